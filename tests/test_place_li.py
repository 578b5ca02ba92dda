"""place_li: compiled kernels (CPU C++, CUDA) against the pure-PyTorch reference.

What is compared: ``ops.place_li`` vs ``reference.place_li`` (float64, CPU) for the residual
case (two branches of one grid with receptive fields ``R`` and ``R + 2δ``, anchors from the
real geometry), with and without ``accumulate``, and densification (window = image); float64 /
float32 (bit-exact without accumulate), NaN-filled outputs, non-contiguous inputs, a dense
oracle written with plain slicing, ``opcheck``, argument errors (C++ = fake kernel), windows that
do not fit.
"""
from __future__ import annotations

import pytest
import torch

from conftest import expect_op_error, assert_rel_close, cpu_and_cuda, nan_filled_outputs, noncontiguous, needs_cuda, rel_err, rf_anchors
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason="nns_cuda._C not built")

DTYPES = [torch.float64, torch.float32]


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


def to(case, device=None, dtype=None):
    out = {}
    for key, v in case.items():
        if isinstance(v, torch.Tensor):
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            if device is not None:
                v = v.to(device)
        out[key] = v
    return out


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


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_place_li_matches_reference(cfg, dtype, device):
    case = make_case(list(CONFIGS).index(cfg), dtype=dtype, **CONFIGS[cfg])
    expected = ref.place_li(**to(case, "cpu", torch.float64))
    assert rel_err(dense_oracle(to(case, "cpu", torch.float64)), expected) == 0
    with nan_filled_outputs():
        out = ops.place_li(**to(case, device))
    assert out.device.type == device
    assert_rel_close(out, expected, dtype)
    if case["accumulate"] is None:
        assert (out.cpu() == expected.to(dtype)).all()  # a pure copy: bit-exact


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_place_li_noncontiguous(device):
    case = make_case(30, accumulate=True)
    expected = ref.place_li(**case)
    nc = noncontiguous(to(case, device))
    with nan_filled_outputs():
        out = ops.place_li(**nc)
    assert_rel_close(out, expected, torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_place_li_result_is_new_tensor(device):
    case = to(make_case(31, accumulate=True), device)
    acc0 = case["accumulate"].clone()
    out = ops.place_li(**case)
    assert out.data_ptr() != case["accumulate"].data_ptr()
    assert torch.equal(case["accumulate"], acc0)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_place_li_empty(device):
    case = to(make_case(32, accumulate=True), device)
    out = ops.place_li(**dict(case, patches=case["patches"][:0], accumulate=case["accumulate"][:0]))
    assert out.shape == (0,) + tuple(case["accumulate"].shape[1:])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_place_li_opcheck(device):
    case = to(make_case(33, B=1, C=2, H=7, W=6), device)
    torch.library.opcheck(torch.ops.nns_cuda.place_li, tuple(case.values()))
    case = to(make_case(34, B=1, C=2, H=7, W=6, accumulate=True), device)
    torch.library.opcheck(torch.ops.nns_cuda.place_li, tuple(case.values()))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_place_li_window_must_fit(device):
    c = make_case(35)
    for change in (dict(ay_out=c["ay_out"] + 1), dict(ax_in=c["ax_in"] + 5), dict(rh_out=c["rh_out"] - 1)):
        bad = dict(c, **change)
        with pytest.raises(ValueError, match=r"place_li: an input window does not fit inside its output window"):
            ops.place_li(**to(bad, device))
        with pytest.raises(ValueError, match="does not fit"):
            ref.place_li(**bad)


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


@pytest.mark.parametrize("mode", ["cpu", "fake"])
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_place_li_bad_arguments(bad, mode):
    _, change, exc, pattern = bad
    args = dict(make_case(36, accumulate=True), **change)
    expect_op_error(torch.ops.nns_cuda.place_li, args, exc, pattern, mode)


@needs_cuda
def test_place_li_cuda_device_mismatch():
    c = to(make_case(37, accumulate=True), "cuda")
    for key in ("accumulate", "ay_in", "ax_out"):
        with pytest.raises(ValueError, match=rf"place_li: {key} must be on the same device as patches \(cuda:0\), got cpu"):
            ops.place_li(**dict(c, **{key: c[key].cpu()}))


@needs_cuda
def test_place_li_cuda_large():
    case = make_case(38, B=2, C=4, H=48, W=45, D=3, J=2, P=3, R=7, delta=4, accumulate=True)
    expected = ref.place_li(**case)
    with nan_filled_outputs():
        out = ops.place_li(**to(case, "cuda"))
    assert_rel_close(out, expected, torch.float64)
