"""TIP — Test with Interpretable Properties (thesis Chapter 5, SPEC §4).

A filter's learned image ``L^k(x)`` (SPEC §1, ``[D, H, W]``, input-sized) is summarised by
*interpretable properties* ``P^k(x)``; their mean over a data set is ``T^k`` (eq. 5-7). Three
analyses explain a model with them:

* **AIPC** (§5.3.1): accuracy drop when the top-ranked filters (by ``T``) are masked, as a
  curve over the mask ratio, and its area (Table 5-1) — :func:`aipc`, :func:`aipc_curves`.
* **Saliency** (§5.3.2): AVoU (eq. 5-8) and SoU (eqs. 5-9, 5-10) per filter and their Spearman
  rank correlation with each ``T`` (Table 5-2) — :func:`avou`, :func:`sou`,
  :func:`spearman_table`, :func:`saliency`.
* **Foreground / background filter types** (§5.3.3, eq. 5-11): ``T_f``, ``T_b`` on the
  foreground / background entries; types H-H, H-noH, noH-H, L-L, L-noL, noL-L, their share and
  the accuracy change when each type is masked, per checkpoint (Tables 5-3 … 5-6) —
  :func:`filter_types`, :func:`fg_bg_types`.

Properties form a registry: built-ins ``mean`` (``P_m``), ``variance`` (``P_v``),
``covariance`` (``P_c``) and ``correlation`` (``P_cor``); add one with
:func:`register_property`. Every property maps ``(L [B, C, D, H, W], x [B, D, H, W],
mask [B, H, W] bool | None)`` to ``[B, C]``.

Decisions (SPEC §4 and this module)
-----------------------------------
* Statistics run over all ``D·H·W`` entries of ``L`` and ``x`` (the thesis writes ``M×M``);
  variance and covariance are population moments; the correlation is 0 when ``σ_L`` or ``σ_x``
  is 0 (``σ ≤ 64·eps·|μ|`` counts as 0: a constant image's computed σ is rounding noise).
* With a mask, a property is computed over the masked entries only (the ``[H, W]`` mask is
  broadcast over the ``D`` channels). A sample whose region is empty has no value there: in
  :meth:`InterpretableProperties.fit` it is left out of that region's mean, counted in
  ``n_samples_`` / ``n_empty_`` and warned about; :func:`properties` raises for it.
* AIPC masks the top ``⌈rK⌉`` filters; ``y(r)`` is the accuracy drop in percentage points from
  ``r = 0``; ties in ``T`` are broken by the lower filter index. The area is the trapezoid of
  ``y`` over ``r`` in percent on ``[0, r_max]`` (the curve is interpolated linearly at ``r_max``
  when ``r_max`` is not a measured ratio); units are pp·%.
* High / low filters: the top / bottom ``⌈per/100 · K⌉`` filters of ``T_f`` and of ``T_b``
  (stable order: ties go to the lower index for both "high" and "low").
* SoU counts the filter's weights (``weight[k]`` of the conv producing the channel), not its
  bias: eq. 5-10's ``W`` is the number of connections. Default loss: per-sample cross-entropy.
* "Accuracy change" in the type tables is ``acc(unmasked) − acc(masked)`` in percentage points
  (positive = the accuracy drops), as in Table 5-3.

Layers are addressed by module names (``model.named_modules()``); a module called several
times per forward is addressed per call as ``name:i`` (SPEC §0).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nns_cuda.analysis import _tip_eval as _ev
from nns_cuda.analysis.masking import resolve_module

__all__ = [
    "PropertyFn",
    "BUILTIN_PROPERTIES",
    "PropertyNotFoundError",
    "register_property",
    "unregister_property",
    "get_property",
    "list_properties",
    "properties",
    "InterpretableProperties",
    "AIPCResult",
    "aipc",
    "aipc_curves",
    "DEFAULT_RATIOS",
    "avou",
    "sou",
    "spearman_table",
    "SaliencyResult",
    "saliency",
    "FILTER_TYPES",
    "filter_types",
    "FgBgTypesResult",
    "fg_bg_types",
    "load_checkpoint",
    "THESIS_REFERENCE",
    "findings",
    "add_tip_arguments",
    "run_tip",
]

PropertyFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
FilterImagesFn = Callable[[nn.Module, torch.Tensor, str], torch.Tensor]


class PropertyNotFoundError(KeyError):
    """An unknown property name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ============================================================================================
