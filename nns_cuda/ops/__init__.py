"""Thin wrappers over the compiled ``torch.ops.nns_cuda.*`` ops (C++ on CPU, CUDA on GPU).

Every function has the signature and the semantics of its pure-PyTorch twin in
:mod:`nns_cuda.ops.reference.ops` (read that module for the patch layout and the anchors); the
compiled kernels validate their arguments and raise ``ValueError`` (shapes, devices, windows
that do not fit) or ``TypeError`` (dtypes) with messages that name the op and the argument.
Fake (meta) kernels are registered for every op, so they work under ``torch.compile`` /
``FakeTensorMode``; they mirror the compiled kernels' checks except the data-dependent ones
(windows that must fit, index ranges).

If the extension ``nns_cuda._C`` is missing, each wrapper falls back to the reference twin and
one ``RuntimeWarning`` says so.

Differences from the reference twins (deliberate, all stricter):

* ``patches`` / ``dense`` must be float32, float64, bfloat16 or float16; the other float
  arguments (weights, scale, gates, activations, ``x``, ``fg``) may have any floating dtype
  (gates, ``fg`` and ``act`` may also be bool); anchors and ``indices`` must be int64;
  ``in_active`` must be bool; ``place_li``'s ``accumulate`` must have the dtype of ``patches``.
* Shapes are checked exactly (the reference broadcasts e.g. a ``[Nout]`` gate); every anchor
  must be 1-D with one entry per grid row / column; all tensors on the device of ``patches``.
* ``stride >= 1``, ``dilation >= 1``, ``padding >= 0``, ``groups >= 1``.
* Where a gate (times the scale) is exactly zero the output is exactly zero, also if the
  inputs hold inf / NaN (the reference multiplies and gives NaN there).

Precision. float32 / float64 patches are computed in their own dtype. bfloat16 / float16
patches are *storage* formats: the kernels read them, compute every product and sum in float32
(``at::opmath_type``; weights, scales, gates, ``x``, ``fg`` and ``act`` are used in float32,
not rounded) and round only the result to the patch dtype, so that they agree with the
reference twins (which compute in float32 and cast back) to the rounding of the result.
``li_stats`` returns its statistics in float32 for 16-bit patches (the patch dtype
otherwise). :func:`conv_li_gemm` and :func:`conv_li_gather` are the exceptions by design: they
multiply in the patch dtype (tensor cores on CUDA), with the weights rounded to it.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence

import torch

from nns_cuda import _extension
from nns_cuda.ops import _fakes
from nns_cuda.ops.reference import ops as _ref

__all__ = [
    "conv_li",
    "conv_li_gemm",
    "conv_li_gather",
    "conv_li_implicit",
    "maxpool_li",
    "place_li",
    "linear_li",
    "li_stats",
    "filter_fold",
    "HAS_OPS",
    "kernel_devices",
]

#: Whether the compiled ops are registered (otherwise the wrappers use the reference).
HAS_OPS: bool = _extension.has_ops()

_warned = False


def kernel_devices() -> Dict[str, bool]:
    """Which device types have compiled kernels, e.g. ``{"cpu": True, "cuda": False}``."""
    return {"cpu": _extension.has_kernel("cpu"), "cuda": _extension.has_kernel("cuda")}


def _fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "nns_cuda: the compiled extension nns_cuda._C is not available "
            f"({_extension.load_error() or 'ops not registered'}); nns_cuda.ops falls back to the pure-PyTorch "
            "reference (nns_cuda.ops.reference.ops). Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning, stacklevel=3)


def _ints(v: Sequence[int]) -> list:
    return [int(i) for i in v]


def _gemm_like(name: str, tensors: tuple, stride, padding, dilation, groups, rh_out, rw_out, max_elems,
               fallback: bool = True) -> torch.Tensor:
    """Call ``torch.ops.nns_cuda.<name>`` for the GEMM formulations of :func:`conv_li` (same
    arguments: conv_li's, then ``max_elems``); without the compiled ops (and ``fallback``), the
    reference twin of the same name, with the one warning."""
    if fallback and not HAS_OPS:
        _fallback()
        return getattr(_ref, name)(*tensors, stride, padding, dilation, groups, rh_out, rw_out, max_elems)
    return getattr(torch.ops.nns_cuda, name)(*tensors, _ints(stride), _ints(padding), _ints(dilation), int(groups),
                                             int(rh_out), int(rw_out), int(max_elems))


# --------------------------------------------------------------------------------- wrappers

def conv_li(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
            in_active: Optional[torch.Tensor], weight: torch.Tensor,
            scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
            ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], groups: int, rh_out: int, rw_out: int) -> torch.Tensor:
    """Learned-image patches of a conv layer's output neurons (frozen, bias-free).

    ``out[b, o, y, x] = gate[b, o, y, x] · scale[o] · Σ_{i, ky, kx} W[o, i, ky, kx] ·
    place(patches[b, i, y·s + ky·d − p, x·s + kx·d − p])``; see
    :func:`nns_cuda.ops.reference.ops.conv_li`. Gated-off outputs (``gate · scale == 0``) and input
    neurons with ``in_active == False`` cost nothing.

    Parameters
    ----------
    patches : Tensor [B, Ci, Hi, Wi, D, Rhi, Rwi], float32, float64, bfloat16 or float16
    ay_in, ax_in : int64 Tensor [Hi], [Wi]
    in_active : bool Tensor [B, Ci, Hi, Wi] or None (False: that input neuron counts as zero; its
        patch is never read, whatever it holds)
    weight : Tensor [Co, Ci / groups, Kh, Kw]
    scale : Tensor [Co] or None
    gate : Tensor [B, Co, Ho, Wo] or None
    ay_out, ax_out : int64 Tensor [Ho], [Wo]
    stride, padding, dilation : 2 ints each
    groups : int
    rh_out, rw_out : int, output window size

    Returns
    -------
    Tensor [B, Co, Ho, Wo, D, rh_out, rw_out], dtype of ``patches``
    """
    if not HAS_OPS:
        _fallback()
        return _ref.conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                            stride, padding, dilation, groups, rh_out, rw_out)
    return torch.ops.nns_cuda.conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate,
                                      ay_out, ax_out, _ints(stride), _ints(padding),
                                      _ints(dilation), int(groups), int(rh_out), int(rw_out))


def conv_li_gemm(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                 in_active: Optional[torch.Tensor], weight: torch.Tensor,
                 scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
                 ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, rh_out: int, rw_out: int,
                 max_elems: int = 0) -> torch.Tensor:
    """:func:`conv_li` as one dense GEMM per image (the tensor-core formulation).

    For image ``b``: ``A_b[(i, ky, kx), (y, x, d, r, q)]`` = the patch of input neuron
    ``(i, y·s + ky·d − p, x·s + kx·d − p)`` placed into output window ``(y, x)`` (zero for
    padding taps, outside the placed window and where ``in_active`` is False), then
    ``out_b = W.view(Co, Ci·Kh·Kw) @ A_b`` (block-diagonal per group), which is already the
    ``[Co, Ho, Wo, D, rh_out, rw_out]`` layout, times ``gate · scale``. One ATen-only C++
    implementation (``csrc/conv_li_gemm.cpp``) runs on the CPU and, with cuBLAS, on CUDA.

    Same arguments and result as :func:`conv_li` (any ``groups``; the engine uses it for
    ``groups == 1``), plus ``max_elems``. Differences:

    * no sparsity skipping: gated-off outputs and inactive inputs are multiplied too (then
      zeroed); inputs must be finite except where ``in_active`` is False (a zero weight does
      not mask a NaN input as it does in :func:`conv_li`);
    * the GEMM runs in the patch dtype: float32 obeys ``torch.backends.cuda.matmul.allow_tf32``
      on CUDA; bfloat16 / float16 round the weights to that dtype and accumulate in float32
      (cuBLAS default); float16 on the CPU multiplies in float32 (ATen's CPU float16 GEMM is
      very slow). The GEMM result times ``gate · scale`` is taken in float32 and rounded to the
      patch dtype (for 16-bit patches the GEMM result itself is rounded first).

    Parameters
    ----------
    patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride, padding,
    dilation, groups, rh_out, rw_out : as :func:`conv_li`
    max_elems : int
        Upper bound on the temporaries of one GEMM, in elements of the GEMM dtype: the gathered
        operand ``A``, its result and the int64 index table (8 / itemsize elements per entry).
        Work is chunked over images and tiles of output positions (at least one output position
        per GEMM). 0: the default, 2**26. The zero-padded copy of ``patches`` that the gather
        reads comes on top.

    Returns
    -------
    Tensor [B, Co, Ho, Wo, D, rh_out, rw_out], dtype of ``patches``
    """
    return _gemm_like("conv_li_gemm", (patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out),
                      stride, padding, dilation, groups, rh_out, rw_out, max_elems)


def conv_li_gather(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                   in_active: Optional[torch.Tensor], weight: torch.Tensor,
                   scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
                   ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int, rh_out: int, rw_out: int,
                   max_elems: int = 0) -> torch.Tensor:
    """:func:`conv_li` as batched GEMMs over the *active* (input neuron, tap) pairs of every
    output position (the gated GEMM; ``csrc/conv_li_gather.cpp``).

    For output position ``p`` of image ``b`` (and group): ``out[b, :, p] = (W[:, J] · gate ·
    scale) @ A`` where ``J`` are the pairs ``(i, ky, kx)`` whose tap is not padding and whose
    input neuron is active, padded with zero rows to the longest list of the chunk, and row ``j``
    of ``A`` is that input neuron's patch placed into the output window of ``p``. Inactive
    inputs cost nothing (unlike :func:`conv_li_gemm`); the rows of ``A`` are whole rows of a
    once-placed copy of the input (one copy per distinct offset of an input position; none
    where the input windows already are the output window), so the gather moves whole patches.
    One ATen-only C++ implementation runs on the CPU and, with cuBLAS, on CUDA.

    The placed copy has the input's size where every input position sits at one offset in all
    the output windows that use it (always so when all output windows are the same window,
    i.e. the receptive field covers the image); where windows move with the position it grows
    up to ``Kh·Kw`` times (exact, but memory-hungry: the engine's ``conv_algorithm="gather"``
    runs such a layer direct when that copy of one image exceeds its chunk bound).

    Same arguments and result as :func:`conv_li` (any ``groups``), plus ``max_elems``.
    Differences: inactive inputs are never read (they may hold anything); gated-off outputs
    (``gate · scale == 0``) are exactly zero, as in :func:`conv_li`;
    precision as :func:`conv_li_gemm` (the GEMM in the patch dtype, TF32 switch obeyed on
    CUDA, float16 on the CPU multiplied in float32; weights · gate · scale formed in float32
    and rounded to the GEMM dtype).

    Parameters
    ----------
    patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride, padding,
    dilation, groups, rh_out, rw_out : as :func:`conv_li`
    max_elems : int
        Upper bound, in elements of the GEMM dtype, on the placed copy of an image chunk plus
        the temporaries of one batched GEMM (``A``, the weights, the result, the index
        tables). Work is chunked over images and tiles of output positions (one output
        position at least). 0: the default, 2**26.

    Returns
    -------
    Tensor [B, Co, Ho, Wo, D, rh_out, rw_out], dtype of ``patches``
    """
    return _gemm_like("conv_li_gather", (patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out),
                      stride, padding, dilation, groups, rh_out, rw_out, max_elems)


def conv_li_implicit(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                     in_active: Optional[torch.Tensor], weight: torch.Tensor,
                     scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
                     ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], groups: int, rh_out: int, rw_out: int,
                     max_elems: int = 0) -> torch.Tensor:
    """:func:`conv_li_gather`'s arithmetic as one Triton kernel (``nns_cuda/ops/_triton_conv.py``):
    the rows of the active pairs are loaded straight from the placed input inside the GEMM
    (an implicit gather), so nothing of the size of the gathered operand is written, and the
    pair lists are ragged (no padding). CUDA tensors only (on the CPU only under Triton's
    interpreter, ``TRITON_INTERPRET=1``, for tests); float32 (``"ieee"`` products, or TF32 when
    ``torch.backends.cuda.matmul.allow_tf32`` is on), bfloat16, float16 — not float64.

    Same arguments and result as :func:`conv_li_gather`; gated-off outputs exactly zero;
    inactive inputs never read. Raises ``ValueError`` where it cannot run (no Triton, CPU
    tensors without the interpreter, float64).
    """
    from nns_cuda.ops import _triton_conv  # noqa: F401  (registers torch.ops.nns_cuda.conv_li_implicit; imports Triton)

    return _gemm_like("conv_li_implicit", (patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out),
                      stride, padding, dilation, groups, rh_out, rw_out, max_elems, fallback=False)


def maxpool_li(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
               indices: torch.Tensor, ay_out: torch.Tensor, ax_out: torch.Tensor, rh_out: int,
               rw_out: int) -> torch.Tensor:
    """Max-pool routing: each output neuron's image is its arg-max input neuron's image.

    Parameters
    ----------
    patches : Tensor [B, C, Hi, Wi, D, Rhi, Rwi], float32, float64, bfloat16 or float16
    ay_in, ax_in : int64 Tensor [Hi], [Wi]
    indices : int64 Tensor [B, C, Ho, Wo], flat ``hi * Wi + wi`` arg-max positions
        (``F.max_pool2d(..., return_indices=True)``)
    ay_out, ax_out : int64 Tensor [Ho], [Wo]
    rh_out, rw_out : int

    Returns
    -------
    Tensor [B, C, Ho, Wo, D, rh_out, rw_out]
    """
    if not HAS_OPS:
        _fallback()
        return _ref.maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out)
    return torch.ops.nns_cuda.maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out,
                                         int(rh_out), int(rw_out))


def place_li(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
             ay_out: torch.Tensor, ax_out: torch.Tensor, rh_out: int, rw_out: int,
             accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Re-window patches into larger windows of the same grid (plus ``accumulate``).

    Parameters
    ----------
    patches : Tensor [B, C, Ho, Wo, D, Rhi, Rwi], float32, float64, bfloat16 or float16
    ay_in, ax_in, ay_out, ax_out : int64 Tensor [Ho], [Wo]
    rh_out, rw_out : int
    accumulate : Tensor [B, C, Ho, Wo, D, rh_out, rw_out] (dtype of ``patches``) or None

    Returns
    -------
    Tensor [B, C, Ho, Wo, D, rh_out, rw_out]
    """
    if not HAS_OPS:
        _fallback()
        return _ref.place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate)
    return torch.ops.nns_cuda.place_li(patches, ay_in, ax_in, ay_out, ax_out, int(rh_out),
                                       int(rw_out), accumulate)


