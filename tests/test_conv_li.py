"""conv_li: compiled kernels (CPU C++, CUDA) against the pure-PyTorch reference and autograd.

What is compared (the op tester, ``tests/_op_tester.py``, plus the tests below):
* ``ops.conv_li`` (C++ / CUDA) vs ``reference.conv_li`` computed in float64 on the CPU, on
  seeded random patches whose anchors come from a real receptive-field geometry (conftest
  ``rf_anchors`` / ``conv_geometry``), for groups 1, grouped and depthwise convs with stride,
  padding, dilation, asymmetric kernels, windows clipped by the image, scale / gate / in_active
  present or absent, gates with zeros; float64 (rel. 1e-12) and float32 (rel. 1e-5); outputs
  allocated NaN-filled so an unwritten element fails.
* A one-layer network against ``torch.autograd``: ``LI = x ⊙ ∂ReLU(s·conv(x))/∂x``
  (docs/spec.md §1).
* Non-contiguous inputs, gated-off outputs exactly zero, inactive inputs skipped, empty
  shapes, ``torch.library.opcheck``, argument errors (C++ and the fake kernel give the same
  messages), windows that do not fit, and the reference fallback's single warning.

``ConvLiTester`` (the cases, argument errors and checks shared by conv_li and its formulations
conv_li_gemm, conv_li_gather and conv_li_implicit, which take the same arguments) is the base of
their tester classes.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from _op_tester import ReferenceOpTester, needs_ops, to
from conftest import TOL, assert_rel_close, conv_geometry, noncontiguous, rel_err, rf_anchors
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref

pytestmark = needs_ops


def make_case(seed, *, B=2, Ci=4, Co=6, groups=1, H=10, W=9, D=2, k=(3, 3), s=(1, 1),
              p=(1, 1), d=(1, 1), pre=(1, 1, 0), scale=True, gate=True, in_active=True,
              dtype=torch.float64):
    """Random conv_li arguments. The input layer is the output of a virtual conv ``pre =
    (k0, s0, p0)`` on the image (``(1, 1, 0)``: the pixels themselves)."""
    g = torch.Generator().manual_seed(seed)
    k0, s0, p0 = pre
    Hi, Jy, Py, Ry = conv_geometry(H, 1, 0, 1, k0, s0, p0)
    Wi, Jx, Px, Rx = conv_geometry(W, 1, 0, 1, k0, s0, p0)
    ay_in, Rhi = rf_anchors(Hi, H, Jy, Py, Ry)
    ax_in, Rwi = rf_anchors(Wi, W, Jx, Px, Rx)
    Ho, Jy2, Py2, Ry2 = conv_geometry(Hi, Jy, Py, Ry, k[0], s[0], p[0], d[0])
    Wo, Jx2, Px2, Rx2 = conv_geometry(Wi, Jx, Px, Rx, k[1], s[1], p[1], d[1])
    ay_out, rho = rf_anchors(Ho, H, Jy2, Py2, Ry2)
    ax_out, rwo = rf_anchors(Wo, W, Jx2, Px2, Rx2)
    act = torch.rand(B, Ci, Hi, Wi, generator=g) > 0.4
    patches = torch.randn(B, Ci, Hi, Wi, D, Rhi, Rwi, generator=g, dtype=dtype) * act[..., None, None, None]
    weight = torch.randn(Co, Ci // groups, *k, generator=g, dtype=dtype)
    weight[torch.rand(weight.shape, generator=g) < 0.1] = 0
    sc = torch.rand(Co, generator=g, dtype=dtype) + 0.5
    if Co:
        sc[0] = 0.0  # a channel switched off by its scale
    u = torch.rand(B, Co, Ho, Wo, generator=g, dtype=dtype)
    gt = torch.where(u > 0.5, torch.ones_like(u), torch.where(u > 0.4, torch.full_like(u, 0.1), torch.zeros_like(u)))
    return dict(patches=patches, ay_in=ay_in, ax_in=ax_in, in_active=act if in_active else None,
                weight=weight, scale=sc if scale else None, gate=gt if gate else None,
                ay_out=ay_out, ax_out=ax_out, stride=list(s), padding=list(p), dilation=list(d),
                groups=groups, rh_out=rho, rw_out=rwo)


def reference64(case):
    return ref.conv_li(**to(case, "cpu", torch.float64))


CONFIGS = {
    "basic": dict(),
    "stride2_pre3": dict(s=(2, 2), p=(1, 1), pre=(3, 1, 1), scale=False, gate=False, in_active=False),
    "dilation2_jump2": dict(H=13, W=12, d=(2, 2), p=(2, 2), pre=(3, 2, 1)),
    "depthwise": dict(Ci=4, Co=4, groups=4, s=(2, 2), p=(1, 1), pre=(3, 1, 1)),
    "depthwise_mult2": dict(Ci=3, Co=6, groups=3, k=(3, 3), p=(0, 0), scale=False),
    "grouped_asym": dict(Ci=4, Co=6, groups=2, k=(2, 3), s=(1, 2), p=(0, 1), pre=(2, 2, 0), gate=False),
    "pointwise_clipped": dict(k=(1, 1), p=(0, 0), pre=(5, 2, 2), in_active=False),
    "window_is_image": dict(H=6, W=5, k=(3, 3), s=(1, 1), p=(1, 1), pre=(5, 1, 2)),
}


def noncontiguous_case(case: dict, device) -> dict:
    """``case`` on ``device`` with every tensor a non-contiguous view of the same values, and the
    weight with channels-last-like strides."""
    nc = noncontiguous(to(case, device))
    assert all(not v.is_contiguous() or v.numel() <= 1 for v in nc.values() if isinstance(v, torch.Tensor))
    nc["weight"] = nc["weight"].permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    return nc


def _bad_cases():
    c = make_case(11, H=6, W=6)
    P, W = c["patches"], c["weight"]
    return [
        ("patches_rank", dict(patches=P[..., 0]), ValueError, r"conv_li: patches must be 7-D \[B, Ci, Hi, Wi, D, Rhi, Rwi\], got \["),
        ("patches_dtype", dict(patches=P.to(torch.int32)), TypeError, r"conv_li: patches must be float32, float64, bfloat16 or float16, got torch.int32"),
        ("weight_rank", dict(weight=torch.zeros(3, 3, dtype=torch.float64)), ValueError, r"conv_li: weight must be 4-D \[Co, Ci/groups, Kh, Kw\], got \[3, 3\]"),
        ("weight_dtype", dict(weight=W.to(torch.int64)), TypeError, r"conv_li: weight must be a floating-point tensor, got torch.int64"),
        ("weight_groups", dict(weight=W[:, :3]), ValueError, r"conv_li: weight \[6, 3, 3, 3\] does not match 4 input channels with groups=1"),
        ("groups_zero", dict(groups=0), ValueError, r"conv_li: groups must be >= 1, got 0"),
        ("stride_len", dict(stride=[1, 1, 1]), ValueError, r"conv_li: stride must have 2 entries"),
        ("stride_zero", dict(stride=[0, 1]), ValueError, r"conv_li: stride must be >= 1"),
        ("padding_neg", dict(padding=[-1, 0]), ValueError, r"conv_li: padding must be >= 0"),
        ("dilation_zero", dict(dilation=[1, 0]), ValueError, r"conv_li: dilation must be >= 1"),
        ("rh_out_neg", dict(rh_out=-1), ValueError, r"conv_li: rh_out and rw_out must be >= 0"),
        ("ay_in_dtype", dict(ay_in=c["ay_in"].int()), TypeError, r"conv_li: ay_in must be torch.int64, got torch.int32"),
        ("ay_in_rank", dict(ay_in=c["ay_in"].view(1, -1)), ValueError, r"conv_li: ay_in must be 1-D \[Hi\]"),
        ("ax_in_len", dict(ax_in=c["ax_in"][:-1]), ValueError, r"conv_li: ax_in must have Wi=6 entries, got 5"),
        ("ay_out_dtype", dict(ay_out=c["ay_out"].float()), TypeError, r"conv_li: ay_out must be torch.int64"),
        ("in_active_dtype", dict(in_active=c["in_active"].float()), TypeError, r"conv_li: in_active must be torch.bool, got torch.float32"),
        ("in_active_shape", dict(in_active=c["in_active"][:, :1]), ValueError, r"conv_li: in_active must be \[B, Ci, Hi, Wi\] = \[2, 4, 6, 6\], got \[2, 1, 6, 6\]"),
        ("scale_shape", dict(scale=c["scale"][:2]), ValueError, r"conv_li: scale must be \[Co\] = \[6\], got \[2\]"),
        ("scale_dtype", dict(scale=c["scale"].long()), TypeError, r"conv_li: scale must be a floating-point tensor"),
        ("gate_shape", dict(gate=c["gate"][0]), ValueError, r"conv_li: gate must be \[B, Co, Ho, Wo\]"),
        ("gate_dtype", dict(gate=c["gate"].long()), TypeError, r"conv_li: gate must be a floating-point or bool tensor, got torch.int64"),
    ]


BAD = _bad_cases()


class ConvLiTester(ReferenceOpTester):
    """conv_li's cases and the checks shared with the ops that take its arguments."""

    OP = "conv_li"
    make_case = staticmethod(make_case)
    CONFIGS = CONFIGS
    BAD = BAD
    BAD_CASE = dict(seed=11, H=6, W=6)
    INVALID_CASE = dict(seed=12)
    DEVICE_CASE = dict(seed=13)
    DEVICE_ARGS = ("weight", "ay_in", "in_active", "scale", "gate")
    #: the dtype of the empty cases
    EMPTY_DTYPE = torch.float64
    #: the empty cases include a conv without input channels (an empty sum: all zeros)
    EMPTY_NO_INPUT_CHANNELS = True

    def reference(self, case):
        # conv_li's twin: the formulations with conv_li's arguments compute the same result
        return reference64(case)

    def noncontiguous_args(self, case, device):
        return noncontiguous_case(case, device)

    def empty_cases(self, device):
        dt = self.EMPTY_DTYPE
        case = to(self.make_case(8, dtype=dt), device)
        win = (len(case["ay_out"]), len(case["ax_out"]), 2, case["rh_out"], case["rw_out"])
        out = [(dict(case, patches=case["patches"][:0], in_active=case["in_active"][:0], gate=case["gate"][:0]),
                (0, 6) + win, False),
               (to(self.make_case(8, Co=0, scale=False, gate=False, dtype=dt), device), (2, 0) + win, False)]
        if self.EMPTY_NO_INPUT_CHANNELS:
            out.append((to(self.make_case(8, Ci=0, scale=False, gate=False, in_active=False, dtype=dt), device),
                        (2, 6) + win, True))
        return out

    def invalid_cases(self, case):
        pattern = rf"{self.OP}: an input window does not fit inside its output window"
        return [(dict(ay_out=case["ay_out"] + 1), pattern, "does not fit"),
                (dict(ax_out=case["ax_out"] - 1), pattern, "does not fit")]


