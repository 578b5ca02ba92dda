"""conv_li_gemm (the dense im2col-window GEMM formulation of conv_li) against the reference.

The tests are methods of ``GemmTests``; ``tests/test_conv_li_gather.py`` runs them again for
``conv_li_gather`` (same arguments, same contract). ``ChunkedConvTester`` (argument errors with
``max_elems``, the TF32 switch) is shared with ``tests/test_conv_li_implicit.py``.

What is compared:
* the op (one ATen-only C++ function, registered for the CPU and CUDA) vs
  ``reference.conv_li`` in float64 on the CPU — code it shares nothing with — on the seeded
  random cases of ``test_conv_li.py`` (anchors from a real receptive-field geometry): stride 2,
  padding, dilation, asymmetric kernels, windows clipped by the image, groups 1 / grouped /
  depthwise, scale / gate / in_active present or absent, gates with zeros; float64 (rel.
  1e-12) and float32 (rel. 1e-5); outputs allocated NaN-filled so an unwritten element fails;
  each case at the default chunk bound and at bounds that force per-image, per-row, per-tile
  and per-position chunks.
* bfloat16 / float16 patches against the reference twin on the same 16-bit inputs, with
  tolerances from the formats' unit roundoff.
* Non-contiguous inputs, in_active masking (also of NaN / inf patches), gated-off outputs
  exactly zero (also when the inputs hold NaN), empty shapes, ``torch.library.opcheck``,
  argument errors (C++ and the fake kernel give the same messages), windows that do not fit.
* CUDA: the same, plus the TF32 switch (``torch.backends.cuda.matmul.allow_tf32``) is obeyed.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from _op_tester import needs_ops, to
from conftest import TOL, assert_rel_close, nan_filled_outputs, needs_cuda, rel_err
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref
from test_conv_li import BAD as CONV_BAD
from test_conv_li import CONFIGS, ConvLiTester, make_case, reference64

pytestmark = needs_ops

#: chunk bounds (elements of the GEMM temporaries), chosen so that across the cases every chunking
#: path runs: all images at once (default), one image, several output rows, a tile of one row,
#: one output position
CHUNKS = {"default": 0, "image": 300_000, "rows": 60_000, "tile": 8_000, "position": 1}

# 16-bit storage: the op rounds the weights and the result to the patch dtype (unit roundoff u:
# 2^-8 bfloat16, 2^-11 float16); against the reference twin on the same 16-bit inputs the error
# is a few u of the largest output (max-norm relative error, conftest.rel_err).
LOW_TOL = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}

# every chunking path in float64; float32 with the default chunking (the dtype does not change
# the chunk logic)
_DTYPE_CHUNK = [pytest.param(torch.float64, c, id=f"f64-{c}") for c in CHUNKS] + \
    [pytest.param(torch.float32, "default", id="f32-default")]


class ChunkedConvTester(ConvLiTester):
    """An op with conv_li's arguments plus ``max_elems`` (the bound of its temporaries) whose
    float32 products run as matrix products: conv_li_gemm, conv_li_gather, conv_li_implicit."""

    def run(self, args, max_elems=0):
        return getattr(ops, self.OP)(**args, max_elems=max_elems)

    def bad_cases(self):
        # the conv_li argument errors, named after the op under test, plus max_elems
        out = [(name, change, exc, pattern.replace("conv_li:", f"{self.OP}:"))
               for name, change, exc, pattern in CONV_BAD]
        out.append(("max_elems_neg", dict(max_elems=-1), ValueError,
                    rf"{self.OP}: max_elems must be >= 0 \(0: default\), got -1"))
        return out

    def bad_args(self):
        return dict(super().bad_args(), max_elems=0)

    @needs_cuda
    def test_cuda_tf32_switch(self):
        """float32 obeys torch.backends.cuda.matmul.allow_tf32: off, float32 accuracy; on, the
        TF32 rounding of the operands (unit roundoff 2^-11) shows, but stays small."""
        case = make_case(14, B=2, Ci=32, Co=16, H=12, W=12, D=3, pre=(5, 1, 2), dtype=torch.float32)
        expected = reference64(case)
        cc = to(case, "cuda")
        old = torch.backends.cuda.matmul.allow_tf32
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            e_fp32 = rel_err(self.run(cc), expected)
            torch.backends.cuda.matmul.allow_tf32 = True
            e_tf32 = rel_err(self.run(cc), expected)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        assert e_fp32 <= TOL[torch.float32], e_fp32
        assert TOL[torch.float32] < e_tf32 <= 1e-2, e_tf32


class GemmTests(ChunkedConvTester):
    """The tests of the cuBLAS / BLAS formulations conv_li_gemm and conv_li_gather."""

    NONCONTIGUOUS = {"f64": dict(seed=6, dtype=torch.float64, groups=2, s=(2, 1), pre=(3, 1, 1)),
                     "f32": dict(seed=6, dtype=torch.float32, groups=2, s=(2, 1), pre=(3, 1, 1))}
    NONCONTIGUOUS_KWARGS = dict(max_elems=300)
    OPCHECK = {"basic": dict(seed=9, B=1, Ci=2, Co=2, H=6, W=5),
               "max_elems7": dict(seed=9, B=1, Ci=2, Co=2, H=6, W=5, extra=(7,)),
               "grouped_ungated": dict(seed=10, B=1, Ci=2, Co=2, H=6, W=5, groups=2, scale=False, gate=False,
                                       in_active=False),
               "bf16": dict(seed=9, B=1, Ci=2, Co=2, H=6, W=5, cast=torch.bfloat16)}
    LARGE = {"ci24_co40": dict(seed=14, B=2, Ci=24, Co=40, H=20, W=19, D=3, k=(3, 3), pre=(9, 1, 4))}
    LARGE_KWARGS = dict(max_elems=100_000)

    @pytest.mark.parametrize("dtype,chunk", _DTYPE_CHUNK)
    def test_matches_reference(self, cfg, dtype, chunk, device):
        case = make_case(list(CONFIGS).index(cfg), dtype=dtype, **CONFIGS[cfg])
        expected = reference64(case)
        with nan_filled_outputs():
            out = self.run(to(case, device), CHUNKS[chunk])
        assert out.device.type == device
        assert_rel_close(out, expected, dtype)
        assert (expected != 0).any()

    def check_large(self, case, out):
        # bfloat16 on the tensor cores
        low = to(case, "cuda", torch.bfloat16)
        err = rel_err(self.run(low), getattr(ref, self.OP)(**to(low, "cpu")).double())
        assert err <= LOW_TOL[torch.bfloat16], err

    @pytest.mark.parametrize("cfg", ["basic", "stride2_pre3", "dilation2_jump2", "grouped_asym"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
    def test_low_precision(self, cfg, dtype, device):
        """16-bit patches: the result has the patch dtype and agrees with the reference twin on the
        same 16-bit inputs to a few units of roundoff; it is far from what a wrong op would give."""
        case = to(make_case(list(CONFIGS).index(cfg), dtype=torch.float32, **CONFIGS[cfg]), dtype=dtype)
        want = getattr(ref, self.OP)(**to(case, "cpu")).double()
        with nan_filled_outputs():
            out = self.run(to(case, device))
        assert out.dtype == dtype and not out.isnan().any()
        err = rel_err(out, want)
        assert err <= LOW_TOL[dtype], f"relative error {err:.3e} > {LOW_TOL[dtype]:.1e}"
        # ... and to float32 arithmetic on the same inputs within the rounding of the weights too
        exact = reference64(to(case, dtype=torch.float64))
        assert rel_err(out, exact) <= 2 * LOW_TOL[dtype]
        # the check can fail: a result with one output channel dropped is far off
        bad = out.clone()
        bad[:, -1] = 0
        assert rel_err(bad, want) > 10 * LOW_TOL[dtype]

    def test_equals_conv_li(self, device):
        """The two formulations agree (float64) on a case with every feature switched on."""
        case = to(make_case(20, B=3, Ci=5, Co=7, H=11, W=10, s=(2, 1), p=(1, 1), pre=(3, 1, 1)), device)
        assert rel_err(self.run(case, 500), ops.conv_li(**case)) <= 1e-13

    def test_gated_outputs_are_exact_zeros(self, device):
        """Where gate * scale == 0 the output is exactly zero, even when the inputs hold NaN (the
        GEMM multiplies everything, then zeroes)."""
        case = make_case(3)
        nan_in = case["patches"].clone()
        nan_in[0, 1, 2, 2] = float("nan")
        case["in_active"][0, 1, 2, 2] = True
        out = self.run(to(dict(case, patches=nan_in), device)).cpu()
        off = (case["gate"] * case["scale"].view(1, -1, 1, 1)) == 0
        assert off.any() and (~off).any()
        assert (out[off] == 0).all()
        assert out[~off].isnan().any()  # the NaN does reach the active outputs that use it

    def test_in_active_masks_inputs(self, device):
        """in_active=False marks a zero patch: the op zeroes it, so a non-zero (or NaN / inf) patch
        marked inactive contributes nothing."""
        case = make_case(4)
        full = self.run(to(case, device)).cpu()
        no_mask = self.run(to(dict(case, in_active=None), device)).cpu()
        assert rel_err(full, no_mask) <= 1e-12
        g = torch.Generator().manual_seed(5)
        dense = torch.randn(case["patches"].shape, generator=g, dtype=torch.float64)
        mask = torch.rand(case["in_active"].shape, generator=g) > 0.5
        dense[~mask] = float("inf")
        out = self.run(to(dict(case, patches=dense, in_active=mask), device)).cpu()
        expected = ref.conv_li(**dict(case, patches=torch.where(mask[..., None, None, None], dense, 0.0),
                                      in_active=None))
        assert_rel_close(out, expected, torch.float64)

    def test_reference_twin_checks_max_elems(self):
        with pytest.raises(ValueError, match=rf"{self.OP}: max_elems must be >= 0"):
            getattr(ref, self.OP)(**make_case(11, H=6, W=6), max_elems=-2)

    def test_fallback_uses_reference(self, monkeypatch):
        """Without the extension the wrapper uses the reference twin (with the one warning)."""
        monkeypatch.setattr(ops, "HAS_OPS", False)
        monkeypatch.setattr(ops, "_warned", False)
        case = make_case(15, B=1)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            a = self.run(case, max_elems=5)
        assert any("falls back" in str(w.message) for w in rec)
        assert torch.equal(a, ref.conv_li(**case))


class TestConvLiGemm(GemmTests):
    OP = "conv_li_gemm"
