"""The memory model of a scan: default budgets, bytes per sample, chunk bounds of the conv ops.

The forward strategy's working set is the patches of the nodes alive at once; a scan chunks
its batch so that ``chunk × forward_bytes_per_sample`` stays within the budget, and
``strategy="auto"`` switches to the reverse strategy when one sample does not fit.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict

import torch

from nns_cuda.engine.graph import GNode, ScanGraph
from nns_cuda.engine.inputs import image_dims
from nns_cuda.ops._geometry import virtual_axis

__all__ = ["default_budget", "gemm_max_elems", "forward_bytes_per_sample", "gather_fits"]


def default_budget(device: torch.device, fit: bool = False) -> int:
    """The default working-set budget of a scan, in bytes.

    Parameters
    ----------
    device : torch.device
        On CUDA 60 % of the free GPU memory; on the CPU 2 GiB, or a quarter of the RAM if that
        is less (a larger batch does not make the per-position GEMMs faster there).
    fit : bool
        The bound for deciding whether one sample may use the forward strategy at all (on the
        CPU 8 GiB, or a quarter of the RAM if that is less) instead of the batching budget.

    Returns
    -------
    int
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 8 << 30
    return int(min(total * 0.25, (8 << 30) if fit else (2 << 30)))


def gemm_max_elems(budget: int, dtype: torch.dtype) -> int:
    """Chunk bound of the GEMM conv ops' temporaries (gathered operand, GEMM result, index
    tables): a quarter of the working-set ``budget`` (bytes), in elements of ``dtype``, at
    least 2**20."""
    esize = torch.empty((), dtype=dtype).element_size()
    return int(max(1 << 20, budget // (4 * esize)))


def _node_patch_elems(graph: ScanGraph, node: GNode) -> int:
    """Elements of one sample's patches of ``node``."""
    D, H, W = image_dims(graph.input_shape)
    if node.kind == "input":
        return (D * H * W * D) if node.spatial else (D * H * W) ** 2
    if node.spatial:
        C, Ho, Wo = node.shape
        return C * Ho * Wo * D * min(node.gy.R, H) * min(node.gx.R, W)
    return int(math.prod(node.shape)) * D * H * W


def forward_bytes_per_sample(graph: ScanGraph, upto: int, dtype: torch.dtype) -> int:
    """Rough peak memory of the forward strategy per sample.

    Parameters
    ----------
    graph : ScanGraph
    upto : int
        Index of the last node propagated.
    dtype : torch.dtype
        Storage dtype of the patches.

    Returns
    -------
    int
        Bytes: the largest (node + its inputs) patch size over the nodes, plus the reference
        conv's gathered tap, times 1.5.
    """
    esize = torch.empty((), dtype=dtype).element_size()
    peak = 0
    for node in graph.nodes[: upto + 1]:
        if node.kind == "aux":
            continue
        elems = _node_patch_elems(graph, node) + sum(_node_patch_elems(graph, graph.nodes[i]) for i in node.inputs)
        if node.kind == "conv":  # the reference gathers one tap of input patches into output windows
            elems += _node_patch_elems(graph, node) // max(1, node.shape[0]) * graph.nodes[node.inputs[0]].shape[0]
        peak = max(peak, elems)
    return int(peak * esize * 1.5)


def gather_fits(patches, ay: torch.Tensor, ax: torch.Tensor, conv_attrs: Dict[str, Any], rh: int, rw: int,
                max_elems: int) -> bool:
    """Whether a convolution runs ``conv_li_gather`` (or ``conv_li_implicit``) when asked to.

    It does when ``groups == 1`` and the op's placed copy of one image's input
    (``Ci × placements_y × placements_x × D·rh·rw`` elements; up to ``Kh·Kw`` placements per
    input position where the windows move with the position, one once the receptive field
    covers the image) fits the op's chunk bound ``max_elems`` — or is no copy at all (the input
    windows already are the output windows).

    Parameters
    ----------
    patches : Patches
        The conv's input, ``data`` [B, Ci, Hi, Wi, D, Rhi, Rwi].
    ay, ax : int64 Tensor [Ho], [Wo]
        Anchors of the output windows.
    conv_attrs : dict
        The conv node's ``kernel``, ``stride``, ``padding``, ``dilation``, ``groups``.
    rh, rw : int
        Output window size.
    max_elems : int
        The chunk bound (:func:`gemm_max_elems`).

    Returns
    -------
    bool
    """
    if int(conv_attrs["groups"]) != 1:
        return False
    B, Ci, Hi, Wi, D, Rhi, Rwi = patches.data.shape
    (kh, kw), (sh, sw) = conv_attrs["kernel"], conv_attrs["stride"]
    (ph, pw), (dh, dw) = conv_attrs["padding"], conv_attrs["dilation"]
    hq = len(virtual_axis(patches.ay, ay, Hi, kh, sh, ph, dh)[0])
    wq = len(virtual_axis(patches.ax, ax, Wi, kw, sw, pw, dw)[0])
    if hq == Hi and wq == Wi and (Rhi, Rwi) == (rh, rw):
        return True  # every window is its output window (offsets 0): the op reads the input itself
    return Ci * hq * wq * D * rh * rw <= max_elems
