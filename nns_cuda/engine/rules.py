"""The forward rules: how the learned images of a node follow from those of its inputs.

One function per node kind, looked up in :data:`RULES`. Every rule has the signature
``rule(prop, node, patches) -> Patches``: ``prop`` is the running
:class:`~nns_cuda.engine.propagate.PatchPropagator` (its backend's ops, the forward pass, the
requested nodes, the fusion records), ``node`` the :class:`~nns_cuda.engine.graph.GNode` to
propagate, ``patches`` the ``{node index: Patches}`` of the nodes still alive (the node's
inputs among them). Inputs with a pending per-channel scale have had it applied already,
except for the kinds in :data:`TAKES_PENDING_SCALE`.

In the frozen, bias-free network (docs/spec.md §1) every node is linear in its input's learned
images: a conv places each input neuron's patch into its output neurons' windows, an
activation multiplies by its gate, a max-pool routes the arg-max patch, average pools average,
BatchNorm scales, linear layers are dense GEMMs over whole-image patches, a residual ``+``
re-windows and sums, ``cat`` / slices join and cut channels.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from nns_cuda.engine.graph import ACTIVATIONS, GNode
from nns_cuda.engine.patches import Patches

__all__ = ["RULES", "TAKES_PENDING_SCALE", "bn_scale"]

#: node kinds whose rule accepts an input with a pending per-channel scale
TAKES_PENDING_SCALE = ("conv", "maxpool")


def bn_scale(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The per-channel scale ``γ / √(σ² + ε)`` of an eval-mode BatchNorm: Tensor [C]."""
    s = 1.0 / torch.sqrt(module.running_var.to(dtype) + module.eps)
    if module.weight is not None:
        s = s * module.weight.to(dtype)
    return s


# ----------------------------------------------------------------------------- convolution
def conv_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """A convolution, fused with what directly follows it when that is not requested:
    ``conv -> activation`` (the activation's gate), or ``conv -> BN [-> activation]`` (the BN
    scale, the activation's gate). The fused nodes share the conv's patches."""
    graph, fwd = prop.graph, prop.forward
    src = patches[node.inputs[0]]
    src_node = graph.nodes[node.inputs[0]]
    if not src.data.shape[2:4] == src_node.shape[1:3] or src_node.gy is None:
        raise AssertionError("conv input must be spatial")
    scale, gate = None, None
    act = graph.gate_user(node)
    chain: List[GNode] = []
    if act is not None:
        chain = [act]
        gate = fwd.act_gate(act)
    elif len(node.users) == 1 and graph.nodes[node.users[0]].kind == "bn" and node.idx not in prop.requested:
        bn = graph.nodes[node.users[0]]
        scale = bn_scale(bn.module, prop.factor_dtype)
        chain = [bn]
        bn_act = graph.gate_user(bn)
        if bn_act is not None and bn.idx not in prop.requested:
            gate = fwd.act_gate(bn_act)
            chain.append(bn_act)
    out = prop.conv(node, src, scale, gate)
    for c in chain:
        prop.fused[c.idx] = node.idx
    if act is not None:
        prop.gated_by_fusion.add(node.idx)
    return out


# ----------------------------------------------------------------------------- element-wise
def activation_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """An activation: the images times its gate (its local slope)."""
    return prop.apply_gate(patches[node.inputs[0]], prop.forward.act_gate(node))


def identity_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """Dropout, Identity, ``contiguous``, a constant added: the input's images."""
    return patches[node.inputs[0]]


