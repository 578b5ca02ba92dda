"""Batched vector–Jacobian products through the frozen network (the reverse strategy's engine).

One forward pass of the batch records every node's value, gate and arg-max
(:class:`~nns_cuda.engine.forward.ForwardPass`). Cotangent *rows* — one per filter
(``g ⊙ a`` restricted to one channel, docs/spec.md §1) or per neuron (a one-hot) of any of the
requested layers — are then pushed backward through the transposed frozen network, node by
node, in one sweep per chunk of rows (:class:`BackwardSweep`). Rows are ordered deepest layer
first; a layer's own rows join the sweep when it passes that layer, and each node's VJP runs
once on every row that has reached it (a batched GEMM, a gate multiply, a scatter), so all
requested layers share one forward pass and every row costs one backward pass from its layer
down. Nothing runs autograd's tape: each node kind has its explicit transpose (a transposed
convolution, ``Wᵀ``, the gate, the arg-max scatter, the BN scale, ...).

**Cut.** The sweep may stop at a *cut* node ``m`` whose learned images are known as forward
patches (:class:`~nns_cuda.engine.patches.Patches`, ungated): the images of a row are then
``Σ_j cot_j · LI_j`` over the neurons ``j`` of ``m`` — one GEMM per position of ``m`` and a
placement — instead of the backward pass from ``m`` down to the input. ``m`` must lie on every
path from the input to the layers of the rows that stop there (:func:`dominates`).

Exact: every row equals ``x ⊙ VJP`` of autograd on the real model (docs/spec.md §1), checked by
the tests at 1e-10 in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F

from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.graph import ACTIVATIONS, GNode, ScanGraph
from nns_cuda.engine.patches import Patches
from nns_cuda.engine.rules import bn_scale
from nns_cuda.ops.reference.stats import NUM_STATS

__all__ = ["RowBlock", "ReverseRequest", "reverse_scan", "request_blocks", "BackwardSweep", "dominates", "grad_reach", "no_gradient_path", "sweep_bytes_per_row",
           "channels_last_wanted", "patches_matrix"]


@dataclass
class RowBlock:
    """Cotangent rows of one layer in a sweep.

    Attributes
    ----------
    node : GNode
        The layer.
    kind : str
        ``"filters"``: row ``i`` is channel ``index[i]``'s cotangent ``g ⊙ a`` (docs/spec.md §1);
        ``"neurons"``: row ``i`` is the one-hot of flat neuron ``index[i]``.
    index : int64 Tensor [r]
    """

    node: GNode
    kind: str
    index: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.index.numel())


def no_gradient_path(node: GNode) -> ValueError:
    """The error of a layer that the input does not reach through a gradient path."""
    return ValueError(f"layer {node.name!r} does not depend on the model's input (no gradient path from x to it), "
                      "so its learned images are undefined; scan a layer computed from the input")


def _passes_gradient(node: GNode) -> bool:
    """Whether ``node``'s VJP reaches its inputs (``.detach()`` does not: autograd stops there)."""
    n = node.fx_node
    return not (node.kind == "identity" and n.op == "call_method" and n.target == "detach")


def grad_reach(graph: ScanGraph, avoid: Optional[int] = None) -> Set[int]:
    """Indices of the nodes the graph input reaches through gradient-passing edges (without
    going through node ``avoid``)."""
    reach: Set[int] = set()
    for g in graph.nodes:
        if g.idx == avoid or g.kind in ("aux", "unsupported"):
            continue
        if g.kind == "input" or (_passes_gradient(g) and any(i in reach for i in g.inputs)):
            reach.add(g.idx)
    return reach


def dominates(graph: ScanGraph, cut: int, nodes: Sequence[GNode]) -> bool:
    """Whether node ``cut`` lies on every gradient path from the input to each of ``nodes``
    (so that a sweep may stop there for their rows)."""
    if not nodes:
        return False
    reach = grad_reach(graph, avoid=cut)
    return all(n.idx > cut and n.idx not in reach for n in nodes)


