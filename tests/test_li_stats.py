"""li_stats: compiled kernels (CPU C++, CUDA) against the reference and the dense definition.

What is compared (the op tester, ``tests/_op_tester.py``): ``ops.li_stats`` vs
``reference.li_stats`` (float64, CPU) and vs ``reference.stats.li_stats_dense`` applied to the
densified images (plain slicing), on patches with exact zeros (so the ``nz`` counts matter) and
anchors from a real receptive-field geometry; foreground masks from bounding boxes as float 0/1
and bool, an all-background mask, fractional masks (the op is linear in ``fg``); float64 /
float32, every statistic on its own scale, exact counts, NaN-filled outputs, non-contiguous
inputs, empty shapes, ``opcheck``, argument errors (C++ = fake kernel), windows outside the
image, and on a GPU arguments on the wrong device and windows much larger than a warp and tiny
ones.
"""
from __future__ import annotations

import torch

from _op_tester import ReferenceOpTester, needs_ops, to
from conftest import rel_err, rf_anchors
from nns_cuda.ops.reference.stats import NUM_STATS, li_stats_dense

pytestmark = needs_ops


def make_case(seed, *, B=2, C=3, H=12, W=11, D=3, J=2, P=1, R=5, fg="box", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * P - min(R, H)) // J + 1
    Wo = (W + 2 * P - min(R, W)) // J + 1
    ay, Rh = rf_anchors(Ho, H, J, P, R)
    ax, Rw = rf_anchors(Wo, W, J, P, R)
    patches = torch.randn(B, C, Ho, Wo, D, Rh, Rw, generator=g, dtype=dtype)
    patches = patches * (torch.rand(patches.shape, generator=g) > 0.3)
    patches[:, 0, 0] = 0  # whole inactive neurons
    x = torch.randn(B, D, H, W, generator=g, dtype=dtype)
    x[:, :, 0] = 0  # inactive input pixels
    box = torch.zeros(B, H, W, dtype=torch.bool)
    box[0, 2:8, 3:9] = True
    box[-1, 5:, :4] = True
    if fg == "box":
        m = box.to(dtype)
    elif fg == "bool":
        m = box
    elif fg == "none":
        m = torch.zeros(B, H, W, dtype=dtype)
    else:  # fractional
        m = torch.rand(B, H, W, generator=g, dtype=dtype)
    return dict(patches=patches, ay=ay, ax=ax, x=x, fg=m)


def densify(patches, ay, ax, H, W):
    B, C, Ho, Wo, D, Rh, Rw = patches.shape
    out = patches.new_zeros(B, C, Ho, Wo, D, H, W)
    for y in range(Ho):
        for x in range(Wo):
            a, b = int(ay[y]), int(ax[x])
            out[:, :, y, x, :, a:a + Rh, b:b + Rw] = patches[:, :, y, x]
    return out


CONFIGS = {
    "box": dict(),
    "bool_mask": dict(fg="bool"),
    "no_foreground": dict(fg="none"),
    "fractional_mask": dict(fg="frac"),
    "small_rf": dict(J=1, P=0, R=1),
    "window_is_image": dict(H=6, W=5, J=1, P=3, R=9),
}


def _bad_cases():
    c = make_case(54)
    return [
        ("patches_rank", dict(patches=c["patches"][0]), ValueError, r"li_stats: patches must be 7-D \[B, C, Ho, Wo, D, Rh, Rw\]"),
        ("patches_dtype", dict(patches=c["patches"].bool()), TypeError, r"li_stats: patches must be float32, float64, bfloat16 or float16, got torch.bool"),
        ("ay_len", dict(ay=c["ay"][:-1]), ValueError, r"li_stats: ay must have Ho=5 entries, got 4"),
        ("ax_dtype", dict(ax=c["ax"].int()), TypeError, r"li_stats: ax must be torch.int64, got torch.int32"),
        ("x_channels", dict(x=c["x"][:, :2]), ValueError, r"li_stats: x must be \[B=2, D=3, H, W\], got \[2, 2, 12, 11\]"),
        ("x_rank", dict(x=c["x"][0]), ValueError, r"li_stats: x must be \[B=2, D=3, H, W\]"),
        ("x_dtype", dict(x=c["x"].long()), TypeError, r"li_stats: x must be a floating-point tensor"),
        ("fg_shape", dict(fg=c["fg"][:, :-1]), ValueError, r"li_stats: fg must be \[B, H, W\] = \[2, 12, 11\], got \[2, 11, 11\]"),
        ("fg_dtype", dict(fg=c["fg"].long()), TypeError, r"li_stats: fg must be a floating-point or bool tensor, got torch.int64"),
    ]


BAD = _bad_cases()

#: windows much larger than a warp (several iterations per lane), and tiny ones
_LARGE = {"big": dict(B=2, C=4, H=40, W=38, D=3, J=4, P=10, R=25), "tiny": dict(B=2, C=4, H=9, W=9, D=1, J=1, P=0, R=1)}


class TestLiStats(ReferenceOpTester):
    OP = "li_stats"
    make_case = staticmethod(make_case)
    CONFIGS = CONFIGS
    NONCONTIGUOUS = {"f64": dict(seed=50)}
    OPCHECK = {"float_fg": dict(seed=52, B=1, C=2, H=7, W=6),
               "bool_fg": dict(seed=52, B=1, C=2, H=7, W=6, bool_fg=True)}
    BAD = BAD
    BAD_CASE = dict(seed=54)
    INVALID_CASE = dict(seed=53)
    DEVICE_CASE = dict(seed=55)
    DEVICE_ARGS = ("x", "fg", "ay")
    LARGE = {f"{name}_{dt}": dict(seed=56, dtype=dtype, **kw)
             for dt, dtype in (("f64", torch.float64), ("f32", torch.float32)) for name, kw in _LARGE.items()}

    def opcheck_args(self, device, bool_fg=False, **kw):
        case = to(make_case(**kw), device)
        if bool_fg:  # the case's float 0/1 mask as bool
            case = dict(case, fg=case["fg"] > 0)
        return tuple(case.values())

    def check_reference(self, cfg, case, expected):
        c64 = to(case, "cpu", torch.float64)
        H, W = case["x"].shape[-2:]
        dense = densify(c64["patches"], case["ay"], case["ax"], H, W)
        fgm = c64["fg"] if c64["fg"].dtype == torch.bool else c64["fg"].double()
        assert rel_err(li_stats_dense(dense, c64["x"], fgm), expected) <= 1e-12

    def check_result(self, cfg, case, out, expected, dtype):
        assert out.shape[-1] == NUM_STATS
        for k in range(NUM_STATS):  # every statistic on its own scale
            assert rel_err(out[..., k], expected[..., k]) <= 10 * (1e-12 if dtype == torch.float64 else 1e-5) \
                or expected[..., k].abs().max() == 0
        assert (out[..., :2].cpu() == expected[..., :2].to(dtype)).all() or cfg == "fractional_mask"  # exact counts

    def empty_cases(self, device):
        case = to(make_case(51), device)
        return [(dict(case, patches=case["patches"][:, :0]),
                 (2, 0) + tuple(case["patches"].shape[2:4]) + (NUM_STATS,), False)]

    def invalid_cases(self, case):
        return [(change, r"li_stats: windows exceed the image \(12×11\)", "windows exceed the image")
                for change in (dict(ay=case["ay"] + 100), dict(ax=case["ax"] - 1))]
