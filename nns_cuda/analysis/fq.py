"""Feature quantity (FQ) of neurons — thesis Chapter 4, SPEC §3.

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

Over a data set :class:`FeatureQuantity` keeps, per neuron, ``FQ = max_i F`` (eq. 4-7), its
arg-max sample, the mean ``F`` and the mean activation, computed **from the fused per-neuron
statistics** of the scan (:mod:`nns_cuda.reference.stats`), so memory is proportional to the
number of neurons, never to neurons × pixels.

Analyses (§4.3, §4.4): Pearson ``r`` (eq. 4-12) per layer, FQ mean / variance per layer, DBSCAN
diversity of the filters of the last convolutional layer with top-/bottom-20 masking
(:class:`FilterDiversity`, Table 4-3), localisation IoU against Grad-CAM and CAM
(:class:`LocalisationIoU`, Table 4-5), and the five ablation variants (:func:`fit_variants`).

Choices made here (beyond SPEC's [decision]s), so that users can see them:

* A sample whose mask covers the whole image has no background, so ``N^n = 0`` and ``F = 0`` for
  every neuron (the literal eq. 4-6); this is reported with :class:`NoBackgroundWarning`.
* ``argmax`` ties go to the first sample; ``F`` may be negative (``l`` and ``s`` can be).
* Masks must be ``torch.bool`` (a float or 0/1 mask is an error, not silently thresholded).
* Filter ranking ties are broken by the lower filter index; the loss is the mean per-sample
  cross-entropy (or ``loss_fn``) and the change is ``100 · (masked − base) / base``.
* Localisation: min-max normalised maps thresholded with ``≥ threshold``; a constant map gives an
  empty mask; samples with an empty box are left out. Grad-CAM and CAM explain the predicted class
  by default (``target="pred"``), Grad-CAM with ReLU (as in its paper), both up-sampled bilinearly
  with Captum's ``LayerAttribution.interpolate``. CAM needs ``features → global average pool →
  Linear`` and is checked numerically; other models skip it with a reason.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from nns_cuda.analysis._toolkit import (
    EmptyForegroundWarning,
    FQWarning,
    NoBackgroundWarning,
    check_eval,
    check_finite,
    check_input,
    check_layers,
    check_mask,
    conv_act_layers,
    iter_batches,
    make_li_fn,
    make_scan,
    model_device,
    output_layer_name,
    pool_layers,
    trace_calls,
    warn_once,
)
from nns_cuda.analysis.masking import mask_filters, resolve_module
from nns_cuda.ops.reference.stats import NUM_STATS, STAT_INDEX

__all__ = [
    "ABLATIONS",
    "FQWarning",
    "EmptyForegroundWarning",
    "NoBackgroundWarning",
    "f_score",
    "f_components",
    "f_from_stats",
    "f_components_from_stats",
    "input_constants",
    "pearson_r",
    "FeatureQuantity",
    "FQLayerResult",
    "FQResult",
    "fit_variants",
    "filter_diversity",
    "rank_filters",
    "mean_loss",
    "FilterDiversity",
    "DiversityResult",
    "saliency_mask",
    "mask_iou",
    "LocalisationIoU",
    "LocalisationResult",
    "findings",
    "THESIS",
    "add_fq_arguments",
    "run_fq",
]

#: Allowed values of ``ablate`` (§4.4.4): ``None`` (full F) or the component replaced by 1.
ABLATIONS = (None, "l", "c", "s", "vf", "nf")
_COMPONENTS = ("l", "c", "s", "vf", "nf")

K_DEFAULT, C1_DEFAULT, C2_DEFAULT, C3_DEFAULT = 1e4, 1e-4, 3e-4, 1.5e-4


# ============================================================================================
# F for one neuron and one sample
# ============================================================================================
def _check_params(K: float, C1: float, C2: float, C3: float, ablate: Optional[str], where: str) -> None:
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
            f"(N_f = 0; empty mask or zero input inside it): F = 0 for them (SPEC §3). Samples: {empty[:5]}",
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
    dict of float64 Tensors [...] : ``l``, ``c``, ``s``, ``vf`` (``N^e/N_f``), ``nf`` (``N^n/N``),
    ``F`` and the bool ``active`` (LI not all zero). Ablated components are returned as ones.
    """
    where = "fq.f_score"
    _check_params(K, C1, C2, C3, ablate, where)
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
    Tensor [...] (float64) — ``F``; 0 for inactive neurons and when ``N_f = 0``.

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
        In :data:`nns_cuda.reference.stats.STAT_NAMES` order, computed with the same ``fg_mask``.
    x : Tensor [D, H, W] or [B, D, H, W]
    fg_mask : bool Tensor [H, W] or [B, H, W]
    constants : optional ``(N, N_f, n_F)`` [B] from :func:`input_constants` (saves recomputing).

    Returns
    -------
    dict of float64 Tensors [...] as :func:`f_components`.

    Notes
    -----
    With ``S_k`` the sums of :mod:`~nns_cuda.reference.stats` and ``|F|`` the number of
    foreground entries: ``μ^e = fg_sum/|F|``, ``μ^fe = fg_xnz_sum/|F|``,
    ``σ^e² = fg_sq_sum/|F| − μ^e²``, ``σ^fe² = fg_xnz_sq_sum/|F| − μ^fe²``,
    ``σ^{fe,e} = fg_x_dot/|F| − μ^fe μ^e`` (``Σ_F I^fe I^e = Σ_F x·LI`` because ``LI = 0`` where
    ``nz = 0``). Computed in float64.
    """
    where = "fq.f_from_stats"
    _check_params(K, C1, C2, C3, ablate, where)
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
    stats : Tensor [..., NUM_STATS] (or [B, ..., NUM_STATS])
    x : Tensor [D, H, W] (or [B, D, H, W])
    fg_mask : bool Tensor [H, W] (or [B, H, W])

    Returns
    -------
    Tensor [...] (float64).
    """
    return f_components_from_stats(stats, x, fg_mask, K=K, C1=C1, C2=C2, C3=C3, ablate=ablate, warn=warn,
                                   constants=constants)["F"]


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation (eq. 4-12) of two equally long vectors; NaN if either is constant."""
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
# Data-set FQ (streaming)
# ============================================================================================
def _tensor_to_list(t: Tensor) -> Any:
    return t.detach().cpu().tolist()


def _finite_or_none(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


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

    @property
    def fq_mean(self) -> float:
        """Mean of ``FQ`` over the layer's neurons (Fig. 4-4a)."""
        return float(self.fq.mean())

    @property
    def fq_var(self) -> float:
        """Population variance of ``FQ`` over the layer's neurons (Fig. 4-4b)."""
        return float(self.fq.var(unbiased=False)) if self.fq.numel() else float("nan")

    @property
    def mean_f_mean(self) -> float:
        """Mean over neurons of the per-neuron mean ``F`` (the thesis's 'direction 1/2' statistic)."""
        return float(self.mean_f.mean())

    @property
    def mean_f_var(self) -> float:
        return float(self.mean_f.var(unbiased=False)) if self.mean_f.numel() else float("nan")

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        """JSON-able summary; ``arrays=True`` adds the per-neuron arrays as nested lists."""
        d = {
            "layer": self.layer,
            "shape": list(self.fq.shape),
            "n_neurons": int(self.fq.numel()),
            "n_samples": self.n_samples,
            "pearson_r": _finite_or_none(self.pearson_r),
            "fq_mean": self.fq_mean,
            "fq_var": self.fq_var,
            "mean_f_mean": self.mean_f_mean,
            "mean_f_var": self.mean_f_var,
            "fq_max": float(self.fq.max()) if self.fq.numel() else None,
        }
        if arrays:
            d.update(fq=_tensor_to_list(self.fq), argmax=_tensor_to_list(self.argmax),
                     mean_f=_tensor_to_list(self.mean_f), mean_activation=_tensor_to_list(self.mean_activation))
        return d


