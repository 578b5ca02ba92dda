"""Forward patch propagation: the learned images of every node of one batch, node by node.

:class:`PatchPropagator` starts from the input's patches (every input entry its own learned
image), applies the rule of each node's kind (:data:`nns_cuda.engine.rules.RULES`) in graph
order, frees the patches of a node once its last user has run, and hands the patches of the
requested nodes, neuron gates applied, to a callback as soon as they are complete (or returns
them all).

**Row tiles.** The working set of a deep layer at a large input can exceed any memory budget
(ResNet-18 at 224 × 224 needs tens of GiB per sample for ``layer2``). The propagation can then
run in bands of output rows (:func:`row_tiles`): for every band of rows of the requested nodes,
each node needed is computed only on the rows its users read (its *cone*: a convolution's
output rows ``[lo, hi)`` read input rows ``[lo·s − p, (hi − 1)·s − p + (K − 1)·d + 1)``,
clipped to the map), and each requested neuron is handed out in exactly one band. A band is
an ordinary propagation on a sub-grid: the rules see node copies whose shapes are the band's
rows, whose receptive-field offsets and paddings are shifted so that every anchor and every tap
is the one of the full map, and a forward pass sliced to the band (:class:`RowsForward`).
Rows shared by neighbouring cones are computed twice (the halo); results are exact.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.graph import ACTIVATIONS, GNode, ScanGraph
from nns_cuda.engine.inputs import image_dims
from nns_cuda.engine.memory import gather_fits
from nns_cuda.engine.options import LOW_PRECISION_DTYPES
from nns_cuda.engine.patches import Patches
from nns_cuda.engine.receptive_field import Geometry
from nns_cuda.engine.rules import RULES, TAKES_PENDING_SCALE
from nns_cuda.ops.reference import ops as reference_ops

__all__ = ["PatchPropagator", "ops_for_backend", "RowTile", "row_tiles", "tile_blocker", "input_rows",
           "RowsForward", "slice_rows"]

#: node kinds the row tiles pass through: windowed ops (whose rows read a band of input rows)
#: and element-wise ops (same rows); dense nodes need every row of their input
_WINDOWED = ("conv", "maxpool", "avgpool")
_ELEMENTWISE = ACTIVATIONS + ("bn", "identity", "add", "cat", "slice")


def ops_for_backend(backend: str):
    """The op module of a resolved backend: the reference twins, or the compiled ops' wrappers."""
    if backend == "reference":
        return reference_ops
    from nns_cuda import ops

    return ops


Rows = Tuple[int, int]


def _window_params(node: GNode) -> Tuple[int, int, int, int]:
    """``(kernel, stride, padding, dilation)`` along the rows of a windowed node (a regular
    adaptive pool / global mean is a pool with stride = kernel and no padding)."""
    a = node.attrs
    if node.kind in ("adaptive_avgpool", "global_mean"):
        k = a["kernel"][0]
        return k, k, 0, 1
    dil = a.get("dilation", (1, 1))
    return a["kernel"][0], a["stride"][0], a["padding"][0], dil[0]


def _is_windowed(node: GNode) -> bool:
    return node.kind in _WINDOWED or (node.kind in ("adaptive_avgpool", "global_mean") and node.spatial
                                      and bool(node.attrs.get("regular")))


def input_rows(graph: ScanGraph, node: GNode, lo: int, hi: int) -> Rows:
    """The rows ``[a, b)`` of ``node``'s inputs that its output rows ``[lo, hi)`` read (the same
    rows for an element-wise node; clipped to the input map for a windowed one)."""
    if hi <= lo:
        return (0, 0)
    if not _is_windowed(node):
        return (lo, hi)
    k, s, p, d = _window_params(node)
    n_in = graph.nodes[node.inputs[0]].shape[1]
    a = max(0, lo * s - p)
    b = min(n_in, (hi - 1) * s - p + (k - 1) * d + 1)
    return (a, max(a, b))


def tile_blocker(graph: ScanGraph, requested: Sequence[int]) -> Optional[GNode]:
    """The first node that keeps the propagation of ``requested`` from running in row tiles
    (a dense node, or a non-spatial input), or None when it can."""
    needed = graph.ancestors(list(requested))
    for g in graph.nodes:
        if g.idx not in needed or g.kind == "aux":
            continue
        if g.kind == "input":
            if not g.spatial:
                return g
            continue
        if not g.spatial or not (_is_windowed(g) or g.kind in _ELEMENTWISE):
            return g
        if g.kind == "avgpool" and (any(g.attrs["padding"]) or g.attrs["ceil_mode"]):
            return g  # its divisor map is computed on the rows it reads: only unpadded, floor-mode pools
    return None