# 1. properties
# ============================================================================================
def _zero_sigma(sigma: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """σ that is rounding noise of a constant image (or exactly 0) -> True."""
    eps = torch.finfo(sigma.dtype).eps
    return sigma <= 64 * eps * mu.abs()


def _moments(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Mean, population variance, covariance with ``x`` and correlation of every ``L[b, c]``.

    Corrected two-pass formulas (centre, then subtract the centred mean's square) so that a
    constant image gives a variance at rounding level. One temporary the size of ``L``.

    Parameters
    ----------
    L : Tensor [B, C, D, H, W]
    x : Tensor [B, D, H, W]
    mask : bool Tensor [B, H, W] or None

    Returns
    -------
    dict with ``mean``, ``variance``, ``covariance``, ``correlation``: Tensor [B, C] each.
    """
    B, C = L.shape[:2]
    N = L[0, 0].numel()
    Lf = L.reshape(B, C, N)
    xf = x.reshape(B, N).to(L.dtype)
    if mask is None:
        n = torch.full((B,), float(N), dtype=L.dtype, device=L.device)
        w = None
    else:
        w = mask.unsqueeze(1).expand(x.shape).reshape(B, N).to(L.dtype)  # [B, N]
        n = w.sum(1)
    # input moments (small)
    xw = xf if w is None else xf * w
    mux0 = xw.sum(1) / n
    xc = xf - mux0[:, None]
    if w is not None:
        xc = xc * w
    mux = mux0 + xc.sum(1) / n
    varx = (xc.square().sum(1) - xc.sum(1).square() / n).clamp_min(0) / n  # [B]
    # filter-image moments
    if w is None:
        muL0 = Lf.sum(2) / n[:, None]
    else:
        muL0 = torch.bmm(Lf, w.unsqueeze(2)).squeeze(2) / n[:, None]
    Lc = Lf - muL0.unsqueeze(2)  # the one temporary
    if w is not None:
        Lc.mul_(w.unsqueeze(1))
    # one pass for both Σ_t Lc·xc and s1 = Σ_t Lc (= Σ w (L − μ0), rounding-level)
    ones = torch.ones_like(xc) if w is None else w
    both = torch.bmm(Lc, torch.stack([xc, ones], 2))  # [B, C, 2]
    s1 = both[..., 1]
    mu = muL0 + s1 / n[:, None]
    var = (torch.linalg.vector_norm(Lc, dim=2).square() - s1.square() / n[:, None]).clamp_min(0) / n[:, None]
    # Σ_t (L − μ)(x − μx) = Σ_t Lc · xc − s1 · Σ xc / n  (xc already masked)
    cov = (both[..., 0] - s1 * xc.sum(1, keepdim=True) / n[:, None]) / n[:, None]
    del Lc
    sdL, sdx = var.sqrt(), varx.sqrt()
    zero = _zero_sigma(sdL, mu) | _zero_sigma(sdx, mux)[:, None]
    den = torch.where(zero, torch.ones_like(sdL), sdL * sdx[:, None])
    cor = torch.where(zero, torch.zeros_like(cov), (cov / den).clamp(-1.0, 1.0))
    return {"mean": mu, "variance": var, "covariance": cov, "correlation": cor}


def property_mean(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``P_m`` (eq. 5-3): mean of ``L`` over its (masked) entries. [B, C, D, H, W] -> [B, C]."""
    return _moments(L, x, mask)["mean"]


def property_variance(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``P_v`` (eq. 5-4): population variance of ``L`` over its (masked) entries -> [B, C]."""
    return _moments(L, x, mask)["variance"]


def property_covariance(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``P_c`` (eq. 5-5): population covariance of ``L`` and ``x`` over the (masked) entries -> [B, C]."""
    return _moments(L, x, mask)["covariance"]


def property_correlation(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``P_cor`` (eq. 5-6 with its ``1/n``): Pearson correlation of ``L`` and ``x`` -> [B, C]; 0 when
    a standard deviation is 0."""
    return _moments(L, x, mask)["correlation"]


BUILTIN_PROPERTIES: Dict[str, PropertyFn] = {
    "mean": property_mean,
    "variance": property_variance,
    "covariance": property_covariance,
    "correlation": property_correlation,
}
#: Thesis symbols of the built-ins (for reports).
SYMBOLS = {"mean": "T_m", "variance": "T_v", "covariance": "T_c", "correlation": "T_cor"}

_REGISTRY: Dict[str, PropertyFn] = dict(BUILTIN_PROPERTIES)


def register_property(name: str, fn: PropertyFn, overwrite: bool = False) -> None:
    """Add an interpretable property to the registry.

    Parameters
    ----------
    name : str
        Registry key (non-empty).
    fn : callable ``fn(L, x, mask) -> Tensor [B, C]``
        ``L`` filter images ``[B, C, D, H, W]``, ``x`` inputs ``[B, D, H, W]``, ``mask`` a bool
        ``[B, H, W]`` region (broadcast over ``D``) or ``None`` for all entries. It must compute
        one value per (sample, filter) from that sample only (the common tests check this).
    overwrite : bool
        Replace an existing property of that name (built-ins included).

    Raises
    ------
    ValueError if ``name`` is taken and ``overwrite`` is False; TypeError for a bad name / fn.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_property: name must be a non-empty str, got {name!r}.")
    if not callable(fn):
        raise TypeError(f"register_property: fn for {name!r} must be callable fn(L, x, mask) -> [B, C].")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_property: a property named {name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[name] = fn


def unregister_property(name: str) -> None:
    """Remove a property (a removed built-in can be registered again from :data:`BUILTIN_PROPERTIES`)."""
    get_property(name)
    del _REGISTRY[name]


def list_properties() -> List[str]:
    """Names of the registered properties, in registration order."""
    return list(_REGISTRY)


def get_property(name: str) -> PropertyFn:
    """The function registered as ``name``.

    Raises
    ------
    PropertyNotFoundError (a KeyError) listing the registered names.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PropertyNotFoundError(
            f"unknown interpretable property {name!r}; registered: {list(_REGISTRY)}. "
            "Add one with tip.register_property(name, fn)."
        ) from None


def _names(names: Union[None, str, Sequence[str]]) -> List[str]:
    if names is None:
        return list(_REGISTRY)
    if isinstance(names, str):
        names = [names]
    out = list(dict.fromkeys(names))
    if not out:
        raise ValueError("properties: names is empty; pass None for all registered properties.")
    for n in out:
        get_property(n)
    return out


def _check_inputs(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], where: str) -> None:
    if not isinstance(L, torch.Tensor) or L.dim() != 5:
        raise ValueError(f"{where}: filter_images must be a Tensor [B, C, D, H, W], got "
                         f"{list(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__}.")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{where}: x must be a Tensor [B, D, H, W], got "
                         f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if L.shape[0] != x.shape[0] or L.shape[2:] != x.shape[1:]:
        raise ValueError(f"{where}: filter_images {list(L.shape)} do not match x {list(x.shape)}: expected "
                         f"[B, C, D, H, W] = [{x.shape[0]}, C, {', '.join(map(str, x.shape[1:]))}].")
    if not L.is_floating_point():
        raise TypeError(f"{where}: filter_images must be floating point, got {L.dtype}.")
    # one cheap reduction screens for NaN / Inf (a NaN or Inf entry makes the sum non-finite)
    if not bool(torch.isfinite(L.sum())) or not bool(torch.isfinite(x).all()):
        which = "x" if not bool(torch.isfinite(x).all()) else "filter_images"
        extra = "" if which == "x" or not bool(torch.isfinite(L).all()) else " (values too large to sum)"
        raise ValueError(f"{where}: {which} contains NaN or Inf{extra}.")
    _ev.check_mask(mask, x, where)
    if mask is not None:
        empty = (~mask.flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"{where}: the mask selects no entry for sample(s) {empty[:10]}"
                             f"{' …' if len(empty) > 10 else ''}; a property needs a non-empty region.")


def properties(filter_images: torch.Tensor, x: torch.Tensor, names: Union[None, str, Sequence[str]] = None,
               mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Interpretable properties ``P^k(x)`` of every filter image.

    Parameters
    ----------
    filter_images : Tensor [B, C, D, H, W]
        ``L^k(x)`` for ``C`` filters and ``B`` samples (SPEC §1).
    x : Tensor [B, D, H, W]
        The inputs.
    names : None, str or sequence of str
        Registered property names; ``None``: all registered.
    mask : bool Tensor [B, H, W] or None
        Region (e.g. the foreground); the properties use the masked entries only, the mask being
        broadcast over ``D``. Every sample's region must be non-empty.

    Returns
    -------
    dict name -> Tensor [B, C] (dtype of ``filter_images``).

    Raises
    ------
    PropertyNotFoundError for an unknown name; ValueError for bad shapes, NaN / Inf, an empty
    region, or a property that returns the wrong shape or non-finite values (naming it).
    """
    names = _names(names)
    _check_inputs(filter_images, x, mask, "tip.properties")
    B, C = filter_images.shape[:2]
    out: Dict[str, torch.Tensor] = {}
    fused: Optional[Dict[str, torch.Tensor]] = None
    for n in names:
        fn = _REGISTRY[n]
        if n in BUILTIN_PROPERTIES and fn is BUILTIN_PROPERTIES[n]:
            if fused is None:  # one pass for all built-ins
                fused = _moments(filter_images, x, mask)
            v = fused[n]
        else:
            v = fn(filter_images, x, mask)
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (B, C):
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"tip.properties: property {n!r} returned {got}, expected [B, C] = [{B}, {C}] "
                             "(one value per sample and filter).")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"tip.properties: property {n!r} returned NaN or Inf.")
        out[n] = v
    return out


# ============================================================================================
# 2. T over a data set
# ============================================================================================
_REGIONS = ("all", "foreground", "background")


def _default_filter_images(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    try:
        from nns_cuda.engine.scanner import filter_images  # lazy: the engine imports heavier machinery
    except ImportError as e:  # pragma: no cover - depends on the checkout
        raise ImportError(f"tip: nns_cuda.engine.filter_images is not available ({e}); pass filter_images_fn="
                          "fn(model, x, layer) -> [B, C, D, H, W].") from e
    return filter_images(model, x, layer)


def _region_list(region: Union[str, Sequence[str]]) -> List[str]:
    regs = [region] if isinstance(region, str) else list(region)
    if not regs:
        raise ValueError(f"InterpretableProperties: region is empty; choose from {list(_REGIONS)}.")
    for r in regs:
        if r not in _REGIONS:
            raise ValueError(f"InterpretableProperties: unknown region {r!r}; choose from {list(_REGIONS)} "
                             "(or a list of them).")
    return list(dict.fromkeys(regs))


class InterpretableProperties:
    """``T^k = mean_x P^k(x)`` (eq. 5-7) for chosen layers, streamed over a data set.

    Parameters
    ----------
    names : None, str or sequence of str
        Properties (``None``: all registered at construction time).
    region : "all", "foreground", "background" or a sequence of them
        Entries the properties run over: all ``D·H·W`` entries (``T``), the foreground box only
        (``T_f``) or the background only (``T_b``). Foreground / background need ``fg_mask`` in
        the data batches.
    filter_images_fn : callable ``(model, x, layer) -> [B, C, D, H, W]``, optional
        Source of the filter learned images; default :func:`nns_cuda.engine.filter_images`.

    Attributes (after :meth:`fit`)
    ------------------------------
    T_ : dict layer -> region -> name -> Tensor [C] (float64, CPU)
    n_samples_ : dict layer -> region -> int — samples averaged (non-empty region)
    n_empty_ : dict layer -> region -> int — samples left out because their region was empty
    channels_ : dict layer -> int

    Examples
    --------
    >>> ip = InterpretableProperties(region=["all", "foreground", "background"]).fit(model, data, ["features.9"])
    >>> ip.T("features.9", "mean", "foreground")   # Tensor [C]
    """

    def __init__(self, names: Union[None, str, Sequence[str]] = None,
                 region: Union[str, Sequence[str]] = "all", *,
                 filter_images_fn: Optional[FilterImagesFn] = None) -> None:
        self.names = _names(names)
        self.region = _region_list(region)
        self.filter_images_fn = filter_images_fn

    def fit(self, model: nn.Module, data: Iterable, layers: Union[str, Sequence[str]], *,
            filter_images_fn: Optional[FilterImagesFn] = None) -> "InterpretableProperties":
        """Stream over ``data`` and accumulate ``T`` per layer, region and property.

        Parameters
        ----------
        model : nn.Module (run in eval mode; its modes are restored)
        data : iterable of batches ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)``; ``(x, y)``
            or ``x`` suffice for ``region="all"``.
        layers : layer name or list of names (``model.named_modules()``; ``name:i`` per call)
        filter_images_fn : overrides the constructor's.

        Returns
        -------
        self
        """
        fi = filter_images_fn or self.filter_images_fn or _default_filter_images
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            raise ValueError("InterpretableProperties.fit: layers is empty.")
        for l in layers:
            resolve_module(model, _ev.split_call(l)[0])
        dev = _ev.model_device(model)
        sums: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
        counts = {l: {r: 0 for r in self.region} for l in layers}
        empty = {l: {r: 0 for r in self.region} for l in layers}
        channels: Dict[str, int] = {}
        seen = 0
        with _ev.eval_mode(model):
            for batch in data:
                x, _, fg = _ev.unpack_batch(batch, "InterpretableProperties.fit")
                x = x.to(dev)
                if fg is not None:
                    fg = _ev.check_mask(fg, x, "InterpretableProperties.fit").to(dev)
                elif any(r != "all" for r in self.region):
                    raise ValueError("InterpretableProperties.fit: region foreground/background needs fg_mask; "
                                     "data batches must be (x, y, fg_mask [B, H, W] bool).")
                if seen == 0:  # every layer must have channels (SPEC §4: filters are channels)
                    for l in layers:
                        _ev.probe_layer(model, x[:2], l, "InterpretableProperties.fit")
                seen += x.shape[0]
                for l in layers:
                    L = fi(model, x, l)
                    if not isinstance(L, torch.Tensor) or L.dim() != 5:
                        raise ValueError(f"InterpretableProperties.fit: filter_images_fn returned "
                                         f"{list(L.shape) if isinstance(L, torch.Tensor) else type(L).__name__} "
                                         f"for layer {l!r}; expected [B, C, D, H, W].")
                    L = L.detach()
                    C = L.shape[1]
                    if channels.setdefault(l, C) != C:
                        raise ValueError(f"InterpretableProperties.fit: layer {l!r} gave {C} filters, earlier {channels[l]}.")
                    for r in self.region:
                        if r == "all":
                            m, sel = None, None
                        else:
                            m = fg if r == "foreground" else ~fg
                            nonempty = m.flatten(1).any(1)
                            if not bool(nonempty.all()):
                                empty[l][r] += int((~nonempty).sum())
                                sel = nonempty.nonzero().flatten()
                                if sel.numel() == 0:
                                    continue
                            else:
                                sel = None
                        if sel is not None:
                            P = properties(L[sel], x[sel], self.names, m[sel])
                        else:
                            P = properties(L, x, self.names, m)
                        n_b = L.shape[0] if sel is None else int(sel.numel())
                        counts[l][r] += n_b
                        acc = sums.setdefault(l, {}).setdefault(r, {})
                        for n, v in P.items():
                            s = v.detach().to(torch.float64).sum(0).cpu()
                            acc[n] = acc[n] + s if n in acc else s
                    del L
        if seen == 0:
            raise ValueError("InterpretableProperties.fit: data has no samples.")
        self.T_ = {}
        for l in layers:
            self.T_[l] = {}
            for r in self.region:
                if counts[l][r] == 0:
                    raise ValueError(f"InterpretableProperties.fit: the {r} region is empty in every sample "
                                     f"(layer {l!r}); no {r} property can be computed.")
                self.T_[l][r] = {n: sums[l][r][n] / counts[l][r] for n in self.names}
        for l in layers:
            for r in self.region:
                if empty[l][r]:
                    warnings.warn(f"InterpretableProperties.fit: {empty[l][r]} sample(s) have an empty {r} region "
                                  f"and are left out of T_{r[0]} (layer {l!r}); see n_empty_.", RuntimeWarning,
                                  stacklevel=2)
                    break
        self.n_samples_ = counts
        self.n_empty_ = empty
        self.channels_ = channels
        return self

    def T(self, layer: str, name: str = "mean", region: Optional[str] = None) -> torch.Tensor:
        """``T`` of one layer, property and region (default: the first fitted region) -> Tensor [C]."""
        self._check_fitted()
        if layer not in self.T_:
            raise KeyError(f"InterpretableProperties.T: layer {layer!r} was not fitted; fitted: {list(self.T_)}.")
        region = region or self.region[0]
        if region not in self.T_[layer]:
            raise KeyError(f"InterpretableProperties.T: region {region!r} was not fitted; fitted: {self.region}.")
        if name not in self.T_[layer][region]:
            raise PropertyNotFoundError(f"InterpretableProperties.T: property {name!r} was not fitted; fitted: {self.names}.")
        return self.T_[layer][region][name]

    def _check_fitted(self) -> None:
        if not hasattr(self, "T_"):
            raise RuntimeError("InterpretableProperties: call fit(model, data, layers) first.")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable summary: names, regions, ``T`` as lists, sample counts."""
        self._check_fitted()
        return _jsonable({
            "names": self.names,
            "regions": self.region,
            "T": {l: {r: {n: v.tolist() for n, v in d.items()} for r, d in rs.items()} for l, rs in self.T_.items()},
            "n_samples": self.n_samples_,
            "n_empty": self.n_empty_,
            "channels": self.channels_,
        })


# ============================================================================================
# 3. AIPC
# ============================================================================================
#: 0, 1, 2, …, 100 % as fractions.
DEFAULT_RATIOS: Tuple[float, ...] = tuple(i / 100 for i in range(101))


def _check_ratios(ratios: Optional[Sequence[float]]) -> List[float]:
    if ratios is None:
        return list(DEFAULT_RATIOS)
    r = np.asarray(ratios.detach().cpu() if isinstance(ratios, torch.Tensor) else ratios, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"aipc: ratios must be a non-empty 1-D sequence of fractions in [0, 1], got shape {list(r.shape)}.")
    bad = [float(v) for v in r if not (np.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        hint = " Ratios are fractions: 50 % is 0.5." if any(np.isfinite(v) and 1 < v <= 100 for v in bad) else ""
        raise ValueError(f"aipc: mask ratios must lie in [0, 1]; got {bad[:5]}.{hint}")
    return sorted(set(r.tolist()))


def _order_desc(scores: torch.Tensor) -> List[int]:
    """Indices by descending score, ties by the lower index."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-s, kind="stable").tolist()


def _trapezoid_area(r_pct: Sequence[float], y: Sequence[float], r_max_pct: float) -> Optional[float]:
    """∫_0^{r_max} y dr by trapezoids through (0, 0) and the measured points, y interpolated at r_max."""
    pts = dict(zip(r_pct, y))
    pts.setdefault(0.0, 0.0)
    xs = sorted(pts)
    if xs[-1] < r_max_pct - 1e-9:
        return None
    ys = [pts[v] for v in xs]
    area, i = 0.0, 0
    while i + 1 < len(xs) and xs[i] < r_max_pct:
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        if x1 > r_max_pct:  # interpolate at r_max
            y1 = y0 + (y1 - y0) * (r_max_pct - x0) / (x1 - x0)
            x1 = r_max_pct
        area += 0.5 * (y0 + y1) * (x1 - x0)
        i += 1
    return area


@dataclass
class AIPCResult:
    """Accuracy–interpretable-property curve of one layer and one ranking (§5.3.1).

    Attributes
    ----------
    layer : str
    ratios : list of float — mask ratios ``r`` (fractions, ascending)
    n_masked : list of int — ``⌈rK⌉``
    accuracy : list of float — accuracy (%) at each ratio
    drop : list of float — ``y(r)`` = ``acc(0) − acc(r)`` in percentage points
    base_accuracy : float — accuracy (%) with nothing masked
    area : float — trapezoid area of ``y`` over ``r`` in percent on ``[0, max(ratios)]`` (pp·%)
    area_top10 : float or None — the same on ``[0, 10 %]`` (Table 5-1); None if ratios stop earlier
    order : list of int — filters by descending ranking score (ties: lower index first)
    channels : int — ``K``
    name : str — the ranking's name (property) if known
    """

    layer: str
    ratios: List[float]
    n_masked: List[int]
    accuracy: List[float]
    drop: List[float]
    base_accuracy: float
    area: float
    area_top10: Optional[float]
    order: List[int]
    channels: int
    name: str = ""

    def area_up_to(self, r_max: float) -> Optional[float]:
        """Trapezoid area (pp·%) of the curve on ``[0, r_max]`` (``r_max`` a fraction)."""
        return _trapezoid_area([100 * r for r in self.ratios], self.drop, 100 * float(r_max))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict."""
        return _jsonable(asdict(self))


def aipc_curves(model: nn.Module, data: Iterable, layer: str,
                rankings: Mapping[str, Union[torch.Tensor, Sequence[float]]],
                ratios: Optional[Sequence[float]] = None, *, vectorize: bool = True) -> Dict[str, AIPCResult]:
    """AIPC for several rankings of the same layer, sharing every identical masked evaluation.

    Parameters
    ----------
    model : nn.Module — a classifier returning logits ``[B, classes]``
    data : re-iterable of ``(x, y[, fg_mask])`` batches (a list or a DataLoader)
    layer : str — module name whose output channels are the filters
    rankings : mapping name -> scores Tensor [K] (e.g. ``{"mean": T_m, …}``); filters are masked
        in descending score order
    ratios : fractions in ``[0, 1]`` (default ``0, 0.01, …, 1``)
    vectorize : evaluate several masks per forward pass by replicating the layer's output

    Returns
    -------
    dict name -> :class:`AIPCResult`
    """
    ratios = _check_ratios(ratios)
    _ev.check_reiterable(data, "aipc")
    x0 = _first_x(data, "aipc", model)
    info = _ev.probe_layer(model, x0, layer, "aipc")
    K = info.channels
    orders = {}
    for name, sc in rankings.items():
        s = torch.as_tensor(sc.detach().cpu() if isinstance(sc, torch.Tensor) else sc, dtype=torch.float64).flatten()
        if s.numel() != K:
            raise ValueError(f"aipc: ranking {name!r} has {s.numel()} scores but layer {layer!r} has {K} filters.")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"aipc: ranking {name!r} contains NaN or Inf.")
        orders[name] = _order_desc(s)
    ev = _ev.MaskedAccuracy(model, data, layer, K, vectorize=vectorize, where="aipc")
    n_masked = [_ev.n_top(r, K) for r in ratios]
    all_masks = [()] + [tuple(o[:n]) for o in orders.values() for n in n_masked]
    ev(all_masks)  # one evaluation run for all distinct masks
    base = ev([()])[0]
    out = {}
    for name, o in orders.items():
        acc = ev([tuple(o[:n]) for n in n_masked])
        drop = [base - a for a in acc]
        rp = [100 * r for r in ratios]
        out[name] = AIPCResult(layer=layer, ratios=ratios, n_masked=n_masked, accuracy=acc, drop=drop,
                               base_accuracy=base, area=_trapezoid_area(rp, drop, rp[-1]) if rp[-1] > 0 else 0.0,
                               area_top10=_trapezoid_area(rp, drop, 10.0), order=o, channels=K, name=name)
    return out


def aipc(model: nn.Module, data: Iterable, layer: str, ranking: Union[torch.Tensor, Sequence[float]],
         ratios: Optional[Sequence[float]] = None, *, vectorize: bool = True) -> AIPCResult:
    """Accuracy–interpretable-property curve (AIPC, §5.3.1) of one layer.

    Filters are ranked by ``ranking`` (descending; ties by the lower index); for each mask ratio
    ``r`` the top ``⌈rK⌉`` output channels of ``layer`` are zeroed (SPEC §6) and the accuracy
    is measured. ``y(r)`` is the accuracy drop in percentage points from ``r = 0``.

    Parameters
    ----------
    model : nn.Module — classifier returning logits ``[B, classes]`` (run in eval mode)
    data : re-iterable of ``(x [B, D, H, W], y [B][, fg_mask])`` batches
    layer : str — module name; its output ``[B, K, ...]`` has the filters as channels
    ranking : Tensor [K] — scores, e.g. ``T^k`` of one property
    ratios : sequence of fractions in ``[0, 1]`` (default ``0, 0.01, …, 1``)
    vectorize : replicate the layer output to evaluate many masks per forward pass (falls back
        to one pass per mask when the model cannot run on a replicated batch)

    Returns
    -------
    :class:`AIPCResult` — ratios, accuracy drop (pp), area (full range and ``[0, 10 %]``).

    Raises
    ------
    ValueError for ratios outside [0, 1], a ranking of the wrong length, or a layer without
    channels; KeyError for an unknown layer.
    """
    return aipc_curves(model, data, layer, {"ranking": ranking}, ratios, vectorize=vectorize)["ranking"]


def _first_x(data: Iterable, where: str, model: nn.Module) -> torch.Tensor:
    for batch in data:
        x, _, _ = _ev.unpack_batch(batch, where)
        if x.shape[0] == 0:
            continue
        return x[:2].to(_ev.model_device(model))
    raise ValueError(f"{where}: data has no samples.")


# ============================================================================================
# 4. saliency
# ============================================================================================
def avou(model: nn.Module, data: Iterable, layer: str) -> torch.Tensor:
    """Average value of unit (AVoU, eq. 5-8): mean of ``a^k`` over positions and samples.

    Parameters
    ----------
    model : nn.Module
    data : iterable of ``(x, ...)`` batches
    layer : str — module (``name`` or ``name:i``) whose output ``[B, K, *spatial]`` holds ``a^k``

    Returns
    -------
    Tensor [K] (float64, CPU)
    """
    _ev.check_reiterable(data, "avou")
    x0 = _first_x(data, "avou", model)
    K = _ev.probe_layer(model, x0, layer, "avou").channels
    dev = _ev.model_device(model)
    total = torch.zeros(K, dtype=torch.float64)
    n = [0]

    def grab(out: torch.Tensor) -> None:
        total.add_(out.detach().flatten(2).to(torch.float64).mean(2).sum(0).cpu())
        n[0] += out.shape[0]

    with torch.no_grad(), _ev.eval_mode(model), _ev.layer_hook(model, layer, grab):
        for batch in data:
            x, _, _ = _ev.unpack_batch(batch, "avou")
            model(x.to(dev))
    return total / n[0]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def _weight_param(model: nn.Module, layer: str, weight_layer: Optional[str], x0: torch.Tensor,
                  where: str) -> Tuple[str, str, int]:
    """(weight module name, qualified parameter name, K) of the filters of ``layer``."""
    info = _ev.probe_layer(model, x0, layer, where, record_order=True)
    K = info.channels

    def ok(mod: nn.Module) -> bool:
        w = getattr(mod, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() >= 2 and w.shape[0] == K

    if weight_layer is not None:
        mod = resolve_module(model, weight_layer)
        if not ok(mod):
            w = getattr(mod, "weight", None)
            raise ValueError(f"{where}: weight_layer {weight_layer!r} must have a weight [K={K}, ...] (one row per "
                             f"filter of {layer!r}), got {list(w.shape) if isinstance(w, torch.Tensor) else None}.")
        name = weight_layer
    else:
        mods = dict(model.named_modules())
        name = None
        for n in reversed(info.call_order[: info.layer_pos + 1]):
            if ok(mods[n]):
                name = n
                break
        if name is None:
            raise ValueError(f"{where}: found no conv / linear module with weight [{K}, ...] at or before layer "
                             f"{layer!r}; pass weight_layer= (the module whose weight[k] is filter k).")
    w = resolve_module(model, name).weight
    pname = next((n for n, p in model.named_parameters() if p is w), None)
    if pname is None:
        raise ValueError(f"{where}: the weight of {name!r} is not a registered parameter of the model.")
    return name, pname, K


def sou(model: nn.Module, data: Iterable, layer: str, method: str = "taylor", *,
        weight_layer: Optional[str] = None, loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        chunk_size: int = 64) -> torch.Tensor:
    """Sensitivity of unit (SoU, eqs. 5-9, 5-10): mean over samples and over the filter's weights
    ``w`` of ``|loss(θ) − loss(θ with w = 0)|``.

    Parameters
    ----------
    model : nn.Module — classifier returning logits ``[B, classes]`` (run in eval mode)
    data : iterable of ``(x, y[, fg_mask])`` batches
    layer : str — layer whose output channels are the filters
    method : "taylor" (default) or "exact"
        ``exact`` zeroes each weight in turn (``K · |w_k|`` forward passes per batch, vectorised
        with ``torch.func.vmap`` over ``chunk_size`` perturbed weight tensors); ``taylor`` uses
        the first-order estimate ``|w · ∂loss_i/∂w|`` per sample ``i`` (SNIP). Per-sample
        gradients: for ``Conv2d`` (groups 1, zero padding) and ``Linear`` weights, from one
        forward / backward per chunk (``grad_out ⊗ unfold(input)``; needs samples that do not
        interact, i.e. eval mode); otherwise ``torch.func.vmap(grad)`` over single samples.
    weight_layer : str, optional
        Module whose ``weight[k]`` is filter ``k`` (default: ``layer`` itself if it has one, else
        the last module before it in the forward pass with a weight ``[K, ...]``).
    loss_fn : ``(logits [B, classes], y [B]) -> [B]`` per-sample loss (default cross-entropy)
    chunk_size : perturbed weights (exact) or samples (taylor) per vectorised call

    Returns
    -------
    Tensor [K] (float64, CPU)
    """
    if method not in ("taylor", "exact"):
        raise ValueError(f"sou: method must be 'taylor' or 'exact', got {method!r}.")
    if chunk_size < 1:
        raise ValueError(f"sou: chunk_size must be >= 1, got {chunk_size}.")
    from torch.func import functional_call, grad, vmap

    loss_fn = loss_fn or _ce
    _ev.check_reiterable(data, "sou")
    x0 = _first_x(data, "sou", model)
    wname, pname, K = _weight_param(model, layer, weight_layer, x0, "sou")
    W = dict(model.named_parameters())[pname].detach()
    per = W[0].numel()
    dev = _ev.model_device(model)
    total = torch.zeros(K, per if method == "exact" else 1, dtype=torch.float64)
    S = 0
    with _ev.eval_mode(model):
        for batch in data:
            x, y, _ = _ev.unpack_batch(batch, "sou")
            if y is None:
                raise ValueError("sou: the loss needs labels; batches must be (x, y[, fg_mask]).")
            x, y = x.to(dev), torch.as_tensor(y).to(dev)
            B = x.shape[0]
            S += B
            if method == "exact":
                with torch.no_grad():
                    base = loss_fn(model(x), y)
                    if base.shape != (B,):
                        raise ValueError(f"sou: loss_fn must return per-sample losses [B] = [{B}], got {list(base.shape)}.")

                    def f(wp: torch.Tensor) -> torch.Tensor:
                        return loss_fn(functional_call(model, {pname: wp}, (x,)), y)

                    flat = W.reshape(-1)
                    for s in range(0, flat.numel(), chunk_size):
                        idx = torch.arange(s, min(s + chunk_size, flat.numel()), device=W.device)
                        Wp = flat.unsqueeze(0).repeat(idx.numel(), 1)
                        Wp[torch.arange(idx.numel(), device=W.device), idx] = 0
                        Wp = Wp.view((idx.numel(),) + tuple(W.shape))
                        try:
                            losses = vmap(f)(Wp)  # [P, B]
                        except Exception:  # noqa: BLE001 - vmap-unsupported op: plain loop, same values
                            losses = torch.stack([f(w) for w in Wp])
                        d = (losses - base.unsqueeze(0)).abs().sum(1).to(torch.float64).cpu()
                        total.view(-1)[idx.cpu()] += d
            else:
                wmod = resolve_module(model, wname)
                fast = _unfold_grads_ok(wmod)
                # bound the per-sample gradient block [b, K, per] to ~2^26 entries
                step = max(1, min(chunk_size, (1 << 26) // max(1, K * per)))

                def loss1(w: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                    return loss_fn(functional_call(model, {pname: w}, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

                for s in range(0, B, step):
                    xs, ys = x[s:s + step], y[s:s + step]
                    if fast:
                        g = _per_sample_weight_grads(model, wmod, xs, ys, loss_fn)  # [b, K, per]
                    else:
                        with torch.no_grad():  # torch.func.grad still differentiates; no outer graph
                            try:
                                g = vmap(grad(loss1), in_dims=(None, 0, 0))(W, xs, ys)  # [b, *W.shape]
                            except Exception:  # noqa: BLE001 - per-sample loop, same values
                                g = torch.stack([grad(loss1)(W, xi, yi) for xi, yi in zip(xs, ys)])
                    t = (W.reshape(1, K, per) * g.reshape(g.shape[0], K, per)).abs_()
                    total[:, 0] += t.mean(2).to(torch.float64).sum(0).cpu()
                    del g, t
    if S == 0:
        raise ValueError("sou: data has no samples.")
    if method == "taylor":
        return total[:, 0] / S
    return total.sum(1) / (per * S)


def _unfold_grads_ok(mod: nn.Module) -> bool:
    """Per-sample weight gradients from (input, grad_output) are exact for these modules."""
    if type(mod) is nn.Linear:
        return True
    return (type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str))


def _per_sample_weight_grads(model: nn.Module, mod: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``∂loss_i/∂W`` for every sample ``i`` of ``x`` ([b, K, per]) from one forward / backward.

    For a conv, ``∂loss_i/∂W[k] = Σ_p grad_out_i[k, p] · unfold(input_i)[:, p]`` (a linear layer:
    the outer product), summed over the module's calls. Samples must not interact (eval mode),
    so ``∂(Σ_j loss_j)/∂out_i = ∂loss_i/∂out_i``. Uses ``torch.autograd.grad`` w.r.t. the
    module outputs only: no ``.grad`` is written.
    """
    caps: List[Tuple[torch.Tensor, torch.Tensor]] = []
    h = mod.register_forward_hook(lambda m, i, o: caps.append((i[0].detach(), o)) and None)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x.detach().requires_grad_(True)), y)
            if loss.shape != (x.shape[0],):
                raise ValueError(f"sou: loss_fn must return per-sample losses [B] = [{x.shape[0]}], got {list(loss.shape)}.")
            gouts = torch.autograd.grad(loss.sum(), [o for _, o in caps], allow_unused=True)
    finally:
        h.remove()
    K = mod.weight.shape[0]
    g = torch.zeros((x.shape[0], K, mod.weight[0].numel()), dtype=mod.weight.dtype, device=mod.weight.device)
    for (inp, _), go in zip(caps, gouts):
        if go is None:
            continue
        if isinstance(mod, nn.Conv2d):
            cols = torch.nn.functional.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
            g += torch.bmm(go.flatten(2), cols.transpose(1, 2))  # [b, K, P] @ [b, P, Cin·kh·kw]
        else:  # Linear on [b, ..., in]
            g += torch.bmm(go.reshape(go.shape[0], -1, K).transpose(1, 2), inp.reshape(inp.shape[0], -1, inp.shape[-1]))
    return g


def spearman_table(saliencies: Mapping[str, Union[torch.Tensor, Sequence[float]]],
                   props: Mapping[str, Union[torch.Tensor, Sequence[float]]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Spearman ρ (eq. 5-12, :func:`scipy.stats.spearmanr`) between each saliency and each ``T``.

    Parameters
    ----------
    saliencies : mapping name -> Tensor [K] (e.g. ``{"AVoU": …, "SoU": …}``)
    props : mapping name -> Tensor [K] (e.g. ``{"mean": T_m, …}``)

    Returns
    -------
    dict saliency -> property -> ρ (None when undefined, e.g. a constant vector)
    """
    from scipy.stats import spearmanr

    out: Dict[str, Dict[str, Optional[float]]] = {}
    for sn, s in saliencies.items():
        a = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64).ravel()
        out[sn] = {}
        for pn, p in props.items():
            b = np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float64).ravel()
            if a.size != b.size:
                raise ValueError(f"spearman_table: {sn!r} has {a.size} filters, {pn!r} has {b.size}.")
            if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
                out[sn][pn] = None
                continue
            rho = float(spearmanr(a, b).statistic)
            out[sn][pn] = rho if math.isfinite(rho) else None
    return out


@dataclass
class SaliencyResult:
    """AVoU, SoU and their Spearman table with the properties (Table 5-2).

    Attributes
    ----------
    layer : str
    avou : list of float [K]
    sou : list of float [K]
    sou_method : str
    spearman : dict saliency ("AVoU", "SoU") -> property -> ρ
    """

    layer: str
    avou: List[float]
    sou: List[float]
    sou_method: str
    spearman: Dict[str, Dict[str, Optional[float]]]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict."""
        return _jsonable(asdict(self))


def saliency(model: nn.Module, data: Iterable, layer: str, T: Mapping[str, torch.Tensor], *,
             sou_method: str = "taylor", weight_layer: Optional[str] = None, **sou_kwargs: Any) -> SaliencyResult:
    """AVoU, SoU and the Spearman table against the properties ``T`` (§5.3.2, Table 5-2).

    Parameters
    ----------
    model, data, layer : as in :func:`sou`
    T : mapping property name -> Tensor [K]
    sou_method : "taylor" or "exact"
    weight_layer, sou_kwargs : passed to :func:`sou`

    Returns
    -------
    :class:`SaliencyResult`
    """
    _ev.check_reiterable(data, "saliency")
    a = avou(model, data, layer)
    s = sou(model, data, layer, sou_method, weight_layer=weight_layer, **sou_kwargs)
    return SaliencyResult(layer, a.tolist(), s.tolist(), sou_method, spearman_table({"AVoU": a, "SoU": s}, T))


# ============================================================================================
# 5. foreground / background filter types
# ============================================================================================
FILTER_TYPES = ("H-H", "H-noH", "noH-H", "L-L", "L-noL", "noL-L")


def filter_types(T_f: Union[torch.Tensor, Sequence[float]], T_b: Union[torch.Tensor, Sequence[float]],
                 per: float = 30.0) -> Dict[str, List[int]]:
    """Foreground / background filter types (§5.3.3, eq. 5-11).

    High = the top ``⌈per/100 · K⌉`` filters by ``T`` (descending), low = the bottom as many
    (ascending); ties go to the lower filter index in both orders.

    Parameters
    ----------
    T_f, T_b : Tensor [K] — a property on the foreground / background entries
    per : float in (0, 100] — percentage defining high / low (default 30)

    Returns
    -------
    dict type -> sorted filter indices, types H-H (high fg and high bg), H-noH (high fg, not high
    bg), noH-H, L-L, L-noL, noL-L (:data:`FILTER_TYPES`).
    """
    f = np.asarray(T_f.detach().cpu() if isinstance(T_f, torch.Tensor) else T_f, dtype=np.float64).ravel()
    b = np.asarray(T_b.detach().cpu() if isinstance(T_b, torch.Tensor) else T_b, dtype=np.float64).ravel()
    if f.size != b.size or f.size == 0:
        raise ValueError(f"filter_types: T_f and T_b must be [K] with the same K > 0, got {f.size} and {b.size}.")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(b))):
        raise ValueError("filter_types: T_f / T_b contain NaN or Inf.")
    if not (0 < float(per) <= 100):
        raise ValueError(f"filter_types: per is a percentage in (0, 100], got {per}.")
    K = f.size
    n = _ev.n_top(float(per) / 100.0, K)
    hf, hb = set(np.argsort(-f, kind="stable")[:n].tolist()), set(np.argsort(-b, kind="stable")[:n].tolist())
    lf, lb = set(np.argsort(f, kind="stable")[:n].tolist()), set(np.argsort(b, kind="stable")[:n].tolist())
    sets = {"H-H": hf & hb, "H-noH": hf - hb, "noH-H": hb - hf, "L-L": lf & lb, "L-noL": lf - lb, "noL-L": lb - lf}
    return {k: sorted(int(i) for i in sets[k]) for k in FILTER_TYPES}


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint and check it against ``model`` without loading it.

    Parameters
    ----------
    checkpoint : path to a ``torch.save``'d state dict (or a dict with a ``state_dict`` / ``model``
        entry), or such a dict itself

    Returns
    -------
    the state dict

    Raises
    ------
    ValueError naming the first key that is missing, unexpected or of another shape.
    """
    src = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"load_checkpoint: no file {os.fspath(checkpoint)!r}.")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"load_checkpoint: a checkpoint must be a state dict, got {type(checkpoint).__name__}.")
    if not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    want = model.state_dict()
    label = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "checkpoint"
    for k, v in want.items():
        if k not in checkpoint:
            raise ValueError(f"load_checkpoint: {label} does not match the model: key {k!r} is missing.")
        c = checkpoint[k]
        if not isinstance(c, torch.Tensor) or c.shape != v.shape:
            got = list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"load_checkpoint: {label} does not match the model: key {k!r} has shape {got}, "
                             f"the model expects {list(v.shape)}.")
    for k in checkpoint:
        if k not in want:
            raise ValueError(f"load_checkpoint: {label} does not match the model: unexpected key {k!r}.")
    return dict(checkpoint)


@dataclass
class FgBgTypesResult:
    """Filter types per checkpoint (Tables 5-3 … 5-6).

    Attributes
    ----------
    layer : str
    property : str — the property ``T`` (e.g. "mean" for ``T_m``)
    per : float
    checkpoints : list of str — labels
    types : list (per checkpoint) of dict type -> filter indices
    share : list of dict type -> ``|type| / K``
    accuracy_drop : list of dict type -> ``acc(unmasked) − acc(type masked)`` (pp)
    base_accuracy : list of float (%)
    T_f, T_b : list of list of float [K]
    channels : int
    """

    layer: str
    property: str
    per: float
    checkpoints: List[str]
    types: List[Dict[str, List[int]]]
    share: List[Dict[str, float]]
    accuracy_drop: List[Dict[str, float]]
    base_accuracy: List[float]
    T_f: List[List[float]]
    T_b: List[List[float]]
    channels: int

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable dict."""
        return _jsonable(asdict(self))


def fg_bg_types(model: nn.Module, data: Iterable, layer: str,
                checkpoints: Union[None, Sequence[Any], Mapping[str, Any]] = None, *,
                property: str = "mean", per: float = 30.0, filter_images_fn: Optional[FilterImagesFn] = None,
                vectorize: bool = True) -> FgBgTypesResult:
    """Foreground / background filter types, their share and the accuracy change when each type
    is masked, for each checkpoint (§5.3.3, Tables 5-3 … 5-6).

    Parameters
    ----------
    model : nn.Module — its own weights are restored afterwards
    data : re-iterable of ``(x, y, fg_mask [B, H, W] bool)`` batches
    layer : str
    checkpoints : None (the model's current weights), a sequence of state-dict paths / dicts, or
        a mapping label -> path / dict (e.g. ``{"phase1": …, "phase2": …}``)
    property : registered property name (default "mean", the thesis's ``T_m``)
    per : percentage of high / low filters (default 30)
    filter_images_fn : ``(model, x, layer) -> [B, C, D, H, W]`` (default the engine)

    Returns
    -------
    :class:`FgBgTypesResult`
    """
    get_property(property)
    if not (0 < float(per) <= 100):
        raise ValueError(f"fg_bg_types: per is a percentage in (0, 100], got {per}.")
    _ev.check_reiterable(data, "fg_bg_types")
    if checkpoints is None:
        items: List[Tuple[str, Any]] = [("current", None)]
    elif isinstance(checkpoints, Mapping):
        items = [(str(k), v) for k, v in checkpoints.items()]
    elif isinstance(checkpoints, (str, os.PathLike)):
        items = [(os.fspath(checkpoints), checkpoints)]
    else:
        items = [(os.fspath(c) if isinstance(c, (str, os.PathLike)) else f"checkpoint{i}", c)
                 for i, c in enumerate(checkpoints)]
    if not items:
        raise ValueError("fg_bg_types: checkpoints is empty; pass None to use the model's current weights.")
    states = [(lab, None if c is None else load_checkpoint(model, c)) for lab, c in items]  # check all first
    x0 = _first_x(data, "fg_bg_types", model)
    K = _ev.probe_layer(model, x0, layer, "fg_bg_types").channels
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = FgBgTypesResult(layer, property, float(per), [], [], [], [], [], [], [], K)
    try:
        for lab, sd in states:
            if sd is not None:
                model.load_state_dict(sd, strict=True)
            ip = InterpretableProperties(property, ["foreground", "background"], filter_images_fn=filter_images_fn)
            ip.fit(model, data, layer)
            tf, tb = ip.T(layer, property, "foreground"), ip.T(layer, property, "background")
            types = filter_types(tf, tb, per)
            ev = _ev.MaskedAccuracy(model, data, layer, K, vectorize=vectorize, where="fg_bg_types")
            accs = ev([()] + [tuple(types[t]) for t in FILTER_TYPES])
            res.checkpoints.append(lab)
            res.types.append(types)
            res.share.append({t: len(types[t]) / K for t in FILTER_TYPES})
            res.accuracy_drop.append({t: accs[0] - a for t, a in zip(FILTER_TYPES, accs[1:])})
            res.base_accuracy.append(accs[0])
            res.T_f.append(tf.tolist())
            res.T_b.append(tb.tolist())
    finally:
        with torch.no_grad():
            model.load_state_dict(original, strict=True)
    return res


# ============================================================================================
# 6. findings and CLI
# ============================================================================================
#: Numbers printed in the thesis (Chapter 5), for side-by-side reports. Datasets 1, 2, 3 =
#: ILSVRC-2013 DET, CUB-200-2011, Pascal VOC 2012 (input 32×32, last conv layer).
THESIS_REFERENCE: Dict[str, Any] = {
    "table_5_1_aipc_area_top10": {  # model -> property -> [dataset1, dataset2, dataset3]
        "AlexNet": {"mean": [41.20, 31.51, 18.46], "variance": [41.40, 26.05, 22.31],
                    "covariance": [52.40, 36.72, 36.92], "correlation": [24.40, 28.26, 24.61]},
        "VGG-11": {"mean": [40.60, 35.67, 25.38], "variance": [19.40, 32.94, 17.70],
                   "covariance": [7.40, 11.20, 8.46], "correlation": [10.20, 12.24, 4.62]},
        "VGG-16": {"mean": [55.20, 52.61, 56.15], "variance": [53.00, 52.34, 66.15],
                   "covariance": [36.40, 21.23, 17.69], "correlation": [29.40, 14.32, 15.38]},
    },
    "table_5_2_spearman": {  # saliency -> model -> property -> [dataset1, dataset2, dataset3]
        "AVoU": {
            "AlexNet": {"mean": [0.99, 1.00, 0.99], "variance": [0.97, 1.00, 0.95],
                        "covariance": [-0.46, -0.09, 0.22], "correlation": [-0.50, -0.51, 0.06]},
            "VGG-11": {"mean": [0.99, 1.00, 1.00], "variance": [0.98, 0.98, 0.99],
                       "covariance": [-0.40, -0.16, -0.54], "correlation": [-0.32, -0.12, -0.43]},
            "VGG-16": {"mean": [0.98, 0.98, 0.97], "variance": [0.84, 0.88, 0.83],
                       "covariance": [-0.54, -0.47, -0.42], "correlation": [-0.37, -0.32, -0.22]},
        },
        "SoU": {
            "AlexNet": {"mean": [0.74, 0.92, 0.75], "variance": [0.77, 0.92, 0.79],
                        "covariance": [-0.21, -0.09, 0.18], "correlation": [-0.26, -0.49, 0.10]},
            "VGG-11": {"mean": [0.83, 0.77, 0.83], "variance": [0.84, 0.78, 0.83],
                       "covariance": [-0.29, -0.23, -0.42], "correlation": [-0.22, -0.22, -0.33]},
            "VGG-16": {"mean": [0.57, 0.58, 0.57], "variance": [0.56, 0.61, 0.47],
                       "covariance": [-0.29, -0.23, -0.18], "correlation": [-0.16, -0.14, -0.06]},
        },
    },
    "table_5_3": {  # VGG-16 on CUB-200-2011, T_m, per = 30; phases 1, 2, 3
        "share": {"H-H": [0.28, 0.28, 0.28], "H-noH": [0.03, 0.03, 0.03], "noH-H": [0.03, 0.03, 0.03],
                  "L-L": [0.29, 0.29, 0.29], "L-noL": [0.02, 0.02, 0.02], "noL-L": [0.02, 0.02, 0.02]},
        "accuracy_change": {"H-H": [17.4, 22.00, 26.00], "H-noH": [0.40, 0.40, 0.80], "noH-H": [1.60, 1.40, 1.80],
                            "L-L": [0.00, 0.40, 0.00], "L-noL": [0.20, 0.20, 0.80], "noL-L": [0.00, 0.20, 0.00]},
    },
}


def findings(model: nn.Module, data: Iterable, layer: str, checkpoints: Union[None, Sequence[Any], Mapping[str, Any]] = None,
             *, filter_images_fn: Optional[FilterImagesFn] = None, per: float = 30.0, sou_method: str = "taylor",
             weight_layer: Optional[str] = None) -> Dict[str, Any]:
    """Measured Chapter-5 findings next to the thesis's numbers (JSON-able; nothing is tuned).

    Computes on ``layer``: ``T`` of the four built-ins (all entries), AVoU and SoU and their
    Spearman ρ with each ``T`` (thesis Table 5-2: AVoU–T_m ≈ 0.97–1.00), and the fg/bg types
    by ``T_m`` with the accuracy cost of masking H-H versus L-L filters per checkpoint (thesis
    Table 5-3: H-H 17.4–26.0 pp, L-L 0.0–0.4 pp).

    Parameters
    ----------
    model : nn.Module (weights restored afterwards)
    data : re-iterable of ``(x, y, fg_mask)`` batches
    layer : str (the thesis uses the last conv layer's activation)
    checkpoints : as in :func:`fg_bg_types` (None: current weights); the Spearman part uses the
        model's current weights
    filter_images_fn, per, sou_method, weight_layer : see :func:`fg_bg_types` / :func:`sou`

    Returns
    -------
    dict with ``measured`` (``spearman``, ``hh_vs_ll``), ``thesis`` (reference numbers) and
    ``details`` (``T``, saliency, per-checkpoint types).
    """
    names = list(BUILTIN_PROPERTIES)
    ip = InterpretableProperties(names, "all", filter_images_fn=filter_images_fn).fit(model, data, layer)
    T = {n: ip.T(layer, n, "all") for n in names}
    sal = saliency(model, data, layer, T, sou_method=sou_method, weight_layer=weight_layer)
    types = fg_bg_types(model, data, layer, checkpoints, property="mean", per=per, filter_images_fn=filter_images_fn)
    return _findings_dict(layer, {n: v.tolist() for n, v in T.items()}, sal, types)


def _findings_dict(layer: str, T: Mapping[str, List[float]], sal: SaliencyResult, types: FgBgTypesResult) -> Dict[str, Any]:
    hh_ll = [{"checkpoint": c, "H-H": d["H-H"], "L-L": d["L-L"], "share_H-H": s["H-H"], "share_L-L": s["L-L"],
              "base_accuracy": b}
             for c, d, s, b in zip(types.checkpoints, types.accuracy_drop, types.share, types.base_accuracy)]
    ref = THESIS_REFERENCE
    return _jsonable({
        "layer": layer,
        "measured": {
            "spearman_AVoU_T_m": sal.spearman["AVoU"].get("mean"),
            "spearman_SoU_T_m": sal.spearman["SoU"].get("mean"),
            "spearman": sal.spearman,
            "sou_method": sal.sou_method,
            "accuracy_drop_masking_HH_vs_LL": hh_ll,
            "types_property": types.property,
            "per": types.per,
        },
        "thesis": {
            "spearman_AVoU_T_m": {m: v["mean"] for m, v in ref["table_5_2_spearman"]["AVoU"].items()},
            "spearman_SoU_T_m": {m: v["mean"] for m, v in ref["table_5_2_spearman"]["SoU"].items()},
            "table_5_3_accuracy_change": {t: ref["table_5_3"]["accuracy_change"][t] for t in ("H-H", "L-L")},
            "table_5_3_share": {t: ref["table_5_3"]["share"][t] for t in ("H-H", "L-L")},
            "note": "Table 5-2: datasets 1-3 per model; Table 5-3: VGG-16 on CUB-200-2011, phases 1-3, T_m, per 30 %.",
        },
        "details": {"T": T, "saliency": sal.to_dict(), "types": types.to_dict()},
    })


def _parse_ratios(s: Optional[str]) -> Optional[List[float]]:
    """``"0:1:0.01"`` (start:stop:step, stop included) or ``"0,0.05,0.1"`` -> fractions."""
    if s is None:
        return None
    s = s.strip()
    if ":" in s:
        parts = [float(p) for p in s.split(":")]
        if len(parts) != 3 or parts[2] <= 0:
            raise ValueError(f"--ratios: expected start:stop:step with step > 0, got {s!r}.")
        a, b, st = parts
        n = int(math.floor(round((b - a) / st, 9)))
        return [round(a + i * st, 12) for i in range(n + 1)]
    return [float(p) for p in s.split(",") if p.strip()]


def _load_object(spec: Any, what: str) -> Any:
    """An object, ``"package.module:factory"`` (called with no arguments) or a ``torch.save``'d file."""
    if not isinstance(spec, str):
        return spec
    if ":" in spec and not os.path.exists(spec):
        mod, _, fn = spec.partition(":")
        obj = getattr(importlib.import_module(mod), fn)
        return obj() if callable(obj) else obj
    if os.path.exists(spec):
        return torch.load(spec, map_location="cpu", weights_only=False)
    raise ValueError(f"--{what}: {spec!r} is neither 'module:factory' nor an existing file.")


def add_tip_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tip`` sub-command's options to ``parser`` (see :func:`run_tip`).

    Options: ``--model``, ``--data`` (``module:factory`` or a ``torch.save``'d file; a CLI that
    loads the project defaults may instead set ``args.model`` / ``args.data`` to objects),
    ``--layer``, ``--properties``, ``--ratios``, ``--per``, ``--sou-method``,
    ``--checkpoints``, ``--out``, ``--no-aipc``.
    """
    g = parser.add_argument_group("TIP (thesis Chapter 5)")
    g.add_argument("--model", help="model: 'package.module:factory' or a torch.save'd nn.Module file")
    g.add_argument("--data", help="data: 'package.module:factory' returning a re-iterable of (x, y, fg_mask) batches")
    g.add_argument("--layer", required=False, help="layer to analyse (module name, e.g. features.9)")
    g.add_argument("--properties", default=None, help="comma-separated property names (default: all registered)")
    g.add_argument("--ratios", default=None, help="AIPC mask ratios as fractions: 'start:stop:step' or a comma list "
                                                  "(default 0:1:0.01)")
    g.add_argument("--per", type=float, default=30.0, help="high/low percentage for fg/bg filter types (default 30)")
    g.add_argument("--sou-method", choices=("taylor", "exact"), default="taylor", help="SoU estimate (default taylor)")
    g.add_argument("--checkpoints", nargs="*", default=None, help="state-dict files, one per training phase")
    g.add_argument("--out", default="nns_output/tip", help="output folder (tip.json is written there)")
    g.add_argument("--no-aipc", action="store_true", help="skip the AIPC curves")
    return parser


def run_tip(args: argparse.Namespace) -> int:
    """Run T, AIPC, saliency, fg/bg types and findings; write ``<out>/tip.json``.

    ``args.filter_images_fn`` (optional attribute) overrides the engine's filter images.

    Returns
    -------
    0 on success, 2 on bad input (the message goes to stderr).
    """
    try:
        model = _load_object(getattr(args, "model", None), "model")
        data = _load_object(getattr(args, "data", None), "data")
        if not isinstance(model, nn.Module):
            raise ValueError("tip: --model must give an nn.Module.")
        if data is None:
            raise ValueError("tip: --data is required.")
        if not getattr(args, "layer", None):
            raise ValueError("tip: --layer is required (a module name from model.named_modules()).")
        layer = args.layer
        fi = getattr(args, "filter_images_fn", None)
        names = _names(args.properties.split(",") if getattr(args, "properties", None) else None)
        ratios = _parse_ratios(getattr(args, "ratios", None))
        _check_ratios(ratios)
        _ev.check_reiterable(data, "tip")
        has_mask = _ev.unpack_batch(next(iter(data)), "tip")[2] is not None
        fit_names = names + ([] if "mean" in names else ["mean"])  # the findings need T_m
        ip = InterpretableProperties(fit_names, "all", filter_images_fn=fi).fit(model, data, layer)
        T = {n: ip.T(layer, n, "all") for n in fit_names}
        out: Dict[str, Any] = {"layer": layer, "properties": ip.to_dict()}
        if not getattr(args, "no_aipc", False):
            curves = aipc_curves(model, data, layer, {n: T[n] for n in names}, ratios)
            out["aipc"] = {n: c.to_dict() for n, c in curves.items()}
        sal = saliency(model, data, layer, T, sou_method=getattr(args, "sou_method", "taylor"))
        out["saliency"] = sal.to_dict()
        if has_mask:
            types = fg_bg_types(model, data, layer, getattr(args, "checkpoints", None) or None, property="mean",
                                per=getattr(args, "per", 30.0), filter_images_fn=fi)
            out["fg_bg_types"] = types.to_dict()
            out["findings"] = _findings_dict(layer, {n: v.tolist() for n, v in T.items()}, sal, types)
        out_dir = getattr(args, "out", None) or "nns_output/tip"
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "tip.json")
        with open(path, "w") as f:
            json.dump(_jsonable(out), f, indent=1, allow_nan=False)
        print(f"tip: wrote {path}")
        return 0
    except (ValueError, KeyError, TypeError, FileNotFoundError, ImportError, IndexError) as e:
        print(f"tip: error: {e}", file=sys.stderr)
        return 2


def _jsonable(obj: Any) -> Any:
    """Tensors / numpy -> lists, NaN / Inf -> None, tuples -> lists, keys -> str."""
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
