"""Feature quantity ``F`` of a neuron on one sample (eqs. 4-1 … 4-6) and the per-layer FQ results
(eqs. 4-7, 4-12) — docs/spec.md §3.

For a neuron ``n`` with learned image ``LI`` on input ``x`` (``[D, H, W]``) and a foreground mask
``M^f`` (``[H, W]`` bool, broadcast over the ``D`` channels):

* ``N = count(x ≠ 0)``, ``N_f = count(x ≠ 0 inside F)``, ``|F| = D · Σ M^f``;
* ``N^n = Σ_{t∈B} 1[LI(t) ≠ 0]`` (noise), ``N^e = Σ_{t∈F} 1[LI(t) ≠ 0]`` (effective);
* ``I^e = LI`` on ``F``, ``I^fe = x · 1[LI ≠ 0]`` on ``F`` (eqs. 4-1, 4-2); means, population standard
  deviations and the covariance over the ``|F|`` entries of ``F``;
* ``l = 2 μ^fe μ^e / (μ^fe² + μ^e² + C1)``, ``c = 2 σ^fe σ^e / (σ^fe² + σ^e² + C2)``,
  ``s = σ^{fe,e} / (σ^fe σ^e + C3)`` (eqs. 4-3 … 4-5, **literal**: constants only in the denominators);
* ``F = K · (N^n / N) · (N^e / N_f) · l · c · s`` (eq. 4-6), ``F = 0`` when ``N_f = 0`` (a named
  :class:`EmptyForegroundWarning`) or when the neuron is inactive (all-zero ``LI``).

Two independent implementations: :func:`f_components` / :func:`f_score` from dense learned images
(two-pass moments over the foreground), :func:`f_components_from_stats` / :func:`f_from_stats` from
the fused per-neuron statistics of a scan (:mod:`nns_cuda.ops.reference.stats`). The public names
are re-exported by :mod:`nns_cuda.analysis.fq`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from nns_cuda.analysis._toolkit import (
    EmptyForegroundWarning,
    NoBackgroundWarning,
    check_finite,
    check_input,
    check_mask,
    to_jsonable,
)
from nns_cuda.ops.reference.stats import NUM_STATS, STAT_INDEX

__all__ = [
    "ABLATIONS",
    "K_DEFAULT",
    "C1_DEFAULT",
    "C2_DEFAULT",
    "C3_DEFAULT",
    "check_params",
    "input_constants",
    "f_components",
    "f_score",
    "f_components_from_stats",
    "f_from_stats",
    "pearson_r",
    "FQLayerResult",
    "FQResult",
]

#: Allowed values of ``ablate`` (§4.4.4): ``None`` (full F) or the component replaced by 1.
ABLATIONS = (None, "l", "c", "s", "vf", "nf")

#: Thesis values of the constants of eqs. 4-3 … 4-6.
K_DEFAULT, C1_DEFAULT, C2_DEFAULT, C3_DEFAULT = 1e4, 1e-4, 3e-4, 1.5e-4


# ============================================================================================
# F for one neuron and one sample
# ============================================================================================
def check_params(K: float, C1: float, C2: float, C3: float, ablate: Optional[str], where: str) -> None:
    """Validate the constants of eq. 4-6 and the ablated component.

    Parameters
    ----------
    K, C1, C2, C3 : float
        Finite numbers; ``C1, C2, C3 >= 0``.
    ablate : {None, "l", "c", "s", "vf", "nf"}
    where : str
        Prefix of error messages.

    Raises
    ------
    ValueError
        For an unknown ``ablate``, a non-finite constant or a negative stabilising constant.
    """
    if ablate not in ABLATIONS:
        raise ValueError(f"{where}: ablate must be one of {ABLATIONS}, got {ablate!r}.")
    for name, v in (("K", K), ("C1", C1), ("C2", C2), ("C3", C3)):
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{where}: {name} must be a finite number, got {v!r}.")
    for name, v in (("C1", C1), ("C2", C2), ("C3", C3)):
        if v < 0:
            raise ValueError(f"{where}: {name} must be >= 0 (a stabilising constant), got {v}.")


def _div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` with 0 where ``b == 0``."""
    b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    nzb = b != 0
    return torch.where(nzb, a / torch.where(nzb, b, torch.ones_like(b)), torch.zeros_like(a))


