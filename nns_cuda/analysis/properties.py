"""Interpretable properties of filter images and their registry (thesis Chapter 5, docs/spec.md §4).

A filter's learned image ``L^k(x)`` (docs/spec.md §1, ``[D, H, W]``, input-sized) is summarised
by *interpretable properties* ``P^k(x)``, one value per sample and filter. The built-ins are
``mean`` (``P_m``, eq. 5-3), ``variance`` (``P_v``, eq. 5-4), ``covariance`` (``P_c``, eq. 5-5)
and ``correlation`` (``P_cor``, eq. 5-6); add one with :func:`register_property`. Every property
maps ``(L [B, C, D, H, W], x [B, D, H, W], mask [B, H, W] bool | None)`` to ``[B, C]``.

Decisions
---------
* Statistics run over all ``D·H·W`` entries of ``L`` and ``x`` (the thesis writes ``M×M``);
  variance and covariance are population moments; the correlation is 0 when ``σ_L`` or ``σ_x``
  is 0 (``σ ≤ 64·eps·|μ|`` counts as 0: a constant image's computed σ is rounding noise).
* With a mask, a property is computed over the masked entries only (the ``[H, W]`` mask is
  broadcast over the ``D`` channels); every sample's region must be non-empty.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from nns_cuda.analysis._toolkit import check_mask

__all__ = [
    "PropertyFn",
    "BUILTIN_PROPERTIES",
    "SYMBOLS",
    "PropertyNotFoundError",
    "property_mean",
    "property_variance",
    "property_covariance",
    "property_correlation",
    "register_property",
    "unregister_property",
    "get_property",
    "list_properties",
    "property_names",
    "properties",
]

#: ``fn(L [B, C, D, H, W], x [B, D, H, W], mask [B, H, W] bool or None) -> [B, C]``.
PropertyFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


class PropertyNotFoundError(KeyError):
    """An unknown property name; the message lists the registered ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


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
    return _moments(L, x, mask)["mean"]


def property_variance(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return _moments(L, x, mask)["variance"]


def property_covariance(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return _moments(L, x, mask)["covariance"]


def property_correlation(L: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return _moments(L, x, mask)["correlation"]


_BUILTIN_DOC = """{summary}

    Parameters
    ----------
    L : Tensor [B, C, D, H, W]
        Filter images of ``C`` filters for ``B`` samples.
    x : Tensor [B, D, H, W]
        The inputs.
    mask : bool Tensor [B, H, W] or None
        Region (broadcast over ``D``); ``None``: all entries.

    Returns
    -------
    Tensor [B, C]
    """
for _fn, _summary in (
    (property_mean, "``P_m`` (eq. 5-3): mean of ``L`` over its (masked) entries."),
    (property_variance, "``P_v`` (eq. 5-4): population variance of ``L`` over its (masked) entries."),
    (property_covariance, "``P_c`` (eq. 5-5): population covariance of ``L`` and ``x`` over the (masked) entries."),
    (property_correlation, "``P_cor`` (eq. 5-6 with its ``1/n``): Pearson correlation of ``L`` and ``x`` over the\n"
                           "    (masked) entries; 0 when a standard deviation is 0."),
):
    _fn.__doc__ = _BUILTIN_DOC.format(summary=_summary)
del _fn, _summary

#: The four properties of the thesis, by registry name.
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

    Returns
    -------
    None

    Raises
    ------
    ValueError
        If ``name`` is taken and ``overwrite`` is False.
    TypeError
        For a bad name or a ``fn`` that is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_property: name must be a non-empty str, got {name!r}.")
    if not callable(fn):
        raise TypeError(f"register_property: fn for {name!r} must be callable fn(L, x, mask) -> [B, C].")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"register_property: a property named {name!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[name] = fn


def unregister_property(name: str) -> None:
    """Remove a property (a removed built-in can be registered again from :data:`BUILTIN_PROPERTIES`).

    Parameters
    ----------
    name : str
        A registered name.

    Returns
    -------
    None

    Raises
    ------
    PropertyNotFoundError
        If ``name`` is not registered.
    """
    get_property(name)
    del _REGISTRY[name]


def list_properties() -> List[str]:
    """Names of the registered properties.

    Returns
    -------
    list of str
        In registration order.
    """
    return list(_REGISTRY)


def get_property(name: str) -> PropertyFn:
    """The function registered as ``name``.

    Parameters
    ----------
    name : str

    Returns
    -------
    PropertyFn
        ``fn(L [B, C, D, H, W], x [B, D, H, W], mask [B, H, W] or None) -> [B, C]``.

    Raises
    ------
    PropertyNotFoundError
        (a ``KeyError``) listing the registered names.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise PropertyNotFoundError(
            f"unknown interpretable property {name!r}; registered: {list(_REGISTRY)}. "
            "Add one with tip.register_property(name, fn)."
        ) from None


def property_names(names: Union[None, str, Sequence[str]] = None) -> List[str]:
    """The registered property names that ``names`` selects, checked.

    Parameters
    ----------
    names : None, str or sequence of str
        ``None``: every registered property (at the time of the call).

    Returns
    -------
    list of str
        Without duplicates, in the given order.

    Raises
    ------
    PropertyNotFoundError
        For a name that is not registered.
    ValueError
        For an empty sequence.
    """
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
    check_mask(mask, x, where, batched=True, required=False)
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
        ``L^k(x)`` for ``C`` filters and ``B`` samples (docs/spec.md §1).
    x : Tensor [B, D, H, W]
        The inputs.
    names : None, str or sequence of str
        Registered property names; ``None``: all registered.
    mask : bool Tensor [B, H, W] or None
        Region (e.g. the foreground); the properties use the masked entries only, the mask being
        broadcast over ``D``. Every sample's region must be non-empty.

    Returns
    -------
    dict of str to Tensor [B, C]
        One entry per name, in the dtype of ``filter_images``.

    Raises
    ------
    PropertyNotFoundError
        For an unknown name.
    ValueError
        For bad shapes, NaN / Inf, an empty region, or a property that returns the wrong shape or
        non-finite values (naming it).
    TypeError
        For a mask that is not bool or filter images that are not floating point.
    """
    names = property_names(names)
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
