"""Accuracy–interpretable-property curves, AIPC (thesis §5.3.1, Table 5-1; docs/spec.md §4).

Rank a layer's filters by a score (e.g. ``T^k`` of one property), mask the top ``⌈rK⌉`` of them
for each mask ratio ``r`` and measure the accuracy drop ``y(r)``; the area under ``y`` sums the
curve up (Table 5-1 uses ``[0, 10 %]``).

Decisions
---------
* Ties in the ranking are broken by the lower filter index.
* ``y(r)`` is the accuracy drop in percentage points from ``r = 0``. The area is the trapezoid
  of ``y`` over ``r`` in percent on ``[0, r_max]`` (the curve is interpolated linearly at
  ``r_max`` when ``r_max`` is not a measured ratio); units are pp·%.
* Masking filter ``k`` zeroes channel ``k`` of the layer's output (docs/spec.md §6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nns_cuda.analysis._tip_eval import DictResult, MaskedAccuracy, first_x, n_top, probe_layer
from nns_cuda.analysis._toolkit import check_reiterable

__all__ = ["DEFAULT_RATIOS", "AIPCResult", "aipc", "aipc_curves", "check_ratios"]

#: 0, 1, 2, …, 100 % as fractions.
DEFAULT_RATIOS: Tuple[float, ...] = tuple(i / 100 for i in range(101))


def check_ratios(ratios: Optional[Sequence[float]]) -> List[float]:
    """Check AIPC mask ratios.

    Parameters
    ----------
    ratios : sequence of float, Tensor [n] or None
        Fractions in ``[0, 1]``; ``None``: :data:`DEFAULT_RATIOS`.

    Returns
    -------
    list of float
        Sorted, without duplicates.

    Raises
    ------
    ValueError
        For an empty or non-1-D sequence, or a ratio outside ``[0, 1]`` (with a hint when the
        ratios look like percentages).
    """
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
    """Indices by descending score, ties by the lower index: Tensor [K] -> list of K int."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-s, kind="stable").tolist()


def _trapezoid_area(r_pct: Sequence[float], y: Sequence[float], r_max_pct: float) -> Optional[float]:
    """∫_0^{r_max} y dr by trapezoids through (0, 0) and the measured points, y interpolated at r_max.

    Parameters
    ----------
    r_pct, y : sequences of float [n]
        Mask ratios in percent and the curve's values there.
    r_max_pct : float
        Upper end of the integral, in percent.

    Returns
    -------
    float or None
        The area (pp·%); None when the ratios stop before ``r_max``.
    """
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
class AIPCResult(DictResult):
    """Accuracy–interpretable-property curve of one layer and one ranking (§5.3.1).

    Attributes
    ----------
    layer : str
        The masked layer.
    ratios : list of float [n]
        Mask ratios ``r`` (fractions, ascending).
    n_masked : list of int [n]
        ``⌈rK⌉``.
    accuracy : list of float [n]
        Accuracy (%) at each ratio.
    drop : list of float [n]
        ``y(r) = acc(0) − acc(r)`` in percentage points.
    base_accuracy : float
        Accuracy (%) with nothing masked.
    area : float
        Trapezoid area of ``y`` over ``r`` in percent on ``[0, max(ratios)]`` (pp·%).
    area_top10 : float or None
        The same on ``[0, 10 %]`` (Table 5-1); None if the ratios stop earlier.
    order : list of int [K]
        Filters by descending ranking score (ties: lower index first).
    channels : int
        ``K``.
    name : str
        The ranking's name (property) if known.
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
        """Trapezoid area of the curve on ``[0, r_max]``.

        Parameters
        ----------
        r_max : float
            A fraction in ``[0, 1]``.

        Returns
        -------
        float or None
            pp·%; None when the ratios stop before ``r_max``.
        """
        return _trapezoid_area([100 * r for r in self.ratios], self.drop, 100 * float(r_max))


def aipc_curves(model: nn.Module, data: Iterable, layer: str,
                rankings: Mapping[str, Union[torch.Tensor, Sequence[float]]],
                ratios: Optional[Sequence[float]] = None, *, vectorize: bool = True,
                progress: bool = True) -> Dict[str, AIPCResult]:
    """AIPC for several rankings of the same layer, sharing every identical masked evaluation.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``[B, classes]`` (run in eval mode, flags restored).
    data : re-iterable of ``(x [B, D, H, W], y [B][, fg_mask])`` batches
        A list or a DataLoader.
    layer : str
        Module name whose output channels are the filters.
    rankings : mapping of str to Tensor [K]
        Scores (e.g. ``{"mean": T_m, …}``); filters are masked in descending score order.
    ratios : sequence of float, optional
        Fractions in ``[0, 1]`` (default ``0, 0.01, …, 1``).
    vectorize : bool
        Evaluate several masks per forward pass by replicating the layer's output.
    progress : bool
        A progress bar on stderr over the batches.

    Returns
    -------
    dict of str to AIPCResult
        One curve per ranking.
    """
    ratios = check_ratios(ratios)
    check_reiterable(data, "aipc")
    x0 = first_x(data, "aipc", model)
    info = probe_layer(model, x0, layer, "aipc")
    K = info.channels
    orders = {}
    for name, sc in rankings.items():
        s = torch.as_tensor(sc.detach().cpu() if isinstance(sc, torch.Tensor) else sc, dtype=torch.float64).flatten()
        if s.numel() != K:
            raise ValueError(f"aipc: ranking {name!r} has {s.numel()} scores but layer {layer!r} has {K} filters.")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"aipc: ranking {name!r} contains NaN or Inf.")
        orders[name] = _order_desc(s)
    ev = MaskedAccuracy(model, data, layer, K, vectorize=vectorize, where="aipc", progress=progress)
    n_masked = [n_top(r, K) for r in ratios]
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
         ratios: Optional[Sequence[float]] = None, *, vectorize: bool = True, progress: bool = True) -> AIPCResult:
    """Accuracy–interpretable-property curve (AIPC, §5.3.1) of one layer.

    Filters are ranked by ``ranking`` (descending; ties by the lower index); for each mask ratio
    ``r`` the top ``⌈rK⌉`` output channels of ``layer`` are zeroed (docs/spec.md §6) and the accuracy
    is measured. ``y(r)`` is the accuracy drop in percentage points from ``r = 0``.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``[B, classes]`` (run in eval mode, flags restored).
    data : re-iterable of ``(x [B, D, H, W], y [B][, fg_mask])`` batches
    layer : str
        Module name; its output ``[B, K, ...]`` has the filters as channels.
    ranking : Tensor [K] or sequence of float
        Scores, e.g. ``T^k`` of one property.
    ratios : sequence of float, optional
        Fractions in ``[0, 1]`` (default ``0, 0.01, …, 1``).
    vectorize : bool
        Replicate the layer output to evaluate many masks per forward pass (falls back to one
        pass per mask when the model cannot run on a replicated batch).
    progress : bool
        A progress bar on stderr over the batches.

    Returns
    -------
    AIPCResult
        Ratios, accuracy drop (pp), area (full range and ``[0, 10 %]``).

    Raises
    ------
    ValueError
        For ratios outside [0, 1], a ranking of the wrong length, or a layer without channels.
    KeyError
        For an unknown layer.
    TypeError
        For one-shot ``data`` (a generator).
    """
    return aipc_curves(model, data, layer, {"ranking": ranking}, ratios, vectorize=vectorize,
                       progress=progress)["ranking"]
