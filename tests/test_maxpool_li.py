"""maxpool_li: compiled kernels (CPU C++, CUDA) against the pure-PyTorch reference.

What is compared (the op tester, ``tests/_op_tester.py``): ``ops.maxpool_li`` vs
``reference.maxpool_li`` (float64, CPU) on seeded random patches with anchors from a real
receptive-field geometry and arg-max indices from ``F.max_pool2d(return_indices=True)`` (kernel,
stride, padding, dilation, asymmetric), and on arbitrary in-window indices; float64 / float32
(a pure copy: bit-exact), NaN-filled outputs, non-contiguous inputs, empty shapes, ``opcheck``,
argument errors (C++ = fake kernel), out-of-range indices and windows that do not fit (the
reference raises on the same inputs), and on a GPU arguments on the wrong device and large
windows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _op_tester import ReferenceOpTester, needs_ops, to
from conftest import conv_geometry, rf_anchors
from nns_cuda.ops.reference import ops as ref

pytestmark = needs_ops


def make_case(seed, *, B=2, C=3, H=12, W=11, D=2, k=(2, 2), s=(2, 2), p=(0, 0), d=(1, 1),
              pre=(1, 1, 0), dtype=torch.float64, random_indices=False):
    g = torch.Generator().manual_seed(seed)
    k0, s0, p0 = pre
    Hi, Jy, Py, Ry = conv_geometry(H, 1, 0, 1, k0, s0, p0)
    Wi, Jx, Px, Rx = conv_geometry(W, 1, 0, 1, k0, s0, p0)
    ay_in, Rhi = rf_anchors(Hi, H, Jy, Py, Ry)
    ax_in, Rwi = rf_anchors(Wi, W, Jx, Px, Rx)
    a = torch.randn(B, C, Hi, Wi, generator=g)
    _, indices = F.max_pool2d(a, k, s, p, d, return_indices=True)
    Ho, Wo = indices.shape[-2:]
    assert (Ho, Wo) == (conv_geometry(Hi, Jy, Py, Ry, k[0], s[0], p[0], d[0])[0],
                        conv_geometry(Wi, Jx, Px, Rx, k[1], s[1], p[1], d[1])[0])
    if random_indices:  # any tap of the pooling window, not only the arg-max
        ty = torch.randint(0, k[0], (B, C, Ho, Wo), generator=g)
        tx = torch.randint(0, k[1], (B, C, Ho, Wo), generator=g)
        yi = (torch.arange(Ho).view(1, 1, -1, 1) * s[0] + ty * d[0] - p[0]).clamp(0, Hi - 1)
        xi = (torch.arange(Wo).view(1, 1, 1, -1) * s[1] + tx * d[1] - p[1]).clamp(0, Wi - 1)
        indices = yi * Wi + xi
    _, Jy2, Py2, Ry2 = conv_geometry(Hi, Jy, Py, Ry, k[0], s[0], p[0], d[0])
    _, Jx2, Px2, Rx2 = conv_geometry(Wi, Jx, Px, Rx, k[1], s[1], p[1], d[1])
    ay_out, rho = rf_anchors(Ho, H, Jy2, Py2, Ry2)
    ax_out, rwo = rf_anchors(Wo, W, Jx2, Px2, Rx2)
    act = torch.rand(B, C, Hi, Wi, generator=g) > 0.3
    patches = torch.randn(B, C, Hi, Wi, D, Rhi, Rwi, generator=g, dtype=dtype) * act[..., None, None, None]
    return dict(patches=patches, ay_in=ay_in, ax_in=ax_in, indices=indices, ay_out=ay_out,
                ax_out=ax_out, rh_out=rho, rw_out=rwo)


CONFIGS = {
    "2x2s2": dict(),
    "3x3s2p1_pre3": dict(k=(3, 3), s=(2, 2), p=(1, 1), pre=(3, 1, 1)),
    "dilation2": dict(k=(2, 2), s=(1, 1), d=(2, 2), pre=(3, 2, 1), H=14, W=13),
    "asym": dict(k=(2, 3), s=(2, 1), p=(1, 1)),
    "window_is_image": dict(H=6, W=7, k=(3, 3), s=(2, 2), p=(1, 1), pre=(5, 1, 2)),
    "random_taps": dict(k=(3, 3), s=(2, 2), p=(1, 1), pre=(3, 1, 1), random_indices=True),
}


def _bad_cases():
    c = make_case(24)
    return [
        ("patches_rank", dict(patches=c["patches"][0]), ValueError, r"maxpool_li: patches must be 7-D \[B, C, Hi, Wi, D, Rhi, Rwi\], got \["),
        ("patches_dtype", dict(patches=c["patches"].int()), TypeError, r"maxpool_li: patches must be float32, float64, bfloat16 or float16, got torch.int32"),
        ("indices_dtype", dict(indices=c["indices"].int()), TypeError, r"maxpool_li: indices must be torch.int64, got torch.int32"),
        ("indices_shape", dict(indices=c["indices"][:, :, :-1]), ValueError, r"maxpool_li: indices must be \[B, C, Ho, Wo\] = \[2, 3, 6, 5\], got \[2, 3, 5, 5\]"),
        ("ay_in_len", dict(ay_in=c["ay_in"][:-1]), ValueError, r"maxpool_li: ay_in must have Hi=12 entries, got 11"),
        ("ax_out_rank", dict(ax_out=c["ax_out"].view(-1, 1)), ValueError, r"maxpool_li: ax_out must be 1-D \[Wo\]"),
        ("ay_out_dtype", dict(ay_out=c["ay_out"].double()), TypeError, r"maxpool_li: ay_out must be torch.int64, got torch.float64"),
        ("rw_out_neg", dict(rw_out=-2), ValueError, r"maxpool_li: rh_out and rw_out must be >= 0"),
    ]


BAD = _bad_cases()


class TestMaxpoolLi(ReferenceOpTester):
    OP = "maxpool_li"
    make_case = staticmethod(make_case)
    CONFIGS = CONFIGS
    NONCONTIGUOUS = {"f64": dict(seed=20, k=(3, 3), s=(2, 2), p=(1, 1), pre=(3, 1, 1))}
    OPCHECK = {"basic": dict(seed=22, B=1, C=2, H=6, W=6)}
    BAD = BAD
    BAD_CASE = dict(seed=24)
    INVALID_CASE = dict(seed=23)
    DEVICE_CASE = dict(seed=25)
    DEVICE_ARGS = ("indices", "ay_in", "ax_out")
    LARGE = {"c5": dict(seed=26, B=2, C=5, H=40, W=36, D=3, k=(3, 3), s=(2, 2), p=(1, 1), pre=(7, 1, 3))}

    def check_result(self, cfg, case, out, expected, dtype):
        assert (out.cpu() == expected.to(dtype)).all()  # a pure copy: bit-exact

    def empty_cases(self, device):
        case = to(make_case(21), device)
        shape = (0,) + tuple(ref.maxpool_li(**make_case(21)).shape[1:])
        return [(dict(case, patches=case["patches"][:0], indices=case["indices"][:0]), shape, False)]

    def invalid_cases(self, case):
        Hi, Wi = case["patches"].shape[2:4]
        out = []
        for val in (-1, Hi * Wi):
            ind = case["indices"].clone()
            ind[1, 2, 1, 0] = val
            out.append((dict(indices=ind), rf"maxpool_li: indices out of range \[0, {Hi * Wi}\)", "out of range"))
        ind = case["indices"].clone()
        ind[0, 1, 0, 0] = Hi * Wi - 1  # a valid neuron far outside output (0, 0)'s window
        out.append((dict(indices=ind), r"maxpool_li: an input window does not fit inside its output window",
                    "does not fit"))
        return out
