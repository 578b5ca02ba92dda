"""Argument checks of the ops, shared by the fake (meta) kernels and the Triton op.

They mirror the compiled ops' checks (``check_<op>`` in ``csrc/<op>.cpp``, written with the
macros of ``csrc/include/nns_cuda/checks.h``) in the same order and with the same words, so
that a fake kernel (``torch.compile`` / ``FakeTensorMode``) rejects what the compiled kernel
rejects, with the same message; the data-dependent checks (windows that must fit, index
ranges) are left to the kernels. A leaf: it imports only torch.

Every ``check_<op>`` raises ``ValueError`` (shapes, devices, values) or ``TypeError`` (dtypes)
naming the op and the argument, and returns the sizes of the op's result.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["check_conv_li", "check_maxpool_li", "check_place_li", "check_linear_li", "check_li_stats",
           "check_filter_fold", "check_gmm_estep", "opmath"]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def opmath(dtype: torch.dtype) -> torch.dtype:
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


def _patches(op: str, patches: torch.Tensor, layout: str):
    """The 7-D patch argument in one of the four patch dtypes; returns its shape."""
    _dim(op, "patches", patches, 7, layout)
    _float_or_double(op, "patches", patches)
    return patches.shape


def _windows(op: str, patches: torch.Tensor, ay_in, ax_in, ay_out, ax_out, rh_out: int, rw_out: int,
             same_grid: bool = False):
    """The output window size and the four anchors of a windowed op: input anchors one per row /
    column of the patches' grid, output anchors one per output row / column (the same grid for
    ``same_grid``). Returns ``(Ho, Wo)``."""
    Hi, Wi = patches.shape[2], patches.shape[3]
    _out_window(op, rh_out, rw_out)
    in_what = ("Ho", "Wo") if same_grid else ("Hi", "Wi")
    _anchor(op, "ay_in", ay_in, patches, Hi, in_what[0])
    _anchor(op, "ax_in", ax_in, patches, Wi, in_what[1])
    _anchor(op, "ay_out", ay_out, patches, Hi if same_grid else ay_out.numel(), "Ho")
    _anchor(op, "ax_out", ax_out, patches, Wi if same_grid else ax_out.numel(), "Wo")
    return ay_out.shape[0], ax_out.shape[0]


def _pair(op: str, name: str, v: Sequence[int]) -> None:
    torch._check_value(len(v) == 2, lambda: f"{op}: {name} must have 2 entries, got {list(v)}")


def _out_window(op: str, rh_out: int, rw_out: int) -> None:
    torch._check_value(rh_out >= 0 and rw_out >= 0,
                       lambda: f"{op}: rh_out and rw_out must be >= 0, got {rh_out}, {rw_out}")


def check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                  stride, padding, dilation, groups, rh_out, rw_out, op="conv_li"):
    """Checks of ``conv_li`` and its GEMM formulations (``op`` names the one in the messages).

    Returns
    -------
    (B, Co, Ho, Wo, D) : the sizes of the result ``[B, Co, Ho, Wo, D, rh_out, rw_out]``
    """
    _patches(op, patches, "[B, Ci, Hi, Wi, D, Rhi, Rwi]")
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
    Ho, Wo = _windows(op, patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out)
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


def check_maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out):
    op = "maxpool_li"
    B, C, Hi, Wi, D, Rhi, Rwi = _patches(op, patches, "[B, C, Hi, Wi, D, Rhi, Rwi]")
    Ho, Wo = _windows(op, patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out)
    _dtype(op, "indices", indices, torch.int64)
    _same_device(op, "indices", indices, patches)
    _shape(op, "indices", indices, (B, C, Ho, Wo), "[B, C, Ho, Wo]")
    return B, C, Ho, Wo, D


def check_place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate):
    op = "place_li"
    B, C, Ho, Wo, D, Rhi, Rwi = _patches(op, patches, "[B, C, Ho, Wo, D, Rhi, Rwi]")
    _windows(op, patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, same_grid=True)
    if accumulate is not None:
        _dtype(op, "accumulate", accumulate, patches.dtype)
        _same_device(op, "accumulate", accumulate, patches)
        _shape(op, "accumulate", accumulate, (B, C, Ho, Wo, D, rh_out, rw_out),
               "[B, C, Ho, Wo, D, rh_out, rw_out]")
    return B, C, Ho, Wo, D


def check_linear_li(dense, weight, gate):
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


def check_li_stats(patches, ay, ax, x, fg):
    op = "li_stats"
    B, C, Ho, Wo, D, Rh, Rw = _patches(op, patches, "[B, C, Ho, Wo, D, Rh, Rw]")
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


def check_filter_fold(patches, ay, ax, act, h, w):
    op = "filter_fold"
    B, C, Ho, Wo, D, Rh, Rw = _patches(op, patches, "[B, C, Ho, Wo, D, Rh, Rw]")
    _anchor(op, "ay", ay, patches, Ho, "Ho")
    _anchor(op, "ax", ax, patches, Wo, "Wo")
    _shape(op, "act", act, (B, C, Ho, Wo), "[B, C, Ho, Wo]")
    _floating_or_bool(op, "act", act)
    _same_device(op, "act", act, patches)
    torch._check_value(h >= 0 and w >= 0, lambda: f"{op}: h and w must be >= 0, got {h}, {w}")
    return B, C, D



def check_gmm_estep(coef, phit):
    """Argument checks of ``gmm_estep`` (the fused GMM E-step of ``nns_cuda.analysis._gmm_em``; CPU only)."""
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
