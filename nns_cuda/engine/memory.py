"""The memory model of a scan: default budgets, bytes per sample, chunk bounds of the conv ops.

The forward strategy's working set is the patches of the nodes alive at once; a scan chunks
its batch so that ``chunk × forward_bytes_per_sample`` stays within the budget, and
``strategy="auto"`` switches to the reverse strategy when one sample does not fit.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any, Dict, Optional, Sequence, Set, Union

import torch

from nns_cuda.engine.graph import GNode, ScanGraph
from nns_cuda.engine.inputs import image_dims
from nns_cuda.ops._geometry import virtual_axis

__all__ = ["default_budget", "gemm_max_elems", "forward_bytes_per_sample", "gather_fits", "parse_bytes",
           "format_bytes", "reverse_fallback_message", "available_bytes", "check_dense_result", "fused_nodes",
           "node_patch_elems", "propagation_peak"]


_SIZE = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([kmgt]?)(?:i?b)?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: Union[None, int, float, str], name: str = "max_memory") -> Optional[int]:
    """A memory size in bytes, from a number or a string such as ``"2G"``, ``"512M"``,
    ``"64k"``, ``"1.5GiB"``, ``"2GB"`` (binary units: k = 2**10, M = 2**20, G = 2**30,
    T = 2**40; case and a trailing ``B`` / ``iB`` ignored). The one parser of the package:
    ``Scanner``, the functional API, the Captum-style classes and the ``--max-memory``
    option of the command line all use it.

    Parameters
    ----------
    value : None, int, float or str
        None stays None (the default budget).
    name : str
        The option's name, for the error message.

    Returns
    -------
    int or None

    Raises
    ------
    ValueError
        Zero, a negative size, or a string that is not a size.
    TypeError
        Any other type (a bool included).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise TypeError(f"{name} must be a number of bytes or a size such as '2G' or '512M', got "
                        f"{type(value).__name__} {value!r}")
    if isinstance(value, str):
        m = _SIZE.match(value.strip().lower())
        if m is None:
            raise ValueError(f"{name}={value!r} is not a memory size; write a number of bytes or a size such as "
                             "2G, 512M or 64k")
        v = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        v = float(value)
    if not math.isfinite(v) or v < 1:
        raise ValueError(f"{name} must be a positive number of bytes (e.g. 2G, 512M), got {value!r}")
    return int(v)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with three significant figures (``"1.80 TiB"``, ``"512 MiB"``)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def available_bytes(device: torch.device) -> int:
    """Memory a new tensor on ``device`` may take: on CUDA the free memory plus what torch's
    caching allocator holds unused; on the CPU ``MemAvailable`` of ``/proc/meminfo`` (else the
    physical RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 1 << 62


def check_dense_result(shape, dtype: torch.dtype, device: torch.device, what: str) -> None:
    """Raise ``MemoryError`` before allocating a dense result of ``shape`` that cannot fit.

    Parameters
    ----------
    shape : sequence of int
        The result's shape.
    dtype : torch.dtype
    device : torch.device
    what : str
        What the result is, for the message (``"the learned images of layer 'conv1'"``).

    Raises
    ------
    MemoryError
        When the result alone exceeds :func:`available_bytes`; the message gives its size and
        what to ask for instead.
    """
    need = math.prod(int(v) for v in shape) * torch.empty((), dtype=dtype).element_size()
    avail = available_bytes(device)
    if need > avail:
        raise MemoryError(
            f"{what} would be a dense tensor {list(shape)} of {format_bytes(need)} ({dtype}), more than the "
            f"{format_bytes(avail)} available on {device}; ask for less: filter_images() (one image per channel, "
            "[B, C, ...]), Scanner(..., stats=True) without keep_images (per-neuron statistics, no images), "
            "neurons=[...] (a few neurons) or fewer samples")


def reverse_fallback_message(per_sample: int, fit_budget: int) -> str:
    """The warning of ``strategy="auto"`` falling back to the reverse strategy: why, and the
    ``max_memory`` that would keep the forward strategy."""
    gib = math.ceil(per_sample / (1 << 30))
    suggest = f"{gib}G" if per_sample >= (1 << 30) else f"{math.ceil(per_sample / (1 << 20))}M"
    return (f"strategy='auto' fell back to the reverse strategy (one backward pass per neuron, up to 10^4 times "
            f"slower than the forward sweep): the forward strategy needs about {format_bytes(per_sample)} per sample "
            f"for these layers, over max_memory={format_bytes(fit_budget)}. Raise max_memory (e.g. "
            f"max_memory='{suggest}') if the device has that memory, or pass strategy='reverse' to silence this warning")


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


def node_patch_elems(graph: ScanGraph, node: GNode) -> int:
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
        elems = node_patch_elems(graph, node) + sum(node_patch_elems(graph, graph.nodes[i]) for i in node.inputs)
        if node.kind == "conv":  # the reference gathers one tap of input patches into output windows
            elems += node_patch_elems(graph, node) // max(1, node.shape[0]) * graph.nodes[node.inputs[0]].shape[0]
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


def fused_nodes(graph: ScanGraph, requested: Set[int]) -> Dict[int, int]:
    """The nodes whose patches the forward propagation shares with their input instead of
    writing new ones (the fusions of :mod:`nns_cuda.engine.rules`: a conv's activation, a conv's
    BN and the BN's activation, a BN's activation), ``{node: input}``, for ``requested``."""
    fused: Dict[int, int] = {}
    for g in graph.nodes:
        if g.kind == "conv":
            act = graph.gate_user(g)
            if act is not None:
                fused[act.idx] = g.idx
            elif len(g.users) == 1 and graph.nodes[g.users[0]].kind == "bn" and g.idx not in requested:
                bn = graph.nodes[g.users[0]]
                fused[bn.idx] = g.idx
                bn_act = graph.gate_user(bn)
                if bn_act is not None and bn.idx not in requested:
                    fused[bn_act.idx] = bn.idx
        elif g.kind == "bn" and g.idx not in fused and g.idx not in requested:
            act = graph.gate_user(g)
            if act is not None and len(g.shape) == 3:
                fused[act.idx] = g.idx
    return fused


def _bn_pending(graph: ScanGraph, bn: GNode, requested: Set[int]) -> bool:
    """Whether a BN's patches keep their scale pending (no copy: the rule of a BN followed by
    a 0/1 activation read only by convs and max-pools, neither requested)."""
    act = graph.gate_user(bn)
    return (act is not None and bn.idx not in requested and act.idx not in requested
            and act.kind in ("relu", "hardtanh") and bool(act.users)
            and all(graph.nodes[u].kind in ("conv", "maxpool") for u in act.users))


def propagation_peak(graph: ScanGraph, requested: Sequence[int], elems: Dict[int, int], esize: int,
                     reference: bool = False, keep: Sequence[int] = ()) -> int:
    """Peak bytes of the patches alive at once in one forward propagation of ``requested``
    (:class:`~nns_cuda.engine.propagate.PatchPropagator` with an output callback: a requested
    node's patches are reduced and dropped once complete, unless in ``keep``).

    The propagation is simulated node by node: each node writes its patches (fused nodes and
    views write none) while the patches of every node with a user still to run stay alive; a
    residual ``+`` or ``cat`` also places its operands (a temporary of the output's size), a
    requested node is gated into a copy, the ``reference`` backend's conv gathers one tap of its
    input into the output windows (``Ci / Co`` times the output).

    Parameters
    ----------
    graph : ScanGraph
    requested : sequence of int
    elems : dict of int to int
        Patch elements of each needed node (all rows, or one band's rows).
    esize : int
        Bytes per element of the storage dtype.
    reference : bool
        The reference backend's conv temporaries.
    keep : sequence of int
        Requested nodes whose patches are kept to the end (a cut).

    Returns
    -------
    int
    """
    req = set(requested)
    if not req:
        return 0
    needed = {i for i in graph.ancestors(list(req)) if i in elems}
    fused = fused_nodes(graph, req)
    users_left = {g.idx: sum(1 for u in g.users if u in needed) for g in graph.nodes}
    alive: Dict[int, int] = {}
    kept = 0
    peak = 0
    for g in graph.nodes[: max(req) + 1]:
        if g.idx not in needed or g.kind == "aux":
            continue
        size = elems[g.idx]
        if g.idx in fused or g.kind in ("identity", "slice") or (g.kind == "bn" and _bn_pending(graph, g, req)):
            new = 0
            src = g.inputs[0] if g.inputs else None
            carried = alive.get(src, 0) if src is not None else 0
            if src is not None and src in alive:
                alive[src] = 0
        else:
            new, carried = size, 0
        temp = 0
        if g.kind in ("add", "cat"):
            temp += size
        if g.kind == "conv" and reference:
            temp += size // max(1, g.shape[0]) * graph.nodes[g.inputs[0]].shape[0]
        if g.idx in req:
            temp += size
        peak = max(peak, sum(alive.values()) + kept + new + carried + temp)
        alive[g.idx] = new + carried
        if g.idx in req and g.idx in keep:
            kept += size
        for i in g.inputs:
            users_left[i] -= 1
            if users_left[i] == 0:
                alive.pop(i, None)
    return int(peak * esize)
