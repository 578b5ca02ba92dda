"""place_li: compiled kernels (CPU C++, CUDA) against the pure-PyTorch reference.

What is compared (the op tester, ``tests/_op_tester.py``, plus the test below):
``ops.place_li`` vs ``reference.place_li`` (float64, CPU) for the residual case (two branches of
one grid with receptive fields ``R`` and ``R + 2δ``, anchors from the real geometry), with and
without ``accumulate``, and densification (window = image); float64 / float32 (bit-exact without
accumulate), NaN-filled outputs, non-contiguous inputs, a dense oracle written with plain
slicing, empty shapes, the result a new tensor, ``opcheck``, argument errors (C++ = fake kernel),
windows that do not fit, and on a GPU arguments on the wrong device and large windows.
"""
from __future__ import annotations

import torch

from _op_tester import ReferenceOpTester, needs_ops, to
from conftest import rel_err, rf_anchors
from nns_cuda import ops

pytestmark = needs_ops


def make_case(seed, *, B=2, C=3, H=11, W=10, D=2, J=2, P=1, R=3, delta=2, dense=False,
              accumulate=False, dtype=torch.float64):
    """Grid of a layer with geometry (J, P, R): windows of size R re-placed into the windows of
    the same grid with receptive field R + 2·delta (or into the whole image when dense)."""
    g = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * P - R) // J + 1
    Wo = (W + 2 * P - R) // J + 1
    ay_in, Rhi = rf_anchors(Ho, H, J, P, R)
    ax_in, Rwi = rf_anchors(Wo, W, J, P, R)
    if dense:
        ay_out, rho = torch.zeros(Ho, dtype=torch.int64), H
        ax_out, rwo = torch.zeros(Wo, dtype=torch.int64), W
    else:
        ay_out, rho = rf_anchors(Ho, H, J, P + delta, R + 2 * delta)
        ax_out, rwo = rf_anchors(Wo, W, J, P + delta, R + 2 * delta)
    patches = torch.randn(B, C, Ho, Wo, D, Rhi, Rwi, generator=g, dtype=dtype)
    acc = torch.randn(B, C, Ho, Wo, D, rho, rwo, generator=g, dtype=dtype) if accumulate else None
    return dict(patches=patches, ay_in=ay_in, ax_in=ax_in, ay_out=ay_out, ax_out=ax_out,
                rh_out=rho, rw_out=rwo, accumulate=acc)


def dense_oracle(c):
    """Plain slicing, one neuron at a time."""
    p = c["patches"]
    B, C, Ho, Wo, D, Rhi, Rwi = p.shape
    out = p.new_zeros(B, C, Ho, Wo, D, c["rh_out"], c["rw_out"])
    for y in range(Ho):
        for x in range(Wo):
            dy = int(c["ay_in"][y] - c["ay_out"][y])
            dx = int(c["ax_in"][x] - c["ax_out"][x])
            out[:, :, y, x, :, dy:dy + Rhi, dx:dx + Rwi] = p[:, :, y, x]
    if c["accumulate"] is not None:
        out = out + c["accumulate"]
    return out


CONFIGS = {
    "residual": dict(),
    "residual_acc": dict(accumulate=True),
    "residual_stride1": dict(J=1, P=1, R=3, delta=1, accumulate=True),
    "same_window": dict(delta=0),
    "densify": dict(dense=True),
    "densify_acc": dict(dense=True, accumulate=True),
    "clipped_big_rf": dict(H=7, W=6, J=1, P=2, R=5, delta=2),
}


def _bad_cases():
    c = make_case(36, accumulate=True)
    return [
        ("patches_rank", dict(patches=c["patches"][0]), ValueError, r"place_li: patches must be 7-D \[B, C, Ho, Wo, D, Rhi, Rwi\]"),
        ("patches_dtype", dict(patches=c["patches"].long()), TypeError, r"place_li: patches must be float32, float64, bfloat16 or float16, got torch.int64"),
        ("ay_in_len", dict(ay_in=c["ay_in"][:-1]), ValueError, r"place_li: ay_in must have Ho=6 entries, got 5"),
        ("ax_out_len", dict(ax_out=c["ax_out"][:-1]), ValueError, r"place_li: ax_out must have Wo=5 entries, got 4"),
        ("ay_out_dtype", dict(ay_out=c["ay_out"].int()), TypeError, r"place_li: ay_out must be torch.int64, got torch.int32"),
        ("acc_shape", dict(accumulate=c["accumulate"][..., :-1]), ValueError, r"place_li: accumulate must be \[B, C, Ho, Wo, D, rh_out, rw_out\] = \[2, 3, 6, 5, 2, 7, 7\], got \[2, 3, 6, 5, 2, 7, 6\]"),
        ("acc_dtype", dict(accumulate=c["accumulate"].float()), TypeError, r"place_li: accumulate must be torch.float64, got torch.float32"),
        ("rh_out_neg", dict(rh_out=-1), ValueError, r"place_li: rh_out and rw_out must be >= 0"),
    ]


BAD = _bad_cases()


class TestPlaceLi(ReferenceOpTester):
    OP = "place_li"
    make_case = staticmethod(make_case)
    CONFIGS = CONFIGS
    NONCONTIGUOUS = {"f64_acc": dict(seed=30, accumulate=True)}
    OPCHECK = {"basic": dict(seed=33, B=1, C=2, H=7, W=6),
               "accumulate": dict(seed=34, B=1, C=2, H=7, W=6, accumulate=True)}
    BAD = BAD
    BAD_CASE = dict(seed=36, accumulate=True)
    INVALID_CASE = dict(seed=35)
    DEVICE_CASE = dict(seed=37, accumulate=True)
    DEVICE_ARGS = ("accumulate", "ay_in", "ax_out")
    LARGE = {"acc": dict(seed=38, B=2, C=4, H=48, W=45, D=3, J=2, P=3, R=7, delta=4, accumulate=True)}

    def check_reference(self, cfg, case, expected):
        assert rel_err(dense_oracle(to(case, "cpu", torch.float64)), expected) == 0

    def check_result(self, cfg, case, out, expected, dtype):
        if case["accumulate"] is None:
            assert (out.cpu() == expected.to(dtype)).all()  # a pure copy: bit-exact

    def empty_cases(self, device):
        case = to(make_case(32, accumulate=True), device)
        return [(dict(case, patches=case["patches"][:0], accumulate=case["accumulate"][:0]),
                 (0,) + tuple(case["accumulate"].shape[1:]), False)]

    def invalid_cases(self, case):
        pattern = r"place_li: an input window does not fit inside its output window"
        return [(change, pattern, "does not fit") for change in
                (dict(ay_out=case["ay_out"] + 1), dict(ax_in=case["ax_in"] + 5), dict(rh_out=case["rh_out"] - 1))]

    def test_result_is_new_tensor(self, device):
        case = to(make_case(31, accumulate=True), device)
        acc0 = case["accumulate"].clone()
        out = ops.place_li(**case)
        assert out.data_ptr() != case["accumulate"].data_ptr()
        assert torch.equal(case["accumulate"], acc0)