def batchnorm_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """BatchNorm: the images times its scale, fused with the activation that follows when the
    BN's own images are not requested."""
    graph, fwd = prop.graph, prop.forward
    src = patches[node.inputs[0]]
    s = bn_scale(node.module, prop.factor_dtype)
    if src.data.shape[2] == 1 and src.data.shape[3] == 1 and len(node.shape) != 3:
        # dense features [B, N]; BN1d over N features (or [B, C, L]: channel-major)
        N = src.data.shape[1]
        per_channel = s.repeat_interleave(N // s.numel()).view(1, N, 1, 1, 1, 1, 1)
        return Patches(prop.scale(src.data, per_channel), src.ay, src.ax, src.active)
    act = graph.gate_user(node)
    if act is not None and node.idx not in prop.requested and act.idx not in prop.requested \
            and act.kind in ("relu", "hardtanh") and act.users \
            and all(graph.nodes[u].kind in TAKES_PENDING_SCALE for u in act.users):
        # BN -> 0/1 activation read only by convs / max-pools, neither requested: no pass at all.
        # The scale stays pending (folded into the next conv's weights), the gate becomes the
        # inactive-input mask (the activation shares these patches).
        prop.fused[act.idx] = node.idx
        gate = fwd.act_gate(act) != 0
        active = gate if src.active is None else gate & src.active
        return Patches(src.data, src.ay, src.ax, active, s)
    if act is not None and node.idx not in prop.requested:
        # BN followed by its activation, the BN's own images not requested: one pass with the
        # product of the BN scale and the activation gate (the activation shares these patches)
        gate = fwd.act_gate(act).to(prop.factor_dtype)
        mult = gate * s.view(1, -1, *([1] * (gate.dim() - 2)))
        prop.fused[act.idx] = node.idx
        B, C, Ho, Wo = src.data.shape[:4]
        return Patches(prop.scale(src.data, mult.reshape(B, C, Ho, Wo, 1, 1, 1)), src.ay, src.ax, mult != 0)
    return Patches(prop.scale(src.data, s.view(1, -1, 1, 1, 1, 1, 1)), src.ay, src.ax, src.active)


# ----------------------------------------------------------------------------- pooling
def maxpool_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """Max-pool: each output neuron's image is its arg-max input neuron's image."""
    src = patches[node.inputs[0]]
    C, Ho, Wo = node.shape
    rh, rw, ay, ax = prop.window(node, Ho, Wo)
    indices = prop.forward.values[("indices", node.idx)]
    t = prop.ops.maxpool_li(src.data, src.ay, src.ax, indices, ay, ax, rh, rw)
    active = None if src.active is None else \
        torch.gather(src.active.flatten(2), 2, indices.flatten(2)).view_as(indices)
    return Patches(t, ay, ax, active, src.pending_scale)  # routing keeps channels: the scale stays pending


def _average_pool(prop, node: GNode, src: Patches, kernel, stride, padding, ceil_mode, count_include_pad,
                  divisor) -> Patches:
    """A regular average pool as a depthwise conv of ones with a per-position divisor gate."""
    C, Ho, Wo = node.shape
    Hi, Wi = src.data.shape[2], src.data.shape[3]
    if (Hi, Wi) != tuple(prop.graph.nodes[node.inputs[0]].shape[1:3]):
        raise AssertionError("pool input must be spatial")
    ones = torch.ones(1, 1, Hi, Wi, dtype=prop.factor_dtype, device=prop.device)
    avg = F.avg_pool2d(ones, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
    cnt = F.avg_pool2d(ones, kernel, stride, padding, ceil_mode, True, 1)
    mult = torch.where(cnt > 0, avg / cnt.clamp_min(1), torch.zeros_like(avg))[0, 0]  # [Ho, Wo]
    gate = mult.view(1, 1, Ho, Wo).expand(prop.B, C, Ho, Wo).contiguous()
    weight = torch.ones(C, 1, kernel[0], kernel[1], dtype=prop.factor_dtype, device=prop.device)
    rh, rw, ay, ax = prop.window(node, Ho, Wo)
    t = prop.ops.conv_li(src.data, src.ay, src.ax, src.active, weight, None, gate, ay, ax, list(stride),
                         list(padding), [1, 1], C, rh, rw)
    return Patches(t, ay, ax, None)


def avgpool_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """``AvgPool2d`` / ``F.avg_pool2d``."""
    a = node.attrs
    return _average_pool(prop, node, patches[node.inputs[0]], a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                         a["count_include_pad"], a["divisor_override"])


def adaptive_avgpool_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """``AdaptiveAvgPool2d`` and a global mean over H, W: a regular pool where the sizes
    divide, else a dense linear map of the pooled map."""
    src = patches[node.inputs[0]]
    if node.attrs.get("regular"):  # a mean with keepdim is the regular pool over the whole map
        kernel = node.attrs["kernel"]
        return _average_pool(prop, node, src, kernel, kernel, (0, 0), False, True, None)
    Ho, Wo = node.shape[1:] if len(node.shape) == 3 else (1, 1)  # a mean without keepdim: [C]
    C, Hi, Wi = prop.graph.nodes[node.inputs[0]].shape

    def mean_matrix(n_in: int, n_out: int) -> torch.Tensor:
        A = torch.zeros(n_out, n_in, dtype=prop.factor_dtype, device=prop.device)
        for i in range(n_out):
            start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
            A[i, start:end] = 1.0 / (end - start)
        return A

    A = torch.kron(mean_matrix(Hi, Ho), mean_matrix(Wi, Wo))  # [Ho*Wo, Hi*Wi]
    dense = prop.to_dense(src)
    B = dense.data.shape[0]
    t = prop.ops.linear_li(dense.data.reshape(B * C, Hi * Wi, -1), A, None)
    return Patches(t.reshape(B, C * Ho * Wo, 1, 1, prop.D, prop.H, prop.W), dense.ay, dense.ax, None)


# ----------------------------------------------------------------------------- channels and shapes
def slice_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """A channel range ``x[:, a:b]`` (or a piece of ``split`` / ``chunk``): a view of the input's patches."""
    src = patches[node.inputs[0]]
    a0, a1 = node.attrs["start"], node.attrs["stop"]
    src_node = prop.graph.nodes[node.inputs[0]]
    if src_node.spatial or len(src_node.shape) == 1:
        return Patches(src.data[:, a0:a1], src.ay, src.ax, None if src.active is None else src.active[:, a0:a1])
    dense = prop.to_dense(src)  # [B, C·rest, 1, 1, ...]: channel-major
    B, C = dense.data.shape[0], src_node.shape[0]
    tail = dense.data.shape[2:]
    return Patches(dense.data.reshape(B, C, -1, *tail)[:, a0:a1].reshape(B, -1, *tail), dense.ay, dense.ax, None)


def cat_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """``torch.cat`` along channels: spatial inputs placed in the union window (no copy where
    they already are), others as dense images."""
    ins = [patches[i] for i in node.inputs]
    if not node.spatial:
        dense = [prop.to_dense(p) for p in ins]
        return Patches(torch.cat([d.data for d in dense], 1), dense[0].ay, dense[0].ax, None)
    C, Ho, Wo = node.shape
    rh, rw, ay, ax = prop.window(node, Ho, Wo)
    parts = [p.data if prop.in_window(i, p, node, rh, rw) else prop.ops.place_li(p.data, p.ay, p.ax, ay, ax, rh, rw, None)
             for i, p in zip(node.inputs, ins)]
    active = None
    if any(p.active is not None for p in ins):
        active = torch.cat([p.active if p.active is not None else
                            torch.ones(p.data.shape[:4], dtype=torch.bool, device=prop.device) for p in ins], 1)
    return Patches(torch.cat(parts, 1), ay, ax, active)


def reshape_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """Flatten / view / reshape: dense images (neurons in the input's order)."""
    return prop.to_dense(patches[node.inputs[0]])


# ----------------------------------------------------------------------------- dense and residual
def linear_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """A linear layer: one GEMM of its weights with the dense images of its input."""
    dense = prop.to_dense(patches[node.inputs[0]])
    B, N = dense.data.shape[:2]
    weight = node.module.weight.detach().to(prop.factor_dtype)
    if weight.shape[1] != N:
        raise ValueError(f"linear layer {node.name!r} expects {weight.shape[1]} features, its input has {N}")
    t = prop.ops.linear_li(dense.data.reshape(B, N, -1), weight, None)
    return Patches(t.reshape(B, weight.shape[0], 1, 1, prop.D, prop.H, prop.W), dense.ay, dense.ax, None)


def add_rule(prop, node: GNode, patches: Dict[int, Patches]) -> Patches:
    """A residual ``+``: both operands placed in the union window and summed (an operand that
    already lies there is read as it is)."""
    a, b = patches[node.inputs[0]], patches[node.inputs[1]]
    if not node.spatial:
        da, db = prop.to_dense(a), prop.to_dense(b)
        if da.data.shape != db.data.shape:
            raise ValueError(f"residual add {node.name!r}: operands have different shapes")
        return Patches(da.data + db.data, da.ay, da.ax, None)
    C, Ho, Wo = node.shape
    rh, rw, ay, ax = prop.window(node, Ho, Wo)
    ia, ib = node.inputs
    if prop.in_window(ib, b, node, rh, rw) and not prop.in_window(ia, a, node, rh, rw):
        a, b, ia, ib = b, a, ib, ia
    if prop.in_window(ia, a, node, rh, rw):
        base = a.data  # already laid out in the output window: read as it is (place_li does not write it)
    else:
        base = prop.ops.place_li(a.data, a.ay, a.ax, ay, ax, rh, rw, None)
    return Patches(prop.ops.place_li(b.data, b.ay, b.ax, ay, ax, rh, rw, base), ay, ax, None)


#: ``{node kind: rule}``; the ``input`` node is the propagation's start, ``aux`` nodes carry no images
RULES: Dict[str, Callable[..., Patches]] = {
    "conv": conv_rule,
    **{kind: activation_rule for kind in ACTIVATIONS},
    "bn": batchnorm_rule,
    "identity": identity_rule,
    "maxpool": maxpool_rule,
    "avgpool": avgpool_rule,
    "adaptive_avgpool": adaptive_avgpool_rule,
    "global_mean": adaptive_avgpool_rule,
    "slice": slice_rule,
    "cat": cat_rule,
    "reshape": reshape_rule,
    "linear": linear_rule,
    "add": add_rule,
}
