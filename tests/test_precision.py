"""Precision options: 16-bit storage in every op, the ``precision`` / ``conv_algorithm``
options of the engine, and the errors they cost.

* Ops: bfloat16 / float16 patches in every compiled op (CPU, CUDA) against the reference twins on
  the same 16-bit inputs (both compute in float32 and round the result once: they agree to
  the rounding of the result); routing ops are exact copies; ``li_stats`` returns float32.
* Engine: ``precision="bf16"`` / ``"fp16"`` results (images, statistics, filter images) close to
  the float32 scan, within tolerances set from the measured errors (``benchmarks/NOTES.md``,
  ``benchmarks/bench_precision.py``), and a deliberately perturbed model is caught by the same
  check; ``conv_algorithm="gemm"`` equals ``"direct"`` (1e-10 float64, 1e-5 float32) on every
  test model; explicit ``"fp32"`` / ``"fp64"`` equal the default bit for bit; bad options raise
  ``ValueError`` naming the option and the allowed values; every result records the precision
  and conv algorithm that ran.
* CUDA (``needs_cuda``): the same on the GPU, with the tensor-core GEMMs (bf16 / fp16 / tf32).
"""
from __future__ import annotations

import math

import pytest
import torch

import nns_cuda as nns
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref
from nns_cuda.ops.reference.stats import STAT_NAMES

import test_filter_fold as T_fold
import test_li_stats as T_stats
import test_linear_li as T_lin
import test_maxpool_li as T_pool
import test_place_li as T_place
from _models import make
from conftest import cpu_and_cuda, nan_filled_outputs, needs_cuda, rel_err
from test_conv_li import make_case as conv_case
from test_engine import MODELS, _leaf_layers

