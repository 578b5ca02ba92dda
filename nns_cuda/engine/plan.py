"""The per-layer plan of a scan: forward patches or reverse VJPs for each requested layer.

The two exact strategies of :class:`~nns_cuda.engine.scanner.Scanner` (docs/spec.md §1) cost
very different things:

* **forward** patch propagation pays, for every node up to the layer, ``2·D·|window|`` FLOPs per
  active (output neuron, input neuron, tap) triple and the writing of every neuron's
  receptive-field patch (``D·R_h·R_w`` values); shared by all requested layers, cheap while
  receptive fields are small, growing with their area;
* **reverse** VJP sweeps pay, for every cotangent *row* (one per filter, or per neuron for
  statistics and images), one transposed pass from the layer down to the input: the dense
  convolution FLOPs of everything below the layer, whatever the receptive field.

:func:`make_plan` predicts both for every requested layer from the receptive-field geometry
(:mod:`nns_cuda.engine.receptive_field`), the activity measured on the recorded forward pass
(the fraction of gates that are on) and the memory budget, and picks the cheapest assignment
whose working set stays within the batching budget (the larger per-sample bound only for a plan
predicted :data:`FIT_GAIN` times faster):
the shallowest ``k`` layers forward (their propagation is shared), the rest reverse, for every
``k`` whose forward working set fits — untiled, or in bands of rows
(:func:`~nns_cuda.engine.propagate.row_tiles`) when one sample does not fit. When a node lies on
every path to a reverse-planned layer, the reverse sweep of that layer may stop there (the
*cut*, :mod:`nns_cuda.engine.backward`): the node's patches are propagated forward (a
forward-planned layer, or a node propagated for the cut alone) and each row contracted with
them. The plan takes the cheapest cut when the contraction is predicted cheaper than the sweep
below it — typically just below a max-pool, where the sweep would otherwise run the first
layers' transposed convolutions on maps four times larger (ResNet-18's stem max-pool, VGG-16's
second max-pool at 224 × 224).

The machine constants (:class:`Rates`) are per backend; the CPU ones were measured on the
development machine (``benchmarks/NOTES.md``, "Per-layer plan"), the CUDA ones are a prediction
and are labelled as such. Predicted seconds are a ranking device, not a promise: the plan
records them so that a run can be compared with its prediction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from nns_cuda.engine.backward import (CHANNEL_WISE, cut_temp_elems, dominates, grad_reach, one_channel_ok,
                                      sweep_budget, sweep_bytes_per_row)
from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.graph import ACTIVATIONS, GNode, ScanGraph
from nns_cuda.engine.inputs import image_dims
from nns_cuda.engine.memory import format_bytes, fused_nodes, node_patch_elems, propagation_peak
from nns_cuda.engine.propagate import row_tiles, tile_blocker

__all__ = ["Rates", "RATES", "LayerPlan", "Plan", "make_plan", "activity", "forced_plan", "BAND_SLACK", "FIT_GAIN"]


from nns_cuda.engine._plan_records import RATES, LayerPlan, Plan, Rates, _finite, _secs  # noqa: F401


def activity(graph: ScanGraph, fwd: Optional[ForwardPass], needed: Set[int]) -> Dict[int, float]:
    """Fraction of each needed node's neurons whose learned image can be non-zero, on the
    batch of ``fwd``: the input's non-zero entries, an activation's gates that are on (times
    its input's activity), a residual ``+``'s union, a window's fan-in. Without a forward pass
    (an empty batch) gates count as half on."""
    act: Dict[int, float] = {}
    for g in graph.nodes:
        if g.idx not in needed or g.kind == "aux":
            continue
        ins = [act.get(i, 1.0) for i in g.inputs]
        a_in = ins[0] if ins else 1.0
        if g.kind == "input":
            a = 1.0 if fwd is None or fwd.value(g).numel() == 0 else float((fwd.value(g) != 0).double().mean())
        elif g.kind in ACTIVATIONS:
            a = a_in * _gate_on(fwd, g)
        elif g.kind == "add":
            a = 1.0 - (1.0 - ins[0]) * (1.0 - ins[1])
        elif g.kind == "cat":
            sizes = [graph.nodes[i].shape[0] for i in g.inputs]
            a = sum(s * v for s, v in zip(sizes, ins)) / max(1, sum(sizes))
        elif g.kind in ("conv", "avgpool", "adaptive_avgpool", "global_mean", "linear"):
            a = 1.0 - (1.0 - min(a_in, 1.0)) ** max(1, _fan_in(graph, g))
        else:  # maxpool, bn, identity, slice, reshape
            a = a_in
        act[g.idx] = max(0.0, min(1.0, a))
    return act


def _gate_on(fwd: Optional[ForwardPass], act: GNode) -> float:
    if fwd is None:
        return 0.5
    cache = fwd.__dict__.setdefault("_plan_gate_on", {})
    if act.idx not in cache:
        gate = fwd.act_gate(act)
        cache[act.idx] = float((gate != 0).double().mean()) if gate.numel() else 0.5
    return cache[act.idx]


def _fan_in(graph: ScanGraph, g: GNode) -> int:
    if g.kind == "conv":
        w = g.module.weight
        return int(w.shape[1] * w.shape[2] * w.shape[3])
    if g.kind == "linear":
        return int(g.module.weight.shape[1])
    if g.kind == "avgpool":
        return int(g.attrs["kernel"][0] * g.attrs["kernel"][1])
    src = graph.nodes[g.inputs[0]].shape
    n_out = max(1, int(math.prod(g.shape[1:])) if len(g.shape) == 3 else 1)
    return max(1, int(math.prod(src[1:])) // n_out) if len(src) == 3 else 1


# ----------------------------------------------------------------------------- costs
class _Costs:
    """Per-node forward costs and per-row reverse costs of one graph, input and batch activity."""

    def __init__(self, graph: ScanGraph, fwd: Optional[ForwardPass], requested: Sequence[GNode], rates: Rates,
                 esize: int, stats: bool, filters: bool, images: bool, band_target: int = 0):
        self.graph, self.rates, self.esize = graph, rates, esize
        self.band_target = band_target   # bytes: more bands down to this if they cost little more
        self.stats, self.filters, self.images = stats, filters, images
        self.req = list(requested)
        self.req_idx = {g.idx for g in requested}
        D, H, W = image_dims(graph.input_shape)
        self.D, self.H, self.W, self.P = D, H, W, D * H * W
        self.needed = graph.ancestors([g.idx for g in requested])
        self.act = activity(graph, fwd, self.needed)
        self.fwd = fwd
        self.fused = fused_nodes(graph, self.req_idx)
        self.elems = {i: node_patch_elems(graph, graph.nodes[i]) for i in self.needed
                      if graph.nodes[i].kind != "aux"}
        self.reach = grad_reach(graph)
        self._fwd_node: Dict[int, float] = {}
        self._rev_node: Dict[int, float] = {}
        self.parts: Dict[tuple, tuple] = {}
        # peak and per-node row factors of a propagation in n bands: whatever bound it is held to
        self.bands: Dict[tuple, Tuple[int, Dict[int, float]]] = {}

    # --------------------------------------------------------------- forward
    def window(self, g: GNode) -> int:
        """Patch elements per neuron and input channel (``|window|``)."""
        if g.kind == "input":
            return 1
        if g.spatial:
            return min(g.gy.R, self.H) * min(g.gx.R, self.W)
        return self.H * self.W

    def out_gate(self, g: GNode) -> float:
        """Fraction of a conv's outputs that the forward ops compute (a fused activation's gate)."""
        graph = self.graph
        act = graph.gate_user(g)
        if act is None and len(g.users) == 1 and graph.nodes[g.users[0]].kind == "bn" and g.idx not in self.req_idx:
            bn = graph.nodes[g.users[0]]
            if bn.idx not in self.req_idx:
                act = graph.gate_user(bn)
        return _gate_on(self.fwd, act) if act is not None else 1.0

    def forward_node(self, i: int) -> float:
        """Predicted seconds per sample of one node of the forward propagation."""
        if i in self._fwd_node:
            return self._fwd_node[i]
        g = self.graph.nodes[i]
        r = self.rates
        D = self.D
        n_out = int(math.prod(g.shape)) if g.shape else 1
        flops, elems = 0.0, 0.0
        if g.kind == "input":
            elems = self.elems.get(i, 0)
        elif g.idx in self.fused or g.kind in ("identity", "slice"):
            elems = 0
        elif g.kind == "conv" or (g.kind in ("avgpool", "adaptive_avgpool", "global_mean") and g.spatial):
            src = self.graph.nodes[g.inputs[0]]
            if g.kind == "conv":
                w = g.module.weight
                taps = int(w.shape[1] * w.shape[2] * w.shape[3])
            else:
                k = g.attrs.get("kernel", (1, 1))
                taps = int(k[0] * k[1])
            pairs = taps * self.act.get(src.idx, 1.0)
            gate = self.out_gate(g) if g.kind == "conv" else 1.0
            flops = 2.0 * D * self.window(src) * pairs * n_out * gate
            elems = self.elems.get(i, n_out * D * self.window(g))
        elif g.kind == "linear" or g.kind in ("adaptive_avgpool", "global_mean"):
            src = self.graph.nodes[g.inputs[0]]
            n_in = int(math.prod(src.shape))
            fan = n_in if g.kind == "linear" else _fan_in(self.graph, g)
            flops = 2.0 * self.P * fan * self.act.get(src.idx, 1.0) * n_out
            elems = n_out * self.P
        elif g.kind == "add":
            elems = 2 * self.elems.get(i, 0)
        else:  # maxpool, cat, reshape, unfused activation / BN: one written copy
            elems = self.elems.get(i, 0)
        t = flops / r.forward_flops + elems * r.forward_elem_s + r.node_s
        self._fwd_node[i] = t
        return t

    def reduction(self, g: GNode) -> float:
        """Predicted seconds per sample of a forward layer's reductions (gating copy, filter
        fold, statistics, dense images)."""
        n = self.elems.get(g.idx, 0)
        work = n  # the gated copy handed to the reductions
        if self.filters:
            work += n
        if self.stats:
            work += 3 * n
        if self.images:
            work += int(math.prod(g.shape)) * self.P
        return work * self.rates.forward_elem_s

    # --------------------------------------------------------------- reverse
    def reverse_node(self, i: int) -> float:
        """Predicted seconds of one node's VJP for one row of one sample."""
        if i in self._rev_node:
            return self._rev_node[i]
        g = self.graph.nodes[i]
        r = self.rates
        n_out = int(math.prod(g.shape)) if g.shape else 1
        flops, elems = 0.0, 0.0
        if g.kind == "input":
            elems = 2 * self.P
        elif g.kind == "conv":
            w = g.module.weight
            src = self.graph.nodes[g.inputs[0]]
            flops = 2.0 * n_out * int(w.shape[1] * w.shape[2] * w.shape[3])
            rate = r.reverse_thin_flops if src.shape[0] <= 4 else r.reverse_flops
            t = flops / rate + (n_out + int(math.prod(src.shape))) * r.reverse_elem_s
            self._rev_node[i] = t
            return t
        elif g.kind == "linear":
            flops = 2.0 * g.module.weight.numel()
        elif g.kind in ("maxpool", "avgpool", "adaptive_avgpool", "global_mean", "slice"):
            elems = 2 * int(math.prod(self.graph.nodes[g.inputs[0]].shape))
        elif g.kind in ("add", "cat"):
            elems = n_out
        elif g.kind in ACTIVATIONS:
            elems = 2 * n_out
        elif g.kind == "bn":
            src = self.graph.nodes[g.inputs[0]]
            elems = 0 if (src.kind == "conv" and len(src.users) == 1) else 2 * n_out  # folded into the conv
        t = flops / r.reverse_flops + elems * r.reverse_elem_s
        self._rev_node[i] = t
        return t

    def rows(self, g: GNode) -> int:
        n = 0
        if self.filters and len(g.shape) in (1, 3):
            n += g.shape[0]
        if self.stats or self.images:
            n += int(math.prod(g.shape))
        return n

    def row_extra(self, g: GNode) -> float:
        """Seconds per row outside the sweep: building its cotangent (a fresh map of the layer's
        shape, zeroed, filled, read by the first VJPs: :data:`ROW_MAP_PASSES` element passes),
        reducing its image."""
        work = ROW_MAP_PASSES * int(math.prod(g.shape)) + self.P
        if self.stats:
            work += 4 * self.P
        return work * self.rates.reverse_elem_s

    def path(self, g: GNode, stop: Optional[int]) -> float:
        """Seconds of one row's sweep from ``g`` down to the input (or to ``stop``); the convs its
        rows reach still non-zero in one channel run row by row (:meth:`one_channel_conv`)."""
        swept = self.swept([g], stop)
        first = self.one_channel_convs(g, swept)
        return sum(self.one_channel_conv(i) if i in first else self.reverse_node(i) for i in swept)

    def one_channel_convs(self, g: GNode, swept: Sequence[int]) -> Set[int]:
        """The convs whose transposed conv sees rows of ``g`` non-zero in one channel (as
        :class:`~nns_cuda.engine.backward.BackwardSweep` tracks them): reached from ``g`` through
        channel-wise nodes only, each the only swept user of the node below it."""
        if len(g.shape) != 3:
            return set()
        inside = set(swept) | {g.idx}
        pure, out = {g.idx}, set()
        for i in sorted(inside, reverse=True):
            node = self.graph.nodes[i]
            if i != g.idx:
                users = [u for u in node.users if u in inside]
                if not (len(users) == 1 and users[0] in pure and self.graph.nodes[users[0]].kind in CHANNEL_WISE):
                    continue
                pure.add(i)
            if node.kind == "conv" and one_channel_ok(node):
                out.add(i)
        return out

    def one_channel_conv(self, i: int) -> float:
        """Predicted seconds of a conv's transposed conv for one row non-zero in one channel (one
        GEMM over the map's windows, ``K`` = the kernel's taps: memory-bound, counted as one
        element per output and tap)."""
        g = self.graph.nodes[i]
        w = g.module.weight
        src = self.graph.nodes[g.inputs[0]]
        taps = int(w.shape[2] * w.shape[3])
        return (int(math.prod(g.shape[1:])) + int(math.prod(src.shape)) * taps) * self.rates.reverse_elem_s

    def swept(self, layers: Sequence[GNode], stop: Optional[int]) -> List[int]:
        """The nodes a sweep of rows of ``layers`` runs a VJP at (down to the input or ``stop``)."""
        lo = -1 if stop is None else stop
        return [i for i in self.graph.ancestors([g.idx for g in layers]) if i in self.reach and i > lo
                and self.graph.nodes[i].kind != "aux"]

    def cut_elems(self, m: int) -> int:
        """Elements of the cut's contraction matrix (:class:`~nns_cuda.engine.backward.CutMatrix`:
        padded windows of the full receptive field) per sample."""
        g = self.graph.nodes[m]
        if g.spatial and tuple(g.shape[1:]) != (1, 1):
            C, Ho, Wo = g.shape
            return C * Ho * Wo * self.D * max(g.gy.R, min(g.gy.R, self.H)) * max(g.gx.R, min(g.gx.R, self.W))
        return int(math.prod(g.shape)) * self.P

    def contraction(self, m: int) -> float:
        """Seconds per row of the contraction with the cut's patches (a GEMM over the cut's
        neurons for every window entry, then the overlap-add of the windows)."""
        e = self.cut_elems(m)
        return 2.0 * e / self.rates.cut_flops + e * self.rates.cut_build_s / max(1, self.graph.nodes[m].shape[0])


