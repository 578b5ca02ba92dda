"""Neuron-level qualitative measures of Chapter 3 (SPEC §2) over a data set.

* :class:`KnowledgeQuantity` — activation-count ratio ``mean_n count(LI_n) / count(x)`` and
  activation-strength ratio ``mean_n strength(LI_n) / strength(x)`` per layer (Fig. 3-8), over all
  neurons and over active neurons only; ``count`` = non-zero entries, ``strength`` = Σ|·|
  (SPEC §2 [decision]s). From the fused statistics.
* :class:`InputDistance` — ``‖LI_n(I) − I‖₂`` (eq. 3-15, from the statistics:
  ``‖LI − x‖² = sq_sum − 2·x_dot + Σx²``) and the mean of ``‖LI_n(I) − J‖₂`` over unrelated samples
  ``J`` (Fig. 3-9; dense learned images against a reference pool).
* :class:`WinnerDistance` — the ``C × C`` matrix ``DIST[c, o]`` = mean over class-``c`` samples of
  ``‖LI_o(I) − I‖₂`` for output neuron ``o`` (eq. 3-16, Fig. 3-10, Table 3-2).
* :class:`FeatureMapCorrelation` — ``C^l`` (eqs. 3-17, 3-18, Table 3-3).
* :class:`Top2IoU` — ``IoU^l`` of the two most activated neurons per filter (eqs. 3-19, 3-20, Table 3-4).

Every class takes its hyper-parameters in ``__init__`` and the model / data in ``fit`` (which
returns a result with ``to_dict()`` and stores it as ``result_``). ``data`` is any iterable of
``(x, y, fg_mask)`` batches (``y`` / ``fg_mask`` optional where not needed) or a map-style
``Dataset``. Aggregation over the data set: each measure is first computed per sample (a mean over
the layer's neurons or filters), then averaged over the samples for which it is defined.

Choices made here (beyond SPEC's [decision]s):

* An *active* neuron is one whose learned image is not all zero (the same test as FQ's
  "inactive"); for ReLU outputs this is ``a_n > 0`` up to neurons that are active only through
  their bias.
* A sample whose input is zero everywhere has undefined ratios and is left out
  (:class:`ZeroInputWarning`).
* Unrelated samples are the first ``n_reference`` samples of the data (a fixed pool; ``I``
  itself excluded). With ``n_reference`` at least the data-set size this is the exact mean over all
  other samples; for hidden layers a seeded subset of neurons keeps the dense work bounded.
* Top-2 ties go to the lower flat position; ``S^k`` uses ``align_corners=False``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from nns_cuda.analysis._toolkit import (
    FQWarning,
    ZeroInputWarning,
    check_eval,
    check_finite,
    check_layers,
    iter_batches,
    layer_outputs,
    make_filter_fn,
    make_li_fn,
    make_scan,
    model_device,
    output_layer_name,
    trace_calls,
    warn_once,
)
from nns_cuda.ops.reference.stats import NUM_STATS, STAT_INDEX

__all__ = [
    "FQWarning",
    "ZeroInputWarning",
    "KnowledgeQuantity",
    "KnowledgeResult",
    "InputDistance",
    "DistanceResult",
    "WinnerDistance",
    "WinnerResult",
    "FeatureMapCorrelation",
    "CorrelationResult",
    "Top2IoU",
    "Top2Result",
    "distance_from_stats",
]

_I = STAT_INDEX


def _none_if_nan(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _list_or_none(t: Tensor) -> List[Optional[float]]:
    return [_none_if_nan(v) for v in t.detach().double().cpu().flatten().tolist()]


def _scan_checked(scan, x, m, layers, where):
    res = scan(x, m)
    out = {}
    for l in layers:
        act, st = res[l]
        if st is None or act.shape[0] != x.shape[0] or tuple(st.shape) != (*act.shape, NUM_STATS):
            raise ValueError(f"{where}: scan output for {l!r} has activations {list(act.shape)} and stats "
                             f"{list(getattr(st, 'shape', []))}; expected [B, *shape] and [B, *shape, {NUM_STATS}].")
        check_finite(f"the scan statistics of {l!r}", st, where)
        out[l] = (act, st)
    return out


class _Mean:
    """Running mean of per-sample values, ignoring NaN."""

    def __init__(self) -> None:
        self.s = 0.0
        self.n = 0

    def add(self, v: Tensor) -> None:
        v = v.double().flatten()
        ok = torch.isfinite(v)
        self.s += float(v[ok].sum())
        self.n += int(ok.sum())

    @property
    def value(self) -> float:
        return self.s / self.n if self.n else float("nan")


# ============================================================================================
# Knowledge quantity (Fig. 3-8)
# ============================================================================================
@dataclass
class KnowledgeLayer:
    """Knowledge quantity of one layer (ratios, not percentages).

    ``count_ratio`` / ``strength_ratio``: mean over samples of ``mean_n count(LI_n)/count(x)`` /
    ``mean_n strength(LI_n)/strength(x)`` over **all** neurons; ``*_active``: the same over the
    active neurons (``LI_n`` not all zero) of each sample. ``n_samples``: samples used (inputs that
    are zero everywhere are left out); ``n_samples_active``: samples with at least one active neuron.
    """

    layer: str
    count_ratio: float
    strength_ratio: float
    count_ratio_active: float
    strength_ratio_active: float
    active_fraction: float
    n_samples: int
    n_samples_active: int

    def to_dict(self) -> Dict[str, Any]:
        return {k: (_none_if_nan(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class KnowledgeResult:
    layers: Dict[str, KnowledgeLayer]
    n_skipped_zero_input: int = 0

    def __getitem__(self, layer: str) -> KnowledgeLayer:
        return self.layers[layer]

    def to_dict(self) -> Dict[str, Any]:
        return {"n_skipped_zero_input": self.n_skipped_zero_input,
                "layers": {k: v.to_dict() for k, v in self.layers.items()}}


class KnowledgeQuantity:
    """Knowledge quantity per layer (SPEC §2, Fig. 3-8), from the fused statistics.

    Parameters
    ----------
    batch_size : int — for map-style datasets.
    scan_fn : injected ``scan_fn(model, x, fg_mask, layers)`` (default: the engine's ``Scanner``).
    max_samples : int, optional.
    """

    def __init__(self, *, batch_size: int = 64, scan_fn=None, max_samples: Optional[int] = None) -> None:
        self.batch_size, self.scan_fn, self.max_samples = batch_size, scan_fn, max_samples

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> KnowledgeResult:
        """Return per layer the count / strength ratios (all neurons and active only)."""
        where = "KnowledgeQuantity.fit"
        layers = check_layers(model, layers, where)
        check_eval(model, where)
        scan = make_scan(model, layers, self.scan_fn, stats=True)
        acc = {l: [_Mean() for _ in range(5)] for l in layers}
        zero: List[int] = []
        n = 0
        for b in iter_batches(data, where, batch_size=self.batch_size, device=model_device(model), max_samples=self.max_samples,
                              input_dims=(2, 3, 4, 5)):
            x = b.x
            B = x.shape[0]
            cx = (x != 0).flatten(1).sum(1).double()
            sx = x.abs().flatten(1).sum(1).double()
            ok = cx > 0
            zero += (~ok).nonzero().flatten().add(b.offset).tolist()
            n += B
            res = _scan_checked(scan, x, b.fg_mask, layers, where)
            nanv = torch.full((B,), float("nan"), dtype=torch.float64, device=x.device)
            for l in layers:
                _, st = res[l]
                st = st.reshape(B, -1, NUM_STATS)
                cnt = st[..., _I["nz_fg"]].double() + st[..., _I["nz_bg"]].double()
                stren = st[..., _I["abs_sum"]].double()
                act = cnt > 0
                na = act.sum(1).double()
                r_c = torch.where(ok, cnt.mean(1) / cx.clamp_min(1), nanv)
                r_s = torch.where(ok, stren.mean(1) / sx.clamp_min(1e-300), nanv)
                good = ok & (na > 0)
                r_ca = torch.where(good, (cnt * act).sum(1) / na.clamp_min(1) / cx.clamp_min(1), nanv)
                r_sa = torch.where(good, (stren * act).sum(1) / na.clamp_min(1) / sx.clamp_min(1e-300), nanv)
                frac = na / cnt.shape[1]
                for a, v in zip(acc[l], (r_c, r_s, r_ca, r_sa, frac)):
                    a.add(v)
        warn_once(ZeroInputWarning, f"{where}: inputs that are zero everywhere have count(x) = strength(x) = 0; "
                  "the ratios are undefined and those samples are left out", len(zero), n, zero)
        out = {}
        for l in layers:
            a = acc[l]
            out[l] = KnowledgeLayer(l, a[0].value, a[1].value, a[2].value, a[3].value, a[4].value, a[0].n, a[2].n)
        self.result_ = KnowledgeResult(out, len(zero))
        return self.result_


# ============================================================================================
# Distances (eq. 3-15, Fig. 3-9)
# ============================================================================================
def distance_from_stats(stats: Tensor, x: Tensor) -> Tensor:
    """``‖LI_n − x‖₂`` from the fused statistics (eq. 3-15).

    Parameters
    ----------
    stats : Tensor [B, *N, NUM_STATS]
    x : Tensor [B, ...] — the inputs.

    Returns
    -------
    float64 Tensor [B, *N] — ``sqrt(max(sq_sum − 2·x_dot + Σx², 0))``.
    """
    sx2 = (x.double() ** 2).flatten(1).sum(1).reshape(x.shape[0], *([1] * (stats.dim() - 2)))
    d2 = stats[..., _I["sq_sum"]].double() - 2 * stats[..., _I["x_dot"]].double() + sx2
    return d2.clamp_min(0).sqrt()


@dataclass
class DistanceLayer:
    """Distances of one layer.

    ``own``: mean over neurons and samples of ``‖LI_n(I) − I‖``; ``own_per_neuron`` [*shape]: mean
    over samples. ``neurons``: flat indices of the neurons used for the unrelated distance (all or a
    seeded subset); ``own_subset`` and ``unrelated``: means over those neurons of the own distance and
    of the mean distance to the reference samples ``J ≠ I``.
    """

    layer: str
    own: float
    own_per_neuron: Tensor
    own_subset: Optional[float]
    unrelated: Optional[float]
    neurons: Optional[Tensor]
    n_samples: int
    n_reference: int

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        d = {"layer": self.layer, "own": _none_if_nan(self.own), "own_subset": _none_if_nan(self.own_subset) if self.own_subset is not None else None,
             "unrelated": _none_if_nan(self.unrelated) if self.unrelated is not None else None,
             "n_neurons_unrelated": None if self.neurons is None else int(self.neurons.numel()),
             "n_samples": self.n_samples, "n_reference": self.n_reference}
        if arrays:
            d["own_per_neuron"] = _list_or_none(self.own_per_neuron)
        return d


@dataclass
class DistanceResult:
    layers: Dict[str, DistanceLayer]

    def __getitem__(self, layer: str) -> DistanceLayer:
        return self.layers[layer]

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        return {"layers": {k: v.to_dict(arrays) for k, v in self.layers.items()}}


class InputDistance:
    """Distance of learned images to their own input and to unrelated samples (eq. 3-15, Fig. 3-9).

    Parameters
    ----------
    unrelated : bool — also compute the distance to unrelated samples (dense learned images).
    n_reference : int — the unrelated samples ``J`` are the first ``n_reference`` samples of the
        data (minus ``I`` itself); with ``n_reference ≥`` the data-set size this is the exact mean
        over all other samples.
    max_neurons : int, optional — per layer, the unrelated distance uses at most this many neurons
        (a seeded random subset; the output layer usually has few). ``None``: all.
    seed : int — for the neuron subset.
    chunk : int — neurons per dense learned-image call.
    scan_fn, li_fn : injected engine functions.
    """

    def __init__(self, *, unrelated: bool = True, n_reference: int = 100, max_neurons: Optional[int] = 256, seed: int = 0,
                 chunk: int = 64, batch_size: int = 64, scan_fn=None, li_fn=None, max_samples: Optional[int] = None) -> None:
        if n_reference < 2 and unrelated:
            raise ValueError("InputDistance: n_reference must be >= 2 (one sample is always excluded as 'itself').")
        self.unrelated, self.n_reference, self.max_neurons, self.seed, self.chunk = unrelated, n_reference, max_neurons, seed, chunk
        self.batch_size, self.scan_fn, self.li_fn, self.max_samples = batch_size, scan_fn, li_fn, max_samples

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> DistanceResult:
        where = "InputDistance.fit"
        layers = check_layers(model, layers, where)
        check_eval(model, where)
        scan = make_scan(model, layers, self.scan_fn, stats=True)
        li_fn = make_li_fn(self.li_fn)
        own_sum: Dict[str, Tensor] = {}
        shapes: Dict[str, Tuple[int, ...]] = {}
        subsets: Dict[str, Optional[Tensor]] = {l: None for l in layers}
        own_sub = {l: _Mean() for l in layers}
        unrel = {l: _Mean() for l in layers}
        pool: List[Tensor] = []
        pool_n = 0
        pending: List[Any] = []
        n = 0

        def process_unrelated(b) -> None:
            P = torch.cat(pool, 0).flatten(1).double()  # [P, E]
            P2 = (P * P).sum(1)
            B = b.x.shape[0]
            gidx = torch.arange(B, device=P.device) + b.offset
            notself = gidx[:, None] != torch.arange(P.shape[0], device=P.device)[None, :]  # [B, P]
            for l in layers:
                sub = subsets[l]
                tuples = [tuple(int(v) for v in np.unravel_index(int(i), shapes[l])) for i in sub.tolist()]
                for s in range(0, len(tuples), self.chunk):
                    li = li_fn(model, b.x, l, neurons=tuples[s:s + self.chunk]).flatten(2).double()  # [B, n, E]
                    d2 = (li * li).sum(2, keepdim=True) - 2 * torch.einsum("bne,pe->bnp", li, P) + P2[None, None, :]
                    d = d2.clamp_min(0).sqrt()
                    w = notself[:, None, :].double()
                    cnt = w.sum(2)
                    mean_d = torch.where(cnt > 0, (d * w).sum(2) / cnt.clamp_min(1), torch.full_like(cnt, float("nan")))
                    unrel[l].add(mean_d)

        for b in iter_batches(data, where, batch_size=self.batch_size, device=model_device(model), max_samples=self.max_samples,
                              input_dims=(2, 3, 4, 5)):
            x = b.x
            B = x.shape[0]
            res = _scan_checked(scan, x, b.fg_mask, layers, where)
            for l in layers:
                act, st = res[l]
                d = distance_from_stats(st, x)  # [B, *shape]
                if l not in own_sum:
                    shapes[l] = tuple(act.shape[1:])
                    own_sum[l] = torch.zeros(shapes[l], dtype=torch.float64, device=d.device)
                    nn_ = int(np.prod(shapes[l]))
                    if self.max_neurons is not None and nn_ > self.max_neurons:
                        g = torch.Generator().manual_seed(self.seed)
                        subsets[l] = torch.randperm(nn_, generator=g)[: self.max_neurons].sort().values
                    else:
                        subsets[l] = torch.arange(nn_)
                own_sum[l] += d.sum(0)
                own_sub[l].add(d.reshape(B, -1)[:, subsets[l].to(d.device)])
            n += B
            if self.unrelated:
                if pool_n < self.n_reference:
                    take = min(self.n_reference - pool_n, B)
                    pool.append(x[:take].detach())
                    pool_n += take
                    pending.append(b)
                    if pool_n >= self.n_reference:
                        for pb in pending:
                            process_unrelated(pb)
                        pending = []
                else:
                    process_unrelated(b)
        if self.unrelated and pending:
            if pool_n < 2:
                raise ValueError(f"{where}: the unrelated distance needs at least 2 samples, got {pool_n}.")
            for pb in pending:
                process_unrelated(pb)
        out = {}
        for l in layers:
            out[l] = DistanceLayer(l, float((own_sum[l] / n).mean()), (own_sum[l] / n).cpu(), own_sub[l].value,
                                   unrel[l].value if self.unrelated else None, subsets[l], n, pool_n if self.unrelated else 0)
        self.result_ = DistanceResult(out)
        return self.result_


# ============================================================================================
# Winner neurons (eq. 3-16, Table 3-2)
# ============================================================================================
@dataclass
class WinnerResult:
    """``dist[c, o]``: mean over class-``c`` samples of ``‖LI_o(I) − I‖`` (NaN for an absent class);
    ``count_ratio[c]`` / ``strength_ratio[c]``: mean over class-``c`` samples of the winner's
    ``count(LI_c)/count(x)`` and ``strength(LI_c)/strength(x)`` (Table 3-2); ``n_per_class[c]``."""

    output_layer: str
    dist: Tensor
    count_ratio: Tensor
    strength_ratio: Tensor
    n_per_class: Tensor

    @property
    def winner_is_closest(self) -> List[Optional[bool]]:
        """Per class: is the diagonal the row minimum (Fig. 3-10's claim)?"""
        out = []
        for c in range(self.dist.shape[0]):
            row = self.dist[c]
            out.append(None if int(self.n_per_class[c]) == 0 else bool(int(torch.argmin(row)) == c))
        return out

    @property
    def winner_distance(self) -> float:
        """Mean over samples of the winner neuron's distance (Table 3-2's 'distance' row)."""
        w = self.n_per_class.double()
        diag = torch.nan_to_num(self.dist.diagonal(), nan=0.0)
        return float((diag * w).sum() / w.sum())

    def to_dict(self) -> Dict[str, Any]:
        return {"output_layer": self.output_layer,
                "dist": [_list_or_none(r) for r in self.dist],
                "count_ratio": _list_or_none(self.count_ratio), "strength_ratio": _list_or_none(self.strength_ratio),
                "n_per_class": self.n_per_class.tolist(), "winner_is_closest": self.winner_is_closest,
                "winner_distance": _none_if_nan(self.winner_distance)}


class WinnerDistance:
    """The ``C × C`` DIST matrix of the output neurons (eq. 3-16, Fig. 3-10, Table 3-2).

    Parameters
    ----------
    output_layer : str, optional — a layer with ``C`` output neurons (default: the last leaf module called).
    scan_fn : injected engine function.
    """

    def __init__(self, *, output_layer: Optional[str] = None, batch_size: int = 64, scan_fn=None,
                 max_samples: Optional[int] = None) -> None:
        self.output_layer, self.batch_size, self.scan_fn, self.max_samples = output_layer, batch_size, scan_fn, max_samples

    def fit(self, model: nn.Module, data: Any) -> WinnerResult:
        """``data`` must yield labels: ``(x, y[, fg_mask])`` batches."""
        where = "WinnerDistance.fit"
        check_eval(model, where)
        dev = model_device(model)
        scan = None
        layer = self.output_layer
        C = None
        for b in iter_batches(data, where, batch_size=self.batch_size, device=dev, need_labels=True, max_samples=self.max_samples,
                              input_dims=(2, 3, 4, 5)):
            x, y = b.x, b.y
            if scan is None:
                if layer is None:
                    layer = output_layer_name(trace_calls(model, x[:1]))
                check_layers(model, [layer], where)
                scan = make_scan(model, [layer], self.scan_fn, stats=True)
            act, st = _scan_checked(scan, x, b.fg_mask, [layer], where)[layer]
            if act.dim() != 2:
                raise ValueError(f"{where}: the output layer {layer!r} must have C neurons (output [B, C]), got "
                                 f"{list(act.shape)}; pass output_layer=.")
            if C is None:
                C = act.shape[1]
                dsum = torch.zeros(C, C, dtype=torch.float64, device=act.device)
                csum = torch.zeros(C, dtype=torch.float64, device=act.device)
                ssum = torch.zeros(C, dtype=torch.float64, device=act.device)
                ncls = torch.zeros(C, dtype=torch.long, device=act.device)
            if int(y.min()) < 0 or int(y.max()) >= C:
                raise ValueError(f"{where}: labels must be in [0, {C}) for an output layer with {C} neurons, got "
                                 f"[{int(y.min())}, {int(y.max())}].")
            d = distance_from_stats(st, x)  # [B, C]
            dsum.index_add_(0, y, d)
            ar = torch.arange(x.shape[0], device=y.device)
            st = st.double()
            cnt = st[ar, y, _I["nz_fg"]] + st[ar, y, _I["nz_bg"]]
            cx = (x != 0).flatten(1).sum(1).double()
            sx = x.abs().flatten(1).sum(1).double()
            csum.index_add_(0, y, torch.where(cx > 0, cnt / cx.clamp_min(1), torch.zeros_like(cnt)))
            ssum.index_add_(0, y, torch.where(sx > 0, st[ar, y, _I["abs_sum"]] / sx.clamp_min(1e-300), torch.zeros_like(cnt)))
            ncls += torch.bincount(y, minlength=C)
        nd = ncls.double()
        nan = torch.full_like(nd, float("nan"))
        dist = torch.where(nd[:, None] > 0, dsum / nd.clamp_min(1)[:, None], nan[:, None].expand(C, C))
        self.result_ = WinnerResult(layer, dist.cpu(), torch.where(nd > 0, csum / nd.clamp_min(1), nan).cpu(),
                                    torch.where(nd > 0, ssum / nd.clamp_min(1), nan).cpu(), ncls.cpu())
        return self.result_


# ============================================================================================
# Feature-map ↔ learned-image correlation (eqs. 3-17, 3-18, Table 3-3)
# ============================================================================================
@dataclass
class _PerFilterLayer:
    """A per-layer measure: ``value`` (the layer's number), ``per_filter`` [K], ``n_samples``;
    ``to_dict`` names the value ``_KEY``."""

    _KEY = "value"
    layer: str
    value: float
    per_filter: Tensor
    n_samples: int

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        d = {"layer": self.layer, self._KEY: _none_if_nan(self.value), "n_samples": self.n_samples}
        if arrays:
            d["per_filter"] = _list_or_none(self.per_filter)
        return d


@dataclass
class _LayersResult:
    """``{layer: per-layer result}``, indexable by layer name, with ``to_dict``."""

    layers: Dict[str, Any]

    def __getitem__(self, layer: str):
        return self.layers[layer]

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        return {"layers": {k: v.to_dict(arrays) for k, v in self.layers.items()}}


@dataclass
class CorrelationLayer(_PerFilterLayer):
    """``value``: ``C^l`` — mean over samples of the mean over filters with ``|A^k| > 0`` of
    ``C^k = |S^k ∩ A^k| / |A^k|``; ``per_filter`` [K]: mean of ``C^k`` over the samples where
    ``|A^k| > 0`` (NaN if never)."""

    _KEY = "C_l"


@dataclass
class CorrelationResult(_LayersResult):
    layers: Dict[str, CorrelationLayer]


def _check_spatial(a: Tensor, layer: str, where: str) -> None:
    if a.dim() != 4:
        raise ValueError(f"{where}: layer {layer!r} must have a 2-D feature map (output [B, K, h, w]), got "
                         f"{list(a.shape)}; choose a convolution / pooling / activation layer of the convolutional part.")


class FeatureMapCorrelation:
    """``C^l`` between feature maps and filter learned images (eqs. 3-17, 3-18).

    ``S^k`` = bilinear up-sampling (``align_corners=False``) of ``a^k`` to ``H × W``, active where
    ``> 0``; ``A^k`` = entries where ``Σ_d |L^k_d| ≠ 0``, ``L^k`` the filter learned image (SPEC §1).

    Parameters
    ----------
    filter_fn : injected ``filter_fn(model, x, layer) -> [B, K, D, H, W]`` (default: the engine's
        ``filter_images``).
    """

    def __init__(self, *, batch_size: int = 64, filter_fn=None, max_samples: Optional[int] = None) -> None:
        self.batch_size, self.filter_fn, self.max_samples = batch_size, filter_fn, max_samples

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> CorrelationResult:
        where = "FeatureMapCorrelation.fit"
        layers = check_layers(model, layers, where)
        check_eval(model, where)
        filter_fn = make_filter_fn(self.filter_fn)
        mean = {l: _Mean() for l in layers}
        fsum: Dict[str, Tensor] = {}
        fcnt: Dict[str, Tensor] = {}
        n = 0
        for b in iter_batches(data, where, batch_size=self.batch_size, device=model_device(model), max_samples=self.max_samples):
            x = b.x
            H, W = x.shape[-2:]
            with torch.no_grad():
                _, acts = layer_outputs(model, x, layers)
            for l in layers:
                a = acts[l].detach()
                _check_spatial(a, l, where)
                S = TF.interpolate(a.double(), size=(H, W), mode="bilinear", align_corners=False) > 0  # [B, K, H, W]
                L = filter_fn(model, x, l)
                if tuple(L.shape) != (a.shape[0], a.shape[1], *x.shape[1:]):
                    raise ValueError(f"{where}: filter images of {l!r} must be [B, K, D, H, W] = "
                                     f"{[a.shape[0], a.shape[1], *x.shape[1:]]}, got {list(L.shape)}.")
                A = L.abs().sum(2) != 0
                sizeA = A.flatten(2).sum(2).double()
                inter = (S & A).flatten(2).sum(2).double()
                ok = sizeA > 0
                ck = torch.where(ok, inter / sizeA.clamp_min(1), torch.zeros_like(sizeA))  # [B, K]
                nk = ok.sum(1).double()
                per_sample = torch.where(nk > 0, ck.sum(1) / nk.clamp_min(1), torch.full_like(nk, float("nan")))
                mean[l].add(per_sample)
                if l not in fsum:
                    fsum[l] = torch.zeros(a.shape[1], dtype=torch.float64, device=ck.device)
                    fcnt[l] = torch.zeros(a.shape[1], dtype=torch.float64, device=ck.device)
                fsum[l] += ck.sum(0)
                fcnt[l] += ok.sum(0).double()
            n += x.shape[0]
        out = {l: CorrelationLayer(l, mean[l].value,
                                   torch.where(fcnt[l] > 0, fsum[l] / fcnt[l].clamp_min(1), torch.full_like(fcnt[l], float("nan"))).cpu(),
                                   n) for l in layers}
        self.result_ = CorrelationResult(out)
        return self.result_


# ============================================================================================
# Top-2 neuron IoU (eqs. 3-19, 3-20, Table 3-4)
# ============================================================================================
@dataclass
class Top2Layer(_PerFilterLayer):
    """``value``: ``IoU^l`` — mean over samples of the mean over filters whose top-2 neurons are both
    active of the IoU of their channel-summed ``|LI|`` active sets; ``per_filter`` [K] likewise per filter."""

    _KEY = "IoU_l"


@dataclass
class Top2Result(_LayersResult):
    layers: Dict[str, Top2Layer]


class Top2IoU:
    """IoU of the learned images of the two most activated neurons of each filter (eqs. 3-19, 3-20).

    Per sample and filter ``k``: the two positions with the largest ``a^k`` (ties: lower flat index
    first); the filter counts only if both have ``a > 0`` and the union of the two active sets
    (``Σ_d |LI_d| ≠ 0``) is non-empty.

    Parameters
    ----------
    li_fn : injected ``li_fn(model, x, layer, neurons) -> [B, n, D, H, W]`` (default: the engine's
        ``learned_images``).
    max_neurons_per_call : int
        The neurons differ per sample, so one learned-image call covers a group of consecutive
        samples with the union of their top-2 neurons; samples are added to a group while the union
        stays within this many neurons (at least one sample per call). The default, 64, keeps the
        engine on its reverse (selected-neuron) strategy.
    """

    def __init__(self, *, batch_size: int = 64, li_fn=None, max_samples: Optional[int] = None,
                 max_neurons_per_call: int = 64) -> None:
        if max_neurons_per_call < 1:
            raise ValueError(f"Top2IoU: max_neurons_per_call must be >= 1, got {max_neurons_per_call}.")
        self.batch_size, self.li_fn, self.max_samples = batch_size, li_fn, max_samples
        self.max_neurons_per_call = max_neurons_per_call

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> Top2Result:
        where = "Top2IoU.fit"
        layers = check_layers(model, layers, where)
        check_eval(model, where)
        li_fn = make_li_fn(self.li_fn)
        mean = {l: _Mean() for l in layers}
        fsum: Dict[str, Tensor] = {}
        fcnt: Dict[str, Tensor] = {}
        n = 0
        for b in iter_batches(data, where, batch_size=self.batch_size, device=model_device(model), max_samples=self.max_samples):
            x = b.x
            with torch.no_grad():
                _, acts = layer_outputs(model, x, layers)
            for l in layers:
                a = acts[l].detach()
                _check_spatial(a, l, where)
                B, K, h, w = a.shape
                if h * w < 2:
                    raise ValueError(f"{where}: layer {l!r} has a {h}x{w} feature map; top-2 needs at least 2 positions.")
                if l not in fsum:
                    fsum[l] = torch.zeros(K, dtype=torch.float64)
                    fcnt[l] = torch.zeros(K, dtype=torch.float64)
                vals, idx = torch.sort(a.flatten(2), dim=2, descending=True, stable=True)
                top = idx[..., :2].cpu()                # [B, K, 2] flat positions
                both = (vals[..., 1] > 0).cpu()         # top-2 both active (the second is the smaller)
                for rows, union in self._groups(top, both):
                    if not union:
                        for _ in rows:
                            mean[l].add(torch.tensor([float("nan")]))
                        continue
                    neurons = [(k, p // w, p % w) for (k, p) in union]
                    li = li_fn(model, x[rows], l, neurons=neurons)          # [g, n_u, D, H, W]
                    sets = (li.abs().sum(2) != 0).cpu()                      # [g, n_u, H, W]
                    del li
                    for r, i in enumerate(rows):
                        ks = both[i].nonzero().flatten().tolist()
                        if not ks:
                            mean[l].add(torch.tensor([float("nan")]))
                            continue
                        u1 = torch.tensor([union[(k, int(top[i, k, 0]))] for k in ks])
                        u2 = torch.tensor([union[(k, int(top[i, k, 1]))] for k in ks])
                        s1, s2 = sets[r, u1].flatten(1), sets[r, u2].flatten(1)
                        inter = (s1 & s2).sum(1).double()
                        uni = (s1 | s2).sum(1).double()
                        ok = uni > 0
                        v = torch.where(ok, inter / uni.clamp_min(1), torch.zeros_like(uni))
                        mean[l].add(v[ok].mean() if bool(ok.any()) else torch.tensor([float("nan")]))
                        kk = torch.tensor(ks)[ok]
                        fsum[l].index_add_(0, kk, v[ok])
                        fcnt[l].index_add_(0, kk, torch.ones(int(ok.sum()), dtype=torch.float64))
            n += x.shape[0]
        out = {l: Top2Layer(l, mean[l].value,
                            torch.where(fcnt[l] > 0, fsum[l] / fcnt[l].clamp_min(1), torch.full_like(fcnt[l], float("nan"))), n)
               for l in layers}
        self.result_ = Top2Result(out)
        return self.result_

    def _groups(self, top: Tensor, both: Tensor):
        """Yield ``(rows, union)``: consecutive samples whose top-2 neurons' union fits one call;
        ``union`` maps ``(filter, flat position)`` to its index in the call."""
        rows: List[int] = []
        union: Dict[Tuple[int, int], int] = {}
        for i in range(top.shape[0]):
            need = {(k, int(top[i, k, j])) for k in both[i].nonzero().flatten().tolist() for j in range(2)}
            if rows and len(set(union) | need) > self.max_neurons_per_call:
                yield rows, union
                rows, union = [], {}
            rows.append(i)
            for key in sorted(need):
                union.setdefault(key, len(union))
        if rows:
            yield rows, union