@dataclass
class FQResult:
    """Result of :meth:`FeatureQuantity.fit`: a mapping ``layer -> FQLayerResult``."""

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
        return {
            "params": dict(self.params),
            "n_samples": self.n_samples,
            "n_empty_foreground": len(self.empty_foreground),
            "n_no_background": len(self.no_background),
            "layers": {k: v.to_dict(arrays) for k, v in self.layers.items()},
        }


class _LayerAcc:
    """Running per-neuron max / arg-max / sums (memory ∝ neurons)."""

    def __init__(self) -> None:
        self.max_f: Optional[Tensor] = None
        self.argmax: Optional[Tensor] = None
        self.sum_f: Optional[Tensor] = None
        self.sum_a: Optional[Tensor] = None
        self.n = 0

    def update(self, F: Tensor, act: Tensor, offset: int) -> None:
        bm, bi = F.max(dim=0)  # first maximal index within the batch
        if self.max_f is None:
            self.max_f, self.argmax = bm.clone(), bi + offset
            self.sum_f = F.sum(0)
            self.sum_a = act.double().sum(0)
        else:
            better = bm > self.max_f  # strict: ties keep the earlier sample
            self.max_f = torch.where(better, bm, self.max_f)
            self.argmax = torch.where(better, bi + offset, self.argmax)
            self.sum_f += F.sum(0)
            self.sum_a += act.double().sum(0)
        self.n += F.shape[0]

    def result(self, layer: str) -> FQLayerResult:
        return FQLayerResult(layer, self.max_f.cpu(), self.argmax.cpu(), (self.sum_f / self.n).cpu(),
                             (self.sum_a / self.n).cpu(), self.n)


def _check_scan_output(layer: str, act: Tensor, st: Optional[Tensor], B: int, where: str) -> None:
    if st is None:
        raise ValueError(f"{where}: the scan returned no statistics for layer {layer!r}; scan with stats=True.")
    if act.shape[0] != B or tuple(st.shape) != (*act.shape, NUM_STATS):
        raise ValueError(f"{where}: scan output for {layer!r} has activations {list(act.shape)} and stats "
                         f"{list(st.shape)}; expected [B={B}, *shape] and [B, *shape, {NUM_STATS}].")


def _fit_fq(model: nn.Module, data: Any, layers: Sequence[str] | str, *, variants: Sequence[Optional[str]], K: float,
            C1: float, C2: float, C3: float, batch_size: int, scan_fn, max_samples: Optional[int],
            where: str) -> Dict[Optional[str], FQResult]:
    for v in variants:
        _check_params(K, C1, C2, C3, v, where)
    layers = check_layers(model, layers, where)
    check_eval(model, where)
    dev = model_device(model)
    scan = make_scan(model, layers, scan_fn, stats=True)
    accs = {v: {l: _LayerAcc() for l in layers} for v in variants}
    empty: List[int] = []
    nobg: List[int] = []
    n = 0
    for batch in iter_batches(data, where, batch_size=batch_size, device=dev, need_mask=True, max_samples=max_samples):
        x, m = batch.x, batch.fg_mask
        B = x.shape[0]
        consts = input_constants(x, m)
        empty += (consts[1] == 0).nonzero().flatten().add(batch.offset).tolist()
        nobg += m.flatten(1).all(1).nonzero().flatten().add(batch.offset).tolist()
        res = scan(x, m)
        for l in layers:
            act, st = res[l]
            _check_scan_output(l, act, st, B, where)
            check_finite(f"the scan statistics of {l!r}", st, where)
            for v in variants:
                F = f_from_stats(st, x, m, K=K, C1=C1, C2=C2, C3=C3, ablate=v, warn=False, constants=consts)
                accs[v][l].update(F, act, batch.offset)
        n += B
    warn_once(EmptyForegroundWarning, f"{where}: samples with no active input entry in the foreground "
              "(N_f = 0: empty mask, or zero input inside it) get F = 0 for every neuron (SPEC §3)", len(empty), n, empty)
    warn_once(NoBackgroundWarning, f"{where}: samples whose foreground mask covers the whole image have "
              "N^n = 0, so F = 0 for every neuron (eq. 4-6 used literally)", len(nobg), n, nobg)
    out = {}
    for v in variants:
        params = dict(K=K, C1=C1, C2=C2, C3=C3, ablate=v)
        out[v] = FQResult({l: accs[v][l].result(l) for l in layers}, params, n, empty, nobg)
    return out