def channels_last_wanted(shape: Tuple[int, ...]) -> bool:
    """Whether transposed convolutions on maps of ``shape`` ``[C, H, W]`` run channels-last:
    on the CPU oneDNN's NHWC kernels were measured faster on maps of 14 × 14 and larger
    (``benchmarks/NOTES.md``), slower on 7 × 7."""
    return len(shape) == 3 and shape[1] * shape[2] >= 196


def sweep_bytes_per_row(graph: ScanGraph, nodes: Sequence[GNode], cut: Optional[int], batch: int,
                        esize: int) -> int:
    """Working-set bytes of one cotangent row in a sweep for ``nodes`` (stopping at ``cut``):
    three maps of the largest swept node (its cotangent, a contribution, the VJP's output) and
    three input-sized images (the cut's product and its transposes)."""
    need = graph.ancestors([n.idx for n in nodes])
    lo = -1 if cut is None else cut
    big = max((int(math.prod(g.shape)) for g in graph.nodes if g.idx in need and g.idx >= lo and g.shape
               and g.kind not in ("aux", "unsupported")), default=1)
    return (3 * big + 3 * int(math.prod(graph.input_shape))) * esize * batch


class BackwardSweep:
    """Push chunks of cotangent rows backward through the frozen network of one batch.

    Parameters
    ----------
    graph : ScanGraph
    fwd : ForwardPass
        The recorded forward pass of ``x`` (values, arg-max indices).
    x : Tensor [B, *graph.input_shape]
    cut : int or None
        Index of the cut node (see the module notes), or None: every row goes down to the input.
    cut_patches : Patches or None
        The ungated learned images of the cut node on ``x`` (pending scale applied).

    Raises
    ------
    ValueError
        From :meth:`run`, for a layer with no gradient path from the input.
    """

    def __init__(self, graph: ScanGraph, fwd: ForwardPass, x: torch.Tensor, cut: Optional[int] = None,
                 cut_patches: Optional[Patches] = None):
        self.graph, self.fwd, self.x = graph, fwd, x
        self.B = x.shape[0]
        self.dtype, self.device = x.dtype, x.device
        self.reach = grad_reach(graph)
        self.cut = cut
        self._cut_patches = cut_patches
        self._cut_cache: Dict[int, torch.Tensor] = {}
        self._gates: Dict[Tuple[int, bool], torch.Tensor] = {}
        self._weights: Dict[int, torch.Tensor] = {}
        self._filter_weights: Dict[int, torch.Tensor] = {}
        self.gate_outputs = fwd.gate_outputs
        self.vjps: Dict[str, Callable] = {
            "conv": self._conv, "linear": self._linear, "bn": self._bn, "identity": self._identity,
            "reshape": self._reshape, "add": self._add, "maxpool": self._maxpool, "cat": self._cat,
            "slice": self._slice, "global_mean": self._global_mean, "avgpool": self._by_autograd,
            "adaptive_avgpool": self._by_autograd, **{k: self._activation for k in ACTIVATIONS}}

    # ------------------------------------------------------------------ rows
    def check(self, nodes: Sequence[GNode]) -> None:
        """``ValueError`` for a node the input does not reach through a gradient path."""
        for n in nodes:
            if n.idx not in self.reach:
                raise no_gradient_path(n)

    def filter_weights(self, node: GNode) -> torch.Tensor:
        """``g ⊙ a`` of ``node`` (docs/spec.md §1): Tensor [B, C, rest]."""
        if node.idx not in self._filter_weights:
            w = self.fwd.full_gate(node) * self.fwd.value(node)
            self._filter_weights[node.idx] = w.reshape(self.B, node.shape[0], -1)
        return self._filter_weights[node.idx]

    def cotangent(self, block: RowBlock) -> torch.Tensor:
        """The block's cotangent rows at its layer's output: Tensor [r·B, *node.shape] (row-major)."""
        node, r, B = block.node, block.rows, self.B
        ar = torch.arange(r, device=self.device)
        idx = block.index.to(self.device)
        if block.kind == "filters":
            w = self.filter_weights(node)
            cot = torch.zeros(r, B, *w.shape[1:], dtype=self.dtype, device=self.device)
            cot[ar, :, idx] = w[:, idx].transpose(0, 1)
        else:
            N = int(math.prod(node.shape))
            cot = torch.zeros(r, B, N, dtype=self.dtype, device=self.device)
            cot[ar, :, idx] = 1
        return cot.reshape(r * B, *node.shape)

    # ------------------------------------------------------------------ sweep
    def run(self, blocks: Sequence[RowBlock], stop_at_cut: bool = False) -> torch.Tensor:
        """One sweep.

        Parameters
        ----------
        blocks : sequence of RowBlock
            Ordered deepest layer first (non-increasing node index).
        stop_at_cut : bool
            Stop at the cut node and contract with its patches (every block's layer must be
            dominated by the cut, :func:`dominates`).

        Returns
        -------
        Tensor [R, B, *input_shape]
            ``x ⊙ VJP`` of every row (``R = Σ rows``), in block order; not multiplied by the
            neurons' own gates.
        """
        self.check([b.node for b in blocks])
        if any(blocks[i].node.idx < blocks[i + 1].node.idx for i in range(len(blocks) - 1)):
            raise AssertionError("row blocks must be ordered deepest layer first")
        B = self.B
        R = sum(b.rows for b in blocks)
        ends, own = [], {}
        e = 0
        for b in blocks:
            own.setdefault(b.node.idx, []).append((e, b))
            e += b.rows
            ends.append(e)
        stop = self.cut if stop_at_cut else None
        need = self.graph.ancestors(list(own))
        pending: Dict[int, List[torch.Tensor]] = {}
        for node in reversed(self.graph.nodes):
            if node.idx not in need or node.idx not in self.reach:
                continue
            contribs = pending.pop(node.idx, [])
            if not contribs and node.idx not in own:
                continue
            g = self._gather(node, contribs, own.get(node.idx, []))
            if node.idx == stop:
                return self._contract(g, R)
            if node.kind == "input":
                xr = self.x.reshape(1, B, *self.x.shape[1:])
                out = g.reshape(-1, B, *self.x.shape[1:]) * xr
                if out.shape[0] != R:
                    out = torch.cat([out, out.new_zeros(R - out.shape[0], *out.shape[1:])])
                return out
            if not _passes_gradient(node):
                continue
            for i, contrib in self.vjps.get(node.kind, self._unhandled)(node, g):
                if i in self.reach:
                    pending.setdefault(i, []).append(contrib)
        raise AssertionError("the sweep did not reach the input")  # pragma: no cover - check() guards it

    def _gather(self, node: GNode, contribs: List[torch.Tensor], own: List[Tuple[int, RowBlock]]) -> torch.Tensor:
        """The cotangent of ``node`` over rows ``[0, end)``: the users' contributions (each over
        a prefix of the rows) summed, and the node's own rows placed at their offsets."""
        B = self.B
        mine = [(s * B, self.cotangent(b)) for s, b in own]
        end = max([c.shape[0] for c in contribs] + [s + m.shape[0] for s, m in mine])
        if len(contribs) == 1 and not mine and contribs[0].shape[0] == end:
            return contribs[0]
        if not contribs and len(mine) == 1 and mine[0][0] == 0:
            return mine[0][1]
        if len(contribs) == 1 and len(mine) == 1 and mine[0][0] == contribs[0].shape[0]:
            return torch.cat([contribs[0], mine[0][1]])
        g = torch.zeros(end, *node.shape, dtype=self.dtype, device=self.device)
        for c in contribs:
            g[: c.shape[0]] += c
        for s, m in mine:
            g[s: s + m.shape[0]] += m
        return g

    # ------------------------------------------------------------------ node VJPs
    def _unhandled(self, node: GNode, g: torch.Tensor):
        raise AssertionError(f"no VJP for node kind {node.kind!r} ({node.name})")

    def _rows(self, g: torch.Tensor) -> int:
        return g.shape[0] // self.B

    def _per_sample(self, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``g`` [R·B, ...] times a per-sample tensor ``t`` [B, ...] (broadcast over the rows)."""
        if self.B == 1:
            return g * t
        R = self._rows(g)
        return (g.view(R, self.B, *g.shape[1:]) * t.unsqueeze(0)).view(g.shape)

    def _gate(self, node: GNode, like: torch.Tensor) -> torch.Tensor:
        cl = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
        key = (node.idx, cl)
        if key not in self._gates:
            gate = self.fwd.act_gate(node).to(self.dtype)
            self._gates[key] = gate.contiguous(memory_format=torch.channels_last) if cl else gate
        return self._gates[key]

    def _activation(self, node: GNode, g: torch.Tensor):
        return [(node.inputs[0], self._per_sample(g, self._gate(node, g)))]

    def _conv(self, node: GNode, g: torch.Tensor):
        a = node.attrs
        src = self.graph.nodes[node.inputs[0]]
        Hi, Wi = src.shape[1:]
        Ho, Wo = node.shape[1:]
        (kh, kw), (sh, sw) = a["kernel"], a["stride"]
        (ph, pw), (dh, dw) = a["padding"], a["dilation"]
        oph = Hi - ((Ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1)
        opw = Wi - ((Wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
        if not (0 <= oph < max(sh, dh) and 0 <= opw < max(sw, dw)):
            return self._by_autograd(node, g)
        w = self._weight(node)
        if channels_last_wanted(node.shape):
            g = g.contiguous(memory_format=torch.channels_last)
        else:
            g = g.contiguous()
        out = F.conv_transpose2d(g, w, None, (sh, sw), (ph, pw), (oph, opw), int(a["groups"]), (dh, dw))
        return [(node.inputs[0], out)]

    def _weight(self, node: GNode) -> torch.Tensor:
        if node.idx not in self._weights:
            self._weights[node.idx] = node.module.weight.detach().to(self.dtype)
        return self._weights[node.idx]

    def _linear(self, node: GNode, g: torch.Tensor):
        return [(node.inputs[0], g @ self._weight(node))]

    def _bn(self, node: GNode, g: torch.Tensor):
        s = bn_scale(node.module, self.dtype)
        shape = (-1,) + (1,) * (g.dim() - 2)  # BN2d [C, H, W], BN1d [C, L] or [N]
        return [(node.inputs[0], g * s.view(shape))]

    def _identity(self, node: GNode, g: torch.Tensor):
        return [(node.inputs[0], g)]

    def _reshape(self, node: GNode, g: torch.Tensor):
        src = self.graph.nodes[node.inputs[0]]
        return [(node.inputs[0], g.reshape(g.shape[0], *src.shape))]

    def _add(self, node: GNode, g: torch.Tensor):
        return [(i, g) for i in node.inputs]

    def _cat(self, node: GNode, g: torch.Tensor):
        sizes = [self.graph.nodes[i].shape[0] for i in node.inputs]
        return list(zip(node.inputs, torch.split(g, sizes, dim=1)))

    def _slice(self, node: GNode, g: torch.Tensor):
        src = self.graph.nodes[node.inputs[0]]
        out = g.new_zeros(g.shape[0], *src.shape)
        out[:, node.attrs["start"]: node.attrs["stop"]] = g
        return [(node.inputs[0], out)]

    def _global_mean(self, node: GNode, g: torch.Tensor):
        C, H, W = self.graph.nodes[node.inputs[0]].shape
        out = (g.reshape(g.shape[0], C, 1, 1) / (H * W)).expand(g.shape[0], C, H, W).contiguous()
        return [(node.inputs[0], out)]

    def _maxpool(self, node: GNode, g: torch.Tensor):
        C, Hi, Wi = self.graph.nodes[node.inputs[0]].shape
        R, B = self._rows(g), self.B
        ind = self.fwd.values[("indices", node.idx)].reshape(1, B, C, -1)
        out = g.new_zeros(R, B, C, Hi * Wi)
        out.scatter_add_(3, ind.expand(R, B, C, ind.shape[-1]), g.reshape(R, B, C, -1))
        return [(node.inputs[0], out.view(R * B, C, Hi, Wi))]

    def _by_autograd(self, node: GNode, g: torch.Tensor):
        """A linear, sample-independent node (average pools, a conv whose transpose has no
        output padding): its VJP by autograd on a zero input of the rows' batch."""
        src = self.graph.nodes[node.inputs[0]]
        z = torch.zeros(g.shape[0], *src.shape, dtype=self.dtype, device=self.device, requires_grad=True)
        with torch.enable_grad():
            out = _linear_call(node, z)
            (grad,) = torch.autograd.grad(out, z, g.reshape(out.shape))
        return [(node.inputs[0], grad)]

    # ------------------------------------------------------------------ cut
    def cut_matrix(self, b: int) -> torch.Tensor:
        """Sample ``b``'s learned images of the cut node as a sparse CSR matrix
        ``[D·H·W, neurons of the cut]`` (int32 indices; zero entries dropped)."""
        if b not in self._cut_cache:
            self._cut_cache[b] = patches_matrix(self._cut_patches, b, self.x.shape[1:], self.dtype)
        return self._cut_cache[b]

    def _contract(self, g: torch.Tensor, R: int) -> torch.Tensor:
        """``Σ_j cot_j · LI_j`` over the cut node's neurons for every row: [R, B, *input_shape]."""
        B = self.B
        P = int(math.prod(self.x.shape[1:]))
        rows = g.shape[0] // B
        gv = g.reshape(rows, B, -1)
        out = torch.zeros(R, B, P, dtype=self.dtype, device=self.device)
        for b in range(B):
            out[:rows, b] = torch.sparse.mm(self.cut_matrix(b), gv[:, b].t().contiguous()).t()
        return out.view(R, B, *self.x.shape[1:])


def patches_matrix(patches: Patches, b: int, input_shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The learned images of one sample's neurons as a sparse CSR matrix ``[D·H·W, C·Ho·Wo]``:
    column ``j`` holds neuron ``j``'s image (from its receptive-field patch), zero entries dropped.

    Parameters
    ----------
    patches : Patches
        ``data`` [B, C, Ho, Wo, D, Rh, Rw] (pending scale applied), anchors ``ay``, ``ax``.
    b : int
        The sample.
    input_shape : tuple of int
        ``(D, H, W)``.
    dtype : torch.dtype

    Returns
    -------
    sparse CSR Tensor [D·H·W, C·Ho·Wo] with int32 indices
    """
    _, C, Ho, Wo, D, Rh, Rw = patches.data.shape
    _, H, W = input_shape
    dev = patches.data.device
    data = patches.data[b].to(dtype)
    yy = patches.ay.to(dev).view(Ho, 1, 1, 1, 1) + torch.arange(Rh, device=dev).view(1, 1, 1, Rh, 1)
    xx = patches.ax.to(dev).view(1, Wo, 1, 1, 1) + torch.arange(Rw, device=dev).view(1, 1, 1, 1, Rw)
    dd = torch.arange(D, device=dev).view(1, 1, D, 1, 1)
    tgt = ((dd * H + yy) * W + xx).to(torch.int32)                     # [Ho, Wo, D, Rh, Rw]
    nz = data != 0                                                     # [C, Ho, Wo, D, Rh, Rw]
    rows = tgt.unsqueeze(0).expand_as(data)[nz]
    cols = torch.arange(C * Ho * Wo, device=dev, dtype=torch.int32).view(C, Ho, Wo, 1, 1, 1).expand_as(data)[nz]
    vals = data[nz]
    del nz
    order = torch.argsort(rows, stable=True)
    P = D * H * W
    crow = torch.zeros(P + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.bincount(rows.long(), minlength=P).cumsum(0)
    if crow[-1] >= 2 ** 31:  # beyond int32 indexing
        return torch.sparse_csr_tensor(crow, cols[order].long(), vals[order], (P, C * Ho * Wo))
    return torch.sparse_csr_tensor(crow.to(torch.int32), cols[order], vals[order], (P, C * Ho * Wo))


@dataclass
class ReverseRequest:
    """What the reverse strategy computes for one requested layer.

    Attributes
    ----------
    name : str
        The layer's address (the key of the results).
    node : GNode
    filters : bool
        Filter images ``L^k`` (one row per channel).
    stats : bool
        Per-neuron statistics (one row per neuron of ``neurons``).
    images : bool
        Dense learned images of ``neurons``.
    neurons : int64 Tensor [n] or None
        Flat neuron indices for ``stats`` / ``images``; None: every neuron.
    """

    name: str
    node: GNode
    filters: bool = False
    stats: bool = False
    images: bool = False
    neurons: Optional[torch.Tensor] = None

    def neuron_index(self, device) -> torch.Tensor:
        if self.neurons is not None:
            return self.neurons.to(device)
        return torch.arange(int(math.prod(self.node.shape)), device=device)


def request_blocks(requests: Sequence[ReverseRequest], device) -> List[Tuple[ReverseRequest, RowBlock]]:
    """The row blocks of ``requests``, deepest layer first (filters before neurons of a layer)."""
    out = []
    for q in requests:
        if q.filters:
            if len(q.node.shape) not in (1, 3):
                raise ValueError(f"filter images need a layer with channels ([C, H, W] or [N]); {q.node.name!r} has "
                                 f"shape {list(q.node.shape)}")
            out.append((q, RowBlock(q.node, "filters", torch.arange(q.node.shape[0], device=device))))
        if q.stats or q.images:
            out.append((q, RowBlock(q.node, "neurons", q.neuron_index(device))))
    return sorted(out, key=lambda t: -t[1].node.idx)


def _chunks(blocks: List[Tuple[ReverseRequest, RowBlock]], size: int):
    """Consecutive chunks of at most ``size`` rows (blocks split where a chunk ends), each a
    list of ``(request, sub-block, offset of the sub-block in its block)``."""
    chunk, n = [], 0
    for q, blk in blocks:
        s = 0
        while s < blk.rows:
            take = min(size - n, blk.rows - s)
            chunk.append((q, RowBlock(blk.node, blk.kind, blk.index[s: s + take]), s))
            s += take
            n += take
            if n == size:
                yield chunk
                chunk, n = [], 0
    if chunk:
        yield chunk


def reverse_scan(graph: ScanGraph, fwd: ForwardPass, x: torch.Tensor, fg: Optional[torch.Tensor],
                 requests: Sequence[ReverseRequest], budget: int, stats_fn: Callable, *,
                 cut: Optional[int] = None, cut_patches: Optional[Patches] = None,
                 on_rows: Optional[Callable[[int], None]] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Filter images, statistics and images of several layers by batched VJPs of one forward pass.

    Parameters
    ----------
    graph : ScanGraph
    fwd : ForwardPass
        The forward pass of ``x``.
    x : Tensor [B, *graph.input_shape]
    fg : bool Tensor [B, H, W] or None
        Foreground mask of the statistics.
    requests : sequence of ReverseRequest
    budget : int
        Working-set bytes of a sweep; sets the rows per sweep (:func:`sweep_bytes_per_row`).
    stats_fn : callable
        ``stats_fn(li [B, n, D, H, W], x [B, D, H, W], fg) -> [B, n, NUM_STATS]``.
    cut, cut_patches : int, Patches or None
        The cut node and its ungated learned images (see the module notes); the rows of the
        layers it dominates (:func:`dominates`) stop there.
    on_rows : callable or None
        Called with the number of rows after each sweep (a progress bar).

    Returns
    -------
    dict
        ``{name: {"filter_images": [B, C, *in], "stats": [B, n, NUM_STATS], "images": [B, n, *in]}}``
        (only the keys asked for; ``n`` neurons in ``neurons`` order).

    Raises
    ------
    ValueError
        A layer without a gradient path from the input, or filter images of a layer without
        channels.
    """
    B, dev, dt = x.shape[0], x.device, x.dtype
    sweep = BackwardSweep(graph, fwd, x, cut, cut_patches)
    sweep.check([q.node for q in requests])
    blocks = request_blocks(requests, dev)
    out: Dict[str, Dict[str, torch.Tensor]] = {q.name: {} for q in requests}
    ins = tuple(x.shape[1:])
    for q in requests:
        n = q.neuron_index(dev).numel()
        if q.filters:
            out[q.name]["filter_images"] = torch.zeros(B, q.node.shape[0], *ins, dtype=dt, device=dev)
        if q.stats:
            out[q.name]["stats"] = torch.zeros(B, n, NUM_STATS, dtype=dt, device=dev)
        if q.images:
            out[q.name]["images"] = torch.zeros(B, n, *ins, dtype=dt, device=dev)
    deep = [t for t in blocks if cut is not None and dominates(graph, cut, [t[1].node])]
    rest = [t for t in blocks if not (cut is not None and dominates(graph, cut, [t[1].node]))]
    esize = x.element_size()
    x4 = x.reshape(B, *ins)
    for group, stop in ((deep, True), (rest, False)):
        if not group:
            continue
        nodes = [b.node for _, b in group]
        per_row = sweep_bytes_per_row(graph, nodes, cut if stop else None, B, esize)
        avail = budget - (cut_matrix_bytes(cut_patches) if stop else 0)
        size = int(max(1, min(sum(b.rows for _, b in group), avail // max(1, per_row))))
        for chunk in _chunks(group, size):
            imgs = sweep.run([blk for _, blk, _ in chunk], stop_at_cut=stop)    # [R, B, *in]
            s = 0
            for q, blk, _ in chunk:
                part = imgs[s: s + blk.rows]
                s += blk.rows
                res = out[q.name]
                if blk.kind == "filters":
                    res["filter_images"][:, blk.index] = part.transpose(0, 1)
                    continue
                pos = _positions(q, blk.index, dev)
                gate = fwd.full_gate(blk.node).reshape(B, -1)[:, blk.index]          # [B, r]
                li = part.transpose(0, 1) * gate.reshape(B, -1, *([1] * len(ins)))    # [B, r, *in]
                if q.stats:
                    res["stats"][:, pos] = stats_fn(li.reshape(B, li.shape[1], *x4.shape[1:]), x4, fg).to(dt)
                if q.images:
                    res["images"][:, pos] = li
            if on_rows is not None:
                on_rows(sum(blk.rows for _, blk, _ in chunk))
    return out


def _positions(q: ReverseRequest, index: torch.Tensor, dev) -> torch.Tensor:
    """Where neuron rows ``index`` go in the request's ``neurons`` order."""
    if q.neurons is None:
        return index
    inv = torch.full((int(math.prod(q.node.shape)),), -1, dtype=torch.long, device=dev)
    inv[q.neurons.to(dev)] = torch.arange(q.neurons.numel(), device=dev)
    return inv[index]


def cut_matrix_bytes(patches: Optional[Patches]) -> int:
    """A bound on the bytes of the cut's sparse matrices (:func:`patches_matrix`): 8 bytes
    (value and int32 index) per patch entry, as if none were zero."""
    if patches is None:
        return 0
    return int(patches.data.numel()) * 8


def _linear_call(node: GNode, z: torch.Tensor) -> torch.Tensor:
    """The forward of a linear, sample-independent node on ``z`` (for its VJP by autograd)."""
    a = node.attrs
    if node.kind == "avgpool":
        return F.avg_pool2d(z, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                            a["divisor_override"])
    if node.kind == "adaptive_avgpool":
        return F.adaptive_avg_pool2d(z, a["output_size"])
    if node.kind == "conv":
        return F.conv2d(z, node.module.weight.detach().to(z.dtype), None, a["stride"], a["padding"], a["dilation"],
                        a["groups"])
    raise AssertionError(f"no linear call for node kind {node.kind!r}")  # pragma: no cover
