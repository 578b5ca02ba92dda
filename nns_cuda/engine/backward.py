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
``Σ_j cot_j · LI_j`` over the neurons ``j`` of ``m`` — one batched GEMM over the positions of
``m`` (``[rows, C] @ [C, D·R_h·R_w]`` per position, :class:`CutMatrix`) and the overlap-add of
the windows — instead of the backward pass from ``m`` down to the input. That pays where the
layers below ``m`` cost much more than its patches: below a max-pool the transposed convs run
on maps 4× larger than the pool's output, and the first conv back to RGB vectorises poorly.
``m`` must lie on every path from the input to the layers of the rows that stop there
(:func:`dominates`).

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

__all__ = ["RowBlock", "ReverseRequest", "reverse_scan", "request_blocks", "BackwardSweep", "dominates", "grad_reach",
           "no_gradient_path", "sweep_bytes_per_row", "one_channel_ok", "channels_last_wanted", "CutMatrix",
           "cut_bytes", "cut_temp_elems", "CPU_SWEEP_BYTES", "sweep_budget"]


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


def _zeros_cl(shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros of a 4-D ``shape`` stored channels-last."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last).zero_()


def _is_cl(t: torch.Tensor) -> bool:
    """A 4-D tensor stored channels-last (and not also plain contiguous)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def channels_last_wanted(shape: Tuple[int, ...]) -> bool:
    """Whether transposed convolutions on maps of ``shape`` ``[C, H, W]`` run channels-last:
    on the CPU oneDNN's NHWC kernels were measured faster on maps of 14 × 14 and larger
    (``benchmarks/NOTES.md``), slower on 7 × 7."""
    return len(shape) == 3 and shape[1] * shape[2] >= 196


#: node kinds whose VJP keeps a row's single non-zero channel (elementwise gates, per-channel
#: scales, sums handing the same cotangent to their operands)
CHANNEL_WISE = frozenset(ACTIVATIONS) | {"bn", "identity", "add"}


def one_channel_ok(node: GNode) -> bool:
    """Whether the transposed conv of ``node`` (a conv) runs row by row when each row is
    non-zero in one channel (:meth:`BackwardSweep._conv_one_channel`): ungrouped, stride 1, and
    a padding within the dilated kernel's reach (the windows of the transposed map)."""
    a = node.attrs
    if node.kind != "conv" or len(node.shape) != 3 or int(a["groups"]) != 1 or tuple(a["stride"]) != (1, 1):
        return False
    return all(0 <= p <= d * (k - 1) for k, p, d in zip(a["kernel"], a["padding"], a["dilation"]))


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
        The ungated learned images of the cut node on ``x`` (pending scale applied). The sweep
        owns them: their ``data`` is released once every sample's :class:`CutMatrix` is laid
        out (the matrices hold the same values in the contraction's layout).

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
        self._cut_cache: Dict[int, "CutMatrix"] = {}
        self._gates: Dict[Tuple[int, bool], torch.Tensor] = {}
        self._weights: Dict[Tuple[int, bool], torch.Tensor] = {}
        self._filter_weights: Dict[int, torch.Tensor] = {}
        self._pool_index: Dict[Tuple[int, bool], torch.Tensor] = {}
        self._fold: Set[int] = set()       # convs whose BN scale this sweep folds into the weights
        self._own: Dict[int, list] = {}
        self._stop: Optional[int] = None
        self._chan: Optional[torch.Tensor] = None   # the node being swept: its rows' one channel, or None
        self.cut_elems = CUT_CHUNK_ELEMS  # bound of the cut contraction's result groups
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
        """The block's cotangent rows at its layer's output: Tensor [r·B, *node.shape] (row-major;
        channels-last for the maps the sweep runs channels-last, :func:`channels_last_wanted`)."""
        node, r, B = block.node, block.rows, self.B
        ar = torch.arange(r, device=self.device)
        idx = block.index.to(self.device)
        if channels_last_wanted(node.shape):
            C, H, W = node.shape
            flat = _zeros_cl((r * B, C, H, W), self.dtype, self.device)
            cot = flat.view(r, B, C, H, W)
            if block.kind == "filters":
                w = self.filter_weights(node).view(B, C, H, W)
                cot[ar, :, idx] = w[:, idx].transpose(0, 1)
            else:
                c, rest = idx // (H * W), idx % (H * W)
                cot[ar, :, c, rest // W, rest % W] = 1
            return flat
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

        Notes
        -----
        Each VJP returns its contributions with an *owned* flag: a tensor no other
        contribution shares may be gated or summed into in place (a residual ``+`` hands one
        tensor to both operands, which are then not owned). A BN whose input is a conv read by
        it alone has its scale folded into that conv's transposed weights instead of a pass
        over the cotangent. Maps the sweep runs channels-last stay channels-last from node to
        node (gates, scatters and sums keep the layout), so transposed convs get them without
        a conversion.
        """
        self.check([b.node for b in blocks])
        if any(blocks[i].node.idx < blocks[i + 1].node.idx for i in range(len(blocks) - 1)):
            raise AssertionError("row blocks must be ordered deepest layer first")
        B = self.B
        R = sum(b.rows for b in blocks)
        own: Dict[int, List[Tuple[int, RowBlock]]] = {}
        e = 0
        for b in blocks:
            own.setdefault(b.node.idx, []).append((e, b))
            e += b.rows
        stop = self.cut if stop_at_cut else None
        self._own, self._stop, self._fold = own, stop, set()
        need = self.graph.ancestors(list(own))
        pending: Dict[int, List[Tuple[torch.Tensor, bool, Optional[torch.Tensor]]]] = {}
        for node in reversed(self.graph.nodes):
            if node.idx not in need or node.idx not in self.reach:
                continue
            contribs = pending.pop(node.idx, [])
            if not contribs and node.idx not in own:
                continue
            g, owned, chan = self._gather(node, contribs, own.get(node.idx, []))
            del contribs
            self._chan = chan
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
            keeps = chan if node.kind in CHANNEL_WISE else None  # the rows' single channel passes through
            for i, contrib, c_owned in self.vjps.get(node.kind, self._unhandled)(node, g, owned):
                if i in self.reach:
                    pending.setdefault(i, []).append((contrib, c_owned, keeps))
            del g
        raise AssertionError("the sweep did not reach the input")  # pragma: no cover - check() guards it

    def _gather(self, node: GNode, contribs: List[Tuple[torch.Tensor, bool, Optional[torch.Tensor]]],
                own: List[Tuple[int, RowBlock]]) -> Tuple[torch.Tensor, bool, Optional[torch.Tensor]]:
        """The cotangent of ``node`` over rows ``[0, end)``, whether it is owned, and its rows'
        channels (:meth:`_channels`): the users' contributions (each over a prefix of the rows)
        summed — into an owned full-length one where there is one — and the node's own rows
        placed at their offsets."""
        B = self.B
        mine = [(s * B, self.cotangent(b)) for s, b in own]
        end = max([c.shape[0] for c, _, _ in contribs] + [s + m.shape[0] for s, m in mine])
        chan = self._channels(end, contribs, own)
        if len(contribs) == 1 and not mine and contribs[0][0].shape[0] == end:
            return contribs[0][0], contribs[0][1], chan
        if not contribs and len(mine) == 1 and mine[0][0] == 0:
            return mine[0][1], True, chan
        if len(contribs) == 1 and len(mine) == 1 and mine[0][0] == contribs[0][0].shape[0]:
            return torch.cat([contribs[0][0], mine[0][1]]), True, chan
        base = next((k for k, (c, o, _) in enumerate(contribs) if o and c.shape[0] == end), None)
        if base is None:
            cl = any(c.dim() == 4 and c.is_contiguous(memory_format=torch.channels_last) and not c.is_contiguous()
                     for c, _, _ in contribs) or (node.shape and channels_last_wanted(node.shape) and not contribs)
            if cl and len(node.shape) == 3:
                g = _zeros_cl((end, *node.shape), self.dtype, self.device)
            else:
                g = torch.zeros(end, *node.shape, dtype=self.dtype, device=self.device)
        else:
            g = contribs[base][0]
        for k, (c, _, _) in enumerate(contribs):
            if k != base:
                g[: c.shape[0]] += c
        for s, m in mine:
            g[s: s + m.shape[0]] += m
        return g, True, chan

    def _channels(self, end: int, contribs: List[Tuple[torch.Tensor, bool, Optional[torch.Tensor]]],
                  own: List[Tuple[int, RowBlock]]) -> Optional[torch.Tensor]:
        """For each of the ``end`` cotangent rows of a node, the one channel it is non-zero in, or
        -1 ([end] int64; None when no row has one): a layer's own rows are (a filter's ``g ⊙ a``
        sits in its channel, a neuron's one-hot in the neuron's), and a contribution keeps its
        rows' channels through gates, per-channel scales and sums (:data:`CHANNEL_WISE`). A row
        that several sources cover counts as dense."""
        srcs = [(0, c.shape[0], ch) for c, _, ch in contribs]
        srcs += [(s * self.B, (s + b.rows) * self.B, self._row_channels(b)) for s, b in own]
        if all(ch is None for _, _, ch in srcs):
            return None
        chan = torch.full((end,), -1, dtype=torch.long, device=self.device)
        count = torch.zeros(end, dtype=torch.long, device=self.device)
        for lo, hi, ch in srcs:
            count[lo:hi] += 1
            if ch is not None:
                chan[lo:hi] = ch
        chan[count != 1] = -1
        return chan if bool((chan >= 0).any()) else None

    def _row_channels(self, block: RowBlock) -> Optional[torch.Tensor]:
        """The one channel each of the block's cotangent rows is non-zero in ([rows·B], row-major
        over the samples), for a layer of shape [C, H, W]; None otherwise."""
        node = block.node
        if len(node.shape) != 3:
            return None
        idx = block.index.to(self.device)
        ch = idx if block.kind == "filters" else idx // (node.shape[1] * node.shape[2])
        return ch.repeat_interleave(self.B)

    # ------------------------------------------------------------------ node VJPs
    # each returns [(input index, contribution, owned)]
    def _unhandled(self, node: GNode, g: torch.Tensor, owned: bool):
        raise AssertionError(f"no VJP for node kind {node.kind!r} ({node.name})")

    def _rows(self, g: torch.Tensor) -> int:
        return g.shape[0] // self.B

    def _per_sample(self, g: torch.Tensor, t: torch.Tensor, owned: bool) -> torch.Tensor:
        """``g`` [R·B, ...] times a per-sample tensor ``t`` [B, ...] (broadcast over the rows),
        in place when ``g`` is owned."""
        if self.B == 1:
            return g.mul_(t) if owned else g * t
        R = self._rows(g)
        if owned:
            g.view(R, self.B, *g.shape[1:]).mul_(t.unsqueeze(0))
            return g
        return (g.view(R, self.B, *g.shape[1:]) * t.unsqueeze(0)).view(g.shape)

    def _gate(self, node: GNode, like: torch.Tensor) -> torch.Tensor:
        cl = _is_cl(like)
        key = (node.idx, cl)
        if key not in self._gates:
            gate = self.fwd.act_gate(node).to(self.dtype)
            self._gates[key] = gate.contiguous(memory_format=torch.channels_last) if cl else gate
        return self._gates[key]

    def _activation(self, node: GNode, g: torch.Tensor, owned: bool):
        return [(node.inputs[0], self._per_sample(g, self._gate(node, g), owned), True)]

    def _conv(self, node: GNode, g: torch.Tensor, owned: bool):
        a = node.attrs
        src = self.graph.nodes[node.inputs[0]]
        Hi, Wi = src.shape[1:]
        Ho, Wo = node.shape[1:]
        (kh, kw), (sh, sw) = a["kernel"], a["stride"]
        (ph, pw), (dh, dw) = a["padding"], a["dilation"]
        oph = Hi - ((Ho - 1) * sh - 2 * ph + dh * (kh - 1) + 1)
        opw = Wi - ((Wo - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
        if not (0 <= oph < max(sh, dh) and 0 <= opw < max(sw, dw)):
            if node.idx in self._fold:  # the BN scale this sweep skipped
                g = g * bn_scale(self.graph.nodes[node.users[0]].module, self.dtype).view(-1, 1, 1)
            return self._by_autograd(node, g, owned)
        chan, k = self._chan, g.shape[0]
        if chan is not None and one_channel_ok(node):
            pure = chan >= 0   # rows non-zero in one channel: a suffix of the rows (a layer's own rows) or all
            k = int(pure.numel() - pure.flip(0).cumprod(0).sum())
            if k == 0:
                return [(node.inputs[0], self._conv_one_channel(node, g, chan), True)]
        cl = channels_last_wanted(node.shape)
        dense = g[:k] if k < g.shape[0] else g
        dense = dense.contiguous(memory_format=torch.channels_last) if cl else dense.contiguous()
        w = self._weight(node, cl)
        out = F.conv_transpose2d(dense, w, None, (sh, sw), (ph, pw), (oph, opw), int(a["groups"]), (dh, dw))
        if k < g.shape[0]:
            rest = self._conv_one_channel(node, g[k:], chan[k:])
            out = torch.cat([out, rest.contiguous(memory_format=torch.channels_last if _is_cl(out)
                                                  else torch.contiguous_format)])
        return [(node.inputs[0], out, True)]

    def _conv_one_channel(self, node: GNode, g: torch.Tensor, chan: torch.Tensor) -> torch.Tensor:
        """The transposed conv (stride 1, :func:`one_channel_ok`) of rows that are non-zero in one
        channel each (``chan`` [rows]): row ``r`` is its map ``g[r, chan[r]]`` correlated with the
        flipped filter ``W[chan[r]]`` — the map's windows (``F.unfold``) times the filter, one GEMM
        per row with ``K = k_h·k_w`` (the dense transposed conv would multiply every channel's
        zeros). Channels-last when the input map runs so (:func:`channels_last_wanted`)."""
        a = node.attrs
        src = self.graph.nodes[node.inputs[0]]
        n, (C, H, W) = g.shape[0], node.shape
        Ci, Hi, Wi = src.shape
        (kh, kw), (ph, pw), (dh, dw) = a["kernel"], a["padding"], a["dilation"]
        sel = g.gather(1, chan.view(n, 1, 1, 1).expand(n, 1, H, W))
        cols = F.unfold(sel, (kh, kw), dilation=(dh, dw), padding=(dh * (kh - 1) - ph, dw * (kw - 1) - pw))
        w = self._weight(node)[chan].flip(2, 3).reshape(n, Ci, kh * kw)   # [n, C_in, taps]
        if channels_last_wanted(src.shape):
            return torch.bmm(cols.transpose(1, 2), w.transpose(1, 2)).view(n, Hi, Wi, Ci).permute(0, 3, 1, 2)
        return torch.bmm(w, cols).view(n, Ci, Hi, Wi)

    def _weight(self, node: GNode, cl: bool = False) -> torch.Tensor:
        """The node's weight in the sweep's dtype (a conv's with the scale of a BN this sweep
        folds into it, channels-last when the conv runs channels-last)."""
        fold = node.idx in self._fold
        key = (node.idx, cl, fold)
        if key not in self._weights:
            w = node.module.weight.detach().to(self.dtype)
            if fold:
                s = bn_scale(self.graph.nodes[node.users[0]].module, self.dtype)
                w = w * s.view(-1, *([1] * (w.dim() - 1)))
            if cl and w.dim() == 4:
                w = w.contiguous(memory_format=torch.channels_last)
            self._weights[key] = w
        return self._weights[key]

    def _linear(self, node: GNode, g: torch.Tensor, owned: bool):
        return [(node.inputs[0], g @ self._weight(node), True)]

    def _bn(self, node: GNode, g: torch.Tensor, owned: bool):
        src = self.graph.nodes[node.inputs[0]]
        if (src.kind == "conv" and src.users == [node.idx] and src.idx not in self._own and src.idx != self._stop
                and len(node.shape) == 3):
            self._fold.add(src.idx)  # the conv's transposed weights carry the scale
            return [(node.inputs[0], g, owned)]
        s = bn_scale(node.module, self.dtype)
        shape = (-1,) + (1,) * (g.dim() - 2)  # BN2d [C, H, W], BN1d [C, L] or [N]
        return [(node.inputs[0], g.mul_(s.view(shape)) if owned else g * s.view(shape), True)]

    def _identity(self, node: GNode, g: torch.Tensor, owned: bool):
        return [(node.inputs[0], g, owned)]

    def _reshape(self, node: GNode, g: torch.Tensor, owned: bool):
        src = self.graph.nodes[node.inputs[0]]
        return [(node.inputs[0], g.reshape(g.shape[0], *src.shape), owned)]

    def _add(self, node: GNode, g: torch.Tensor, owned: bool):
        if len(node.inputs) == 1:
            return [(node.inputs[0], g, owned)]
        return [(i, g, False) for i in node.inputs]

    def _cat(self, node: GNode, g: torch.Tensor, owned: bool):
        sizes = [self.graph.nodes[i].shape[0] for i in node.inputs]
        return [(i, part, False) for i, part in zip(node.inputs, torch.split(g, sizes, dim=1))]

    def _slice(self, node: GNode, g: torch.Tensor, owned: bool):
        src = self.graph.nodes[node.inputs[0]]
        out = g.new_zeros(g.shape[0], *src.shape)
        out[:, node.attrs["start"]: node.attrs["stop"]] = g
        return [(node.inputs[0], out, True)]

    def _global_mean(self, node: GNode, g: torch.Tensor, owned: bool):
        C, H, W = self.graph.nodes[node.inputs[0]].shape
        out = (g.reshape(g.shape[0], C, 1, 1) / (H * W)).expand(g.shape[0], C, H, W).contiguous()
        return [(node.inputs[0], out, True)]

    def _maxpool(self, node: GNode, g: torch.Tensor, owned: bool):
        """The arg-max scatter, in the cotangent's layout (channels-last: flat index
        ``(h·W + w)·C + c`` of each output neuron's arg-max)."""
        C, Hi, Wi = self.graph.nodes[node.inputs[0]].shape
        R, B = self._rows(g), self.B
        cl = _is_cl(g)
        key = (node.idx, cl)
        if key not in self._pool_index:
            ind = self.fwd.values[("indices", node.idx)]                           # [B, C, Ho, Wo]
            if cl:
                ind = (ind * C + torch.arange(C, device=ind.device).view(1, C, 1, 1)).permute(0, 2, 3, 1)
            self._pool_index[key] = ind.reshape(1, B, -1)
        ind = self._pool_index[key]
        if cl:
            out = _zeros_cl((R * B, C, Hi, Wi), g.dtype, g.device)
            src = g.permute(0, 2, 3, 1).reshape(R, B, -1)
            out.permute(0, 2, 3, 1).view(R, B, -1).scatter_add_(2, ind.expand(R, B, ind.shape[-1]), src)
            return [(node.inputs[0], out, True)]
        out = g.new_zeros(R, B, C * Hi * Wi)
        flat = (ind.view(1, B, C, -1) + (torch.arange(C, device=g.device) * (Hi * Wi)).view(1, 1, C, 1)).view(1, B, -1)
        out.scatter_add_(2, flat.expand(R, B, flat.shape[-1]), g.reshape(R, B, -1))
        return [(node.inputs[0], out.view(R * B, C, Hi, Wi), True)]

    def _by_autograd(self, node: GNode, g: torch.Tensor, owned: bool = False):
        """A linear, sample-independent node (average pools, a conv whose transpose has no
        output padding): its VJP by autograd on a zero input of the rows' batch."""
        src = self.graph.nodes[node.inputs[0]]
        z = torch.zeros(g.shape[0], *src.shape, dtype=self.dtype, device=self.device, requires_grad=True)
        with torch.enable_grad():
            out = _linear_call(node, z)
            (grad,) = torch.autograd.grad(out, z, g.reshape(out.shape))
        return [(node.inputs[0], grad, True)]

    # ------------------------------------------------------------------ cut
    def cut_matrix(self, b: int) -> "CutMatrix":
        """Sample ``b``'s learned images of the cut node as a :class:`CutMatrix`."""
        if b not in self._cut_cache:
            self._cut_cache[b] = CutMatrix(self._cut_patches, b, self.graph.nodes[self.cut], tuple(self.x.shape[1:]),
                                           self.dtype)
            if len(self._cut_cache) == self.B:  # every sample laid out: release the patches (the sweep owns them)
                self._cut_patches.data = self._cut_patches.data.new_empty(0)
                self._cut_patches = None
        return self._cut_cache[b]

    def _contract(self, g: torch.Tensor, R: int) -> torch.Tensor:
        """``Σ_j cot_j · LI_j`` over the cut node's neurons for every row: [R, B, *input_shape]."""
        B = self.B
        rows = g.shape[0] // B
        if B == 1 and rows == R:  # the contraction's result as it is (no copy)
            return self.cut_matrix(0).contract(g, self.cut_elems).unsqueeze(1)
        out = torch.zeros(R, B, *self.x.shape[1:], dtype=self.dtype, device=self.device)
        for b in range(B):
            gb = g.view(rows, B, *g.shape[1:])[:, b]
            out[:rows, b] = self.cut_matrix(b).contract(gb, self.cut_elems)
        return out


#: at most this many elements of the per-position GEMM results of a cut are held at once (the
#: rows are contracted in groups; a smaller budget lowers it, :func:`cut_temp_elems`)
CUT_CHUNK_ELEMS = 1 << 25


def cut_temp_elems(row_elems: int, budget: int, esize: int) -> int:
    """Elements of one group of the cut's contraction results: an eighth of the budget, at most
    :data:`CUT_CHUNK_ELEMS`, at least one row's (``row_elems``)."""
    return max(row_elems, min(CUT_CHUNK_ELEMS, budget // (8 * esize)))


class CutMatrix:
    """One sample's learned images of the cut node, laid out for the contraction
    ``images[r] = Σ_j cot[r, j] · LI_j`` (:meth:`contract`).

    A spatial node's patches are re-laid into *padded* windows: neuron ``(c, y, x)``'s window
    starts at row ``y·J − P`` (its receptive field's start, which may lie outside the image)
    instead of the stored anchor (clamped into the image), and spans the receptive field ``R``
    (the stored window holds every non-zero of the image inside it, so nothing is lost). All
    windows of a position then sit on one regular grid: the contraction is one batched GEMM
    ``[rows, C] @ [C, D·R_h·R_w]`` per position and an overlap-add of the windows into a canvas
    that extends the image by the receptive field's overhang. A dense node (whole-image
    windows) is one GEMM ``[rows, N] @ [N, D·H·W]``.

    Parameters
    ----------
    patches : Patches
        ``data`` [B, C, Ho, Wo, D, Rh, Rw] (pending scale applied, no neuron gate), anchors.
    b : int
        The sample.
    node : GNode
        The cut node (its receptive-field geometry).
    input_shape : tuple of int
        ``(D, H, W)``.
    dtype : torch.dtype
    """

    def __init__(self, patches: Patches, b: int, node: GNode, input_shape: Tuple[int, ...], dtype: torch.dtype):
        data = patches.data[b].to(dtype)                                    # [C, Ho, Wo, D, Rh, Rw]
        C, Ho, Wo, D, Rh, Rw = data.shape
        self.input_shape = tuple(input_shape)
        _, H, W = self.input_shape
        self.dense = not node.spatial or ((Ho, Wo) == (1, 1) and (Rh, Rw) == (H, W))
        if self.dense:  # whole-image windows: [N, D·H·W]
            self.mat = data.reshape(C * Ho * Wo, D * H * W)
            return
        gy, gx = node.gy, node.gx
        self.C, self.Ho, self.Wo, self.D = C, Ho, Wo, D
        self.J = (gy.J, gx.J)
        self.R = (max(gy.R, Rh), max(gx.R, Rw))
        self.P = (gy.P, gx.P)
        self.origin = (max(gy.P, 0), max(gx.P, 0))   # canvas index of image row / column 0
        ay = patches.ay.to("cpu").tolist()
        ax = patches.ax.to("cpu").tolist()
        pad = data.new_zeros(Ho, Wo, C, D, self.R[0], self.R[1])
        src = data.permute(1, 2, 0, 3, 4, 5)                               # [Ho, Wo, C, D, Rh, Rw]
        ys = self._shifts(ay, gy.J, gy.P, Rh, self.R[0])
        xs = self._shifts(ax, gx.J, gx.P, Rw, self.R[1])
        for (s0, s1, d0), yy in ys.items():   # positions that share a shift are copied at once
            for (t0, t1, e0), xx in xs.items():
                iy = torch.tensor(yy)[:, None]
                ix = torch.tensor(xx)[None, :]
                pad[iy, ix, :, :, d0: d0 + s1 - s0, e0: e0 + t1 - t0] = src[iy, ix, :, :, s0:s1, t0:t1]
        self.mat = pad.reshape(Ho * Wo, C, D * self.R[0] * self.R[1])
        del pad
        self.canvas = (max((Ho - 1) * gy.J - gy.P + self.R[0], H) + self.origin[0],
                       max((Wo - 1) * gx.J - gx.P + self.R[1], W) + self.origin[1])

    @staticmethod
    def _shifts(anchors, J: int, P: int, stored: int, padded: int) -> Dict[Tuple[int, int, int], List[int]]:
        """For each position, which stored window indices ``[s0, s1)`` land at padded indices
        ``[d0, d0 + s1 - s0)``, grouped: ``{(s0, s1, d0): positions}``."""
        out: Dict[Tuple[int, int, int], List[int]] = {}
        for i, a in enumerate(anchors):
            start = i * J - P                           # the padded window's first image row
            lo = max(a, start)
            hi = min(a + stored, start + padded)
            if hi > lo:
                out.setdefault((lo - a, hi - a, lo - start), []).append(i)
        return out

    def nbytes(self) -> int:
        return self.mat.numel() * self.mat.element_size()

    def row_elems(self) -> int:
        """Elements of one row's per-position GEMM results."""
        return self.mat.shape[-1] if self.dense else self.Ho * self.Wo * self.mat.shape[-1]

    def contract(self, g: torch.Tensor, max_elems: int = CUT_CHUNK_ELEMS) -> torch.Tensor:
        """``Σ_j g[r, j] · LI_j`` for cotangent rows ``g`` [rows, *node shape]: [rows, D, H, W].

        All rows at once, the positions in groups (grid rows of the cut) whose GEMM results and
        their transpose hold at most ``max_elems`` elements together; each group's windows are
        overlap-added into the canvas by one ``F.fold`` (col2im)."""
        rows = g.shape[0]
        D, H, W = self.input_shape
        if self.dense:
            return (g.reshape(rows, -1) @ self.mat).view(rows, D, H, W)
        C, Ho, Wo = self.C, self.Ho, self.Wo
        (Jy, Jx), (Ry, Rx), (oy, ox) = self.J, self.R, self.origin
        K = self.mat.shape[-1]
        gp = g.permute(2, 3, 0, 1)   # [y, x, rows, C], a view: each group's rows are gathered by its GEMM
        mat = self.mat.view(Ho, Wo, C, K)
        canvas = g.new_zeros(rows, D, *self.canvas)
        # a group's GEMM results and their transpose for the overlap-add are alive together
        per_y = max(1, max_elems // max(1, 2 * Wo * rows * K))
        bw = (Wo - 1) * Jx + Rx
        cx = ox - self.P[1]
        for y0 in range(0, Ho, per_y):
            y1 = min(Ho, y0 + per_y)
            n = (y1 - y0) * Wo
            vals = torch.bmm(gp[y0:y1].reshape(n, rows, C), mat[y0:y1].reshape(n, C, K))     # [n, rows, K]
            # overlap-add of the group's windows (one grid row every Jy rows, one window every Jx
            # columns): col2im of the windows as columns [rows, K, n]
            bh = (y1 - y0 - 1) * Jy + Ry
            band = F.fold(vals.permute(1, 2, 0), (bh, bw), (Ry, Rx), stride=(Jy, Jx))          # [rows, D, bh, bw]
            del vals
            cy = y0 * Jy - self.P[0] + oy
            canvas[:, :, cy: cy + bh, cx: cx + bw] += band
            del band
        return canvas[:, :, oy: oy + H, ox: ox + W]


#: Working-set bytes of one reverse sweep on the CPU (its cotangent rows and the cut's
#: contraction temporaries; the cut's matrix comes on top), whatever larger budget is given:
#: ResNet-18 at 224 x 224 on a 2-core VM ran its sweeps faster within 256 MiB than within 2 GiB
#: (the maps of a few dozen rows stay in the caches; benchmarks/NOTES.md, "Reverse sweeps"),
#: and the scan's peak stays below the batched VJP's. GPUs take the whole budget.
CPU_SWEEP_BYTES = 256 << 20


def sweep_budget(budget: int, device_type: str, cut_matrix: int = 0) -> int:
    """The budget a reverse sweep plans its rows with: ``budget`` on CUDA; on the CPU at most
    :data:`CPU_SWEEP_BYTES` plus the cut's matrix (``cut_matrix`` bytes)."""
    if device_type == "cuda":
        return budget
    return min(budget, CPU_SWEEP_BYTES + cut_matrix)


def cut_bytes(patches: Optional[Patches], node: Optional[GNode], budget: int, temps: bool = True) -> int:
    """Bytes of the cut's :class:`CutMatrix` (one sample) plus, with ``temps``, the
    contraction's temporaries (a group of GEMM results and the canvas, :func:`cut_temp_elems`)."""
    if patches is None or node is None:
        return 0
    B, C, Ho, Wo, D, Rh, Rw = patches.data.shape
    esize = patches.data.element_size()
    if node.spatial and (Ho, Wo) != (1, 1):
        row = Ho * Wo * D * max(node.gy.R, Rh) * max(node.gx.R, Rw)
        elems = C * row
    else:
        row = D * Rh * Rw
        elems = patches.data[0].numel()
    return (elems + (2 * cut_temp_elems(row, budget, esize) if temps else 0)) * esize


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
        Working-set bytes of a sweep; sets the rows per sweep (:func:`sweep_bytes_per_row`),
        on the CPU within :func:`sweep_budget`.
    stats_fn : callable
        ``stats_fn(li [B, n, D, H, W], x [B, D, H, W], fg) -> [B, n, NUM_STATS]``.
    cut, cut_patches : int, Patches or None
        The cut node and its ungated learned images (see the module notes); the rows of the
        layers it dominates (:func:`dominates`) stop there. The patches' ``data`` is released
        during the scan (:class:`BackwardSweep`).
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
    stops = [cut is not None and dominates(graph, cut, [t[1].node]) for t in blocks]
    deep = [t for t, stop in zip(blocks, stops) if stop]
    rest = [t for t, stop in zip(blocks, stops) if not stop]
    # the cut's matrix: its share of the sweep budget, then laid out before the results and any
    # rows are allocated (its patches are released then)
    matrix = cut_bytes(cut_patches, graph.nodes[cut], 0, temps=False) if deep else 0
    cut_sb = sweep_budget(budget, dev.type, matrix)   # the rows and the contraction's temporaries get cut_sb - matrix
    cut_all = cut_bytes(cut_patches, graph.nodes[cut], cut_sb - matrix) if deep else 0
    if deep:
        for b in range(B):
            sweep.cut_matrix(b)
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
    esize = x.element_size()
    x4 = x.reshape(B, *ins)
    for group, stop in ((deep, True), (rest, False)):
        if not group:
            continue
        nodes = [b.node for _, b in group]
        per_row = sweep_bytes_per_row(graph, nodes, cut if stop else None, B, esize)
        avail = cut_sb - cut_all if stop else sweep_budget(budget, dev.type)
        sweep.cut_elems = cut_temp_elems(0, cut_sb - matrix, esize)
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
            del imgs, part  # before the next sweep allocates its rows
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