class FeatureQuantity:
    """Data-set feature quantity (eq. 4-7) of every neuron of the given layers, streaming.

    Parameters
    ----------
    K, C1, C2, C3 : float
        Constants of eqs. 4-3 … 4-6 (thesis: ``1e4, 1e-4, 3e-4, 1.5e-4``).
    ablate : {None, "l", "c", "s", "vf", "nf"}
        Component of eq. 4-6 replaced by 1 (§4.4.4).
    batch_size : int
        Used only when ``data`` is a map-style ``Dataset`` of single samples.
    scan_fn : callable, optional
        ``scan_fn(model, x, fg_mask, layers) -> {layer: (activations [B, *shape], stats [B, *shape, NUM_STATS])}``.
        Default: the engine's ``Scanner(model, layers, stats=True).scan(x, fg_mask=fg_mask)``.
    max_samples : int, optional
        Stop after this many samples.

    Examples
    --------
    >>> res = FeatureQuantity().fit(model.eval(), loader, ["features.1", "features.4"])
    >>> res["features.4"].fq.shape, res["features.4"].pearson_r
    """

    def __init__(self, K: float = K_DEFAULT, C1: float = C1_DEFAULT, C2: float = C2_DEFAULT, C3: float = C3_DEFAULT,
                 ablate: Optional[str] = None, *, batch_size: int = 64, scan_fn=None,
                 max_samples: Optional[int] = None) -> None:
        _check_params(K, C1, C2, C3, ablate, "FeatureQuantity")
        self.K, self.C1, self.C2, self.C3, self.ablate = K, C1, C2, C3, ablate
        self.batch_size, self.scan_fn, self.max_samples = batch_size, scan_fn, max_samples

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> FQResult:
        """Scan ``data`` once and return per layer ``fq`` (max), ``argmax``, ``mean_f``, ``mean_activation``.

        Parameters
        ----------
        model : nn.Module in eval mode
        data : iterable of ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)`` batches (``y`` may be
            absent), or a map-style ``Dataset`` of such samples.
        layers : str or list of str — qualified module names (``model.named_modules()``).

        Returns
        -------
        FQResult (also stored as ``self.result_``).
        """
        res = _fit_fq(model, data, layers, variants=[self.ablate], K=self.K, C1=self.C1, C2=self.C2, C3=self.C3,
                      batch_size=self.batch_size, scan_fn=self.scan_fn, max_samples=self.max_samples,
                      where="FeatureQuantity.fit")[self.ablate]
        self.result_ = res
        return res


def fit_variants(model: nn.Module, data: Any, layers: Sequence[str] | str,
                 ablations: Sequence[Optional[str]] = ABLATIONS, *, K: float = K_DEFAULT, C1: float = C1_DEFAULT,
                 C2: float = C2_DEFAULT, C3: float = C3_DEFAULT, batch_size: int = 64, scan_fn=None,
                 max_samples: Optional[int] = None) -> Dict[str, FQResult]:
    """FQ for several ablation variants (§4.4.4) from **one** scan of the data.

    Returns
    -------
    dict ``"full" | "l" | "c" | "s" | "vf" | "nf" -> FQResult`` (``"full"`` is ``ablate=None``).
    """
    res = _fit_fq(model, data, layers, variants=list(ablations), K=K, C1=C1, C2=C2, C3=C3, batch_size=batch_size,
                  scan_fn=scan_fn, max_samples=max_samples, where="fq.fit_variants")
    return {("full" if k is None else k): v for k, v in res.items()}


# ============================================================================================
# Filter diversity (DBSCAN) and masking (Table 4-3)
# ============================================================================================
def filter_diversity(fq_values: Any, eps: float = 0.3, min_samples: int = 6) -> np.ndarray:
    """Number of DBSCAN clusters (noise excluded) of each filter's 1-D FQ values.

    Parameters
    ----------
    fq_values : array [C, ...] — per-neuron FQ of a layer, channel first.
    eps, min_samples : DBSCAN parameters (thesis: 0.3 and 6).

    Returns
    -------
    np.ndarray [C] of int.
    """
    from sklearn.cluster import DBSCAN

    v = fq_values.detach().cpu().double().numpy() if isinstance(fq_values, Tensor) else np.asarray(fq_values, np.float64)
    if v.ndim < 1 or v.shape[0] == 0:
        raise ValueError(f"filter_diversity: fq_values must be [C, ...] with C > 0, got shape {list(v.shape)}.")
    if not np.isfinite(v).all():
        raise ValueError("filter_diversity: fq_values contain NaN or Inf.")
    v = v.reshape(v.shape[0], -1)
    out = np.zeros(v.shape[0], dtype=np.int64)
    for k in range(v.shape[0]):
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit(v[k].reshape(-1, 1)).labels_
        out[k] = len(set(labels.tolist()) - {-1})
    return out


def rank_filters(diversity: Any, n: int = 20) -> Tuple[List[int], List[int]]:
    """The ``n`` most and ``n`` least diverse filters; ties broken by the lower filter index.

    Returns
    -------
    (top, bottom) : lists of filter indices, most diverse first / least diverse first.
    """
    d = np.asarray(diversity).ravel()
    idx = np.arange(d.size)
    n = min(int(n), d.size)
    top = np.lexsort((idx, -d))[:n]
    bottom = np.lexsort((idx, d))[:n]
    return top.tolist(), bottom.tolist()


def _default_loss(logits: Tensor, y: Tensor) -> Tensor:
    return TF.cross_entropy(logits, y, reduction="none")