def input_constants(x: Tensor, fg_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample constants of eq. 4-6.

    Parameters
    ----------
    x : Tensor [B, D, H, W]
    fg_mask : bool Tensor [B, H, W]

    Returns
    -------
    N, N_f, n_F : float64 Tensors [B]
        ``count(x ≠ 0)``, ``count(x ≠ 0 in F)`` and ``|F| = D · Σ mask``.
    """
    D = x.shape[1]
    nzx = x != 0
    fg = fg_mask.unsqueeze(1)
    N = nzx.flatten(1).sum(1).double()
    Nf = (nzx & fg).flatten(1).sum(1).double()
    nF = (D * fg_mask.flatten(1).sum(1)).double()
    return N, Nf, nF


def _combine(Ne: Tensor, Nn: Tensor, N: Tensor, Nf: Tensor, mu_fe: Tensor, mu_e: Tensor, var_fe: Tensor,
             var_e: Tensor, cov: Tensor, *, K: float, C1: float, C2: float, C3: float,
             ablate: Optional[str]) -> Dict[str, Tensor]:
    """Eqs. 4-3 … 4-6 from the moments; every argument broadcast to ``[B, *n]`` (float64)."""
    sd_fe = var_fe.clamp_min(0).sqrt()
    sd_e = var_e.clamp_min(0).sqrt()
    comps = {
        "l": _div(2 * mu_fe * mu_e, mu_fe * mu_fe + mu_e * mu_e + C1),
        "c": _div(2 * sd_fe * sd_e, sd_fe * sd_fe + sd_e * sd_e + C2),
        "s": _div(cov, sd_fe * sd_e + C3),
        "vf": _div(Ne, Nf.expand_as(Ne)),
        "nf": _div(Nn, N.expand_as(Nn)),
    }
    if ablate is not None:
        comps[ablate] = torch.ones_like(comps[ablate])
    F = K * comps["nf"] * comps["vf"] * comps["l"] * comps["c"] * comps["s"]
    active = (Ne + Nn) > 0
    valid = (Nf > 0).expand_as(F)
    comps["F"] = torch.where(active & valid, F, torch.zeros_like(F))
    comps["active"] = active
    return comps


def _sample_view(t: Tensor, nmid: int) -> Tensor:
    """[B] -> [B, 1, …, 1] with ``nmid`` trailing ones."""
    return t.reshape(t.shape[0], *([1] * nmid))


def _emit_sample_warnings(Nf: Tensor, nF: Tensor, D: int, fg_mask: Tensor, where: str) -> None:
    B = Nf.shape[0]
    empty = (Nf == 0).nonzero().flatten().tolist()
    if empty:
        warnings.warn(
            f"{where}: {len(empty)} of {B} samples have no active input entry in the foreground "
            f"(N_f = 0; empty mask or zero input inside it): F = 0 for them (docs/spec.md §3). Samples: {empty[:5]}",
            EmptyForegroundWarning, stacklevel=3)
    full = fg_mask.flatten(1).all(1).nonzero().flatten().tolist()
    if full:
        warnings.warn(
            f"{where}: {len(full)} of {B} samples have a foreground mask covering the whole image, so "
            f"N^n = 0 and F = 0 for every neuron (eq. 4-6 used literally). Samples: {full[:5]}",
            NoBackgroundWarning, stacklevel=3)


def _prepare_dense(learned_images: Tensor, x: Tensor, fg_mask: Tensor, where: str):
    check_input(x, where, dims=(3, 4))
    batched = x.dim() == 4
    check_mask(fg_mask, x, where, batched=batched)
    if not isinstance(learned_images, Tensor) or not learned_images.is_floating_point():
        raise TypeError(f"{where}: learned_images must be a floating-point tensor.")
    if tuple(learned_images.shape[-3:]) != tuple(x.shape[-3:]) or (batched and (
            learned_images.dim() < 4 or learned_images.shape[0] != x.shape[0])):
        want = "[B, ..., D, H, W]" if batched else "[..., D, H, W]"
        raise ValueError(f"{where}: learned_images must be {want} matching x {list(x.shape)}, got {list(learned_images.shape)}.")
    check_finite("learned_images", learned_images, where)
    if not batched:
        learned_images, x, fg_mask = learned_images.unsqueeze(0), x.unsqueeze(0), fg_mask.unsqueeze(0)
    return learned_images, x, fg_mask.to(x.device), batched


def f_components(learned_images: Tensor, x: Tensor, fg_mask: Tensor, *, K: float = K_DEFAULT, C1: float = C1_DEFAULT,
                 C2: float = C2_DEFAULT, C3: float = C3_DEFAULT, ablate: Optional[str] = None,
                 warn: bool = True) -> Dict[str, Tensor]:
    """The components of eq. 4-6 from dense learned images.

    Parameters
    ----------
    learned_images : Tensor [..., D, H, W]  (or [B, ..., D, H, W] with a batched ``x``)
    x : Tensor [D, H, W]  (or [B, D, H, W])
    fg_mask : bool Tensor [H, W]  (or [B, H, W])
    K, C1, C2, C3 : float
        Constants of eqs. 4-3 … 4-6.
    ablate : {None, "l", "c", "s", "vf", "nf"}
        Component replaced by 1 (§4.4.4).
    warn : bool
        Emit :class:`EmptyForegroundWarning` / :class:`NoBackgroundWarning` for such samples.

    Returns
    -------
    dict of str to Tensor [...] (or [B, ...])
        float64 ``l``, ``c``, ``s``, ``vf`` (``N^e/N_f``), ``nf`` (``N^n/N``), ``F`` and the bool
        ``active`` (LI not all zero). Ablated components are returned as ones.
    """
    where = "fq.f_score"
    check_params(K, C1, C2, C3, ablate, where)
    li, xb, m, batched = _prepare_dense(learned_images, x, fg_mask, where)
    B, D = xb.shape[:2]
    nmid = li.dim() - 4
    li = li.double()
    xd = xb.double()
    N, Nf, nF = input_constants(xb, m)
    if warn:
        _emit_sample_warnings(Nf, nF, D, m, where)
    H, W = m.shape[1:]
    fg = m.reshape(B, *([1] * nmid), 1, H, W).expand(B, *([1] * nmid), D, H, W)
    fgd = fg.double()
    xv = xd.reshape(B, *([1] * nmid), *xd.shape[1:])
    nz = li != 0
    Ne = (nz & fg).flatten(-3).sum(-1).double()
    Nn = (nz & ~fg).flatten(-3).sum(-1).double()
    ie = li * fgd                     # I^e on F, 0 elsewhere
    ife = xv * nz.double() * fgd      # I^fe on F, 0 elsewhere
    nFv = _sample_view(nF, nmid)
    mu_e = _div(ie.flatten(-3).sum(-1), nFv)
    mu_fe = _div(ife.flatten(-3).sum(-1), nFv)
    de = (ie - mu_e[..., None, None, None]) * fgd     # centred, restricted to F (two-pass)
    dfe = (ife - mu_fe[..., None, None, None]) * fgd
    var_e = _div((de * de).flatten(-3).sum(-1), nFv)
    var_fe = _div((dfe * dfe).flatten(-3).sum(-1), nFv)
    cov = _div((de * dfe).flatten(-3).sum(-1), nFv)
    comps = _combine(Ne, Nn, _sample_view(N, nmid), _sample_view(Nf, nmid), mu_fe, mu_e, var_fe, var_e, cov,
                     K=K, C1=C1, C2=C2, C3=C3, ablate=ablate)
    if not batched:
        comps = {k: v[0] for k, v in comps.items()}
    return comps


def f_score(learned_images: Tensor, x: Tensor, fg_mask: Tensor, *, K: float = K_DEFAULT, C1: float = C1_DEFAULT,
            C2: float = C2_DEFAULT, C3: float = C3_DEFAULT, ablate: Optional[str] = None, warn: bool = True) -> Tensor:
    """Feature quantity ``F(I, n)`` of eq. 4-6 for dense learned images.

    Parameters
    ----------
    learned_images : Tensor [..., D, H, W]
        Learned images of any number of neurons for the one input ``x``. A batched call
        (``x [B, D, H, W]``, ``fg_mask [B, H, W]``, ``learned_images [B, ..., D, H, W]``) is accepted too.
    x : Tensor [D, H, W]
        The input sample (finite).
    fg_mask : bool Tensor [H, W]
        Foreground (bounding-box) mask, broadcast over the ``D`` channels.
    K, C1, C2, C3 : float
        ``K = 1e4``, ``C1 = 1e-4``, ``C2 = 3e-4``, ``C3 = 1.5e-4`` by default (thesis values).
    ablate : {None, "l", "c", "s", "vf", "nf"}
        Replace that component by 1 (the ablation variants of §4.4.4).
    warn : bool
        Emit the named warnings for samples with ``N_f = 0`` or without background.

    Returns
    -------
    Tensor [...] (or [B, ...]), float64
        ``F``; 0 for inactive neurons and when ``N_f = 0``.

    Notes
    -----
    Moments are computed two-pass over the foreground entries, independently of the sums that
    :func:`f_from_stats` uses; the two agree to rounding.
    """
    return f_components(learned_images, x, fg_mask, K=K, C1=C1, C2=C2, C3=C3, ablate=ablate, warn=warn)["F"]


def f_components_from_stats(stats: Tensor, x: Tensor, fg_mask: Tensor, *, K: float = K_DEFAULT, C1: float = C1_DEFAULT,
                            C2: float = C2_DEFAULT, C3: float = C3_DEFAULT, ablate: Optional[str] = None,
                            warn: bool = True, constants: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Dict[str, Tensor]:
    """Components of eq. 4-6 from the fused per-neuron statistics.

    Parameters
    ----------
    stats : Tensor [..., NUM_STATS]  (or [B, ..., NUM_STATS] with a batched ``x``)
        In :data:`nns_cuda.ops.reference.stats.STAT_NAMES` order, computed with the same ``fg_mask``.
    x : Tensor [D, H, W] or [B, D, H, W]
    fg_mask : bool Tensor [H, W] or [B, H, W]
    K, C1, C2, C3, ablate, warn
        As :func:`f_components`.
    constants : tuple of three Tensors [B], optional
        ``(N, N_f, n_F)`` from :func:`input_constants` (saves recomputing them).

    Returns
    -------
    dict of str to Tensor [...] (or [B, ...])
        The float64 components as :func:`f_components` returns them.

    Notes
    -----
    With ``S_k`` the sums of :mod:`~nns_cuda.ops.reference.stats` and ``|F|`` the number of
    foreground entries: ``μ^e = fg_sum/|F|``, ``μ^fe = fg_xnz_sum/|F|``,
    ``σ^e² = fg_sq_sum/|F| − μ^e²``, ``σ^fe² = fg_xnz_sq_sum/|F| − μ^fe²``,
    ``σ^{fe,e} = fg_x_dot/|F| − μ^fe μ^e`` (``Σ_F I^fe I^e = Σ_F x·LI`` because ``LI = 0`` where
    ``nz = 0``). Computed in float64.
    """
    where = "fq.f_from_stats"
    check_params(K, C1, C2, C3, ablate, where)
    check_input(x, where, dims=(3, 4))
    batched = x.dim() == 4
    m = check_mask(fg_mask, x, where, batched=batched)
    if not isinstance(stats, Tensor) or not stats.is_floating_point():
        raise TypeError(f"{where}: stats must be a floating-point tensor [..., {NUM_STATS}].")
    if stats.shape[-1] != NUM_STATS or (batched and (stats.dim() < 2 or stats.shape[0] != x.shape[0])):
        want = f"[B, ..., {NUM_STATS}]" if batched else f"[..., {NUM_STATS}]"
        raise ValueError(f"{where}: stats must be {want} (STAT_NAMES order), got {list(stats.shape)}.")
    check_finite("stats", stats, where)
    if not batched:
        stats, x, m = stats.unsqueeze(0), x.unsqueeze(0), m.unsqueeze(0)
    B = x.shape[0]
    nmid = stats.dim() - 2
    N, Nf, nF = input_constants(x, m) if constants is None else constants
    if warn:
        _emit_sample_warnings(Nf, nF, x.shape[1], m, where)
    st = stats.double()
    S = {k: st[..., i] for k, i in STAT_INDEX.items()}
    nFv = _sample_view(nF.to(st.device), nmid)
    mu_e = _div(S["fg_sum"], nFv)
    mu_fe = _div(S["fg_xnz_sum"], nFv)
    var_e = _div(S["fg_sq_sum"], nFv) - mu_e * mu_e
    var_fe = _div(S["fg_xnz_sq_sum"], nFv) - mu_fe * mu_fe
    cov = _div(S["fg_x_dot"], nFv) - mu_fe * mu_e
    comps = _combine(S["nz_fg"], S["nz_bg"], _sample_view(N.to(st.device), nmid), _sample_view(Nf.to(st.device), nmid),
                     mu_fe, mu_e, var_fe, var_e, cov, K=K, C1=C1, C2=C2, C3=C3, ablate=ablate)
    if not batched:
        comps = {k: v[0] for k, v in comps.items()}
    return comps


def f_from_stats(stats: Tensor, x: Tensor, fg_mask: Tensor, *, K: float = K_DEFAULT, C1: float = C1_DEFAULT,
                 C2: float = C2_DEFAULT, C3: float = C3_DEFAULT, ablate: Optional[str] = None, warn: bool = True,
                 constants: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """``F`` of eq. 4-6 from the fused statistics; equals :func:`f_score` on the same images.

    Parameters
    ----------
    stats, x, fg_mask, K, C1, C2, C3, ablate, warn, constants
        As :func:`f_components_from_stats`: ``stats [..., NUM_STATS]``, ``x [D, H, W]``,
        ``fg_mask [H, W]`` (or all with a leading batch dimension ``B``).

    Returns
    -------
    Tensor [...] (or [B, ...]), float64
        ``F``; 0 for inactive neurons and when ``N_f = 0``.
    """
    return f_components_from_stats(stats, x, fg_mask, K=K, C1=C1, C2=C2, C3=C3, ablate=ablate, warn=warn,
                                   constants=constants)["F"]


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation (eq. 4-12) of two equally long vectors.

    Parameters
    ----------
    a, b : array-like [n]
        Flattened to vectors of the same length.

    Returns
    -------
    float
        ``r`` in ``[-1, 1]``; NaN when ``n < 2`` or either vector is constant.

    Raises
    ------
    ValueError
        For vectors of different lengths.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson_r: vectors of different lengths {a.size} and {b.size}.")
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    sa, sb = math.sqrt(float(da @ da)), math.sqrt(float(db @ db))
    if sa == 0 or sb == 0:
        return float("nan")
    return float(np.clip((da @ db) / (sa * sb), -1.0, 1.0))


# ============================================================================================
# FQ of a layer over a data set (eq. 4-7)
# ============================================================================================
def _over_neurons(name: str, var: bool, doc: str) -> property:
    """A read-only property: the mean (or population variance) of the tensor attribute ``name``."""
    def get(self) -> float:
        t = getattr(self, name)
        if var:
            return float(t.var(unbiased=False)) if t.numel() else float("nan")
        return float(t.mean())
    return property(get, doc=doc)


@dataclass
class FQLayerResult:
    """FQ of one layer over a data set.

    Attributes
    ----------
    layer : str
    fq : Tensor [*shape] float64 — ``FQ(n) = max_i F(I^i, n)`` (eq. 4-7).
    argmax : Tensor [*shape] long — data-set index of the first sample reaching the max.
    mean_f : Tensor [*shape] float64 — mean of ``F`` over the samples.
    mean_activation : Tensor [*shape] float64 — mean of the layer output ``a_n`` over the samples.
    n_samples : int
    """

    layer: str
    fq: Tensor
    argmax: Tensor
    mean_f: Tensor
    mean_activation: Tensor
    n_samples: int

    @property
    def pearson_r(self) -> float:
        """Pearson ``r`` between per-neuron mean activation and mean ``F`` (eq. 4-12, Fig. 4-3)."""
        return pearson_r(self.mean_activation.cpu().numpy(), self.mean_f.cpu().numpy())

    fq_mean = _over_neurons("fq", False, "Mean of ``FQ`` over the layer's neurons (Fig. 4-4a).")
    fq_var = _over_neurons("fq", True, "Population variance of ``FQ`` over the layer's neurons (Fig. 4-4b).")
    mean_f_mean = _over_neurons("mean_f", False, "Mean over neurons of the per-neuron mean ``F`` "
                                "(the thesis's 'direction 1/2' statistic).")
    mean_f_var = _over_neurons("mean_f", True, "Population variance over neurons of the per-neuron mean ``F``.")

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        """JSON-safe summary of the layer.

        Parameters
        ----------
        arrays : bool
            Also include the per-neuron arrays ``fq``, ``argmax``, ``mean_f`` and
            ``mean_activation`` as nested lists of shape ``[*shape]``.

        Returns
        -------
        dict
            ``layer``, ``shape``, ``n_neurons``, ``n_samples``, ``pearson_r`` (``None`` when
            undefined), ``fq_mean``, ``fq_var``, ``mean_f_mean``, ``mean_f_var``, ``fq_max``.
        """
        d = {
            "layer": self.layer,
            "shape": list(self.fq.shape),
            "n_neurons": int(self.fq.numel()),
            "n_samples": self.n_samples,
            "pearson_r": to_jsonable(self.pearson_r),
            "fq_mean": self.fq_mean,
            "fq_var": self.fq_var,
            "mean_f_mean": self.mean_f_mean,
            "mean_f_var": self.mean_f_var,
            "fq_max": float(self.fq.max()) if self.fq.numel() else None,
        }
        if arrays:
            d.update({k: getattr(self, k).detach().cpu().tolist() for k in ("fq", "argmax", "mean_f", "mean_activation")})
        return d


@dataclass
class FQResult:
    """FQ of several layers over a data set: a mapping ``layer -> FQLayerResult``.

    The result of :meth:`nns_cuda.analysis.fq.FeatureQuantity.fit` (its ``result_``) and of each
    variant of :func:`nns_cuda.analysis.fq.fit_variants`.

    Attributes
    ----------
    layers : dict of str to FQLayerResult
    params : dict
        ``K``, ``C1``, ``C2``, ``C3`` and ``ablate`` used.
    n_samples : int
    empty_foreground : list of int
        Data-set indices of the samples with ``N_f = 0`` (their ``F`` is 0).
    no_background : list of int
        Data-set indices of the samples whose mask covers the whole image (their ``F`` is 0).
    """

    layers: Dict[str, FQLayerResult]
    params: Dict[str, Any]
    n_samples: int
    empty_foreground: List[int] = field(default_factory=list)
    no_background: List[int] = field(default_factory=list)

    def __getitem__(self, layer: str) -> FQLayerResult:
        return self.layers[layer]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def keys(self):
        return self.layers.keys()

    def items(self):
        return self.layers.items()

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        """JSON-safe summary.

        Parameters
        ----------
        arrays : bool
            Include the per-neuron arrays of every layer (see :meth:`FQLayerResult.to_dict`).

        Returns
        -------
        dict
            ``params``, ``n_samples``, ``n_empty_foreground``, ``n_no_background`` and
            ``layers`` (``{layer: FQLayerResult.to_dict(arrays)}``).
        """
        return {
            "params": dict(self.params),
            "n_samples": self.n_samples,
            "n_empty_foreground": len(self.empty_foreground),
            "n_no_background": len(self.no_background),
            "layers": {k: v.to_dict(arrays) for k, v in self.layers.items()},
        }