#: Element passes over a reverse row's own map (zeroing fresh memory, the filter's values, its
#: gate, the first VJP's read): a ReLU after a 3 x 3 conv at 224 x 224 on the CPU spent ~1.4 ns per
#: element of its rows' maps outside the convolutions (``torch.profiler``: zeros 1.15, gates 0.25)
ROW_MAP_PASSES = 4


# ----------------------------------------------------------------------------- the plan
#: A forward part over the batching budget takes more bands of rows than the fewest that fit the
#: per-sample bound, down to the batching budget, while they are predicted to cost at most this
#: fraction more (a smaller working set for a few halo rows recomputed).
BAND_SLACK = 0.05

#: Left to the cost model, a plan holds one sample within the batching budget unless a plan within
#: the larger per-sample bound is predicted at least this many times faster (forward patches at a
#: small input against per-neuron reverse sweeps: 10-10^4 times).
FIT_GAIN = 2.0


def _forward_part(costs: _Costs, fwd_nodes: List[GNode], fit: int, reference: bool, keep: Sequence[int] = (),
                  extra: Sequence[GNode] = ()) -> Tuple[float, int, int, int, Dict[int, float]]:
    """Cost, bands, peak bytes per sample and untiled need of propagating ``fwd_nodes`` (and
    ``extra`` nodes, propagated but not reduced: a cut), keeping the patches of ``keep`` to the
    end (``inf`` cost when it does not fit ``fit`` in any number of bands), and each layer's own
    share."""
    key = (tuple(g.idx for g in fwd_nodes), tuple(g.idx for g in extra), fit, reference, tuple(keep))
    if key not in costs.parts:
        costs.parts[key] = _forward_part_uncached(costs, list(fwd_nodes), list(extra), fit, reference, keep)
    cost, n, peak, need, shares = costs.parts[key]
    return cost, n, peak, need, dict(shares)