def linear_li(dense: torch.Tensor, weight: torch.Tensor,
              gate: Optional[torch.Tensor]) -> torch.Tensor:
    """Linear layer on dense images: ``out[b, o] = gate[b, o] · Σ_i W[o, i] · dense[b, i]``.

    Parameters
    ----------
    dense : Tensor [B, Nin, P] (P = D·H·W), float32, float64, bfloat16 or float16
        (16-bit: multiplied in float32, the result rounded)
    weight : Tensor [Nout, Nin]
    gate : Tensor [B, Nout] or None

    Returns
    -------
    Tensor [B, Nout, P], dtype of ``dense``
    """
    if not HAS_OPS:
        _fallback()
        return _ref.linear_li(dense, weight, gate)
    return torch.ops.nns_cuda.linear_li(dense, weight, gate)


def li_stats(patches: torch.Tensor, ay: torch.Tensor, ax: torch.Tensor, x: torch.Tensor,
             fg: torch.Tensor) -> torch.Tensor:
    """Fused per-neuron statistics (``nns_cuda.ops.reference.stats.STAT_NAMES`` order).

    Parameters
    ----------
    patches : Tensor [B, C, Ho, Wo, D, Rh, Rw], float32, float64, bfloat16 or float16
    ay, ax : int64 Tensor [Ho], [Wo]
    x : Tensor [B, D, H, W]
    fg : Tensor [B, H, W] foreground mask (0/1 float or bool)

    Returns
    -------
    Tensor [B, C, Ho, Wo, NUM_STATS]: float32 for bfloat16 / float16 patches, else the patch dtype
    """
    if not HAS_OPS:
        _fallback()
        return _ref.li_stats(patches, ay, ax, x, fg)
    return torch.ops.nns_cuda.li_stats(patches, ay, ax, x, fg)


def filter_fold(patches: torch.Tensor, ay: torch.Tensor, ax: torch.Tensor, act: torch.Tensor,
                h: int, w: int) -> torch.Tensor:
    """Filter learned images ``L^k = Σ_{y,x} act[b,k,y,x] · LI_{k,y,x}`` (docs/spec.md §1).

    Parameters
    ----------
    patches : Tensor [B, C, Ho, Wo, D, Rh, Rw], float32, float64, bfloat16 or float16
    ay, ax : int64 Tensor [Ho], [Wo]
    act : Tensor [B, C, Ho, Wo]
    h, w : int, image size

    Returns
    -------
    Tensor [B, C, D, h, w], dtype of ``patches`` (summed in float32 for 16-bit patches)
    """
    if not HAS_OPS:
        _fallback()
        return _ref.filter_fold(patches, ay, ax, act, h, w)
    return torch.ops.nns_cuda.filter_fold(patches, ay, ax, act, int(h), int(w))


if HAS_OPS:
    _fakes.register()
