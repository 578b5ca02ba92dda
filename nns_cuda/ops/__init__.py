"""Thin wrappers over the compiled ``torch.ops.nns_cuda.*`` ops (C++ on CPU, CUDA on GPU).

Every function has the signature and the semantics of its pure-PyTorch twin in
:mod:`nns_cuda.reference.ops` (read that module for the patch layout and the anchors); the
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

import importlib
import warnings
from typing import Dict, Optional, Sequence

import torch

from nns_cuda import _extension
from nns_cuda.ops.reference import ops as _ref
from nns_cuda.ops.reference.stats import NUM_STATS

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
    :func:`nns_cuda.reference.ops.conv_li`. Gated-off outputs (``gate · scale == 0``) and input
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
    """:func:`conv_li` as one dense GEMM per image (the tensor-core formulation, DESIGN §2).

    For image ``b``: ``A_b[(i, ky, kx), (y, x, d, r, q)]`` = the patch of input neuron
    ``(i, y·s + ky·d − p, x·s + kx·d − p)`` placed into output window ``(y, x)`` (zero for
    padding taps, outside the placed window and where ``in_active`` is False), then
    ``out_b = W.view(Co, Ci·Kh·Kw) @ A_b`` (block-diagonal per group), which is already the
    ``[Co, Ho, Wo, D, rh_out, rw_out]`` layout, times ``gate · scale``. One ATen-only C++
    implementation (``csrc/conv_gemm.cpp``) runs on the CPU and, with cuBLAS, on CUDA.

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
    output position (the gated GEMM of DESIGN §2; ``csrc/conv_gather.cpp``).

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
    """:func:`conv_li_gather`'s arithmetic as one Triton kernel (``nns_cuda/_triton_conv.py``):
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
    """Fused per-neuron statistics (``nns_cuda.reference.stats.STAT_NAMES`` order).

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
    """Filter learned images ``L^k = Σ_{y,x} act[b,k,y,x] · LI_{k,y,x}`` (SPEC §1).

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


# ---------------------------------------------------------------- checks for fake kernels
# Mirror csrc/include/nns_cuda/{checks,validate}.h in the same order and with the same words.

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """``at::opmath_type``: float32 for the 16-bit float dtypes, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _dim(op: str, name: str, t: torch.Tensor, n: int, layout: str) -> None:
    torch._check_value(t.dim() == n, lambda: f"{op}: {name} must be {n}-D {layout}, got {list(t.shape)}")


def _shape(op: str, name: str, t: torch.Tensor, want: Sequence, layout: str) -> None:
    torch._check_value(tuple(t.shape) == tuple(want),
                       lambda: f"{op}: {name} must be {layout} = {list(want)}, got {list(t.shape)}")