def _forward_part_uncached(costs: _Costs, fwd_nodes: List[GNode], extra: List[GNode], fit: int, reference: bool,
                           keep: Sequence[int]) -> Tuple[float, int, int, int, Dict[int, float]]:
    if not fwd_nodes and not extra:
        return 0.0, 1, 0, 0, {}
    graph = costs.graph
    prop = sorted({g.idx: g for g in list(fwd_nodes) + list(extra)}.values(), key=lambda n: n.idx)
    req = [g.idx for g in prop]
    needed = [i for i in sorted(graph.ancestors(req)) if graph.nodes[i].kind != "aux"]
    kept = sum(costs.elems[i] for i in keep) * costs.esize
    # the working set: the patches alive at once (the results — statistics, filter images,
    # dense images — are the scan's output, not its working set, as for max_memory's meaning)
    untiled = propagation_peak(graph, req, costs.elems, costs.esize, reference, keep)
    # the layer that first needs a node pays for it (a node only a cut needs: the cut's layer)
    owner: Dict[int, int] = {}
    for g in prop:
        for i in graph.ancestors([g.idx]):
            owner.setdefault(i, g.idx)
    shares: Dict[int, float] = {g.idx: 0.0 for g in prop}
    for g in fwd_nodes:
        shares[g.idx] += costs.reduction(g)
    base = {i: costs.forward_node(i) for i in needed}
    if untiled <= fit:
        for i in needed:
            shares[owner[i]] += base[i]
        return sum(shares.values()), 1, untiled, untiled, shares
    if tile_blocker(graph, req) is not None:
        return math.inf, 1, untiled, untiled, shares
    max_rows = max(graph.nodes[i].shape[1] for i in req)

    def banded(n: int) -> Tuple[int, Dict[int, float]]:
        key = (tuple(req), tuple(keep), reference, n)
        if key in costs.bands:
            return costs.bands[key]
        peak, factor = 0, {i: 0.0 for i in needed}
        for t in row_tiles(graph, req, n):
            elems = {i: costs.elems[i] * (t.rows[i][1] - t.rows[i][0]) // max(1, _height(graph, i))
                     for i in t.rows}
            peak = max(peak, propagation_peak(graph, [r for r in req if r in t.rows], elems, costs.esize, reference))
            for i, (lo, hi) in t.rows.items():
                factor[i] += (hi - lo) / max(1, _height(graph, i))
        costs.bands[key] = (peak + kept, factor)  # a kept cut is assembled from the bands: all of it at the end
        return costs.bands[key]

    thinnest = banded(max_rows)
    if thinnest[0] <= fit:  # bands of one row fit: the fewest bands that do, or more (below)
        sizes = [2]
        while sizes[-1] < max_rows:
            sizes.append(min(max_rows, sizes[-1] * 2 if sizes[-1] < 8 else sizes[-1] + max(1, sizes[-1] // 2)))

        def node_cost(i: int, n: int, factor: Dict[int, float]) -> float:
            return base[i] * max(1.0, factor[i]) + (n - 1) * costs.rates.node_s

        best = first = None
        for n in sizes:
            peak, factor = thinnest if n == max_rows else banded(n)
            if peak > fit:
                continue
            c = sum(node_cost(i, n, factor) for i in needed)
            if first is None:
                first = c
            elif c > first * (1 + BAND_SLACK):
                break
            if best is None or peak < best[1]:
                best = (n, peak, factor)
            if peak <= costs.band_target:
                break
        n, peak, factor = best
        for i in needed:
            shares[owner[i]] += node_cost(i, n, factor)
        return sum(shares.values()), n, peak, untiled, shares
    return math.inf, 1, untiled, untiled, shares


def _height(graph: ScanGraph, i: int) -> int:
    g = graph.nodes[i]
    return g.shape[1] if len(g.shape) == 3 else 1


def make_plan(graph: ScanGraph, fwd: Optional[ForwardPass], names: Sequence[str], nodes: Sequence[GNode], *,
              backend: str, esize: int, budget: int, fit_budget: int, stats: bool, filters: bool, images: bool,
              allow_forward: bool = True, allow_reverse: bool = True, batch: int = 1,
              forward: Optional[Sequence[str]] = None, cut: Optional[str] = "auto", device_type: str = "cpu") -> Plan:
    """The cheapest per-layer plan (see the module notes).

    Parameters
    ----------
    graph : ScanGraph
    fwd : ForwardPass or None
        A recorded forward pass (for the activity); None: gates count as half on.
    names, nodes : sequences
        The requested layers' addresses and nodes (same order).
    backend : str
        The resolved backend (its :data:`RATES`).
    esize : int
        Bytes per element of the forward patches.
    budget, fit_budget : int
        The batching budget and the bound on one sample's working set (bytes). The cost model's
        choice (``forward`` left to it, both strategies allowed) holds one sample within
        ``budget`` unless a plan within ``fit_budget`` is predicted :data:`FIT_GAIN` times faster.
    stats, filters, images : bool
        What the scan computes.
    allow_forward, allow_reverse : bool
        Strategies that may run (a precision only the forward strategy honours forbids reverse).
    batch : int
        Samples per batch (the reverse sweep's working set scales with it).
    forward : sequence of str or None
        Force these layers forward and the others reverse (None: chosen by cost).
    cut : str, None or "auto"
        The cut node: ``"auto"`` chosen by cost, None none, or the address of a forward layer.
    device_type : str
        Where the scan runs: a reverse sweep on the CPU plans its rows within
        :func:`~nns_cuda.engine.backward.sweep_budget`.

    Returns
    -------
    Plan

    Raises
    ------
    ValueError
        A forced assignment that cannot run (a cut that is not a forward layer, does not lie on
        every path to a reverse layer, or carries a gate).
    MemoryError
        When nothing fits: no reverse allowed and the forward propagation exceeds the
        budget in any number of bands.
    """
    rates = RATES.get(backend, RATES["cpu"])
    uniq: Dict[int, GNode] = {}
    for g in nodes:
        uniq.setdefault(g.idx, g)
    req = sorted(uniq.values(), key=lambda g: g.idx)
    costs = _Costs(graph, fwd, req, rates, esize, stats, filters, images, band_target=budget)
    reference = backend == "reference"
    batch = max(1, batch)

    def reverse_cost(rev: List[GNode], cut_idx: Optional[int]) -> Tuple[float, Dict[int, float], int]:
        per_layer = {}
        for g in rev:
            stop = cut_idx if cut_idx is not None and dominates(graph, cut_idx, [g]) else None
            per_row = costs.path(g, stop) + costs.row_extra(g) + (costs.contraction(stop) if stop is not None else 0)
            per_layer[g.idx] = costs.rows(g) * per_row
        if not rev:
            return 0.0, per_layer, 0
        total_rows = sum(costs.rows(g) for g in rev)
        # as reverse_scan chunks them: the cut's matrix first, then as many rows as fit
        matrix = 0 if cut_idx is None else costs.cut_elems(cut_idx) * esize
        sb = sweep_budget(budget, device_type, matrix)
        cut_mem = 0 if cut_idx is None else matrix + 2 * cut_temp_elems(
            costs.cut_elems(cut_idx) // max(1, graph.nodes[cut_idx].shape[0]), sb - matrix, esize) * esize
        stopped = [g for g in rev if cut_idx is not None and dominates(graph, cut_idx, [g])]
        rest = [g for g in rev if g not in stopped]
        per_row_bytes = max([sweep_bytes_per_row(graph, grp, stop, batch, esize) // batch
                             for grp, stop in ((stopped, cut_idx), (rest, None)) if grp])
        avail = sb - cut_mem
        if cut_idx is not None and avail < per_row_bytes * batch:  # (without a cut one row always runs)
            return math.inf, {g.idx: math.inf for g in rev}, cut_mem + per_row_bytes
        mem_rows = max(1, min(total_rows, avail // max(1, per_row_bytes * batch)))
        mem = per_row_bytes * mem_rows + cut_mem
        sweeps = math.ceil(total_rows / mem_rows)
        fixed = rates.reverse_fixed_s + sweeps * len(costs.swept(rev, cut_idx)) * rates.node_s / batch
        for g in rev:  # shared by the layers in proportion to their rows
            per_layer[g.idx] += fixed * costs.rows(g) / max(1, total_rows)
        if cut_idx is not None:
            per_layer[rev[0].idx] += costs.cut_elems(cut_idx) * rates.cut_build_s
        return sum(per_layer.values()), per_layer, mem

    reach = grad_reach(graph)

    def cut_ok(m: GNode, fwd_set: List[GNode], rev: List[GNode]) -> Optional[str]:
        if m.idx in {g.idx for g in rev}:
            return (f"the cut {m.name!r} is planned reverse: its patches come from the forward propagation; plan "
                    "it forward or cut at another node")
        if m.kind in ("input", "aux", "unsupported") or m.idx not in reach:
            return f"the cut {m.name!r} has no learned images to contract"
        if graph.gate_user(m) is not None or (fwd is not None and fwd.gate_outputs and m.idx == graph.output_idx):
            return f"the cut {m.name!r} carries a neuron gate (an activation follows it); cut at the activation"
        if graph.blocker(m) is not None:
            return f"the cut {m.name!r} cannot be propagated forward"
        if not any(dominates(graph, m.idx, [g]) for g in rev):
            return f"the cut {m.name!r} does not lie on every path to any reverse layer"
        return None

    def cut_candidates(fwd_set: List[GNode], rev: List[GNode], bound: int) -> List[GNode]:
        """Nodes the sweeps of ``rev`` could stop at: on every path to one of them, ungated,
        and with a contraction matrix within ``bound`` (bytes of one sample's working set)."""
        if not rev:
            return []
        out = []
        top = max(g.idx for g in rev)
        for m in graph.nodes[:top]:
            if m.kind in ("input", "aux", "unsupported") or m.idx not in costs.needed:
                continue
            if (costs.cut_elems(m.idx) + costs.elems.get(m.idx, 0)) * esize > bound:
                continue
            if cut_ok(m, fwd_set, rev) is None:
                out.append(m)
        return out

    def evaluate(fwd_set: List[GNode], rev: List[GNode], cut_choice, bound: int = fit_budget):
        keep_options: List[Optional[GNode]] = [None]
        if cut_choice == "auto":
            keep_options += cut_candidates(fwd_set, rev, bound)
        elif cut_choice is not None:
            keep_options = [cut_choice]
        best = None
        fwd_idx = {g.idx for g in fwd_set}
        for m in keep_options:
            extra = [] if m is None or m.idx in fwd_idx else [m]
            f_cost, tiles, f_mem, need, shares = _forward_part(costs, fwd_set, bound, reference,
                                                              keep=() if m is None else (m.idx,), extra=extra)
            r_cost, r_shares, r_mem = reverse_cost(rev, None if m is None else m.idx)
            if m is not None and (r_mem > bound or not math.isfinite(r_cost)):
                continue
            if m is not None and m.idx not in fwd_idx:  # the cut's own propagation: the first reverse layer's
                r_shares[rev[0].idx] += shares.pop(m.idx, 0.0)
            total = f_cost + r_cost
            cand = (total, m, tiles, f_mem, r_mem, need, shares, r_shares, f_cost, r_cost)
            if best is None or total < best[0]:
                best = cand
        return best

    if forward is not None:  # a forced assignment
        fset = {graph.resolve(n).idx for n in forward}
        unknown = fset - set(uniq)
        if unknown:
            raise ValueError(f"forward={list(forward)} names layers that are not scanned; scanned: {list(names)}")
        fwd_set = [g for g in req if g.idx in fset]
        rev = [g for g in req if g.idx not in fset]
        cut_choice = cut
        if cut not in ("auto", None):
            m = graph.resolve(cut)
            why = cut_ok(m, fwd_set, rev)
            if why:
                raise ValueError(why)
            cut_choice = m
        best = evaluate(fwd_set, rev, cut_choice)
        if best is None or not math.isfinite(best[0]):
            m = cut_choice if isinstance(cut_choice, GNode) else None
            extra = [] if m is None or m.idx in fset else [m]
            f_part = _forward_part(costs, fwd_set, fit_budget, reference, keep=() if m is None else (m.idx,),
                                   extra=extra)
            if not math.isfinite(f_part[0]):
                raise MemoryError(f"forward={list(forward)}: the forward part needs about {format_bytes(f_part[3])} "
                                  f"per sample, over max_memory={format_bytes(fit_budget)} even in bands of rows; "
                                  "raise max_memory or plan fewer layers forward")
            r_mem = reverse_cost(rev, None if m is None else m.idx)[2]
            raise MemoryError(f"forward={list(forward)}, cut={cut!r}: the reverse part needs about "
                              f"{format_bytes(r_mem)} per sample with the cut's contraction, over "
                              f"max_memory={format_bytes(fit_budget)}; raise max_memory or cut elsewhere")
        mode = "given"
        candidates = [(fwd_set, rev, best)]
    else:
        ks = range(len(req) + 1)
        if not allow_reverse:
            ks = [len(req)]
        elif not allow_forward:
            ks = [0]
        # the cheapest plan within the batching budget, unless one within one sample's bound is
        # predicted FIT_GAIN times faster (the forced strategies take one sample's bound)
        bounds = (min(budget, fit_budget), fit_budget) if allow_forward and allow_reverse else (fit_budget,)
        tiers = []
        for bound in dict.fromkeys(bounds):
            cands = []
            for k in ks:
                fwd_set, rev = req[:k], req[k:]
                best = evaluate(fwd_set, rev, cut if cut in ("auto", None) else graph.resolve(cut), bound)
                if best is not None:
                    cands.append((fwd_set, rev, best))
            tiers.append((bound, cands, min((c[2][0] for c in cands), default=math.inf)))
        fit_budget, candidates, _ = tiers[-1]
        if len(tiers) == 2 and math.isfinite(tiers[0][2]) and tiers[0][2] <= FIT_GAIN * tiers[1][2]:
            fit_budget, candidates, _ = tiers[0]   # what the plan holds one sample to (recorded below)
        mode = "auto" if allow_forward and allow_reverse else ("forward" if not allow_reverse else "reverse")
    feasible = [c for c in candidates if math.isfinite(c[2][0])]
    if not feasible:
        fwd_set = req
        need = _forward_part(costs, fwd_set, 1 << 62, reference)[3]
        raise MemoryError(
            f"the forward strategy needs about {format_bytes(need)} per sample for these layers, over "
            f"max_memory={format_bytes(fit_budget)} even in bands of rows; raise max_memory or use strategy='reverse'")
    # the cheapest; among (nearly) equal costs the one with more layers forward
    fwd_set, rev, best = min(feasible, key=lambda c: (round(c[2][0], 12), -len(c[0])))
    total, m, tiles, f_mem, r_mem, need, shares, r_shares, _f, _r = best

    # what the cost alone would choose (memory unbounded), for the fallback warning
    memory_bound = False
    forward_need = need
    if mode == "auto":
        free = []
        for k in range(len(req) + 1):
            fs, rv = req[:k], req[k:]
            f_cost = _forward_part(costs, fs, 1 << 62, reference)[0]
            r_cost = reverse_cost(rv, None)[0]
            free.append((round(f_cost + r_cost, 12), -k, fs))
        _, negk, fs_free = min(free)
        memory_bound = -negk > len(fwd_set)
        if memory_bound:
            forward_need = _forward_part(costs, fs_free, 1 << 62, reference)[3]

    def single(fs, rv):
        if fs and not allow_forward or rv and not allow_reverse:
            return math.inf
        return _forward_part(costs, fs, fit_budget, reference)[0] + reverse_cost(rv, None)[0]

    names_of = {g.idx: n for n, g in zip(names, nodes)}
    layers: List[LayerPlan] = []
    all_f: Dict[int, float] = {}
    for j, g in enumerate(req):
        part = _forward_part(costs, req[: j + 1], fit_budget, reference)
        all_f[g.idx] = part[4].get(g.idx, math.inf) if math.isfinite(part[0]) else math.inf
    cut_idx = None if m is None else m.idx
    fwd_idx = {g.idx for g in fwd_set}
    rev_alone = reverse_cost(req, None)[1] if allow_reverse else {}
    for name, g in zip(names, nodes):
        strat = "forward" if g.idx in fwd_idx else "reverse"
        stop = cut_idx if strat == "reverse" and cut_idx is not None and dominates(graph, cut_idx, [g]) else None
        lp = LayerPlan(name=name, index=g.idx, strategy=strat, rows=costs.rows(g),
                       forward_s=all_f.get(g.idx, math.inf) * batch if allow_forward else math.inf,
                       reverse_s=rev_alone.get(g.idx, math.inf) * batch,
                       cut=None if stop is None else names_of.get(stop, graph.nodes[stop].name))
        lp.predicted_s = (shares.get(g.idx, 0.0) if strat == "forward" else r_shares.get(g.idx, 0.0)) * batch
        lp.memory = f_mem if strat == "forward" else r_mem
        layers.append(lp)
    seen = set()
    for lp in layers:  # a layer requested twice is counted once
        if lp.index in seen:
            lp.predicted_s = 0.0
        seen.add(lp.index)
    tot = sum(lp.predicted_s for lp in layers)
    for lp in layers:
        lp.share = lp.predicted_s / tot if tot > 0 else 0.0
    return Plan(layers=layers, cut=None if m is None else names_of.get(m.idx, m.name), cut_index=cut_idx, tiles=tiles,
                forward_memory=f_mem, reverse_memory=r_mem, budget=budget, fit_budget=fit_budget,
                predicted_s=total * batch, all_forward_s=single(req, []) * batch,
                all_reverse_s=single([], req) * batch, backend=backend, mode=mode, memory_bound=memory_bound,
                forward_need=forward_need,
                activity={n: costs.act.get(g.idx, 1.0) for n, g in zip(names, nodes)})


def forced_plan(graph: ScanGraph, fwd: Optional[ForwardPass], names: Sequence[str], nodes: Sequence[GNode],
                strategy: str, **kw) -> Plan:
    """The plan of ``strategy="forward"`` or ``"reverse"``: every layer on that strategy, priced
    by the same model (:func:`make_plan` with the other strategy forbidden)."""
    if strategy == "forward":
        return make_plan(graph, fwd, names, nodes, allow_reverse=False, cut=None, **kw)
    return make_plan(graph, fwd, names, nodes, allow_forward=False, cut=None, **kw)