@torch.no_grad()
def mean_loss(model: nn.Module, data: Any, *, loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
              masks: Optional[Mapping[str, Sequence[int]]] = None, batch_size: int = 64,
              max_samples: Optional[int] = None) -> float:
    """Mean per-sample loss of ``model`` on ``data``, optionally with filters masked (SPEC §6).

    Parameters
    ----------
    loss_fn : callable ``(logits [B, C], y [B]) -> per-sample losses [B]``; default cross-entropy.
    masks : ``{layer: [channels]}`` for :func:`nns_cuda.masking.mask_filters`.
    """
    where = "fq.mean_loss"
    check_eval(model, where)
    loss_fn = loss_fn or _default_loss
    dev = model_device(model)
    total, n = 0.0, 0
    ctx = mask_filters(model, masks) if masks else contextlib.nullcontext(model)
    with ctx:
        for b in iter_batches(data, where, batch_size=batch_size, device=dev, need_labels=True, max_samples=max_samples,
                              input_dims=(2, 3, 4, 5)):
            losses = loss_fn(model(b.x), b.y)
            if losses.dim() == 0:
                raise ValueError(f"{where}: loss_fn must return per-sample losses [B] (reduction='none').")
            total += float(losses.double().sum())
            n += b.x.shape[0]
    return total / n


@dataclass
class DiversityResult:
    """Table 4-3 for one layer: diversity per filter and the loss change when masking."""

    layer: str
    n_clusters: np.ndarray
    top: List[int]
    bottom: List[int]
    loss_base: float
    loss_top: float
    loss_bottom: float
    eps: float
    min_samples: int
    neurons_per_filter: int

    @property
    def pct_change_top(self) -> float:
        return 100.0 * (self.loss_top - self.loss_base) / self.loss_base if self.loss_base else float("nan")

    @property
    def pct_change_bottom(self) -> float:
        return 100.0 * (self.loss_bottom - self.loss_base) / self.loss_base if self.loss_base else float("nan")

    @property
    def degenerate(self) -> bool:
        """True when every filter has the same cluster count (the ranking is then by index only)."""
        return bool(np.all(self.n_clusters == self.n_clusters[0]))

    @property
    def overlap(self) -> List[int]:
        """Filters that are in both the top and the bottom set (a layer with < 2·n_mask filters)."""
        return sorted(set(self.top) & set(self.bottom))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layer": self.layer, "eps": self.eps, "min_samples": self.min_samples, "overlap": self.overlap,
            "neurons_per_filter": self.neurons_per_filter,
            "n_clusters": self.n_clusters.tolist(), "top": list(self.top), "bottom": list(self.bottom),
            "loss_base": self.loss_base, "loss_top": self.loss_top, "loss_bottom": self.loss_bottom,
            "pct_change_top": _finite_or_none(self.pct_change_top),
            "pct_change_bottom": _finite_or_none(self.pct_change_bottom),
            "degenerate": self.degenerate,
        }


class FilterDiversity:
    """DBSCAN diversity of a layer's filters and the loss change when masking them (§4.3.3, Table 4-3).

    Parameters
    ----------
    eps, min_samples : DBSCAN parameters (thesis: ``0.3``, ``6``).
    n_mask : number of most / least diverse filters to mask (thesis: 20).
    loss_fn : ``(logits, y) -> per-sample losses``; default cross-entropy.
    """

    def __init__(self, eps: float = 0.3, min_samples: int = 6, n_mask: int = 20, *,
                 loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, batch_size: int = 64,
                 max_samples: Optional[int] = None) -> None:
        self.eps, self.min_samples, self.n_mask = eps, min_samples, n_mask
        self.loss_fn, self.batch_size, self.max_samples = loss_fn, batch_size, max_samples

    def fit(self, model: nn.Module, fq: FQResult | FQLayerResult | Tensor, layer: str, eval_data: Any) -> DiversityResult:
        """Cluster each filter's FQ values, mask the top / bottom ``n_mask`` filters of ``layer``, measure the loss.

        Parameters
        ----------
        fq : FQResult (containing ``layer``), FQLayerResult, or a Tensor [C, ...] of FQ values.
        layer : the layer whose output channels are the filters (masked via :func:`mask_filters`).
        eval_data : iterable of ``(x, y[, fg_mask])`` batches with labels.
        """
        where = "FilterDiversity.fit"
        check_layers(model, [layer], where)
        if isinstance(fq, FQResult):
            fq = fq[layer].fq
        elif isinstance(fq, FQLayerResult):
            fq = fq.fq
        if not isinstance(fq, Tensor) or fq.dim() < 2:
            raise ValueError(f"{where}: FQ values of {layer!r} must be [C, H, W] (a convolutional layer), got "
                             f"{list(getattr(fq, 'shape', []))}.")
        div = filter_diversity(fq, self.eps, self.min_samples)
        top, bottom = rank_filters(div, self.n_mask)
        per = int(fq[0].numel())
        if per < self.min_samples:
            warnings.warn(f"{where}: each filter of {layer!r} has {per} neurons, fewer than min_samples="
                          f"{self.min_samples}: DBSCAN finds no cluster and the ranking is by filter index only.",
                          FQWarning, stacklevel=2)
        if 2 * len(top) > fq.shape[0]:
            warnings.warn(f"{where}: {layer!r} has {fq.shape[0]} filters, fewer than 2 x n_mask = {2 * self.n_mask}: "
                          "the most and least diverse sets overlap.", FQWarning, stacklevel=2)
        kw = dict(loss_fn=self.loss_fn, batch_size=self.batch_size, max_samples=self.max_samples)
        base = mean_loss(model, eval_data, **kw)
        lt = mean_loss(model, eval_data, masks={layer: top}, **kw)
        lb = mean_loss(model, eval_data, masks={layer: bottom}, **kw)
        self.result_ = DiversityResult(layer, div, top, bottom, base, lt, lb, self.eps, self.min_samples, per)
        return self.result_