def _float_or_double(op: str, name: str, t: torch.Tensor) -> None:
    torch._check_type(t.dtype in _FLOATS,
                      lambda: f"{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def _floating(op: str, name: str, t: torch.Tensor) -> None:
    torch._check_type(t.dtype.is_floating_point,
                      lambda: f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def _floating_or_bool(op: str, name: str, t: torch.Tensor) -> None:
    torch._check_type(t.dtype.is_floating_point or t.dtype == torch.bool,
                      lambda: f"{op}: {name} must be a floating-point or bool tensor, got {t.dtype}")


def _dtype(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    torch._check_type(t.dtype == dtype, lambda: f"{op}: {name} must be {dtype}, got {t.dtype}")


def _same_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, what: str = "patches") -> None:
    torch._check_value(t.device == ref.device,
                       lambda: f"{op}: {name} must be on the same device as {what} ({ref.device}), got {t.device}")


def _anchor(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, n, what: str) -> None:
    _dim(op, name, t, 1, f"[{what}]")
    _dtype(op, name, t, torch.int64)
    _same_device(op, name, t, ref)
    torch._check_value(t.numel() == n, lambda: f"{op}: {name} must have {what}={n} entries, got {t.numel()}")


def _pair(op: str, name: str, v: Sequence[int]) -> None:
    torch._check_value(len(v) == 2, lambda: f"{op}: {name} must have 2 entries, got {list(v)}")


def _out_window(op: str, rh_out: int, rw_out: int) -> None:
    torch._check_value(rh_out >= 0 and rw_out >= 0,
                       lambda: f"{op}: rh_out and rw_out must be >= 0, got {rh_out}, {rw_out}")


def _check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                   stride, padding, dilation, groups, rh_out, rw_out, op="conv_li"):
    _dim(op, "patches", patches, 7, "[B, Ci, Hi, Wi, D, Rhi, Rwi]")
    _float_or_double(op, "patches", patches)
    _dim(op, "weight", weight, 4, "[Co, Ci/groups, Kh, Kw]")
    _floating(op, "weight", weight)
    _same_device(op, "weight", weight, patches)
    _pair(op, "stride", stride)
    _pair(op, "padding", padding)
    _pair(op, "dilation", dilation)
    torch._check_value(stride[0] >= 1 and stride[1] >= 1, lambda: f"{op}: stride must be >= 1, got {list(stride)}")
    torch._check_value(padding[0] >= 0 and padding[1] >= 0, lambda: f"{op}: padding must be >= 0, got {list(padding)}")
    torch._check_value(dilation[0] >= 1 and dilation[1] >= 1,
                       lambda: f"{op}: dilation must be >= 1, got {list(dilation)}")
    torch._check_value(groups >= 1, lambda: f"{op}: groups must be >= 1, got {groups}")
    B, Ci, Hi, Wi, D, Rhi, Rwi = patches.shape
    Co, Cig, Kh, Kw = weight.shape
    torch._check_value(Ci % groups == 0 and Co % groups == 0 and Cig == Ci // groups,
                       lambda: f"{op}: weight {list(weight.shape)} does not match {Ci} input channels with groups={groups}")
    _out_window(op, rh_out, rw_out)
    _anchor(op, "ay_in", ay_in, patches, Hi, "Hi")
    _anchor(op, "ax_in", ax_in, patches, Wi, "Wi")
    _anchor(op, "ay_out", ay_out, patches, ay_out.numel(), "Ho")
    _anchor(op, "ax_out", ax_out, patches, ax_out.numel(), "Wo")
    Ho, Wo = ay_out.shape[0], ax_out.shape[0]
    if in_active is not None:
        _dtype(op, "in_active", in_active, torch.bool)
        _same_device(op, "in_active", in_active, patches)
        _shape(op, "in_active", in_active, (B, Ci, Hi, Wi), "[B, Ci, Hi, Wi]")
    if scale is not None:
        _floating(op, "scale", scale)
        _same_device(op, "scale", scale, patches)
        _shape(op, "scale", scale, (Co,), "[Co]")
    if gate is not None:
        _floating_or_bool(op, "gate", gate)
        _same_device(op, "gate", gate, patches)
        _shape(op, "gate", gate, (B, Co, Ho, Wo), "[B, Co, Ho, Wo]")
    return B, Co, Ho, Wo, D


def _check_maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out):
    op = "maxpool_li"
    _dim(op, "patches", patches, 7, "[B, C, Hi, Wi, D, Rhi, Rwi]")
    _float_or_double(op, "patches", patches)
    B, C, Hi, Wi, D, Rhi, Rwi = patches.shape
    _out_window(op, rh_out, rw_out)
    _anchor(op, "ay_in", ay_in, patches, Hi, "Hi")
    _anchor(op, "ax_in", ax_in, patches, Wi, "Wi")
    _anchor(op, "ay_out", ay_out, patches, ay_out.numel(), "Ho")
    _anchor(op, "ax_out", ax_out, patches, ax_out.numel(), "Wo")
    Ho, Wo = ay_out.shape[0], ax_out.shape[0]
    _dtype(op, "indices", indices, torch.int64)
    _same_device(op, "indices", indices, patches)
    _shape(op, "indices", indices, (B, C, Ho, Wo), "[B, C, Ho, Wo]")
    return B, C, Ho, Wo, D


