"""Dense autograd oracles of learned images and filter images.

For a ReLU network, ``LI_n = x ⊙ ∂a_n/∂x`` computed by autograd on the real model (docs/spec.md
§1, identity 1). These functions implement the injectable ``scan_fn`` / ``li_fn`` /
``filter_fn`` of the analyses (``nns_cuda.analysis.fq``, ``nns_cuda.analysis.chapter3``, ...)
with plain autograd, without the engine. They are dense (memory ∝ neurons × pixels) and meant
for small models: tests, and cross-checking an engine backend. They share no code with the
engine's propagation.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nns_cuda._modules import layer_outputs
from nns_cuda.ops.reference.stats import li_stats_dense

__all__ = ["autograd_learned_images", "autograd_filter_images", "autograd_scan"]


def autograd_learned_images(model: nn.Module, x: Tensor, layer: str, neurons: Optional[Sequence[Tuple[int, ...]]] = None,
                            *, chunk: int = 512) -> Tensor:
    """Dense learned images ``x ⊙ ∂a_n/∂x`` by autograd (the ``li_fn`` of the analyses).

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    x : Tensor [B, D, H, W]
    layer : str
        Module name; ``name:k`` for the k-th call of a reused module (the last call without).
    neurons : list of index tuples or None
        Indices into the layer's output shape (without the batch); None: every neuron.
    chunk : int
        Neurons per batched backward pass.

    Returns
    -------
    Tensor [B, *shape, D, H, W] (``neurons=None``) or [B, n, D, H, W]
    """
    xg = x.detach().clone().requires_grad_(True)
    _, cap = layer_outputs(model, xg, [layer])
    a = cap[layer]
    B = x.shape[0]
    shape = tuple(a.shape[1:])
    flat = a.reshape(B, -1)
    if neurons is None:
        idx = torch.arange(flat.shape[1], device=x.device)
    else:
        idx = torch.tensor([_ravel(n, shape) for n in neurons], device=x.device, dtype=torch.long)
    out = []
    for s in range(0, idx.numel(), chunk):
        ii = idx[s:s + chunk]
        cot = torch.zeros(ii.numel(), B, flat.shape[1], dtype=a.dtype, device=a.device)
        cot[torch.arange(ii.numel()), :, ii] = 1
        (g,) = torch.autograd.grad(flat, xg, grad_outputs=cot, is_grads_batched=True, retain_graph=True)
        out.append((g * x.unsqueeze(0)).transpose(0, 1))  # [B, n, D, H, W]
    li = torch.cat(out, dim=1).detach()
    if neurons is None:
        li = li.reshape(B, *shape, *x.shape[1:])
    return li


def _ravel(n, shape) -> int:
    n = tuple(int(v) for v in (n if isinstance(n, (tuple, list)) else (n,)))
    if len(n) != len(shape):
        raise IndexError(f"neuron index {n} does not match the layer output shape {list(shape)}")
    flat = 0
    for v, s in zip(n, shape):
        if not 0 <= v < s:
            raise IndexError(f"neuron index {n} out of range for the layer output shape {list(shape)}")
        flat = flat * s + v
    return flat


def autograd_filter_images(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    """Filter learned images ``L^k = x ⊙ VJP(cotangent = a^k)`` by autograd (the ``filter_fn`` of the analyses).

    Parameters
    ----------
    model, x
        As :func:`autograd_learned_images`.
    layer : str
        A module with channels (output ``[B, C, ...]``); ``name:k`` as :func:`autograd_learned_images`.

    Returns
    -------
    Tensor [B, C, D, H, W]
    """
    xg = x.detach().clone().requires_grad_(True)
    _, cap = layer_outputs(model, xg, [layer])
    a = cap[layer]
    B, C = a.shape[:2]
    cot = torch.zeros(C, *a.shape, dtype=a.dtype, device=a.device)
    ad = a.detach()
    for k in range(C):
        cot[k, :, k] = ad[:, k]
    (g,) = torch.autograd.grad(a, xg, grad_outputs=cot, is_grads_batched=True)
    return (g * x.unsqueeze(0)).transpose(0, 1).detach()


def autograd_scan(model: nn.Module, x: Tensor, fg_mask: Optional[Tensor], layers: Sequence[str]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """The ``scan_fn`` of the analyses by autograd.

    Parameters
    ----------
    model, x
        As :func:`autograd_learned_images`.
    fg_mask : bool Tensor [B, H, W] or None
        Foreground for the statistics (None: the whole image).
    layers : sequence of str

    Returns
    -------
    dict of str to (Tensor [B, *shape], Tensor [B, *shape, NUM_STATS])
        Per layer its activations and the statistics of its learned images.
    """
    with torch.no_grad():
        _, cap = layer_outputs(model, x, layers)
    out = {}
    for layer in layers:
        li = autograd_learned_images(model, x, layer)
        out[layer] = (cap[layer].detach(), li_stats_dense(li, x, fg_mask))
    return out
