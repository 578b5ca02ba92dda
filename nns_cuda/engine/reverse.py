"""The reverse strategy: learned images and filter images by batched vector–Jacobian products.

One VJP per neuron (or per filter), batched by running the model on ``k`` stacked copies of the
batch: samples are independent in eval mode, so one backward pass over the stack gives ``k``
VJPs per sample. Any resolution; memory ∝ (chunk × image). It runs autograd in the input's
dtype, and doubles as an oracle of the forward strategy.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch

from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.graph import GNode, ScanGraph

__all__ = ["reverse_learned_images", "reverse_filter_images"]


def _stacked_forward(graph: ScanGraph, x: torch.Tensor, k: int,
                     gate_outputs: bool) -> Tuple[torch.Tensor, Dict[Any, Any], ForwardPass]:
    """Run the model on ``k`` stacked copies of the batch with autograd on: the stacked input
    (requires grad), the values with their autograd graph, and their detached forward pass."""
    xr = x.detach().repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)
    with torch.enable_grad():
        values = graph.run(xr)
    return xr, values, ForwardPass.from_values(graph, values, gate_outputs)


def _copies_per_pass(graph: ScanGraph, node: GNode, x: torch.Tensor, n: int, budget: int) -> int:
    """How many VJPs per sample one stacked backward pass may carry within ``budget`` bytes
    (at most ``n`` and 512)."""
    per_copy = sum(int(math.prod(nd.shape)) for nd in graph.nodes[: node.idx + 1] if nd.kind != "aux")
    per_copy = (per_copy * 3 + int(math.prod(graph.input_shape)) * 2) * x.element_size() * x.shape[0]
    return int(max(1, min(n, budget // max(1, per_copy), 512)))


def reverse_learned_images(graph: ScanGraph, x: torch.Tensor, node: GNode, neurons: Optional[torch.Tensor],
                           gate_outputs: bool, budget: int) -> torch.Tensor:
    """Dense learned images ``g_n · x ⊙ ∂a_n/∂x`` by batched VJPs.

    Parameters
    ----------
    graph : ScanGraph
    x : Tensor [B, *graph.input_shape]
    node : GNode
        The layer.
    neurons : int64 Tensor [n] or None
        Flat indices into the layer's output shape; None: every neuron.
    gate_outputs : bool
        Gate the model's output neurons too (docs/spec.md §1).
    budget : int
        Working-set bound in bytes.

    Returns
    -------
    Tensor [B, *node.shape, *input_shape] (``neurons=None``) or [B, n, *input_shape]
    """
    B = x.shape[0]
    N = int(math.prod(node.shape))
    sel = torch.arange(N, device=x.device) if neurons is None else neurons
    n = sel.numel()
    P = int(math.prod(graph.input_shape))
    out = torch.zeros(B, n, P, dtype=x.dtype, device=x.device)
    chunk = _copies_per_pass(graph, node, x, n, budget)
    gate = None
    for s in range(0, n, chunk):
        idx = sel[s: s + chunk]
        k = idx.numel()
        xr, values, fwd = _stacked_forward(graph, x, k, gate_outputs)
        if gate is None:
            gate = fwd.full_gate(node)[:B].reshape(B, N)
        cotangent = torch.zeros(k, B, N, dtype=x.dtype, device=x.device)
        cotangent[torch.arange(k, device=x.device), :, idx] = 1
        with torch.enable_grad():
            zf = values[node.idx].reshape(k, B, N)
            (grad,) = torch.autograd.grad(zf, xr, grad_outputs=cotangent, allow_unused=True)
        if grad is None:
            continue
        li = grad.reshape(k, B, P) * x.reshape(1, B, P) * gate[:, idx].t().unsqueeze(-1)
        out[:, s: s + k] = li.permute(1, 0, 2)
    shape = node.shape if neurons is None else (n,)
    return out.reshape(B, *shape, *graph.input_shape).detach()


def reverse_filter_images(graph: ScanGraph, x: torch.Tensor, node: GNode, gate_outputs: bool,
                          budget: int) -> torch.Tensor:
    """Filter images ``L^k = x ⊙ VJP(cotangent = g ⊙ a restricted to channel k)``.

    Parameters
    ----------
    graph, x, node, gate_outputs, budget : as :func:`reverse_learned_images`
        ``node`` must have channels (output shape ``[C, H, W]`` or ``[N]``).

    Returns
    -------
    Tensor [B, C, *input_shape]
    """
    if len(node.shape) not in (1, 3):
        raise ValueError(f"filter images need a layer with channels ([C, H, W] or [N]); {node.name!r} has shape "
                         f"{list(node.shape)}")
    B = x.shape[0]
    C = node.shape[0]
    P = int(math.prod(graph.input_shape))
    out = torch.zeros(B, C, P, dtype=x.dtype, device=x.device)
    chunk = _copies_per_pass(graph, node, x, C, budget)
    weights = None
    for s in range(0, C, chunk):
        k = min(chunk, C - s)
        xr, values, fwd = _stacked_forward(graph, x, k, gate_outputs)
        if weights is None:
            weights = (fwd.full_gate(node)[:B] * fwd.values[node.idx][:B]).reshape(B, C, -1)
        cotangent = torch.zeros(k, B, C, weights.shape[-1], dtype=x.dtype, device=x.device)
        ar = torch.arange(k, device=x.device)
        cotangent[ar, :, s + ar] = weights[:, s: s + k].permute(1, 0, 2)
        with torch.enable_grad():
            zf = values[node.idx].reshape(k, B, C, -1)
            (grad,) = torch.autograd.grad(zf, xr, grad_outputs=cotangent, allow_unused=True)
        if grad is None:
            continue
        out[:, s: s + k] = (grad.reshape(k, B, P) * x.reshape(1, B, P)).permute(1, 0, 2)
    return out.reshape(B, C, *graph.input_shape).detach()