def _check_place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate):
    op = "place_li"
    _dim(op, "patches", patches, 7, "[B, C, Ho, Wo, D, Rhi, Rwi]")
    _float_or_double(op, "patches", patches)
    B, C, Ho, Wo, D, Rhi, Rwi = patches.shape
    _out_window(op, rh_out, rw_out)
    _anchor(op, "ay_in", ay_in, patches, Ho, "Ho")
    _anchor(op, "ax_in", ax_in, patches, Wo, "Wo")
    _anchor(op, "ay_out", ay_out, patches, Ho, "Ho")
    _anchor(op, "ax_out", ax_out, patches, Wo, "Wo")
    if accumulate is not None:
        _dtype(op, "accumulate", accumulate, patches.dtype)
        _same_device(op, "accumulate", accumulate, patches)
        _shape(op, "accumulate", accumulate, (B, C, Ho, Wo, D, rh_out, rw_out),
               "[B, C, Ho, Wo, D, rh_out, rw_out]")
    return B, C, Ho, Wo, D


def _check_linear_li(dense, weight, gate):
    op = "linear_li"
    _dim(op, "dense", dense, 3, "[B, Nin, P]")
    _float_or_double(op, "dense", dense)
    B, Nin, P = dense.shape
    _dim(op, "weight", weight, 2, "[Nout, Nin]")
    torch._check_value(weight.shape[1] == Nin, lambda: f"{op}: weight must be [Nout, Nin={Nin}], got {list(weight.shape)}")
    _floating(op, "weight", weight)
    _same_device(op, "weight", weight, dense, "dense")
    Nout = weight.shape[0]
    if gate is not None:
        _floating_or_bool(op, "gate", gate)
        _same_device(op, "gate", gate, dense, "dense")
        _shape(op, "gate", gate, (B, Nout), "[B, Nout]")
    return B, Nout, P


def _check_li_stats(patches, ay, ax, x, fg):
    op = "li_stats"
    _dim(op, "patches", patches, 7, "[B, C, Ho, Wo, D, Rh, Rw]")
    _float_or_double(op, "patches", patches)
    B, C, Ho, Wo, D, Rh, Rw = patches.shape
    _anchor(op, "ay", ay, patches, Ho, "Ho")
    _anchor(op, "ax", ax, patches, Wo, "Wo")
    torch._check_value(x.dim() == 4 and x.shape[0] == B and x.shape[1] == D,
                       lambda: f"{op}: x must be [B={B}, D={D}, H, W], got {list(x.shape)}")
    _floating(op, "x", x)
    _same_device(op, "x", x, patches)
    _shape(op, "fg", fg, (B, x.shape[2], x.shape[3]), "[B, H, W]")
    _floating_or_bool(op, "fg", fg)
    _same_device(op, "fg", fg, patches)
    return B, C, Ho, Wo


def _check_filter_fold(patches, ay, ax, act, h, w):
    op = "filter_fold"
    _dim(op, "patches", patches, 7, "[B, C, Ho, Wo, D, Rh, Rw]")
    _float_or_double(op, "patches", patches)
    B, C, Ho, Wo, D, Rh, Rw = patches.shape
    _anchor(op, "ay", ay, patches, Ho, "Ho")
    _anchor(op, "ax", ax, patches, Wo, "Wo")
    _shape(op, "act", act, (B, C, Ho, Wo), "[B, C, Ho, Wo]")
    _floating_or_bool(op, "act", act)
    _same_device(op, "act", act, patches)
    torch._check_value(h >= 0 and w >= 0, lambda: f"{op}: h and w must be >= 0, got {h}, {w}")
    return B, C, D


# ------------------------------------------------------------------------- fake kernels

def _check_gmm_estep(coef, phit):
    """Argument checks of ``gmm_estep`` (the fused GMM E-step of ``nns_cuda._gmm_em``; CPU only)."""
    op = "gmm_estep"
    _dim(op, "coef", coef, 3, "[B, k, 6]")
    _dim(op, "phit", phit, 3, "[B, 6, S]")
    _dtype(op, "coef", coef, torch.float64)
    _dtype(op, "phit", phit, torch.float64)
    B, k, S = coef.shape[0], coef.shape[1], phit.shape[2]
    torch._check_value(coef.shape[2] == 6 and phit.shape[0] == B and phit.shape[1] == 6,
                       lambda: f"{op}: coef must be [B, k, 6] and phit [B, 6, S] with the same B, got "
                               f"{list(coef.shape)} and {list(phit.shape)}")
    torch._check_value(1 <= k <= 64, lambda: f"{op}: the number of components k must be in [1, 64], got {k}")
    torch._check_value(S >= 1, lambda: f"{op}: phit needs at least one point (S >= 1), got S = {S}")
    torch._check_value(phit.device == coef.device,
                       lambda: f"{op}: phit must be on the same device as coef ({coef.device}), got {phit.device}")
    return B, k, S


