"""The reverse strategy: learned images and filter images by batched vector–Jacobian products.

One VJP per neuron (or per filter), all of a layer's rows pushed backward through the frozen
network of one recorded forward pass, chunk by chunk (:mod:`nns_cuda.engine.backward`): any
resolution, memory ∝ (rows per chunk × largest feature map). It runs in the input's dtype and
doubles as an oracle of the forward strategy.
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch

from nns_cuda.engine.backward import ReverseRequest, reverse_scan
from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.graph import GNode, ScanGraph
from nns_cuda.ops.reference.stats import li_stats_dense

__all__ = ["reverse_learned_images", "reverse_filter_images"]


#: seconds after which the default progress bar (``progress=None``) of a reverse loop appears
PROGRESS_DELAY_S = 2.0


def _progress_bar(total: int, desc: str, unit: str, progress: Optional[bool]):
    """A tqdm bar on stderr (``progress``: True always, False never, None after
    :data:`PROGRESS_DELAY_S` seconds, so that short loops stay silent)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=progress is False,
                delay=0 if progress else PROGRESS_DELAY_S)


def reverse_learned_images(graph: ScanGraph, x: torch.Tensor, node: GNode, neurons: Optional[torch.Tensor],
                           gate_outputs: bool, budget: int, progress: Optional[bool] = None) -> torch.Tensor:
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
    progress : bool or None
        A progress bar (stderr) over the neurons: True always, False never, None (default)
        only once the loop has run for :data:`PROGRESS_DELAY_S` seconds.

    Returns
    -------
    Tensor [B, *node.shape, *input_shape] (``neurons=None``) or [B, n, *input_shape]
    """
    B = x.shape[0]
    fwd = ForwardPass(graph, x, gate_outputs)
    req = ReverseRequest(node.name, node, images=True, neurons=neurons)
    n = int(math.prod(node.shape)) if neurons is None else int(neurons.numel())
    bar = _progress_bar(n, f"reverse {node.name}", "neuron", progress)
    try:
        out = reverse_scan(graph, fwd, x, None, [req], budget, li_stats_dense, on_rows=bar.update)
    finally:
        bar.close()
    shape = node.shape if neurons is None else (n,)
    return out[node.name]["images"].reshape(B, *shape, *graph.input_shape)


def reverse_filter_images(graph: ScanGraph, x: torch.Tensor, node: GNode, gate_outputs: bool,
                          budget: int, progress: Optional[bool] = None) -> torch.Tensor:
    """Filter images ``L^k = x ⊙ VJP(cotangent = g ⊙ a restricted to channel k)``.

    Parameters
    ----------
    graph, x, node, gate_outputs, budget, progress : as :func:`reverse_learned_images`
        ``node`` must have channels (output shape ``[C, H, W]`` or ``[N]``).

    Returns
    -------
    Tensor [B, C, *input_shape]
    """
    fwd = ForwardPass(graph, x, gate_outputs)
    req = ReverseRequest(node.name, node, filters=True)
    C = node.shape[0] if node.shape else 0
    bar = _progress_bar(C, f"reverse {node.name} filters", "filter", progress)
    try:
        out = reverse_scan(graph, fwd, x, None, [req], budget, li_stats_dense, on_rows=bar.update)
    finally:
        bar.close()
    return out[node.name]["filter_images"]
