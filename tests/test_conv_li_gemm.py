"""conv_li_gemm (the dense im2col-window GEMM formulation of conv_li) against the reference.

The tests take the op's name from the ``op_name`` fixture: ``tests/test_conv_li_gather.py``
imports them and runs them again for ``conv_li_gather`` (same arguments, same contract).

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

from conftest import (TOL, assert_rel_close, cpu_and_cuda, expect_op_error, nan_filled_outputs, needs_cuda,
                      rel_err)
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref
from test_conv_li import BAD as CONV_BAD
from test_conv_li import CONFIGS, make_case, noncontiguous_case, reference64, to

pytestmark = pytest.mark.skipif(not ops.HAS_OPS, reason="nns_cuda._C not built")

DTYPES = [torch.float64, torch.float32]
#: chunk bounds (elements of the GEMM temporaries), chosen so that across the cases every chunking
#: path runs: all images at once (default), one image, several output rows, a tile of one row,
#: one output position
CHUNKS = {"default": 0, "image": 300_000, "rows": 60_000, "tile": 8_000, "position": 1}

# 16-bit storage: the op rounds the weights and the result to the patch dtype (unit roundoff u:
# 2^-8 bfloat16, 2^-11 float16); against the reference twin on the same 16-bit inputs the error
# is a few u of the largest output (max-norm relative error, conftest.rel_err).
LOW_TOL = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}


@pytest.fixture
def op_name():
    """The op under test; tests/test_conv_li_gather.py runs these tests again with its own."""
    return "conv_li_gemm"


def run(op_name, case, max_elems=0):
    return getattr(ops, op_name)(**case, max_elems=max_elems)


# every chunking path in float64; float32 with the default chunking (the dtype does not change
# the chunk logic)
_DTYPE_CHUNK = [pytest.param(torch.float64, c, id=f"f64-{c}") for c in CHUNKS] + \
    [pytest.param(torch.float32, "default", id="f32-default")]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype,chunk", _DTYPE_CHUNK)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_matches_reference(op_name, cfg, dtype, chunk, device):
    case = make_case(list(CONFIGS).index(cfg), dtype=dtype, **CONFIGS[cfg])
    expected = reference64(case)
    with nan_filled_outputs():
        out = run(op_name, to(case, device), CHUNKS[chunk])
    assert out.device.type == device
    assert_rel_close(out, expected, dtype)
    assert (expected != 0).any()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cfg", ["basic", "stride2_pre3", "dilation2_jump2", "grouped_asym"])
def test_low_precision(op_name, cfg, dtype, device):
    """16-bit patches: the result has the patch dtype and agrees with the reference twin on the
    same 16-bit inputs to a few units of roundoff; it is far from what a wrong op would give."""
    case = to(make_case(list(CONFIGS).index(cfg), dtype=torch.float32, **CONFIGS[cfg]), dtype=dtype)
    want = getattr(ref, op_name)(**to(case, "cpu")).double()
    with nan_filled_outputs():
        out = run(op_name, to(case, device))
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


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_equals_conv_li(op_name, device):
    """The two formulations agree (float64) on a case with every feature switched on."""
    case = to(make_case(20, B=3, Ci=5, Co=7, H=11, W=10, s=(2, 1), p=(1, 1), pre=(3, 1, 1)), device)
    assert rel_err(run(op_name, case, 500), ops.conv_li(**case)) <= 1e-13


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_gated_outputs_are_exact_zeros(op_name, device):
    """Where gate * scale == 0 the output is exactly zero, even when the inputs hold NaN (the
    GEMM multiplies everything, then zeroes)."""
    case = make_case(3)
    nan_in = case["patches"].clone()
    nan_in[0, 1, 2, 2] = float("nan")
    case["in_active"][0, 1, 2, 2] = True
    out = run(op_name, to(dict(case, patches=nan_in), device)).cpu()
    off = (case["gate"] * case["scale"].view(1, -1, 1, 1)) == 0
    assert off.any() and (~off).any()
    assert (out[off] == 0).all()
    assert out[~off].isnan().any()  # the NaN does reach the active outputs that use it


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_in_active_masks_inputs(op_name, device):
    """in_active=False marks a zero patch: the op zeroes it, so a non-zero (or NaN / inf) patch
    marked inactive contributes nothing."""
    case = make_case(4)
    full = run(op_name, to(case, device)).cpu()
    no_mask = run(op_name, to(dict(case, in_active=None), device)).cpu()
    assert rel_err(full, no_mask) <= 1e-12
    g = torch.Generator().manual_seed(5)
    dense = torch.randn(case["patches"].shape, generator=g, dtype=torch.float64)
    mask = torch.rand(case["in_active"].shape, generator=g) > 0.5
    dense[~mask] = float("inf")
    out = run(op_name, to(dict(case, patches=dense, in_active=mask), device)).cpu()
    expected = ref.conv_li(**dict(case, patches=torch.where(mask[..., None, None, None], dense, 0.0),
                                  in_active=None))
    assert_rel_close(out, expected, torch.float64)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_noncontiguous(op_name, dtype, device):
    case = make_case(6, dtype=dtype, groups=2, s=(2, 1), pre=(3, 1, 1))
    expected = reference64(case)
    with nan_filled_outputs():
        out = run(op_name, noncontiguous_case(case, device), 300)
    assert_rel_close(out, expected, dtype)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_empty(op_name, device):
    case = to(make_case(8), device)
    out = run(op_name, dict(case, patches=case["patches"][:0], in_active=case["in_active"][:0], gate=case["gate"][:0]))
    assert out.shape[0] == 0 and out.shape[1:] == (6, len(case["ay_out"]), len(case["ax_out"]), 2,
                                                   case["rh_out"], case["rw_out"])
    assert run(op_name, to(make_case(8, Co=0, scale=False, gate=False), device)).shape[1] == 0
    # no input channels: an empty sum, all zeros
    c0 = to(make_case(8, Ci=0, scale=False, gate=False, in_active=False), device)
    z = run(op_name, c0)
    assert z.shape[1] == 6 and (z == 0).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(op_name, device):
    case = to(make_case(9, B=1, Ci=2, Co=2, H=6, W=5), device)
    torch.library.opcheck(getattr(torch.ops.nns_cuda, op_name), tuple(case.values()))
    torch.library.opcheck(getattr(torch.ops.nns_cuda, op_name), tuple(case.values()) + (7,))
    case = to(make_case(10, B=1, Ci=2, Co=2, H=6, W=5, groups=2, scale=False, gate=False, in_active=False), device)
    torch.library.opcheck(getattr(torch.ops.nns_cuda, op_name), tuple(case.values()))
    lowc = to(make_case(9, B=1, Ci=2, Co=2, H=6, W=5), device, torch.bfloat16)
    torch.library.opcheck(getattr(torch.ops.nns_cuda, op_name), tuple(lowc.values()))


def _bad_cases():
    # the conv_li argument errors, named after the op under test ("OP:"), plus max_elems
    out = [(name, change, exc, pattern.replace("conv_li:", "OP:"))
           for name, change, exc, pattern in CONV_BAD]
    out.append(("max_elems_neg", dict(max_elems=-1), ValueError,
                r"OP: max_elems must be >= 0 \(0: default\), got -1"))
    return out


BAD = _bad_cases()


@pytest.mark.parametrize("mode", ["cpu", "fake"])
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(op_name, bad, mode):
    _, change, exc, pattern = bad
    args = dict(make_case(11, H=6, W=6), max_elems=0)
    args.update(change)
    expect_op_error(getattr(torch.ops.nns_cuda, op_name), args, exc, pattern.replace("OP:", f"{op_name}:"), mode)


def test_reference_twin_checks_max_elems(op_name):
    with pytest.raises(ValueError, match=rf"{op_name}: max_elems must be >= 0"):
        getattr(ref, op_name)(**make_case(11, H=6, W=6), max_elems=-2)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_window_must_fit(op_name, device):
    c = make_case(12)
    for key, shift in (("ay_out", 1), ("ax_out", -1)):
        bad = dict(c, **{key: c[key] + shift})
        with pytest.raises(ValueError, match=rf"{op_name}: an input window does not fit inside its output window"):
            run(op_name, to(bad, device))


def test_fallback_uses_reference(op_name, monkeypatch):
    """Without the extension the wrapper uses the reference twin (with the one warning)."""
    monkeypatch.setattr(ops, "HAS_OPS", False)
    monkeypatch.setattr(ops, "_warned", False)
    case = make_case(15, B=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = getattr(ops, op_name)(**case, max_elems=5)
    assert any("falls back" in str(w.message) for w in rec)
    assert torch.equal(a, ref.conv_li(**case))


@needs_cuda
def test_cuda_device_mismatch(op_name):
    c = to(make_case(13), "cuda")
    for key in ("weight", "ay_in", "in_active", "scale", "gate"):
        with pytest.raises(ValueError, match=rf"{op_name}: {key} must be on the same device as patches \(cuda:0\), got cpu"):
            run(op_name, dict(c, **{key: c[key].cpu()}))


@needs_cuda
def test_cuda_tf32_switch(op_name):
    """float32 obeys torch.backends.cuda.matmul.allow_tf32: off, float32 accuracy; on, the
    TF32 rounding of the operands (unit roundoff 2^-11) shows, but stays small."""
    case = make_case(14, B=2, Ci=32, Co=16, H=12, W=12, D=3, pre=(5, 1, 2), dtype=torch.float32)
    expected = reference64(case)
    cc = to(case, "cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        e_fp32 = rel_err(run(op_name, cc), expected)
        torch.backends.cuda.matmul.allow_tf32 = True
        e_tf32 = rel_err(run(op_name, cc), expected)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert e_fp32 <= TOL[torch.float32], e_fp32
    assert TOL[torch.float32] < e_tf32 <= 1e-2, e_tf32


@needs_cuda
def test_cuda_large(op_name):
    """More input channels and output positions than one chunk; bf16 on the tensor cores."""
    case = make_case(14, B=2, Ci=24, Co=40, H=20, W=19, D=3, k=(3, 3), pre=(9, 1, 4))
    expected = reference64(case)
    with nan_filled_outputs():
        out = run(op_name, to(case, "cuda"), 100_000)
    assert_rel_close(out, expected, torch.float64)
    low = to(case, "cuda", torch.bfloat16)
    err = rel_err(run(op_name, low), getattr(ref, op_name)(**to(low, "cpu")).double())
    assert err <= LOW_TOL[torch.bfloat16], err