def _register_fakes() -> None:
    @torch.library.register_fake("nns_cuda::conv_li")
    def _conv_li_fake(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                      stride, padding, dilation, groups, rh_out, rw_out):
        B, Co, Ho, Wo, D = _check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate,
                                          ay_out, ax_out, stride, padding, dilation, groups,
                                          rh_out, rw_out)
        return patches.new_empty((B, Co, Ho, Wo, D, rh_out, rw_out))

    @torch.library.register_fake("nns_cuda::conv_li_gemm")
    def _conv_li_gemm_fake(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                           stride, padding, dilation, groups, rh_out, rw_out, max_elems=0):
        B, Co, Ho, Wo, D = _check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate,
                                          ay_out, ax_out, stride, padding, dilation, groups,
                                          rh_out, rw_out, op="conv_li_gemm")
        torch._check_value(max_elems >= 0,
                           lambda: f"conv_li_gemm: max_elems must be >= 0 (0: default), got {max_elems}")
        return patches.new_empty((B, Co, Ho, Wo, D, rh_out, rw_out))

    @torch.library.register_fake("nns_cuda::conv_li_gather")
    def _conv_li_gather_fake(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                             stride, padding, dilation, groups, rh_out, rw_out, max_elems=0):
        B, Co, Ho, Wo, D = _check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate,
                                          ay_out, ax_out, stride, padding, dilation, groups,
                                          rh_out, rw_out, op="conv_li_gather")
        torch._check_value(max_elems >= 0,
                           lambda: f"conv_li_gather: max_elems must be >= 0 (0: default), got {max_elems}")
        return patches.new_empty((B, Co, Ho, Wo, D, rh_out, rw_out))

    @torch.library.register_fake("nns_cuda::maxpool_li")
    def _maxpool_li_fake(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out):
        B, C, Ho, Wo, D = _check_maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out,
                                            rh_out, rw_out)
        return patches.new_empty((B, C, Ho, Wo, D, rh_out, rw_out))

    @torch.library.register_fake("nns_cuda::place_li")
    def _place_li_fake(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate=None):
        B, C, Ho, Wo, D = _check_place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out,
                                          accumulate)
        return patches.new_empty((B, C, Ho, Wo, D, rh_out, rw_out))

    @torch.library.register_fake("nns_cuda::linear_li")
    def _linear_li_fake(dense, weight, gate):
        B, Nout, P = _check_linear_li(dense, weight, gate)
        return dense.new_empty((B, Nout, P))

    @torch.library.register_fake("nns_cuda::li_stats")
    def _li_stats_fake(patches, ay, ax, x, fg):
        B, C, Ho, Wo = _check_li_stats(patches, ay, ax, x, fg)
        return patches.new_empty((B, C, Ho, Wo, NUM_STATS), dtype=_opmath(patches.dtype))

    @torch.library.register_fake("nns_cuda::filter_fold")
    def _filter_fold_fake(patches, ay, ax, act, h, w):
        B, C, D = _check_filter_fold(patches, ay, ax, act, h, w)
        return patches.new_empty((B, C, D, h, w))

    if hasattr(torch.ops.nns_cuda, "gmm_estep"):
        @torch.library.register_fake("nns_cuda::gmm_estep")
        def _gmm_estep_fake(coef, phit, want_moments, want_labels):
            B, k, S = _check_gmm_estep(coef, phit)
            mom = coef.new_empty((B, k, 6) if want_moments else (0,))
            lab = coef.new_empty((B, S) if want_labels else (0,), dtype=torch.int64)
            return mom, coef.new_empty((B,)), lab


if HAS_OPS:
    _register_fakes()