@dataclass
class RowTile:
    """One band of a row-tiled propagation.

    Attributes
    ----------
    rows : dict of int to (int, int)
        For every node computed in the band, its rows ``[lo, hi)``.
    parts : dict of int to (int, int)
        For every requested node, the rows ``[a, b)`` whose neurons this band hands out (the
        parts of all bands partition the node's rows).
    """

    rows: Dict[int, Rows]
    parts: Dict[int, Rows]


def _hull(a: Optional[Rows], b: Rows) -> Rows:
    if b[1] <= b[0]:
        return a if a is not None else b
    if a is None or a[1] <= a[0]:
        return b
    return (min(a[0], b[0]), max(a[1], b[1]))


def row_tiles(graph: ScanGraph, requested: Sequence[int], n: int) -> List[RowTile]:
    """Split the propagation of ``requested`` into ``n`` bands of rows (see the module notes).

    The image's rows are split into ``n`` bands of (nearly) equal height; a requested neuron
    belongs to the band that holds the centre of its receptive field (so the parts of layers of
    different resolutions line up). Band ``t`` computes every node on the rows that its parts
    need (their cone). A node whose only user is an element-wise node shares that user's rows
    (so that a fused chain such as conv → BN → ReLU is one set of rows).

    Raises
    ------
    ValueError
        When :func:`tile_blocker` finds a node that cannot be split into rows.
    """
    bad = tile_blocker(graph, requested)
    if bad is not None:
        raise ValueError(f"node {bad.name!r} ({bad.kind}) is not a spatial map: the propagation cannot run in row tiles")
    needed = graph.ancestors(list(requested))
    last = max(requested)
    order = [g for g in graph.nodes[: last + 1] if g.idx in needed and g.kind != "aux"]
    users = {g.idx: [u for u in g.users if u in needed] for g in order}
    H_img = graph.input_shape[1]
    tiles = []
    for t in range(n):
        parts: Dict[int, Rows] = {}
        for r in requested:
            parts[r] = (_band_start(graph.nodes[r], t, n, H_img), _band_start(graph.nodes[r], t + 1, n, H_img))
        need: Dict[int, Rows] = {r: parts[r] for r in parts}
        changed = True
        while changed:
            changed = False
            for g in reversed(order):
                rg = need.get(g.idx)
                if rg is None or rg[1] <= rg[0]:
                    continue
                for i in g.inputs:
                    want = input_rows(graph, g, *rg)
                    if g.kind in _ELEMENTWISE and users[i] == [g.idx]:  # a chain shares its rows
                        want = _hull(need.get(i), rg)
                        if need.get(g.idx) != want:
                            need[g.idx] = want
                            changed = True
                    new = _hull(need.get(i), want)
                    if new != need.get(i):
                        need[i] = new
                        changed = True
        rows = {i: r for i, r in need.items() if r[1] > r[0]}
        tiles.append(RowTile(rows, parts))
    return tiles


