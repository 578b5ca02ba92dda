"""filter_fold: compiled kernels (CPU C++, CUDA) against the reference and a dense fold.

What is compared (the op tester, ``tests/_op_tester.py``, plus the test below):
``ops.filter_fold`` vs ``reference.filter_fold`` (float64, CPU, scatter_add) and vs a dense
oracle (images densified by slicing, weighted by the activation and summed over positions), on
anchors from a real receptive-field geometry, including overlapping windows, windows clipped by
the image and windows equal to the image; activations with zeros (skipped neurons), bool
activations; float64 / float32, NaN-filled outputs (pixels no window covers must be written as
0), non-contiguous inputs, empty shapes, ``opcheck``, argument errors (C++ = fake kernel),
windows outside the image, and on a GPU arguments on the wrong device and large windows. Also
the filter image of a one-conv network vs the VJP definition ``L^k = x ⊙ VJP(cotangent = a^k)``
(docs/spec.md §1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _op_tester import ReferenceOpTester, needs_ops, to
from conftest import conv_geometry, rel_err, rf_anchors
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref

pytestmark = needs_ops


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


class TestFilterFold(ReferenceOpTester):
    OP = "filter_fold"
    make_case = staticmethod(make_case)
    CONFIGS = CONFIGS
    NONCONTIGUOUS = {"f64": dict(seed=60, pad=(1, 1))}
    OPCHECK = {"basic": dict(seed=63, B=1, C=2, H=7, W=6, pad=(1, 0))}
    BAD = BAD
    BAD_CASE = dict(seed=65)
    INVALID_CASE = dict(seed=64)
    DEVICE_CASE = dict(seed=66)
    DEVICE_ARGS = ("act", "ay", "ax")
    LARGE = {dt: dict(seed=67, B=2, C=5, H=48, W=44, D=3, J=4, P=12, R=27, pad=(3, 2), dtype=dtype)
             for dt, dtype in (("f64", torch.float64), ("f32", torch.float32))}

    def check_reference(self, cfg, case, expected):
        assert rel_err(dense_oracle(case), expected) <= 1e-12

    def empty_cases(self, device):
        case = to(make_case(62), device)
        out = [(dict(case, patches=case["patches"][:, :0], act=case["act"][:, :0]), (2, 0, 2, 12, 11), False)]
        case = to(make_case(62, pad=(1, 1)), device)
        out.append((dict(case, patches=case["patches"][:, :, :0], act=case["act"][:, :, :0], ay=case["ay"][:0]),
                    (2, 3, 2, 14, 13), True))
        return out

    def invalid_cases(self, case):
        return [(change, r"filter_fold: windows exceed the image \(", "windows exceed the image")
                for change in (dict(h=case["h"] - 1), dict(ax=case["ax"] - 1), dict(w=0))]

    def test_vjp_oracle(self, device):
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