LOW = [torch.bfloat16, torch.float16]
LOW_IDS = ["bf16", "f16"]
#: unit roundoff of the 16-bit formats
U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _low(case, dtype, keys):
    """The float32 case with the listed tensors (the stored images) in ``dtype``."""
    return {k: (v.to(dtype) if k in keys and isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _dev(case, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


# ------------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_ops_accept_16bit_patches(dtype, device):
    """Every op takes 16-bit images, returns them in that dtype (li_stats: float32) and agrees
    with its reference twin on the same inputs to the rounding of the result (2u of the largest
    entry; the float32 sums differ only in their order)."""
    tol = 2 * U[dtype]
    cases = {
        "conv_li": (ops.conv_li, ref.conv_li, _low(conv_case(30, dtype=torch.float32), dtype, ["patches"])),
        "conv_li_grouped": (ops.conv_li, ref.conv_li,
                            _low(conv_case(31, Ci=4, Co=4, groups=4, dtype=torch.float32), dtype, ["patches"])),
        "linear_li": (ops.linear_li, ref.linear_li, _low(T_lin.make_case(32, dtype=torch.float32), dtype, ["dense"])),
        "filter_fold": (ops.filter_fold, ref.filter_fold,
                        _low(T_fold.make_case(33, dtype=torch.float32), dtype, ["patches"])),
    }
    for name, (op, twin, case) in cases.items():
        want = twin(**case)
        with nan_filled_outputs():
            got = op(**_dev(case, device))
        assert got.dtype == dtype and want.dtype == dtype, name
        assert not got.isnan().any(), name
        err = rel_err(got, want)
        assert err <= tol, f"{name}: {err:.2e} > {tol:.1e}"
        # far from the float32 result of a *different* computation: zero one output slice
        bad = want.clone().double()
        bad[0] = 0
        assert rel_err(bad, want) > 10 * tol, name


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_routing_ops_copy_16bit_exactly(dtype, device):
    """maxpool_li / place_li only move values (place_li adds ``accumulate``, rounded once like
    torch's own 16-bit ``+``): bit-identical to the reference."""
    pc = _low(T_pool.make_case(34, dtype=torch.float32), dtype, ["patches"])
    with nan_filled_outputs():
        got = ops.maxpool_li(**_dev(pc, device))
    assert got.dtype == dtype and torch.equal(got.cpu(), ref.maxpool_li(**pc))
    for acc in (False, True):
        qc = _low(T_place.make_case(35, accumulate=acc, dtype=torch.float32), dtype, ["patches", "accumulate"])
        with nan_filled_outputs():
            got = ops.place_li(**_dev(qc, device))
        assert got.dtype == dtype and torch.equal(got.cpu(), ref.place_li(**qc))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_li_stats_16bit_returns_float32(dtype, device):
    """Statistics of 16-bit patches are float32 (x and fg are not rounded): equal to the
    reference twin's float32 sums of the same patches to float32 rounding."""
    case = _low(T_stats.make_case(36, dtype=torch.float32), dtype, ["patches"])
    want = ref.li_stats(**case)
    got = ops.li_stats(**_dev(case, device))
    assert got.dtype == torch.float32 and want.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5
    # float32 / float64 patches keep returning their own dtype
    for dt in (torch.float32, torch.float64):
        assert ops.li_stats(**_dev(T_stats.make_case(36, dtype=dt), device)).dtype == dt


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_ops_opcheck_16bit(device):
    """The fake kernels agree with the compiled ones for 16-bit patches (li_stats: float32)."""
    c = _dev(_low(T_stats.make_case(37, B=1, C=2, H=6, W=5, dtype=torch.float32), torch.bfloat16, ["patches"]),
             device)
    torch.library.opcheck(torch.ops.nns_cuda.li_stats, tuple(c.values()))
    c = _dev(_low(conv_case(38, B=1, Ci=2, Co=2, H=6, W=5, dtype=torch.float32), torch.float16, ["patches"]), device)
    torch.library.opcheck(torch.ops.nns_cuda.conv_li, tuple(c.values()))


# ------------------------------------------------------------------------------ engine helpers
def _scan(model, x, precision="auto", conv_algorithm="auto", **kw):
    names = [n for n, _ in _leaf_layers(model)]
    H, W = x.shape[-2:]
    fg = torch.zeros(x.shape[0], H, W, dtype=torch.bool, device=x.device)
    fg[:, H // 4: 3 * H // 4, W // 4: 3 * W // 4] = True
    kw = dict(dict(keep_images=True, stats=True, filter_images=True, strategy="forward"), **kw)
    return nns.Scanner(model, names, precision=precision, conv_algorithm=conv_algorithm, **kw).scan(x, fg)


def _frob(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


#: statistics that depend only on *which* entries are non-zero: 16-bit storage moves them more
#: than its unit roundoff (float16 flushes tiny values to zero; a sum that cancels exactly in 16
#: bits but not in float32 becomes a zero), see benchmarks/NOTES.md
COUNT_STATS = ("nz_fg", "nz_bg", "fg_xnz_sum", "fg_xnz_sq_sum")
VALUE_COLS = [i for i, n in enumerate(STAT_NAMES) if n not in COUNT_STATS]
COUNT_COLS = [i for i, n in enumerate(STAT_NAMES) if n in COUNT_STATS]


def _errors(res, want):
    """Largest over layers of: images / filter images (relative Frobenius), value statistics and
    count statistics (per column max |s - s_ref| / max |s_ref|)."""
    e = {"img": 0.0, "filt": 0.0, "stat_val": 0.0, "stat_cnt": 0.0}
    for n in want:
        e["img"] = max(e["img"], _frob(res[n].images, want[n].images))
        if want[n].filter_images is not None:
            e["filt"] = max(e["filt"], _frob(res[n].filter_images, want[n].filter_images))
        s, w = res[n].stats.double().cpu().flatten(0, -2), want[n].stats.double().cpu().flatten(0, -2)
        col = (s - w).abs().amax(0) / w.abs().amax(0).clamp_min(1e-300)
        col = torch.where(w.abs().amax(0) == 0, (s - w).abs().amax(0), col)
        e["stat_val"] = max(e["stat_val"], float(col[VALUE_COLS].max()))
        e["stat_cnt"] = max(e["stat_cnt"], float(col[COUNT_COLS].max()))
    return e


# Tolerances from the measured errors (CPU; benchmarks/bench_precision.py, benchmarks/NOTES.md):
# bf16 storage, images / filter images 3.2e-3 .. 6.3e-3 (direct) and up to 8.7e-3 (gemm, whose
# weights are rounded too) on the thesis CNN and the 13 ReLU layers of VGG-16, value statistics
# up to 1.1e-2; float16 4e-4 .. 1.0e-3. On these test models (CPU, this file's _errors) bf16
# measured images <= 6.5e-3, value statistics <= 1.0e-2, fp16 <= 1.2e-3 / 1.1e-3. The bounds
# are about 2x the largest measurement; a 2 % error in one layer's weights is far outside them
# (test_precision_check_catches_a_wrong_model). Count statistics moved by up to 4.4e-2 (bf16,
# LeNet-5) and 2.7e-1 (fp16, small ResNet): only a gross error bound is checked for them.
TOL_LOW = {"bf16": 1.5e-2, "fp16": 3e-3}
TOL_STAT = {"bf16": 2e-2, "fp16": 3e-3}
LOW_MODELS = ["simple_cnn", "small_resnet", "lenet5"]


@pytest.fixture(scope="module")
def fp32_scans():
    out = {}
    for mn in LOW_MODELS:
        model, x = make(mn, torch.float32)
        out[mn] = (model, x, _scan(model, x))
    return out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("model_name", LOW_MODELS)
def test_low_precision_close_to_fp32(model_name, precision, fp32_scans):
    model, x, want = fp32_scans[model_name]
    for algo in ("direct", "gemm", "gather"):
        res = _scan(model, x, precision, algo)
        assert res.precision == precision and res.conv_algorithm == algo
        for n in want:
            assert res[n].stats.dtype == torch.float32 and res[n].images.dtype == torch.float32
            assert res[n].precision == precision and res[n].conv_algorithm == algo
        e = _errors(res, want)
        tol = TOL_LOW[precision]
        assert e["img"] <= tol and e["filt"] <= tol and e["stat_val"] <= TOL_STAT[precision], (algo, e)
        assert e["img"] > 0  # 16-bit storage did happen
        if precision == "bf16":
            assert e["stat_cnt"] <= 0.1, (algo, e)


def test_precision_check_catches_a_wrong_model(fp32_scans):
    """The tolerances of the 16-bit checks are tight enough to fail: results 2.5 % too large in
    one layer only (images, filter images, sums) fail the bf16 bounds, 0.5 % the fp16 ones;
    the float32 scan of a model whose first conv weights are off by 2 % (one draw per weight)
    is far outside."""
    model, x, want = fp32_scans["simple_cnn"]
    last = list(want)[-1]
    for p, f in (("bf16", 1.025), ("fp16", 1.005)):
        off = dict(want.layers)
        lr = want[last]
        s = lr.stats.clone()
        s[..., VALUE_COLS] *= f
        off[last] = nns.LayerResult(lr.name, lr.activations, lr.gates, s, lr.filter_images * f, lr.images * f)
        e = _errors(off, want)
        assert e["img"] > TOL_LOW[p] and e["filt"] > TOL_LOW[p] and e["stat_val"] > TOL_STAT[p], (p, e)
    wrong, _ = make("simple_cnn", torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wrong[0].weight.mul_(1 + 0.02 * torch.randn(wrong[0].weight.shape, generator=g))
    e = _errors(_scan(wrong, x), want)
    assert e["img"] > 2 * TOL_LOW["bf16"] and e["stat_val"] > 2 * TOL_STAT["bf16"], e


@pytest.mark.parametrize("algo", ["gemm", "gather"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("model_name", MODELS)
def test_gemm_equals_direct(model_name, dtype, algo):
    """Both GEMM algorithms equal the direct kernels; each convolution records the op it ran."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    model, x = make(model_name, dtype)
    d = _scan(model, x, conv_algorithm="direct")
    g = _scan(model, x, conv_algorithm=algo)
    assert g.conv_algorithm == algo and d.conv_algorithm == "direct"
    assert set(d.conv_algorithms.values()) <= {"direct"} and set(d.conv_algorithms) == set(g.conv_algorithms)
    if any(isinstance(m, torch.nn.Conv2d) and m.groups == 1 for m in model.modules()):
        assert algo in g.conv_algorithms.values()
    for n in d:
        assert g[n].images.dtype == dtype
        assert rel_err(g[n].images, d[n].images) <= tol, n
        assert rel_err(g[n].stats, d[n].stats) <= tol, n
        if d[n].filter_images is not None:
            assert rel_err(g[n].filter_images, d[n].filter_images) <= tol, n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_explicit_precision_is_the_default_bit_for_bit(dtype):
    model, x = make("small_resnet", dtype)
    name = {torch.float64: "fp64", torch.float32: "fp32"}[dtype]
    a = _scan(model, x)
    b = _scan(model, x, name, "direct")
    assert a.precision == b.precision == name and a.conv_algorithm == b.conv_algorithm == "direct"
    for n in a:
        for attr in ("images", "stats", "filter_images"):
            va, vb = getattr(a[n], attr), getattr(b[n], attr)
            assert (va is None and vb is None) or torch.equal(va, vb), (n, attr)


def test_fp64_storage_of_a_float32_model():
    """precision="fp64" on a float32 model: images in float64, closer to the float64 oracle than
    the float32 scan (same gates)."""
    m64, x64 = make("simple_cnn", torch.float64)
    m32, x32 = make("simple_cnn", torch.float32)
    want = _scan(m64, x64)
    r32, r64 = _scan(m32, x32), _scan(m32, x32, "fp64")
    n = list(want)[-1]
    assert r64[n].images.dtype == torch.float64 and r64.precision == "fp64"
    assert _frob(r64[n].images, want[n].images) < _frob(r32[n].images, want[n].images)


def test_records_precision_and_algorithm():
    model, x = make("simple_cnn", torch.float32)
    res = nns.Scanner(model, ["4"]).scan(x)
    assert (res.precision, res.conv_algorithm) == ("fp32", "direct")
    assert (res["4"].precision, res["4"].conv_algorithm) == ("fp32", "direct")
    res = nns.Scanner(model.double(), ["4"]).scan(x.double())
    assert res.precision == "fp64"
    res = nns.Scanner(model.float(), ["4"], strategy="reverse").scan(x)
    assert (res.precision, res.conv_algorithm, res.backend) == ("fp32", "autograd", "autograd")
    from nns_cuda.engine.memory import forward_bytes_per_sample

    g = nns.build_graph(model, x[:1])
    per = forward_bytes_per_sample(g, g.resolve("4").idx, torch.bfloat16)
    res = nns.Scanner(model, ["4"], precision="bf16", max_memory=per + 1).scan(x)  # one sample per chunk
    assert (res.precision, res.conv_algorithm) == ("bf16", "direct") and res["4"].stats.shape[0] == 2
    assert (res["4"].precision, res["4"].conv_algorithm) == ("bf16", "direct")


def test_functional_helpers_take_the_options():
    model, x = make("simple_cnn", torch.float32)
    want = nns.learned_images(model, x, "4")
    got = nns.learned_images(model, x, "4", precision="bf16", conv_algorithm="gemm")
    assert got.dtype == torch.float32 and 0 < _frob(got, want) <= TOL_LOW["bf16"]
    # a few neurons: "auto" would pick the reverse strategy, but only the forward one has bf16
    few = nns.learned_images(model, x, "4", neurons=[(0, 1, 1)], precision="bf16")
    assert few.dtype == torch.float32 and _frob(few[:, 0], want[:, 0, 1, 1]) <= TOL_LOW["bf16"]
    f = nns.filter_images(model, x, "4", precision="fp16")
    assert f.dtype == torch.float32 and _frob(f, nns.filter_images(model, x, "4")) <= TOL_LOW["fp16"]
    li = nns.layer_image(model, x, "4", precision="bf16", conv_algorithm="gemm")
    assert _frob(li, nns.layer_image(model, x, "4")) <= TOL_LOW["bf16"]


def test_fp16_overflow_raises():
    """float16 ends at 65504: learned images beyond it raise instead of returning inf / NaN."""
    model, x = make("simple_cnn", torch.float32)
    with torch.no_grad():
        model[0].weight.mul_(1e3)
        model[3].weight.mul_(1e3)
    with pytest.raises(FloatingPointError, match=r"precision='fp16'.*overflowed float16.*use precision='bf16'"):
        nns.Scanner(model, ["4"], precision="fp16").scan(x * 100)
    res = nns.Scanner(model, ["4"], precision="bf16").scan(x * 100)  # bfloat16 has float32's range
    assert torch.isfinite(res["4"].stats).all()


def test_bad_options():
    model, x = make("simple_cnn", torch.float32)
    allowed_p = r"\('auto', 'fp32', 'fp64', 'tf32', 'bf16', 'fp16'\)"
    with pytest.raises(ValueError, match=rf"precision must be one of {allowed_p}, got 'bf17'"):
        nns.Scanner(model, precision="bf17")
    with pytest.raises(ValueError, match=r"conv_algorithm must be one of \('auto', 'direct', 'gemm', 'gather', 'implicit'\), got 'winograd'"):
        nns.Scanner(model, conv_algorithm="winograd")
    with pytest.raises(ValueError, match=r"precision='tf32' runs the convolutions as TF32 GEMMs.*got 'direct'"):
        nns.Scanner(model, precision="tf32", conv_algorithm="direct")
    with pytest.raises(ValueError, match=r"precision='tf32' exists only on CUDA.*on cpu"):
        nns.Scanner(model, ["4"], precision="tf32").scan(x)
    with pytest.raises(ValueError, match=r"precision='tf32' exists only on CUDA"):
        nns.learned_images(model, x, "4", precision="tf32")
    with pytest.raises(ValueError, match=r"precision='bf16' needs the forward strategy.*torch.float32"):
        nns.Scanner(model, ["4"], precision="bf16", strategy="reverse").scan(x)
    with pytest.raises(ValueError, match=rf"precision must be one of {allowed_p}, got 'half'"):
        nns.filter_images(model, x, "4", precision="half")
    with pytest.raises(ValueError, match=r"conv_algorithm must be one of"):
        nns.learned_images(model, x, "4", conv_algorithm="fft")


# ------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16", "tf32"])
@pytest.mark.parametrize("model_name", ["simple_cnn", "small_resnet"])
def test_cuda_low_precision_close_to_fp32(model_name, precision):
    """On the GPU "auto" runs the gather GEMMs (tensor cores for these precisions); TF32 rounds
    the float32 operands to 10 mantissa bits (u = 2^-11, like float16)."""
    model, x = make(model_name, torch.float32)
    m, xc = model.cuda(), x.cuda()
    want = _scan(m, xc, "fp32")
    res = _scan(m, xc, precision)
    assert res.precision == precision and res.conv_algorithm == "gather"
    assert "gather" in res.conv_algorithms.values()
    e = _errors(res, want)
    p = "fp16" if precision == "tf32" else precision
    assert e["img"] <= TOL_LOW[p] and e["filt"] <= TOL_LOW[p] and e["stat_val"] <= TOL_STAT[p], e
    assert e["img"] > 1e-6  # the reduced precision did happen
    direct = _scan(m, xc, precision if precision != "tf32" else "fp32", "direct")
    assert direct.conv_algorithm == "direct"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("algo", ["gemm", "gather"])
@pytest.mark.parametrize("model_name", ["simple_cnn", "small_resnet", "alexnet_like"])
def test_cuda_gemm_equals_direct(model_name, dtype, algo):
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[dtype]
    model, x = make(model_name, dtype)
    m, xc = model.cuda(), x.cuda()
    d = _scan(m, xc, "fp64" if dtype == torch.float64 else "fp32", "direct")
    g = _scan(m, xc, "fp64" if dtype == torch.float64 else "fp32", algo)
    assert algo in g.conv_algorithms.values()
    for n in d:
        assert rel_err(g[n].images, d[n].images) <= tol, n
        assert rel_err(g[n].stats, d[n].stats) <= tol, n


@needs_cuda
def test_cuda_fp32_turns_tf32_off_and_restores():
    model, x = make("simple_cnn", torch.float32)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        m, xc = model.cuda(), x.cuda()
        d = _scan(m, xc, "fp32", "direct")
        for algo in ("gemm", "gather"):
            g = _scan(m, xc, "fp32", algo)  # TF32 off inside the scan: float32 accuracy
            for n in d:
                assert rel_err(g[n].images, d[n].images) <= 1e-5, (algo, n)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