def _band_start(node: GNode, t: int, n: int, H: int) -> int:
    """The first row of ``node`` whose receptive-field centre lies in image band ``t`` of ``n``
    (or beyond): ``t = 0`` gives 0, ``t = n`` the node's height."""
    rows = node.shape[1]
    if t <= 0:
        return 0
    if t >= n:
        return rows
    g = node.gy
    # centre(i) = i·J − P + (R − 1) / 2 >= t·H / n  <=>  i >= (t·H / n + P − (R − 1) / 2) / J
    num = 2 * t * H + n * (2 * g.P - (g.R - 1))      # times 2n, to stay in integers
    den = 2 * n * g.J
    return max(0, min(rows, -(-num // den)))


def slice_rows(p: Patches, start: int, stop: int) -> Patches:
    """The patches of rows ``[start, stop)`` (indices into ``p``'s own rows) of a spatial node."""
    if start == 0 and stop == p.data.shape[2]:
        return p
    return Patches(p.data[:, :, start:stop], p.ay[start:stop], p.ax,
                   None if p.active is None else p.active[:, :, start:stop], p.pending_scale)


class RowsForward:
    """A recorded forward pass seen through one row band: values, gates and max-pool
    indices of each node restricted to the rows the band computes for it (``rows``), the
    max-pool indices re-based onto the input rows the band reads."""

    def __init__(self, full: ForwardPass, graph: ScanGraph, rows: Dict[int, Rows]):
        self.full, self.graph, self.rows = full, graph, rows
        self.gate_outputs = full.gate_outputs
        self.values = _RowValues(self)

    def _cut(self, t: torch.Tensor, idx: int) -> torch.Tensor:
        node = self.graph.nodes[idx]
        while idx not in self.rows and node.inputs:  # an activation fused into its input's rows
            idx = node.inputs[0]
            node = self.graph.nodes[idx]
        lo, hi = self.rows[idx]
        return t[:, :, lo:hi] if t.dim() >= 3 else t

    def value(self, node: GNode) -> torch.Tensor:
        return self._cut(self.full.value(node), node.idx)

    def act_gate(self, node: GNode) -> torch.Tensor:
        return self._cut(self.full.act_gate(node), node.idx)

    def neuron_gate(self, node: GNode) -> Optional[torch.Tensor]:
        g = self.full.neuron_gate(node)
        return None if g is None else self._cut(g, node.idx)

    def full_gate(self, node: GNode) -> torch.Tensor:
        return self._cut(self.full.full_gate(node), node.idx)


class _RowValues:
    """``values[...]`` of a :class:`RowsForward`."""

    def __init__(self, fwd: RowsForward):
        self.fwd = fwd

    def __getitem__(self, key):
        full = self.fwd.full.values[key]
        if isinstance(key, tuple) and key[0] == "indices":
            node = self.fwd.graph.nodes[key[1]]
            lo, hi = self.fwd.rows[node.idx]
            a = input_rows(self.fwd.graph, node, lo, hi)[0]
            return full[:, :, lo:hi] - a * full.new_tensor(self.fwd.graph.nodes[node.inputs[0]].shape[2])
        return self.fwd._cut(full, key)

    def __contains__(self, key) -> bool:
        return key in self.fwd.full.values


def _band_node(node: GNode, lo: int, hi: int, in_start: Optional[int] = None) -> GNode:
    """A copy of spatial ``node`` restricted to rows ``[lo, hi)``: its shape, its row geometry
    shifted (anchors stay those of the full map) and, for a windowed node reading input rows
    from ``in_start`` on, its row padding shifted so that every tap reads the same input row."""
    C, _, W = node.shape
    g = dataclasses.replace(node, shape=(C, hi - lo, W), gy=Geometry(node.gy.J, node.gy.P - lo * node.gy.J, node.gy.R))
    if in_start is not None and _is_windowed(node) and "padding" in node.attrs:
        _k, s, p, _d = _window_params(node)
        attrs = dict(node.attrs)
        attrs["padding"] = (p - lo * s + in_start, node.attrs["padding"][1])
        g.attrs = attrs
    return g


class PatchPropagator:
    """Forward patch propagation of one batch with one backend's ops.

    For bfloat16 / float16 storage the per-neuron factors (weights, BN scales, gates, pooling
    divisors) stay float32 (``factor_dtype``): the ops compute in float32 and round their
    results once, and element-wise scalings here multiply in float32 and round once
    (:meth:`scale`).

    Parameters
    ----------
    graph : ScanGraph
    forward : ForwardPass
        The forward pass of the same batch (values, gates, arg-max indices).
    x : Tensor [B, *graph.input_shape]
    backend : str
        A resolved backend (``"reference"``, ``"cpu"``, ``"cuda"``).
    requested : sequence of int
        Indices of the nodes whose patches :meth:`run` returns.
    dtype : torch.dtype
        Storage dtype of the patches.
    conv_algorithm : str
        ``"direct"``, ``"gemm"``, ``"gather"`` or ``"implicit"``.
    gemm_max_elems : int
        Chunk bound of the GEMM conv ops (:func:`nns_cuda.engine.memory.gemm_max_elems`).

    Attributes
    ----------
    ops : module
        The backend's ops.
    conv_ops_used : dict of str to str
        For every convolution that ran, the op it used (``"direct"``, ``"gemm"``, ...).
    fused : dict of int to int
        Nodes that share the patches of an earlier node (a conv or BN fused with what follows).
    gated_by_fusion : set of int
        Convs whose patches already carry the gate of the activation after them.
    """

    def __init__(self, graph: ScanGraph, forward: ForwardPass, x: torch.Tensor, backend: str,
                 requested: Sequence[int], dtype: torch.dtype, conv_algorithm: str = "direct",
                 gemm_max_elems: int = 0):
        self.graph, self.forward, self.x = graph, forward, x
        self.ops = ops_for_backend(backend)
        self.requested = set(requested)
        self.dtype = dtype
        self.low = dtype in LOW_PRECISION_DTYPES
        self.factor_dtype = torch.float32 if self.low else dtype
        self.conv_algorithm = conv_algorithm
        self.gemm_max_elems = gemm_max_elems
        self.conv_ops_used: Dict[str, str] = {}
        self.fused: Dict[int, int] = {}
        self.gated_by_fusion: Set[int] = set()
        self.B = x.shape[0]
        self.D, self.H, self.W = image_dims(graph.input_shape)
        self.device = x.device

    # ------------------------------------------------------------------ helpers of the rules
    def scale(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``t * s`` (``s`` broadcast) in the storage dtype; for 16-bit storage the product is
        taken in float32 and rounded once."""
        if not self.low:
            return t * s.to(self.dtype)
        return torch.mul(t, s.to(self.factor_dtype), out=torch.empty_like(t))

    def settle(self, patches: Patches) -> Patches:
        """``patches`` with its pending scale applied (one pass over the data), or ``patches``."""
        if patches.pending_scale is None:
            return patches
        B, C, Ho, Wo = patches.data.shape[:4]
        mult = patches.pending_scale.view(1, C, 1, 1) * patches.active.to(self.factor_dtype)
        return Patches(self.scale(patches.data, mult.view(B, C, Ho, Wo, 1, 1, 1)), patches.ay, patches.ax,
                       patches.active)

    def apply_gate(self, patches: Patches, gate: torch.Tensor) -> Patches:
        """``patches`` times a per-neuron ``gate`` (any shape with ``B·C·Ho·Wo`` entries)."""
        B, C, Ho, Wo = patches.data.shape[:4]
        g = gate.reshape(B, C, Ho, Wo).to(self.factor_dtype)
        return Patches(self.scale(patches.data, g.view(B, C, Ho, Wo, 1, 1, 1)), patches.ay, patches.ax, g != 0)

    def to_dense(self, patches: Patches) -> Patches:
        """``patches`` as dense images ``[B, C·Ho·Wo, 1, 1, D, H, W]`` (unchanged if they are)."""
        if patches.is_dense(self.H, self.W):
            return patches
        B, C, Ho, Wo = patches.data.shape[:4]
        zy = torch.zeros(Ho, dtype=torch.long, device=self.device)
        zx = torch.zeros(Wo, dtype=torch.long, device=self.device)
        t = self.ops.place_li(patches.data, patches.ay, patches.ax, zy, zx, self.H, self.W, None)
        t = t.reshape(B, C * Ho * Wo, 1, 1, self.D, self.H, self.W)
        active = None if patches.active is None else patches.active.reshape(B, C * Ho * Wo, 1, 1)
        return Patches(t, self._zero_anchor(), self._zero_anchor(), active)

    def window(self, node: GNode, ho: int, wo: int) -> Tuple[int, int, torch.Tensor, torch.Tensor]:
        """``(rh, rw, ay, ax)``: window size and anchors of the ``ho × wo`` neurons of a spatial node."""
        rh, ay = node.gy.window(self.H, ho)
        rw, ax = node.gx.window(self.W, wo)
        return rh, rw, ay.to(self.device), ax.to(self.device)

    def in_window(self, i: int, patches: Patches, node: GNode, rh: int, rw: int) -> bool:
        """Whether the patches of input ``i`` already lie in ``node``'s windows (same
        receptive-field geometry, same window size): then no placement copy is needed."""
        src = self.graph.nodes[i]
        return src.gy == node.gy and src.gx == node.gx and tuple(patches.data.shape[5:]) == (rh, rw)

    def conv(self, node: GNode, patches: Patches, scale: Optional[torch.Tensor],
             gate: Optional[torch.Tensor]) -> Patches:
        """A convolution of ``patches`` with the op of the scan's conv algorithm.

        ``scale`` [Co] and ``gate`` [B, Co, Ho, Wo] (or None) multiply the outputs (a fused BN,
        a fused activation). A pending scale of the input is folded into the weights per input
        channel; its ``active`` mask makes every conv op skip inactive inputs without reading
        them. ``"gemm"`` runs for ``groups == 1``; ``"gather"`` / ``"implicit"`` where the
        placed copy fits (:func:`~nns_cuda.engine.memory.gather_fits`), float64 ``"implicit"``
        as the gather (Triton has no float64 dot); everything else runs ``"direct"``.
        """
        C, Ho, Wo = node.shape
        rh, rw, ay, ax = self.window(node, Ho, Wo)
        a = node.attrs
        groups = int(a["groups"])
        weight = node.module.weight.detach().to(self.factor_dtype)
        if patches.pending_scale is not None:
            Co, Cig = weight.shape[:2]
            s_in = patches.pending_scale.view(groups, 1, Cig).expand(groups, Co // groups, Cig).reshape(Co, Cig, 1, 1)
            weight = weight * s_in
        args = (patches.data, patches.ay, patches.ax, patches.active, weight, scale, gate, ay, ax, list(a["stride"]),
                list(a["padding"]), list(a["dilation"]), groups, rh, rw)
        algo = self.conv_algorithm
        if algo in ("gather", "implicit") and not gather_fits(patches, ay, ax, a, rh, rw, self.gemm_max_elems):
            algo = "direct"
        if algo == "implicit" and self.dtype == torch.float64:
            algo = "gather"
        if algo == "gemm" and groups == 1:
            t = self.ops.conv_li_gemm(*args, self.gemm_max_elems)
        elif algo == "gather":
            t = self.ops.conv_li_gather(*args, self.gemm_max_elems)
        elif algo == "implicit":
            t = self.ops.conv_li_implicit(*args, self.gemm_max_elems)
        else:
            t, algo = self.ops.conv_li(*args), "direct"
        self.conv_ops_used[node.name] = algo
        return Patches(t, ay, ax, None if gate is None else gate != 0)

    def _zero_anchor(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ propagation
    def input_patches(self) -> Patches:
        """The learned images of the input: every entry its own image (``x_t`` at ``t``)."""
        B, D, H, W = self.B, self.D, self.H, self.W
        xi = self.x.reshape(B, D, H, W).to(self.dtype)
        if self.graph.nodes[0].spatial:
            t = torch.zeros(B, D, H, W, D, 1, 1, dtype=self.dtype, device=self.device)
            idx = torch.arange(D, device=self.device)
            t[:, idx, :, :, idx, 0, 0] = xi.permute(1, 0, 2, 3)
            return Patches(t, torch.arange(H, device=self.device), torch.arange(W, device=self.device))
        P = D * H * W
        t = torch.diag_embed(xi.reshape(B, P)).reshape(B, P, 1, 1, D, H, W)
        return Patches(t, self._zero_anchor(), self._zero_anchor())

    def propagate(self, node: GNode, patches: Dict[int, Patches]) -> Patches:
        """The patches of ``node`` from those of its inputs (its kind's rule)."""
        if node.kind not in TAKES_PENDING_SCALE:
            for i in node.inputs:
                patches[i] = self.settle(patches[i])
        rule = RULES.get(node.kind)
        if rule is None:
            raise AssertionError(f"unhandled node kind {node.kind}")
        return rule(self, node, patches)

    def run(self, on_output: Optional[Callable[[int, Patches, Rows], None]] = None,
            keep: Sequence[int] = (), tile: Optional[RowTile] = None) -> Dict[int, Patches]:
        """Propagate up to the last requested node.

        Parameters
        ----------
        on_output : callable or None
            ``on_output(idx, patches, rows)`` is called for each requested node as soon as its
            patches are complete (pending scale and neuron gate (:meth:`ForwardPass.neuron_gate`)
            applied; ``rows`` the node's rows ``[a, b)`` they hold), so that the caller can
            reduce them before the next node runs. None: they are collected and returned.
        keep : sequence of int
            With ``on_output``: requested nodes whose patches are returned too.
        tile : RowTile or None
            Run one band of rows (:func:`row_tiles`); None: every row.

        Returns
        -------
        dict of int to Patches
            The patches of every requested node (``on_output`` None) or of ``keep``, with
            their neuron gate applied (and, in a band, only the band's part of the rows).
        """
        full_graph, full_forward = self.graph, self.forward
        self._full = full_graph
        if tile is not None:
            self.graph = copy.copy(full_graph)
            self.graph.nodes = list(full_graph.nodes)
            self.forward = RowsForward(full_forward, full_graph, tile.rows)
        try:
            return self._run(full_graph, on_output, set(keep), tile)
        finally:
            self.graph, self.forward = full_graph, full_forward

    def _run(self, full: ScanGraph, on_output, keep: Set[int], tile: Optional[RowTile]) -> Dict[int, Patches]:
        graph = self.graph
        alive: Dict[int, Patches] = {}
        # only the requested nodes and what they are computed from (other branches are skipped)
        needed = full.ancestors(self.requested)
        if tile is not None:
            needed = needed & set(tile.rows)
        users_left = {g.idx: sum(1 for u in g.users if u in needed) for g in full.nodes}
        out: Dict[int, Patches] = {}
        self.fused, self.gated_by_fusion = {}, set()
        last_needed = max(self.requested) if self.requested else -1
        for node in full.nodes:
            if node.idx > last_needed:
                break
            if node.kind == "aux" or node.idx not in needed:
                continue
            if tile is not None:
                node = self._band(node, tile)
            if node.idx in self.fused:
                p = alive[node.inputs[0]]  # a fused chain shares one set of patches
            elif node.kind == "input":
                p = self.input_patches() if tile is None else self._input_rows(*tile.rows[node.idx])
            elif tile is None:
                p = self.propagate(node, alive)
            else:
                p = self.propagate(node, self._band_inputs(node, alive, tile))
            alive[node.idx] = p
            if node.idx in self.requested:
                rows = (0, node.shape[1]) if len(node.shape) == 3 else (0, 1)
                if tile is not None:
                    a, b = tile.parts[node.idx]
                    lo = tile.rows[node.idx][0]
                    p = slice_rows(p, a - lo, b - lo)
                    rows = (a, b)
                if rows[1] > rows[0]:
                    # a conv fused with the activation that follows it already carries g_n
                    gate = None if node.idx in self.gated_by_fusion else self.forward.neuron_gate(node)
                    if gate is not None and tile is not None:
                        lo = tile.rows[node.idx][0]
                        gate = gate[:, :, rows[0] - lo: rows[1] - lo]
                    p = self.settle(p)
                    p = p if gate is None else self.apply_gate(p, gate)
                    if on_output is None:
                        out[node.idx] = p
                    else:
                        on_output(node.idx, p, rows)
                        if node.idx in keep:
                            out[node.idx] = p
                    del p
            for i in node.inputs:
                users_left[i] -= 1
                if users_left[i] == 0 and i in alive:
                    del alive[i]
        return out

    # ------------------------------------------------------------------ row bands
    def _band(self, node: GNode, tile: RowTile) -> GNode:
        """``node`` restricted to the band's rows; also installed in the band's graph."""
        if node.kind == "input" or not node.spatial:
            return node
        lo, hi = tile.rows[node.idx]
        start = input_rows(self._full, node, lo, hi)[0] if node.inputs else None
        g = _band_node(node, lo, hi, start)
        self.graph.nodes[node.idx] = g
        return g

    def _band_inputs(self, node: GNode, alive: Dict[int, Patches], tile: RowTile) -> Dict[int, Patches]:
        """The rule's view of the alive patches: each input cut to the rows ``node`` reads,
        and the band graph's copy of that input shaped like the cut (pending scales are
        applied on the shared copy first, as :meth:`propagate` would)."""
        full = self._full
        if node.kind not in TAKES_PENDING_SCALE:
            for i in node.inputs:
                alive[i] = self.settle(alive[i])
        lo, hi = tile.rows[node.idx]
        a, b = input_rows(full, full.nodes[node.idx], lo, hi)
        view = dict(alive)
        for i in node.inputs:
            src = full.nodes[i]
            ilo = tile.rows[i][0]
            view[i] = slice_rows(alive[i], a - ilo, b - ilo)
            self.graph.nodes[i] = _band_node(src, a, b) if src.spatial and len(src.shape) == 3 else src
        return view

    def _input_rows(self, lo: int, hi: int) -> Patches:
        """Rows ``[lo, hi)`` of the input's patches (:meth:`input_patches`)."""
        B, D, W = self.B, self.D, self.W
        xi = self.x.reshape(B, D, self.H, W)[:, :, lo:hi].to(self.dtype)
        t = torch.zeros(B, D, hi - lo, W, D, 1, 1, dtype=self.dtype, device=self.device)
        idx = torch.arange(D, device=self.device)
        t[:, idx, :, :, idx, 0, 0] = xi.permute(1, 0, 2, 3)
        return Patches(t, torch.arange(lo, hi, device=self.device), torch.arange(W, device=self.device))
