"""filter_fold: compiled kernels (CPU C++, CUDA) against the reference and a dense fold.

What is compared: ``ops.filter_fold`` vs ``reference.filter_fold`` (float64, CPU, scatter_add)
and vs a dense oracle (images densified by slicing, weighted by the activation and summed over
positions), on anchors from a real receptive-field geometry, including overlapping windows,
windows clipped by the image and windows equal to the image; activations with zeros (skipped
neurons), bool activations; float64 / float32, NaN-filled outputs (pixels no window covers
must be written as 0), non-contiguous inputs, ``opcheck``, argument errors (C++ = fake kernel),
windows outside the image. Also the filter image of a one-conv network vs the VJP definition
``L^k = x ⊙ VJP(cotangent = a^k)`` (SPEC §1).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import expect_op_error, assert_rel_close, conv_geometry, cpu_and_cuda, nan_filled_outputs, noncontiguous, needs_cuda, rel_err, rf_anchors
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason="nns_cuda._C not built")

DTYPES = [torch.float64, torch.float32]


def make_case(seed, *, B=2, C=3, H=12, W=11, D=2, J=2, P=1, R=5, pad=(0, 0), act="float",
              dtype=torch.float64):
    """Grid of a layer with geometry (J, P, R) on an image padded by ``pad`` pixels that no
    window covers (so the op must write zeros there)."""
    g = torch.Generator().manual_seed(seed)
    Ho = (H + 2 * P - min(R, H)) // J + 1
    Wo = (W + 2 * P - min(R, W)) // J + 1
    ay, Rh = rf_anchors(Ho, H, J, P, R)
    ax, Rw = rf_anchors(Wo, W, J, P, R)
    patches = torch.randn(B, C, Ho, Wo, D, Rh, Rw, generator=g, dtype=dtype)
    a = torch.relu(torch.randn(B, C, Ho, Wo, generator=g, dtype=dtype))  # about half are zero
    if act == "bool":
        a = a > 0
    return dict(patches=patches, ay=ay + pad[0], ax=ax + pad[1], act=a, h=H + 2 * pad[0], w=W + 2 * pad[1])


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
    p = c["patches"].double()
    B, C, Ho, Wo, D, Rh, Rw = p.shape
    out = torch.zeros(B, C, D, c["h"], c["w"], dtype=torch.float64)
    a = c["act"].double()
    for y in range(Ho):
        for x in range(Wo):
            r0, c0 = int(c["ay"][y]), int(c["ax"][x])
            out[:, :, :, r0:r0 + Rh, c0:c0 + Rw] += p[:, :, y, x] * a[:, :, y, x, None, None, None]
    return out


CONFIGS = {
    "overlapping": dict(),
    "stride1": dict(J=1, P=1, R=3),
    "disjoint": dict(J=3, P=0, R=3, H=12, W=12),
    "uncovered_border": dict(pad=(2, 1)),
    "window_is_image": dict(H=6, W=5, J=1, P=3, R=9),
    "bool_act": dict(act="bool"),
}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_filter_fold_matches_reference(cfg, dtype, device):
    case = make_case(list(CONFIGS).index(cfg), dtype=dtype, **CONFIGS[cfg])
    expected = ref.filter_fold(**to(case, "cpu", torch.float64))
    assert rel_err(dense_oracle(case), expected) <= 1e-12
    with nan_filled_outputs():
        out = ops.filter_fold(**to(case, device))
    assert out.device.type == device
    assert_rel_close(out, expected, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_filter_fold_noncontiguous(device):
    case = make_case(60, pad=(1, 1))
    expected = ref.filter_fold(**case)
    nc = noncontiguous(to(case, device))
    with nan_filled_outputs():
        out = ops.filter_fold(**nc)
    assert_rel_close(out, expected, torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_filter_fold_vjp_oracle(device):
    """One conv + ReLU: L^k = x ⊙ VJP(cotangent = a^k) (one backward pass per filter)."""
    g = torch.Generator().manual_seed(61)
    B, D, H, W, Co, k, s, p = 2, 2, 9, 8, 3, 3, 2, 1
    x = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
    weight = torch.randn(Co, D, k, k, generator=g, dtype=torch.float64)
    z = F.conv2d(x, weight, stride=s, padding=p)
    a = torch.relu(z)
    Ho, Wo = z.shape[-2:]
    expected = torch.zeros(B, Co, D, H, W, dtype=torch.float64)
    for kk in range(Co):
        xr = x.clone().requires_grad_(True)
        ak = torch.relu(F.conv2d(xr, weight, stride=s, padding=p))[:, kk]
        (gx,) = torch.autograd.grad(ak, xr, grad_outputs=a[:, kk].detach())
        expected[:, kk] = x * gx
    # patches from conv_li on pixel patches (tested against autograd in test_conv_li)
    pix = torch.zeros(B, D, H, W, D, 1, 1, dtype=torch.float64)
    for c in range(D):
        pix[:, c, :, :, c, 0, 0] = x[:, c]
    _, Jy, Py, Ry = conv_geometry(H, 1, 0, 1, k, s, p)
    _, Jx, Px, Rx = conv_geometry(W, 1, 0, 1, k, s, p)
    ay, rh = rf_anchors(Ho, H, Jy, Py, Ry)
    ax, rw = rf_anchors(Wo, W, Jx, Px, Rx)
    li = ref.conv_li(pix, torch.arange(H), torch.arange(W), None, weight, None, (z > 0).double(),
                     ay, ax, [s, s], [p, p], [1, 1], 1, rh, rw)
    out = ops.filter_fold(li.to(device), ay.to(device), ax.to(device), a.to(device), H, W)
    assert rel_err(out, expected) <= 1e-12 and (expected != 0).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_filter_fold_empty(device):
    case = to(make_case(62), device)
    out = ops.filter_fold(**dict(case, patches=case["patches"][:, :0], act=case["act"][:, :0]))
    assert out.shape == (2, 0, 2, 12, 11)
    case = to(make_case(62, pad=(1, 1)), device)
    out = ops.filter_fold(**dict(case, patches=case["patches"][:, :, :0], act=case["act"][:, :, :0],
                                 ay=case["ay"][:0]))
    assert out.shape == (2, 3, 2, 14, 13) and (out == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_filter_fold_opcheck(device):
    case = to(make_case(63, B=1, C=2, H=7, W=6, pad=(1, 0)), device)
    torch.library.opcheck(torch.ops.nns_cuda.filter_fold, tuple(case.values()))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_filter_fold_windows_outside_image(device):
    c = make_case(64)
    for change in (dict(h=c["h"] - 1), dict(ax=c["ax"] - 1), dict(w=0)):
        bad = dict(c, **change)
        with pytest.raises(ValueError, match=r"filter_fold: windows exceed the image \("):
            ops.filter_fold(**to(bad, device))
        with pytest.raises(ValueError, match="windows exceed the image"):
            ref.filter_fold(**bad)


def _bad_cases():
    c = make_case(65)
    return [
        ("patches_rank", dict(patches=c["patches"][0]), ValueError, r"filter_fold: patches must be 7-D \[B, C, Ho, Wo, D, Rh, Rw\]"),
        ("patches_dtype", dict(patches=c["patches"].int()), TypeError, r"filter_fold: patches must be float32, float64, bfloat16 or float16, got torch.int32"),
        ("ay_len", dict(ay=c["ay"][:-1]), ValueError, r"filter_fold: ay must have Ho=5 entries, got 4"),
        ("ax_rank", dict(ax=c["ax"].view(1, -1)), ValueError, r"filter_fold: ax must be 1-D \[Wo\]"),
        ("act_shape", dict(act=c["act"][:, :, :-1]), ValueError, r"filter_fold: act must be \[B, C, Ho, Wo\] = \[2, 3, 5, 5\], got \[2, 3, 4, 5\]"),
        ("act_dtype", dict(act=c["act"].long()), TypeError, r"filter_fold: act must be a floating-point or bool tensor, got torch.int64"),
        ("h_neg", dict(h=-1), ValueError, r"filter_fold: h and w must be >= 0, got -1, 11"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("mode", ["cpu", "fake"])
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_filter_fold_bad_arguments(bad, mode):
    _, change, exc, pattern = bad
    args = dict(make_case(65), **change)
    expect_op_error(torch.ops.nns_cuda.filter_fold, args, exc, pattern, mode)


@needs_cuda
def test_filter_fold_cuda_device_mismatch():
    c = to(make_case(66), "cuda")
    for key in ("act", "ay", "ax"):
        with pytest.raises(ValueError, match=rf"filter_fold: {key} must be on the same device as patches \(cuda:0\), got cpu"):
            ops.filter_fold(**dict(c, **{key: c[key].cpu()}))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_filter_fold_cuda_large(dtype):
    case = make_case(67, B=2, C=5, H=48, W=44, D=3, J=4, P=12, R=27, pad=(3, 2), dtype=dtype)
    expected = ref.filter_fold(**to(case, "cpu", torch.float64))
    with nan_filled_outputs():
        out = ops.filter_fold(**to(case, "cuda"))
    assert_rel_close(out, expected, dtype)