# ============================================================================================
# Localisation IoU (Table 4-5)
# ============================================================================================
def saliency_mask(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """Min-max normalise each map and threshold it: ``(m − min)/(max − min) ≥ threshold``.

    Parameters
    ----------
    maps : Tensor [B, H, W]

    Returns
    -------
    bool Tensor [B, H, W] (all False for a constant map).
    """
    flat = maps.flatten(1).double()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    rng = hi - lo
    norm = torch.where(rng > 0, (flat - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(flat))
    out = (norm >= threshold) & (rng > 0)
    return out.view_as(maps)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of bool masks ``[B, H, W]`` -> ``[B]`` float64 (1 when both are empty)."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclass
class LocalisationResult:
    """Per-image IoU of each method's thresholded saliency with the box mask (Table 4-5)."""

    iou: Dict[str, List[float]]
    skipped: Dict[str, str]
    threshold: float
    output_layer: str
    gradcam_layer: Optional[str]
    n_samples: int

    def mean(self, method: str) -> float:
        v = self.iou.get(method, [])
        return float(np.mean(v)) if v else float("nan")

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        d = {
            "threshold": self.threshold, "output_layer": self.output_layer, "gradcam_layer": self.gradcam_layer,
            "n_samples": self.n_samples, "mean_iou": {k: _finite_or_none(self.mean(k)) for k in self.iou},
            "skipped": dict(self.skipped),
        }
        if arrays:
            d["iou"] = {k: list(v) for k, v in self.iou.items()}
        return d


def _find_gap(calls) -> Optional[Tuple[nn.Module, nn.Module]]:
    """(pooling module, final Linear) when the model ends ``features → global average pool → Linear``."""
    last = calls[-1].module if calls else None
    if not isinstance(last, nn.Linear):
        return None
    for c in reversed(calls[:-1]):
        if isinstance(c.module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) and len(c.out_shape) == 3:
            if c.out_shape[1:] == (1, 1) and c.out_shape[0] == last.in_features:
                return c.module, last
            return None
        if isinstance(c.module, (nn.Conv2d, nn.Linear, _POOLS_NON_GAP)):
            return None
    return None


_POOLS_NON_GAP = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)


class LocalisationIoU:
    """Localisation IoU of FQ, Grad-CAM and CAM maps against the boxes (§4.4.5, Table 4-5).

    Per image: ``fq`` — the output neuron with the largest ``F``; its channel-summed ``|LI|``;
    ``gradcam`` — Captum's ``LayerGradCam`` (ReLU on) on ``gradcam_layer``, up-sampled bilinearly
    with ``LayerAttribution.interpolate``; ``cam`` — class activation map of a global-average-pool
    model (``Σ_k w_{c,k} A^k``, up-sampled the same way; skipped for other models). Each map is
    min-max normalised and thresholded at ``threshold``; IoU with the foreground mask. Samples
    with an empty mask are left out (:class:`EmptyForegroundWarning`).

    Parameters
    ----------
    threshold : float, default 0.5
    methods : subset of ``("fq", "gradcam", "cam")``
    output_layer : name of the output layer (default: the last leaf module called)
    gradcam_layer : layer for Grad-CAM / CAM features (default: the last conv + activation layer)
    target : ``"pred"`` (predicted class, default) or ``"label"`` — the class Grad-CAM / CAM explain
    K, C1, C2, C3 : constants of ``F``
    scan_fn, li_fn : injected engine functions (see :class:`FeatureQuantity`).
    """

    def __init__(self, threshold: float = 0.5, methods: Sequence[str] = ("fq", "gradcam", "cam"), *,
                 output_layer: Optional[str] = None, gradcam_layer: Optional[str] = None, target: str = "pred",
                 K: float = K_DEFAULT, C1: float = C1_DEFAULT, C2: float = C2_DEFAULT, C3: float = C3_DEFAULT,
                 batch_size: int = 64, scan_fn=None, li_fn=None, max_samples: Optional[int] = None) -> None:
        bad = set(methods) - {"fq", "gradcam", "cam"}
        if bad:
            raise ValueError(f"LocalisationIoU: unknown methods {sorted(bad)}; choose from 'fq', 'gradcam', 'cam'.")
        if target not in ("pred", "label"):
            raise ValueError(f"LocalisationIoU: target must be 'pred' or 'label', got {target!r}.")
        _check_params(K, C1, C2, C3, None, "LocalisationIoU")
        self.threshold, self.methods, self.output_layer, self.gradcam_layer = threshold, tuple(methods), output_layer, gradcam_layer
        self.target, self.K, self.C1, self.C2, self.C3 = target, K, C1, C2, C3
        self.batch_size, self.scan_fn, self.li_fn, self.max_samples = batch_size, scan_fn, li_fn, max_samples

    def fit(self, model: nn.Module, data: Any) -> LocalisationResult:
        """Per-image IoUs over ``data`` (batches ``(x, y, fg_mask)``; ``y`` needed for ``target='label'``)."""
        from captum.attr import LayerAttribution, LayerGradCam

        where = "LocalisationIoU.fit"
        check_eval(model, where)
        dev = model_device(model)
        li_fn = make_li_fn(self.li_fn)
        iou: Dict[str, List[float]] = {m: [] for m in self.methods}
        skipped: Dict[str, str] = {}
        scan = None
        out_layer = gc_layer = None
        gap = None
        empty: List[int] = []
        n = 0
        for b in iter_batches(data, where, batch_size=self.batch_size, device=dev, need_mask=True,
                              need_labels=self.target == "label", max_samples=self.max_samples):
            x, m = b.x, b.fg_mask
            if scan is None:  # first batch: resolve layers from the model's structure
                calls = trace_calls(model, x[:1])
                out_layer = self.output_layer or output_layer_name(calls)
                check_layers(model, [out_layer], where)
                convs = conv_act_layers(calls)
                gc_layer = self.gradcam_layer or (convs[-1] if convs else None)
                if gc_layer is not None:
                    check_layers(model, [gc_layer], where)
                if "fq" in self.methods:
                    scan = make_scan(model, [out_layer], self.scan_fn, stats=True)
                else:
                    scan = False
                if "cam" in self.methods:
                    gap = _find_gap(calls)
                    if gap is None:
                        skipped["cam"] = "not a global-average-pool model (features → GAP → Linear)"
                        iou.pop("cam", None)
                if "gradcam" in self.methods and gc_layer is None:
                    skipped["gradcam"] = "no convolutional layer found; pass gradcam_layer="
                    iou.pop("gradcam", None)
            keep = m.flatten(1).any(1)
            empty += (~keep).nonzero().flatten().add(b.offset).tolist()
            n += x.shape[0]
            if not bool(keep.any()):
                continue
            x, m = x[keep], m[keep]
            y = b.y[keep] if b.y is not None else None
            H, W = x.shape[-2:]
            with torch.no_grad():
                logits = model(x)
            tgt = logits.argmax(1) if self.target == "pred" else y
            if "fq" in iou:
                act, st = scan(x, m)[out_layer]
                _check_scan_output(out_layer, act, st, x.shape[0], where)
                F = f_from_stats(st, x, m, K=self.K, C1=self.C1, C2=self.C2, C3=self.C3, warn=False)
                shape = tuple(act.shape[1:])
                best = F.flatten(1).argmax(1)
                maps = torch.empty(x.shape[0], H, W, dtype=torch.float64, device=x.device)
                for o in best.unique().tolist():
                    sel = (best == o).nonzero().flatten()
                    neuron = tuple(int(v) for v in np.unravel_index(o, shape))
                    li = li_fn(model, x[sel], out_layer, neurons=[neuron])  # [b, 1, D, H, W]
                    maps[sel] = li[:, 0].abs().sum(1).double()
                iou["fq"] += mask_iou(saliency_mask(maps, self.threshold), m).tolist()
            if "gradcam" in iou:
                base = gc_layer.split(":")[0]
                gc = LayerGradCam(model, resolve_module(model, base))
                attr = gc.attribute(x, target=tgt, relu_attributions=True)
                up = LayerAttribution.interpolate(attr.detach(), (H, W), interpolate_mode="bilinear")
                iou["gradcam"] += mask_iou(saliency_mask(up[:, 0], self.threshold), m).tolist()
            if "cam" in iou:
                pool, fc = gap
                feats: Dict[str, Tensor] = {}
                hs = [pool.register_forward_hook(lambda mod, i, o: feats.__setitem__("A", i[0])),
                      fc.register_forward_hook(lambda mod, i, o: feats.__setitem__("z", i[0]))]
                try:
                    with torch.no_grad():
                        model(x)
                finally:
                    for h in hs:
                        h.remove()
                A = feats["A"]
                if not torch.allclose(feats["z"].flatten(1), A.mean((2, 3)), rtol=1e-4, atol=1e-6):
                    # something between the pooling and the classifier (e.g. a BatchNorm1d): no CAM
                    skipped["cam"] = "the classifier's input is not the global average of the last feature maps"
                    iou.pop("cam")
                else:
                    cam = torch.einsum("bk,bkhw->bhw", fc.weight[tgt].to(A.dtype), A).detach()
                    up = LayerAttribution.interpolate(cam.unsqueeze(1), (H, W), interpolate_mode="bilinear")
                    iou["cam"] += mask_iou(saliency_mask(up[:, 0], self.threshold), m).tolist()
        warn_once(EmptyForegroundWarning, f"{where}: samples with an empty foreground mask have no box to "
                  "localise and are left out", len(empty), n, empty)
        self.result_ = LocalisationResult(iou, skipped, self.threshold, out_layer, gc_layer, n)
        return self.result_


# ============================================================================================
# Findings vs the thesis (for the report)
# ============================================================================================
#: The thesis's numbers, as printed (Chapter 3 and 4 tables); ``dataset 1..3`` are ILSVRC-2013 DET,
#: CUB-200-2011 and Pascal VOC 2012 in the order of §4.4.1.
THESIS: Dict[str, Any] = {
    "table_3_3_C_l": {  # feature-map ↔ learned-image correlation, layers 1..5
        "AlexNet": [0.998, 0.872, 0.641, 0.634, 0.623],
        "VGG-16": [0.952, 0.923, 0.688, 0.620, 0.538],
        "trend": "decreasing with depth",
    },
    "table_3_4_top2_iou": {
        "AlexNet": [0.999, 0.953, 0.761, 0.676, 0.615],
        "VGG-16": [0.997, 0.990, 0.873, 0.835, 0.804],
        "trend": "decreasing with depth",
    },
    "fig_4_3_pearson": {
        "claim": "positive in most conv layers; VGG-16 mid/high layers > 0.8; ResNet-18 most mid/high layers >= 0.85",
        "sign": "positive",
    },
    "table_4_3_pct_loss_change": {  # (top-20, bottom-20) per data set 1..3
        "AlexNet": [[108.3, -12.8], [84.9, -8.7], [112.5, 0.03]],
        "VGG-11": [[93.4, -1.9], [90.5, -10.3], [92.8, -2.7]],
        "VGG-16": [[95.2, -0.01], [89.6, 0.01], [88.7, -3.1]],
        "ResNet-18": [[78.2, -2.6], [88.3, -0.4], [82.2, 1.3]],
        "sign": "masking the 20 most diverse filters raises the loss more than masking the 20 least diverse",
    },
    "table_4_4_pct_loss_change": {  # ILSVRC-2013 DET; (top-20, bottom-20) per ablated component
        "AlexNet": {"l": [-32.7, 23.4], "c": [1.4, 3.5], "s": [34.1, -10.4], "vf": [56.8, 58.4], "nf": [56.8, 58.4]},
        "VGG-11": {"l": [-0.18, 67.3], "c": [-19.6, -8.7], "s": [-4.2, -0.12], "vf": [70.6, 65.8], "nf": [70.6, 65.8]},
    },
    "table_4_5_iou": {  # (CAM, Grad-CAM, FQ) per data set 1..3
        "AlexNet": [[0.08, 0.17, 0.32], [0.09, 0.23, 0.46], [0.08, 0.22, 0.34]],
        "VGG-11": [[0.11, 0.24, 0.52], [0.14, 0.19, 0.45], [0.09, 0.21, 0.35]],
        "VGG-16": [[0.17, 0.31, 0.49], [0.16, 0.36, 0.53], [0.07, 0.15, 0.28]],
        "ResNet-18": [[0.19, 0.29, 0.58], [0.21, 0.28, 0.34], [0.12, 0.32, 0.44]],
        "order": "CAM < Grad-CAM < FQ",
    },
}


def _spearman(v: Sequence[float]) -> Optional[float]:
    from scipy.stats import spearmanr

    v = [float(a) for a in v]
    if len(v) < 2 or len(set(v)) < 2:
        return None
    r = spearmanr(np.arange(len(v)), v).statistic
    return _finite_or_none(float(r))


def findings(model: nn.Module, data: Any, *, eval_data: Any = None, fq_layers: Optional[Sequence[str]] = None,
             depth_layers: Optional[Sequence[str]] = None, diversity_layer: Optional[str] = None,
             n_mask: Optional[int] = None, max_samples: Optional[int] = 256, batch_size: int = 64, scan_fn=None, li_fn=None,
             filter_fn=None, localisation: bool = True, top2: bool = True, ablation: bool = True) -> Dict[str, Any]:
    """Run the Chapter 3 / 4 analyses on a (trained) model and put the results next to the thesis's.

    Measured as is — nothing is tuned to match the thesis.

    Parameters
    ----------
    model : nn.Module in eval mode (a classifier).
    data : batches ``(x, y, fg_mask)`` with bounding-box masks.
    eval_data : batches for the loss of the masking experiment (default: ``data``).
    fq_layers : layers for FQ / Pearson (default: every conv + activation layer).
    depth_layers : layers for ``C^l`` by depth (default: the 2-D pooling layers if there are at least
        two, else the conv + activation layers).
    diversity_layer : layer for DBSCAN + masking (default: the last conv + activation layer).
    n_mask : filters masked at each end; default: the thesis's 20 when the layer has at least 80
        filters, else ``max(1, C // 4)`` (20 of a 10-filter layer would mask the same filters twice).
        The choice is recorded in the output.
    max_samples : samples used from ``data`` (and ``eval_data``).
    localisation, top2, ablation : include Table 4-5, Table 3-4, and the §4.4.4 ablations (Fig. 4-5,
        Table 4-4; the five variants come from the same scan).

    Returns
    -------
    dict (JSON-able) with keys ``table_3_3``, ``table_3_4`` (if ``top2``), ``fig_4_3``, ``fig_4_4``, ``fq``,
    ``table_4_3``, ``ablation`` (if ``ablation``) and ``table_4_5`` (if ``localisation``); each holds our numbers, the thesis's, and
    whether the thesis's qualitative claim (trend / sign / order) holds here.
    """
    from nns_cuda.analysis.chapter3 import FeatureMapCorrelation

    where = "fq.findings"
    check_eval(model, where)
    eval_data = data if eval_data is None else eval_data
    first = next(iter(iter_batches(data, where, batch_size=batch_size, device=model_device(model), max_samples=1)))
    calls = trace_calls(model, first.x[:1])
    convs = conv_act_layers(calls)
    if not convs and (fq_layers is None or diversity_layer is None):
        raise ValueError(f"{where}: no conv + activation layer found; pass fq_layers= and diversity_layer=.")
    fq_layers = list(fq_layers) if fq_layers is not None else convs
    pools = pool_layers(calls)
    depth_layers = list(depth_layers) if depth_layers is not None else (pools if len(pools) >= 2 else convs)
    diversity_layer = diversity_layer or convs[-1]
    out: Dict[str, Any] = {"model": type(model).__name__, "max_samples": max_samples}

    # Table 3-3: C^l by depth
    cl = FeatureMapCorrelation(filter_fn=filter_fn, batch_size=batch_size, max_samples=max_samples).fit(model, data, depth_layers)
    vals = [cl[l].value for l in depth_layers]
    rho = _spearman(vals)
    out["table_3_3"] = {
        "layers": depth_layers, "ours_C_l": [_finite_or_none(v) for v in vals], "thesis": THESIS["table_3_3_C_l"],
        "spearman_with_depth": rho,
        "ours_trend": None if rho is None else ("decreasing" if rho < 0 else "increasing" if rho > 0 else "flat"),
        "matches_thesis_trend": None if rho is None else bool(rho < 0),
    }

    # Table 3-4: top-2 neuron IoU by depth
    if top2:
        from nns_cuda.analysis.chapter3 import Top2IoU

        t2 = Top2IoU(li_fn=li_fn, batch_size=batch_size, max_samples=max_samples).fit(model, data, depth_layers)
        tv = [t2[l].value for l in depth_layers]
        rho2 = _spearman(tv)
        out["table_3_4"] = {"layers": depth_layers, "ours_IoU_l": [_finite_or_none(v) for v in tv],
                            "thesis": THESIS["table_3_4_top2_iou"], "spearman_with_depth": rho2,
                            "matches_thesis_trend": None if rho2 is None else bool(rho2 < 0)}

    # Fig. 4-3 / 4-4: FQ, Pearson per layer, FQ mean / variance by depth
    all_layers = list(dict.fromkeys(fq_layers + [diversity_layer]))
    variants = fit_variants(model, data, all_layers, ABLATIONS if ablation else (None,), batch_size=batch_size,
                            scan_fn=scan_fn, max_samples=max_samples)
    fqres = variants["full"]
    rs = {l: _finite_or_none(fqres[l].pearson_r) for l in fq_layers}
    finite = [r for r in rs.values() if r is not None]
    out["fig_4_3"] = {
        "pearson_r": rs, "n_positive": sum(r > 0 for r in finite), "n_layers": len(fq_layers),
        "fraction_positive": (sum(r > 0 for r in finite) / len(finite)) if finite else None,
        "thesis": THESIS["fig_4_3_pearson"],
        "matches_thesis_sign": (sum(r > 0 for r in finite) > len(finite) / 2) if finite else None,
    }
    out["fig_4_4"] = {"layers": fq_layers, "fq_mean": [fqres[l].fq_mean for l in fq_layers],
                      "fq_var": [fqres[l].fq_var for l in fq_layers],
                      "thesis": "mean and variance rise then fall with depth (non-monotone)"}
    out["fq"] = fqres.to_dict()

    # Table 4-3: diversity masking
    with warnings.catch_warnings():
        warnings.simplefilter("always", FQWarning)
        with warnings.catch_warnings(record=True) as rec:
            n_filters = int(fqres[diversity_layer].fq.shape[0])
            if n_mask is None:
                n_mask = 20 if n_filters >= 80 else max(1, n_filters // 4)
            div = FilterDiversity(n_mask=n_mask, batch_size=batch_size, max_samples=max_samples).fit(
                model, fqres, diversity_layer, eval_data)
    d = div.to_dict()
    d["n_mask"] = n_mask
    d["n_filters"] = n_filters
    d["warnings"] = [str(w.message) for w in rec]
    d["thesis"] = THESIS["table_4_3_pct_loss_change"]
    d["matches_thesis_sign"] = (None if div.degenerate else bool(div.pct_change_top > div.pct_change_bottom))
    out["table_4_3"] = d

    # §4.4.4 ablations: Fig. 4-5 (Pearson, mean, variance per variant) and Table 4-4 (masking per variant)
    if ablation:
        abl: Dict[str, Any] = {"thesis_table_4_4": THESIS["table_4_4_pct_loss_change"], "variants": {}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FQWarning)
            for name, res in variants.items():
                dv = FilterDiversity(n_mask=n_mask, batch_size=batch_size, max_samples=max_samples).fit(
                    model, res, diversity_layer, eval_data)
                abl["variants"][name] = {
                    "pearson_r": {l: _finite_or_none(res[l].pearson_r) for l in fq_layers},
                    "fq_mean": [res[l].fq_mean for l in fq_layers], "fq_var": [res[l].fq_var for l in fq_layers],
                    "pct_change_top": _finite_or_none(dv.pct_change_top),
                    "pct_change_bottom": _finite_or_none(dv.pct_change_bottom),
                    "top": dv.top, "bottom": dv.bottom,
                }
        out["ablation"] = abl

    # Table 4-5: localisation IoU
    if localisation:
        loc = LocalisationIoU(batch_size=batch_size, scan_fn=scan_fn, li_fn=li_fn, max_samples=max_samples).fit(model, data)
        ld = loc.to_dict()
        ld["thesis"] = THESIS["table_4_5_iou"]
        means = ld["mean_iou"]
        ld["fq_beats_gradcam"] = (None if means.get("fq") is None or means.get("gradcam") is None
                                  else bool(means["fq"] > means["gradcam"]))
        out["table_4_5"] = ld
    return out


# ============================================================================================
# CLI
# ============================================================================================
def add_fq_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns fq`` options to ``parser``."""
    parser.add_argument("--model", default=None,
                        help="model-zoo name (nns_cuda.models.build); default: the demo's model, trained and cached on first use")
    parser.add_argument("--weights", default=None, help="state-dict file of the trained model (strongly recommended)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--split", default="test", help="split of the embedded cluttered-digits data set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layers", nargs="*", default=None, help="FQ layers (default: every conv + activation layer)")
    parser.add_argument("--ablate", choices=["l", "c", "s", "vf", "nf"], default=None)
    parser.add_argument("--findings", action="store_true", help="run all analyses and compare with the thesis")
    parser.add_argument("--no-localisation", action="store_true")
    parser.add_argument("--arrays", action="store_true", help="include per-neuron arrays in the JSON")
    parser.add_argument("--out", default="nns_output/fq.json", help="JSON output path")
    return parser


def run_fq(args: argparse.Namespace) -> int:
    """Run FQ (or ``--findings``) on a zoo model and the embedded data set; write JSON. Returns an exit code.

    Without ``--weights`` and with the demo's model name, the demo's well-trained checkpoint
    (:func:`nns_cuda.train.default_demo_model`, best validation accuracy; trained and cached on
    first use) is analysed; any other model without weights keeps random weights (with a warning).
    """
    import os

    from torch.utils.data import DataLoader

    from nns_cuda import data as nns_data
    from nns_cuda import models as nns_models

    from nns_cuda import train as nns_train

    name = args.model or nns_train.DEMO_CONFIG["model"]
    source = "weights file"
    if args.weights:
        model = nns_models.load_model(name, weights=args.weights, num_classes=args.num_classes)
    elif name == nns_train.DEMO_CONFIG["model"] and args.num_classes == nns_train.DEMO_CONFIG["num_classes"]:
        demo = nns_train.default_demo_model(progress=False)
        model = nns_models.load_model(demo.name, weights=demo.history.best_checkpoint, num_classes=args.num_classes)
        source = f"demo model, well-trained checkpoint {demo.history.best_checkpoint}"
    else:
        warnings.warn("nns fq: no --weights given; the model has random weights, so the findings describe an "
                      "untrained network.", FQWarning)
        model = nns_models.build(name, num_classes=args.num_classes)
        source = "random weights"
    model.eval()
    ds = nns_data.cluttered_digits(split=args.split, seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    if args.findings:
        result = findings(model, loader, fq_layers=args.layers, max_samples=args.max_samples,
                          batch_size=args.batch_size, localisation=not args.no_localisation)
    else:
        layers = args.layers
        if not layers:
            x0 = next(iter(loader))[0][:1]
            layers = conv_act_layers(trace_calls(model, x0))
        result = FeatureQuantity(ablate=args.ablate, max_samples=args.max_samples).fit(model, loader, layers).to_dict(args.arrays)
    result = {"model": name, "weights": source, "data": f"cluttered_digits(split={args.split!r}, seed={args.seed})",
              "result": result}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"nns fq: wrote {args.out}")
    return 0