class TestConvLi(ConvLiTester):
    NONCONTIGUOUS = {"f64": dict(seed=6, dtype=torch.float64, groups=2, s=(2, 1), pre=(3, 1, 1)),
                     "f32": dict(seed=6, dtype=torch.float32, groups=2, s=(2, 1), pre=(3, 1, 1))}
    OPCHECK = {"basic": dict(seed=9, B=1, Ci=2, Co=2, H=6, W=5),
               "grouped_ungated": dict(seed=10, B=1, Ci=2, Co=2, H=6, W=5, groups=2, scale=False, gate=False,
                                       in_active=False)}
    LARGE = {"co40": dict(seed=14, B=1, Ci=6, Co=40, H=40, W=37, D=3, k=(3, 3), pre=(9, 1, 4))}
    EMPTY_NO_INPUT_CHANNELS = False

    def check_result(self, cfg, case, out, expected, dtype):
        # the same-dtype reference agrees too (float32 rounding of the oracle itself)
        assert rel_err(ref.conv_li(**case), expected) <= TOL[dtype]

    def test_gated_outputs_are_exact_zeros(self, device):
        case = make_case(3)
        out = ops.conv_li(**to(case, device)).cpu()
        off = (case["gate"] * case["scale"].view(1, -1, 1, 1)) == 0
        assert off.any() and (~off).any()
        assert (out[off] == 0).all()
        assert (out[~off].flatten(1).abs().sum(1) > 0).any()

    def test_in_active_skips_inputs(self, device):
        """in_active=False marks a zero patch; the kernels skip it. Marking a *non-zero* patch
        inactive therefore drops its contribution, which proves the skip happens."""
        case = make_case(4)
        full = ops.conv_li(**to(case, device)).cpu()
        no_mask = ops.conv_li(**to(dict(case, in_active=None), device)).cpu()
        assert rel_err(full, no_mask) <= 1e-12
        g = torch.Generator().manual_seed(5)
        dense = torch.randn(case["patches"].shape, generator=g, dtype=torch.float64)
        mask = torch.rand(case["in_active"].shape, generator=g) > 0.5
        out = ops.conv_li(**to(dict(case, patches=dense, in_active=mask), device)).cpu()
        expected = ref.conv_li(**dict(case, patches=dense * mask[..., None, None, None], in_active=None))
        assert_rel_close(out, expected, torch.float64)

    def test_autograd_oracle(self, device):
        """One BN-folded conv + ReLU on an image: ``LI_n = x ⊙ ∂a_n/∂x`` from torch.autograd."""
        g = torch.Generator().manual_seed(7)
        B, D, H, W, Co = 2, 2, 7, 6, 3
        x = torch.randn(B, D, H, W, generator=g, dtype=torch.float64)
        weight = torch.randn(Co, D, 3, 3, generator=g, dtype=torch.float64)
        scale = torch.rand(Co, generator=g, dtype=torch.float64) + 0.5
        stride, padding = (2, 1), (1, 1)

        def net(inp):
            return F.relu(F.conv2d(inp, weight, stride=stride, padding=padding) * scale.view(1, -1, 1, 1))

        z = F.conv2d(x, weight, stride=stride, padding=padding) * scale.view(1, -1, 1, 1)
        _, _, Ho, Wo = z.shape
        jac = torch.autograd.functional.jacobian(net, x)          # [B, Co, Ho, Wo, B, D, H, W]
        idx = torch.arange(B)
        jac = jac[idx, :, :, :, idx]                               # per-sample: [B, Co, Ho, Wo, D, H, W]
        li_dense = jac * x.view(B, 1, 1, 1, D, H, W)
        # pixel patches: neuron (c, y, x) of the input is x[c, y, x] at channel c of a 1x1 window
        pix = torch.zeros(B, D, H, W, D, 1, 1, dtype=torch.float64)
        for c in range(D):
            pix[:, c, :, :, c, 0, 0] = x[:, c]
        ay_in, ax_in = torch.arange(H), torch.arange(W)
        _, Jy, Py, Ry = conv_geometry(H, 1, 0, 1, 3, stride[0], padding[0])
        _, Jx, Px, Rx = conv_geometry(W, 1, 0, 1, 3, stride[1], padding[1])
        ay_out, rho = rf_anchors(Ho, H, Jy, Py, Ry)
        ax_out, rwo = rf_anchors(Wo, W, Jx, Px, Rx)
        args = dict(patches=pix, ay_in=ay_in, ax_in=ax_in, in_active=None, weight=weight, scale=scale,
                    gate=(z > 0).double(), ay_out=ay_out, ax_out=ax_out, stride=list(stride),
                    padding=list(padding), dilation=[1, 1], groups=1, rh_out=rho, rw_out=rwo)
        out = ops.conv_li(**to(args, device)).cpu()
        dense = torch.zeros(B, Co, Ho, Wo, D, H, W, dtype=torch.float64)
        for y in range(Ho):
            for xx in range(Wo):
                a, b = int(ay_out[y]), int(ax_out[xx])
                dense[:, :, y, xx, :, a:a + rho, b:b + rwo] = out[:, :, y, xx]
        assert rel_err(dense, li_dense) <= 1e-12
        assert (li_dense != 0).any()

    def test_ops_fallback_warns_once(self, monkeypatch):
        """Without the extension the wrappers use the reference and warn exactly once."""
        monkeypatch.setattr(ops, "HAS_OPS", False)
        monkeypatch.setattr(ops, "_warned", False)
        case = make_case(15, B=1)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            a = ops.conv_li(**case)
            b = ops.conv_li(**case)
        msgs = [w for w in rec if issubclass(w.category, RuntimeWarning) and "falls back" in str(w.message)]
        assert len(msgs) == 1
        assert torch.equal(a, ref.conv_li(**case)) and torch.equal(a, b)
