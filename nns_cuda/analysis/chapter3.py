"""Neuron-level qualitative measures of Chapter 3 (docs/spec.md §2) over a data set.

* :class:`KnowledgeQuantity` — activation-count ratio ``mean_n count(LI_n) / count(x)`` and
  activation-strength ratio ``mean_n strength(LI_n) / strength(x)`` per layer (Fig. 3-8), over all
  neurons and over active neurons only; ``count`` = non-zero entries, ``strength`` = Σ|·|
  (docs/spec.md §2 [decision]s). From the fused statistics.
* :class:`InputDistance` — ``‖LI_n(I) − I‖₂`` (eq. 3-15, from the statistics:
  ``‖LI − x‖² = sq_sum − 2·x_dot + Σx²``) and the mean of ``‖LI_n(I) − J‖₂`` over unrelated samples
  ``J`` (Fig. 3-9; dense learned images against a reference pool).
* :class:`WinnerDistance` — the ``C × C`` matrix ``DIST[c, o]`` = mean over class-``c`` samples of
  ``‖LI_o(I) − I‖₂`` for output neuron ``o`` (eq. 3-16, Fig. 3-10, Table 3-2).
* :class:`FeatureMapCorrelation` — ``C^l`` (eqs. 3-17, 3-18, Table 3-3).
* :class:`Top2IoU` — ``IoU^l`` of the two most activated neurons per filter (eqs. 3-19, 3-20, Table 3-4).

The last two live in :mod:`nns_cuda.analysis._chapter3_maps` and are re-exported here.

Every class is an estimator: it stores its hyper-parameters in ``__init__``; ``fit`` takes the
model and data, validates, computes, stores the result object in ``result_`` and returns the
estimator; ``to_dict()`` gives the JSON-safe result. ``data`` is any iterable of
``(x, y, fg_mask)`` batches (``y`` / ``fg_mask`` optional where not needed) or a map-style
``Dataset``. Aggregation over the data set: each measure is first computed per sample (a mean over
the layer's neurons or filters), then averaged over the samples for which it is defined.

Parameters every class takes:

* ``batch_size`` (int) — used only when ``data`` is a map-style ``Dataset``;
* ``max_samples`` (int, optional) — stop after this many samples;
* ``progress`` (bool, default True) — a progress bar on stderr over the batches;
* the injected engine function it needs, replacing the engine's default:
  ``scan_fn(model, x, fg_mask, layers) -> {layer: (activations [B, *shape], stats [B, *shape, NUM_STATS])}``
  (default: ``Scanner(..., stats=True)``), ``li_fn(model, x, layer, neurons) -> [B, n, D, H, W]``
  (default: ``learned_images``) or ``filter_fn(model, x, layer) -> [B, K, D, H, W]`` (default:
  ``filter_images``).

Choices made here (beyond the [decision]s of docs/spec.md):

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

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nns_cuda.analysis import _chapter3_maps
from nns_cuda.analysis._chapter3_maps import (
    CorrelationLayer,
    CorrelationResult,
    FeatureMapCorrelation,
    LayersResult,
    Top2IoU,
    Top2Layer,
    Top2Result,
)
from nns_cuda.analysis._toolkit import (
    FQWarning,
    LiFn,
    NanMean,
    ResultEstimator,
    ScanFn,
    ZeroInputWarning,
    check_eval,
    check_layers,
    checked_scan,
    iter_batches,
    make_li_fn,
    make_scan,
    model_device,
    output_layer_name,
    to_jsonable,
    trace_calls,
    warn_once,
)
from nns_cuda.ops.reference.stats import NUM_STATS, STAT_INDEX

__all__ = [
    "FQWarning",
    "ZeroInputWarning",
    "KnowledgeQuantity",
    "KnowledgeLayer",
    "KnowledgeResult",
    "InputDistance",
    "DistanceLayer",
    "DistanceResult",
    "WinnerDistance",
    "WinnerResult",
    "distance_from_stats",
    *_chapter3_maps.__all__,
]

_I = STAT_INDEX


def _count_strength(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per sample ``count(x)`` and ``strength(x)`` (float64 ``[B]``)."""
    return (x != 0).flatten(1).sum(1).double(), x.abs().flatten(1).sum(1).double()


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
        """JSON-safe summary: the attributes, NaN ratios as ``None``."""
        return {k: (to_jsonable(v) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class KnowledgeResult:
    """``{layer: KnowledgeLayer}`` and the number of samples left out because their input is zero."""

    layers: Dict[str, KnowledgeLayer]
    n_skipped_zero_input: int = 0

    def __getitem__(self, layer: str) -> KnowledgeLayer:
        return self.layers[layer]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe summary: ``n_skipped_zero_input`` and ``layers`` (``{layer: KnowledgeLayer.to_dict()}``)."""
        return {"n_skipped_zero_input": self.n_skipped_zero_input,
                "layers": {k: v.to_dict() for k, v in self.layers.items()}}


class KnowledgeQuantity(ResultEstimator):
    """Knowledge quantity per layer (docs/spec.md §2, Fig. 3-8), from the fused statistics.

    Parameters
    ----------
    batch_size, scan_fn, max_samples, progress
        See the module docstring (``progress`` is also the data-set scan's unless
        ``scan_options`` sets it).
    out_dir : str, optional
        Run as a data-set scan into this folder (:class:`nns_cuda.DatasetScan`; ``data`` a
        map-style data set): resumable, and shared among the ranks under ``torchrun``
        (``result_`` on rank 0, ``None`` elsewhere). ``scan_fn`` does not apply.
    scan_options : dict, optional
        Options of the data-set scan (``block_size``, ``batch_size``, ``backend``, ``progress`` …).
    """

    def __init__(self, *, batch_size: int = 64, scan_fn: Optional[ScanFn] = None, max_samples: Optional[int] = None,
                 out_dir: Optional[str] = None, scan_options: Optional[Dict[str, Any]] = None,
                 progress: bool = True) -> None:
        self.batch_size, self.scan_fn, self.max_samples = batch_size, scan_fn, max_samples
        self.out_dir, self.scan_options = out_dir, scan_options
        self.progress = progress

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> "KnowledgeQuantity":
        """Per layer the count / strength ratios (all neurons and active only).

        Parameters
        ----------
        model : nn.Module
            In eval mode.
        data : iterable of ``(x [B, ...], y, fg_mask)`` batches, or a map-style ``Dataset``
            ``y`` and ``fg_mask`` may be absent.
        layers : str or list of str
            Qualified module names, call indices allowed.

        Returns
        -------
        KnowledgeQuantity
            ``self``, with the :class:`KnowledgeResult` in ``result_``.
        """
        where = "KnowledgeQuantity.fit"
        layers = check_layers(model, layers, where)
        check_eval(model, where)
        if self.out_dir is not None:
            self.result_ = _knowledge_dataset(model, data, layers, self.out_dir,
                                              {"progress": self.progress, **(self.scan_options or {})}, self.max_samples)
            return self
        scan = make_scan(model, layers, self.scan_fn, stats=True)
        acc = {l: [NanMean() for _ in range(5)] for l in layers}
        zero: List[int] = []
        n = 0
        batches = iter_batches(data, where, batch_size=self.batch_size, device=model_device(model),
                               max_samples=self.max_samples, input_dims=(2, 3, 4, 5))
        for b in tqdm(batches, desc="knowledge quantity", unit="batch", leave=False, disable=not self.progress):
            x = b.x
            B = x.shape[0]
            cx, sx = _count_strength(x)
            ok = cx > 0
            zero += (~ok).nonzero().flatten().add(b.offset).tolist()
            n += B
            res = checked_scan(scan, x, b.fg_mask, layers, where)
            for l in layers:
                for a, v in zip(acc[l], _knowledge_per_sample(res[l][1], x).unbind(1)):
                    a.add(v)
        warn_once(ZeroInputWarning, f"{where}: inputs that are zero everywhere have count(x) = strength(x) = 0; "
                  "the ratios are undefined and those samples are left out", len(zero), n, zero)
        out = {}
        for l in layers:
            a = acc[l]
            out[l] = KnowledgeLayer(l, a[0].value, a[1].value, a[2].value, a[3].value, a[4].value, a[0].n, a[2].n)
        self.result_ = KnowledgeResult(out, len(zero))
        return self


def _knowledge_per_sample(stats: Tensor, x: Tensor) -> Tensor:
    """Per sample ``[B, 5]``: count ratio, strength ratio, the two over active neurons only, and the
    active fraction; NaN where undefined (zero input, or no active neuron for the ``*_active``)."""
    B = x.shape[0]
    cx, sx = _count_strength(x)
    ok = cx > 0
    nanv = torch.full((B,), float("nan"), dtype=torch.float64, device=x.device)
    st = stats.reshape(B, -1, NUM_STATS)
    cnt = st[..., _I["nz_fg"]].double() + st[..., _I["nz_bg"]].double()
    stren = st[..., _I["abs_sum"]].double()
    act = cnt > 0
    na = act.sum(1).double()
    r_c = torch.where(ok, cnt.mean(1) / cx.clamp_min(1), nanv)
    r_s = torch.where(ok, stren.mean(1) / sx.clamp_min(1e-300), nanv)
    good = ok & (na > 0)
    r_ca = torch.where(good, (cnt * act).sum(1) / na.clamp_min(1) / cx.clamp_min(1), nanv)
    r_sa = torch.where(good, (stren * act).sum(1) / na.clamp_min(1) / sx.clamp_min(1e-300), nanv)
    return torch.stack([r_c, r_s, r_ca, r_sa, na / cnt.shape[1]], 1)


def _knowledge_dataset(model: nn.Module, dataset: Any, layers: List[str], out_dir: str,
                       scan_options: Optional[Dict[str, Any]], max_samples: Optional[int]) -> Optional["KnowledgeResult"]:
    """Knowledge quantity through a data-set scan: each per-sample ratio is a measure whose
    sum over the samples where it is defined, and that number of samples, are accumulated."""
    from torch.utils.data import Subset

    from nns_cuda.engine.dataset_scan import DatasetScan

    if max_samples is not None:
        dataset = Subset(dataset, range(min(int(max_samples), len(dataset))))

    def measure(layer, lr, x, fg):
        v = _knowledge_per_sample(lr.stats, x)
        return torch.cat([torch.nan_to_num(v, nan=0.0), (~torch.isnan(v)).double()], 1)  # [B, 10]

    opts = dict(scan_options or {})
    opts.setdefault("progress", True)
    res = DatasetScan(model, layers, stats=True, measures={"knowledge": measure}, **opts).run(dataset, out_dir,
                                                                                              resume=True)
    if res is None:
        return None
    n = res.samples
    out = {}
    zero = 0
    for l in layers:
        tot = res.measure_mean(l, "knowledge") * n  # sums: 5 values, then 5 counts of defined samples
        vals = [float(tot[j] / tot[5 + j]) if tot[5 + j] > 0 else float("nan") for j in range(5)]
        counts = [int(round(float(tot[5 + j]))) for j in range(5)]
        out[l] = KnowledgeLayer(l, vals[0], vals[1], vals[2], vals[3], vals[4], counts[0], counts[2])
        zero = n - counts[0]
    if zero:
        warn_once(ZeroInputWarning, "KnowledgeQuantity.fit: inputs that are zero everywhere have count(x) = "
                  "strength(x) = 0; the ratios are undefined and those samples are left out", zero, n, [])
    return KnowledgeResult(out, zero)


# ============================================================================================
# Distances (eq. 3-15, Fig. 3-9)
# ============================================================================================
def distance_from_stats(stats: Tensor, x: Tensor) -> Tensor:
    """``‖LI_n − x‖₂`` from the fused statistics (eq. 3-15).

    Parameters
    ----------
    stats : Tensor [B, *N, NUM_STATS]
        Per-neuron statistics (:data:`nns_cuda.ops.reference.stats.STAT_NAMES` order).
    x : Tensor [B, ...]
        The inputs.

    Returns
    -------
    float64 Tensor [B, *N]
        ``sqrt(max(sq_sum − 2·x_dot + Σx², 0))``.
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
        """JSON-safe ``{layer, own, own_subset, unrelated, n_neurons_unrelated, n_samples, n_reference}``
        (``None`` where undefined); ``arrays=True`` adds ``own_per_neuron`` (flattened)."""
        d = {"layer": self.layer, "own": to_jsonable(self.own), "own_subset": to_jsonable(self.own_subset),
             "unrelated": to_jsonable(self.unrelated),
             "n_neurons_unrelated": None if self.neurons is None else int(self.neurons.numel()),
             "n_samples": self.n_samples, "n_reference": self.n_reference}
        if arrays:
            d["own_per_neuron"] = to_jsonable(self.own_per_neuron.double().flatten())
        return d


@dataclass
class DistanceResult(LayersResult):
    """``{layer: DistanceLayer}``: the result of :meth:`InputDistance.fit`."""

    layers: Dict[str, DistanceLayer]


class InputDistance(ResultEstimator):
    """Distance of learned images to their own input and to unrelated samples (eq. 3-15, Fig. 3-9).

    Parameters
    ----------
    unrelated : bool
        Also compute the distance to unrelated samples (dense learned images).
    n_reference : int
        The unrelated samples ``J`` are the first ``n_reference`` samples of the data (minus ``I``
        itself); with ``n_reference ≥`` the data-set size this is the exact mean over all other
        samples. At least 2 when ``unrelated``.
    max_neurons : int, optional
        Per layer, the unrelated distance uses at most this many neurons (a seeded random subset;
        the output layer usually has few). ``None``: all.
    seed : int
        Seed of the neuron subset.
    chunk : int
        Neurons per dense learned-image call.
    batch_size, scan_fn, li_fn, max_samples, progress
        See the module docstring.
    """

    def __init__(self, *, unrelated: bool = True, n_reference: int = 100, max_neurons: Optional[int] = 256, seed: int = 0,
                 chunk: int = 64, batch_size: int = 64, scan_fn: Optional[ScanFn] = None, li_fn: Optional[LiFn] = None,
                 max_samples: Optional[int] = None, progress: bool = True) -> None:
        self.unrelated, self.n_reference, self.max_neurons = unrelated, n_reference, max_neurons
        self.seed, self.chunk, self.batch_size, self.scan_fn = seed, chunk, batch_size, scan_fn
        self.li_fn, self.max_samples, self.progress = li_fn, max_samples, progress

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> "InputDistance":
        """Own and unrelated distances per layer over ``data``.

        Parameters
        ----------
        model, data, layers
            As :meth:`KnowledgeQuantity.fit`.

        Returns
        -------
        InputDistance
            ``self``, with the :class:`DistanceResult` in ``result_``.
        """
        if self.n_reference < 2 and self.unrelated:
            raise ValueError("InputDistance: n_reference must be >= 2 (one sample is always excluded as 'itself').")
        where = "InputDistance.fit"
        layers = check_layers(model, layers, where)
        check_eval(model, where)
        scan = make_scan(model, layers, self.scan_fn, stats=True)
        li_fn = make_li_fn(self.li_fn)
        own_sum: Dict[str, Tensor] = {}
        shapes: Dict[str, Tuple[int, ...]] = {}
        subsets: Dict[str, Optional[Tensor]] = {l: None for l in layers}
        own_sub = {l: NanMean() for l in layers}
        unrel = {l: NanMean() for l in layers}
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

        batches = iter_batches(data, where, batch_size=self.batch_size, device=model_device(model),
                               max_samples=self.max_samples, input_dims=(2, 3, 4, 5))
        for b in tqdm(batches, desc="distances", unit="batch", leave=False, disable=not self.progress):
            x = b.x
            B = x.shape[0]
            res = checked_scan(scan, x, b.fg_mask, layers, where)
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
        return self


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
        """JSON-safe summary.

        Returns
        -------
        dict
            ``output_layer``, ``dist`` (``C`` lists of ``C``), ``count_ratio`` / ``strength_ratio``
            (``[C]``), ``n_per_class``, ``winner_is_closest`` and ``winner_distance``; NaN as ``None``.
        """
        return {"output_layer": self.output_layer,
                "dist": to_jsonable(self.dist.double()),
                "count_ratio": to_jsonable(self.count_ratio.double()),
                "strength_ratio": to_jsonable(self.strength_ratio.double()),
                "n_per_class": self.n_per_class.tolist(), "winner_is_closest": self.winner_is_closest,
                "winner_distance": to_jsonable(self.winner_distance)}


class WinnerDistance(ResultEstimator):
    """The ``C × C`` DIST matrix of the output neurons (eq. 3-16, Fig. 3-10, Table 3-2).

    Parameters
    ----------
    output_layer : str, optional
        A layer with ``C`` output neurons (default: the last leaf module called).
    batch_size, scan_fn, max_samples, progress
        See the module docstring.
    """

    def __init__(self, *, output_layer: Optional[str] = None, batch_size: int = 64, scan_fn: Optional[ScanFn] = None,
                 max_samples: Optional[int] = None, progress: bool = True) -> None:
        self.output_layer, self.batch_size, self.scan_fn = output_layer, batch_size, scan_fn
        self.max_samples, self.progress = max_samples, progress

    def fit(self, model: nn.Module, data: Any) -> "WinnerDistance":
        """The DIST matrix over ``data``.

        Parameters
        ----------
        model : nn.Module
            A classifier in eval mode.
        data : iterable of ``(x [B, ...], y [B][, fg_mask])`` batches, or a map-style ``Dataset``
            Labels are required, in ``[0, C)``.

        Returns
        -------
        WinnerDistance
            ``self``, with the :class:`WinnerResult` in ``result_``.
        """
        where = "WinnerDistance.fit"
        check_eval(model, where)
        dev = model_device(model)
        scan = None
        layer = self.output_layer
        C = None
        batches = iter_batches(data, where, batch_size=self.batch_size, device=dev, need_labels=True,
                               max_samples=self.max_samples, input_dims=(2, 3, 4, 5))
        for b in tqdm(batches, desc="winner distances", unit="batch", leave=False, disable=not self.progress):
            x, y = b.x, b.y
            if scan is None:
                if layer is None:
                    layer = output_layer_name(trace_calls(model, x[:1]))
                check_layers(model, [layer], where)
                scan = make_scan(model, [layer], self.scan_fn, stats=True)
            act, st = checked_scan(scan, x, b.fg_mask, [layer], where)[layer]
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
            cx, sx = _count_strength(x)
            csum.index_add_(0, y, torch.where(cx > 0, cnt / cx.clamp_min(1), torch.zeros_like(cnt)))
            ssum.index_add_(0, y, torch.where(sx > 0, st[ar, y, _I["abs_sum"]] / sx.clamp_min(1e-300), torch.zeros_like(cnt)))
            ncls += torch.bincount(y, minlength=C)
        nd = ncls.double()
        nan = torch.full_like(nd, float("nan"))
        dist = torch.where(nd[:, None] > 0, dsum / nd.clamp_min(1)[:, None], nan[:, None].expand(C, C))
        self.result_ = WinnerResult(layer, dist.cpu(), torch.where(nd > 0, csum / nd.clamp_min(1), nan).cpu(),
                                    torch.where(nd > 0, ssum / nd.clamp_min(1), nan).cpu(), ncls.cpu())
        return self


