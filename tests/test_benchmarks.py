"""The benchmark harness: the gated FLOP / byte floor against a brute-force count, and a
smoke run of ``benchmarks.run.main`` on a tiny workload (JSON schema, correctness checked before
timing, a wrong method detected)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_baselines, common  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402


# ----------------------------------------------------------------------------- floor vs brute force
class _Tiny(nn.Module):
    """conv+ReLU (gated at the conv), max-pool, strided conv+BN+ReLU (ungated conv), conv
    with a kernel that runs past the image (clipped windows) + ReLU."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.r1 = nn.ReLU()
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.r2 = nn.ReLU()
        self.c3 = nn.Conv2d(4, 2, 2, padding=1)
        self.r3 = nn.ReLU()

    def forward(self, x):
        return self.r3(self.c3(self.r2(self.b2(self.c2(self.p1(self.r1(self.c1(x))))))))


# (name, kernel, stride, padding) of the spatial layers in order; pools pass activity of the
# arg-max input, convs are counted
_LAYERS = [("c1", 3, 1, 1), ("p1", 2, 2, 0), ("c2", 3, 2, 1), ("c3", 2, 1, 1)]


def _jacobian_active(model: nn.Module, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Where the learned image of each output neuron of ``module`` is non-zero, by autograd:
    row b, neuron n is active iff ∂out[b, n]/∂x[b] ⊙ x[b] has a non-zero entry."""
    store = {}
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("o", o))
    try:
        def f(inp):
            model(inp)
            return store["o"]
        J = torch.autograd.functional.jacobian(f, x, vectorize=True)   # [B, *out, B, *in]
    finally:
        h.remove()
    B = x.shape[0]
    out_shape = J.shape[1: J.dim() - x.dim()]
    Jr = J.reshape(B, -1, B, x[0].numel())
    own = torch.stack([Jr[b, :, b] for b in range(B)])      # [B, N, P]
    return ((own * x.reshape(B, 1, -1)) != 0).any(-1).reshape(B, *out_shape)


def _brute_force(model: _Tiny, x: torch.Tensor):
    B, D, H, W = x.shape
    # receptive fields (own recursion): R, J per layer, clipped to the image
    R, J, win = 1, 1, {"x": D * 1}
    for name, k, s, p in _LAYERS:
        R, J = R + (k - 1) * J, J * s
        win[name] = D * min(R, H) * min(R, W)
    # activity of the node each layer reads, and of each layer's output as stored
    act_in = {
        "c1": x != 0,
        "p1": _jacobian_active(model, x, model.r1),           # conv1 is gated by its ReLU
        "c2": _jacobian_active(model, x, model.p1),
        "c3": _jacobian_active(model, x, model.r2),
    }
    act_out = {
        "c1": _jacobian_active(model, x, model.r1),
        "p1": _jacobian_active(model, x, model.p1),
        "c2": _jacobian_active(model, x, model.c2),           # followed by BN: g_n = 1
        "c3": _jacobian_active(model, x, model.r3),
    }
    src_win = {"c1": win["x"], "p1": win["c1"], "c2": win["p1"], "c3": win["c2"]}
    flops, nbytes = {}, {}
    for name, k, s, p in _LAYERS:
        ai, ao = act_in[name], act_out[name]
        if name.startswith("p"):
            flops[name] = 0
            nbytes[name] = 4 * int(ao.sum()) * (src_win[name] + win[name])
            continue
        Ci, Hi, Wi = ai.shape[1:]
        Co, Ho, Wo = ao.shape[1:]
        al, ol = ai.tolist(), ao.tolist()
        pairs = 0
        for b in range(B):
            for o in range(Co):
                for y in range(Ho):
                    for xx in range(Wo):
                        if not ol[b][o][y][xx]:
                            continue
                        for i in range(Ci):
                            for ky in range(k):
                                for kx in range(k):
                                    yi, xi = y * s + ky - p, xx * s + kx - p
                                    if 0 <= yi < Hi and 0 <= xi < Wi and al[b][i][yi][xi]:
                                        pairs += 1
        flops[name] = 2 * src_win[name] * pairs
        nbytes[name] = 4 * (int(ai.sum()) * src_win[name] + int(ao.sum()) * win[name])
    return flops, nbytes


def test_count_floor_matches_brute_force():
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        model.b2.running_mean.normal_(0, 0.2)
        model.b2.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    want_flops, want_bytes = _brute_force(model, x)
    layers = ["c1", "c2", "c3"]
    fc = common.count_floor(model, x, layers)
    got = {n.name: n for n in fc.nodes}
    assert set(got) == {"c1", "p1", "c2", "c3"}
    for name in want_flops:
        assert got[name].flops == want_flops[name], name
        assert got[name].bytes_read + got[name].bytes_written == want_bytes[name], name
    n_req = 2 * (3 * 9 * 9 + 4 * 2 * 2 + 2 * 3 * 3)
    assert fc.neurons == n_req
    assert fc.flops == sum(want_flops.values())
    assert fc.bytes == sum(want_bytes.values()) + 4 * common.NUM_STATS * n_req
    # gating matters here: some conv-1 outputs are off, so the count is below the ungated one
    assert 0 < got["c1"].active_out < got["c1"].n_out
    # the floor time is the larger of the compute and the memory bound
    assert fc.time(1e9, 1e12) == pytest.approx(max(fc.flops / 1e9, fc.bytes / 1e12))
    assert fc.time(None, 1e12) is None


def test_baseline_stats_reduction_matches_reference_definition():
    """The baselines' on-the-fly reduction equals nns_cuda.ops.reference.stats.li_stats_dense."""
    torch.manual_seed(1)
    B, n, D, H, W = 2, 5, 3, 4, 5
    x = torch.randn(B, D, H, W, dtype=torch.float64)
    li = torch.randn(B, n, D, H, W, dtype=torch.float64) * (torch.rand(B, n, D, H, W) > 0.4)
    fg = torch.rand(B, H, W) > 0.5
    got = bench_baselines._dense_li_stats(li, x, fg)
    want = common.li_stats_dense(li, x, fg)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # gated: statistics of g·T from those of T (ReLU gates 0/1 and a LeakyReLU slope)
    gate = torch.tensor([[1.0, 0.0, 0.1, 1.0, 0.0], [0.0, 1.0, 1.0, 0.1, 1.0]], dtype=torch.float64)
    P = D * H * W
    T = li.reshape(B, n, P).permute(2, 0, 1)
    xp = x.reshape(B, P).t()
    fgp = fg.double().unsqueeze(1).expand(B, D, H, W).reshape(B, P).t()
    got = bench_baselines._reduce_stats(T, gate, xp, fgp)
    want = common.li_stats_dense(li * gate.view(B, n, 1, 1, 1), x, fg)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- smoke run
_ROW_KEYS = {"workload", "task", "method", "precision", "device", "batch", "verified", "rel_err", "tol",
             "check_s", "checked_at", "timing_started_at", "times_s", "measured_s", "total_s", "s_per_image",
             "neurons_per_s", "gflops", "floor_s", "floor_fraction", "time_over_floor", "peak_bytes",
             "useful_flops", "useful_bytes", "notes", "error"}


def _run(tmp_path, *extra):
    out_json = tmp_path / "bench.json"
    out_md = tmp_path / "bench.md"
    rc = bench_run.main(["--quick", "--device", "cpu", "--json", str(out_json), "--markdown", str(out_md),
                         "--quiet", *extra])
    return rc, json.loads(out_json.read_text()), out_md.read_text()


def test_quick_smoke_json_schema(tmp_path, capsys):
    rc, doc, md = _run(tmp_path, "--workloads", "tiny", "--methods", "cpu,reference,dense,vjp,captum")
    assert rc == 0
    assert doc["schema"] == bench_run.SCHEMA
    for k in ("date", "torch", "torch_cuda", "commit", "device", "cpu", "python", "extension"):
        assert k in doc["env"], k
    assert doc["peaks"]["fp32_flops"] > 0 and doc["peaks"]["copy_bytes_per_s"] > 0
    w = doc["workloads"]["tiny"]
    assert w["neurons_per_image"] == sum(
        c * h * ww for c, h, ww in [(6, 12, 12), (12, 6, 6), (12, 3, 3), (12, 3, 3), (6, 1, 1)])
    ran = [r for r in doc["rows"] if not r.get("error")]
    methods = {r["method"] for r in ran}
    assert {"reference", "dense", "vjp"} <= methods
    for r in ran:
        missing = _ROW_KEYS - set(r)
        assert not missing, (r["method"], missing)
        # correctness first: checked (and right) before the timed runs began
        assert r["verified"] is True and r["rel_err"] <= 1e-4, r
        assert r["checked_at"] <= r["timing_started_at"]
        if r["method"] in ("reference", "dense", "cpu", "cuda"):  # full comparisons: components kept
            d = r["check_detail"]
            assert set(d) == {"values", "support", "flip_frac", "rel_err"} and d["rel_err"] == r["rel_err"]
        assert r["times_s"] and all(t > 0 for t in r["times_s"])
        assert r["s_per_image"] == pytest.approx(r["total_s"] / r["batch"])
        assert r["floor_s"] > 0 and r["time_over_floor"] == pytest.approx(r["total_s"] / r["floor_s"])
    for r in doc["rows"]:
        if r.get("error"):
            assert r["error"].startswith("skipped"), r["error"]
    sampled = [r for r in ran if r["method"] in ("vjp", "captum")]
    assert all(r["extrapolated"] and r["total_s"] > r["measured_s"] for r in sampled)
    # the markdown table is printed last
    printed = capsys.readouterr().out.rstrip()
    assert printed.endswith(md.rstrip())
    assert "| workload | method |" in md


def test_wrong_method_is_caught_before_timing(tmp_path, monkeypatch):
    real = bench_baselines._reduce_stats
    monkeypatch.setattr(bench_baselines, "_reduce_stats", lambda *a: real(*a) * 1.01)
    rc, doc, _ = _run(tmp_path, "--workloads", "tiny", "--methods", "dense")
    (row,) = [r for r in doc["rows"] if r["method"] == "dense"]
    assert row["verified"] is False and row["rel_err"] > 1e-3
    assert rc == 2


def test_bench_fq_streams_and_logs(tmp_path):
    """benchmarks.bench_fq (the data-set FQ run) on a tiny configuration: every sample
    counted, one log row per batch, memory fields present, JSON written."""
    import json

    from benchmarks import bench_fq

    out = tmp_path / "fq.json"
    assert bench_fq.main(["--images", "6", "--batch", "2", "--model", "simple_cnn", "--layers", "2",
                          "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_samples"] == 6 and len(res["log"]) == 3
    assert [r["images_before"] for r in res["log"]] == [0, 2, 4]
    assert res["neurons_per_image"] > 0 and res["seconds"] > 0
    assert res["peak_rss_gib"] >= res["log"][0]["rss_gib"] > 0
    assert res["config"]["layers"] and res["env"]["torch"]


def test_stats_errors_separates_support_flips_from_value_errors():
    """The benchmark's agreement measure: value columns relative to their maximum; an entry that
    is exactly 0 in one computation and not in the other counts as a support flip (a fraction of
    the non-zero entries), not as a relative error of the discontinuous count columns; a wrong
    value or a wrong fg_xnz column on neurons whose counts agree is still caught."""
    from benchmarks.common import stats_errors, stats_rel_err
    from nns_cuda.ops.reference.stats import STAT_INDEX

    gen = torch.Generator().manual_seed(0)
    want = torch.rand(1, 40, 11, generator=gen, dtype=torch.float64)
    want[..., STAT_INDEX["nz_fg"]] = 500.0
    want[..., STAT_INDEX["nz_bg"]] = 1500.0
    assert stats_errors(want.clone(), want)["rel_err"] == 0.0
    # one neuron loses one foreground entry (x = 0.84): counts and fg_xnz columns move
    got = want.clone()
    got[0, 3, STAT_INDEX["nz_fg"]] -= 1
    got[0, 3, STAT_INDEX["fg_xnz_sum"]] -= 0.84
    got[0, 3, STAT_INDEX["fg_xnz_sq_sum"]] -= 0.84**2
    e = stats_errors(got, want)
    assert e["flip_frac"] == pytest.approx(1 / (40 * 2000))
    assert e["support"] == 0.0 and e["values"] == 0.0 and e["rel_err"] < 1e-4
    # a wrong fg_xnz_sum on a neuron whose counts agree is an error
    bad = want.clone()
    bad[0, 5, STAT_INDEX["fg_xnz_sum"]] *= 1.01
    assert stats_rel_err(bad, want) > 1e-3
    # a wrong value column is an error; counts wrong everywhere are an error
    bad = want.clone()
    bad[0, 7, STAT_INDEX["sum"]] += 0.5
    assert stats_rel_err(bad, want) > 1e-2
    bad = want.clone()
    bad[..., STAT_INDEX["nz_bg"]] += 30
    assert stats_errors(bad, want)["flip_frac"] > 1e-2
    bad[0, 0, 0] = float("nan")
    assert stats_rel_err(bad, want) == float("inf")


# ----------------------------------------------------------------------------- conv algorithms
def test_algorithms_one_cpu_row_each(tmp_path):
    """``--algorithms direct,gather``: one cpu row per algorithm, recording what ran, both checked
    against the reference before timing, each with its own ratio against the one dense row;
    the baselines' rows are unchanged; the markdown and the device-check summary tell the
    algorithms apart."""
    from benchmarks import bench_summary

    rc, doc, md = _run(tmp_path, "--workloads", "tiny", "--methods", "cpu,dense", "--algorithms", "direct,gather")
    assert rc == 0
    assert doc["config"]["algorithms"] == ["direct", "gather"]
    cpu = [r for r in doc["rows"] if r["method"] == "cpu"]
    assert [r["requested_algorithm"] for r in cpu] == ["direct", "gather"]
    assert [r["conv_algorithm"] for r in cpu] == ["direct", "gather"]
    (dense,) = [r for r in doc["rows"] if r["method"] == "dense"]
    assert "requested_algorithm" not in dense and "conv_algorithm" not in dense
    for r in cpu:
        assert not r["error"], r["error"]
        missing = _ROW_KEYS - set(r)
        assert not missing, missing
        assert r["verified"] is True and r["rel_err"] <= 1e-4, r
        assert r["checked_at"] <= r["timing_started_at"]
        assert r["speedup_vs_dense"] == pytest.approx(dense["s_per_image"] / r["s_per_image"])
    assert "| cpu (direct) |" in md and "| cpu (gather) |" in md
    summary = "\n".join(bench_summary._bench(str(tmp_path / "bench.json")))
    assert "cpu (direct)" in summary and "cpu (gather)" in summary


def test_algorithms_auto_duplicate_recorded_as_skipped(tmp_path):
    """An explicit algorithm that ``auto`` already ran (same method and precision) is not run
    again: its row is kept, marked skipped; the other explicit algorithm runs."""
    rc, doc, md = _run(tmp_path, "--workloads", "tiny", "--methods", "cpu", "--algorithms", "gather,direct,auto")
    assert rc == 0
    rows = [r for r in doc["rows"] if r["method"] == "cpu"]
    assert [r["requested_algorithm"] for r in rows] == ["auto", "gather", "direct"]  # auto first
    auto = rows[0]
    assert not auto["error"] and auto["verified"] is True
    chosen = auto["conv_algorithm"]
    assert chosen in ("direct", "gather")
    for r in rows[1:]:
        if r["requested_algorithm"] == chosen:
            assert r["error"].startswith("skipped: same as auto") and r["conv_algorithm"] is None
        else:
            assert not r["error"] and r["conv_algorithm"] == r["requested_algorithm"] and r["verified"] is True
    assert f"| cpu (auto→{chosen}) |" in md


def test_algorithms_plan_and_options():
    """The plan (no CUDA needed): one engine triple per algorithm, tf32 + direct left out (and
    reported), the auto rows first, then the explicit ones; baselines and the reference once
    per precision; the option's parsing (default auto, unknown names refused, last one wins)."""
    from benchmarks.bench_scan import Options, algorithm_skip_reason, plan_methods

    opts = Options(device="cuda", methods=("reference", "dense", "cuda", "cpu"), precisions=("fp32", "tf32"),
                   algorithms=("gather", "auto", "direct", "gemm", "gather"), verbose=False)
    skipped: list = []
    plan = plan_methods(opts, not_planned=skipped)
    assert plan == [("cuda", "fp32", "auto"), ("cuda", "tf32", "auto"),
                    ("cuda", "fp32", "gather"), ("cuda", "fp32", "direct"), ("cuda", "fp32", "gemm"),
                    ("cuda", "tf32", "gather"), ("cuda", "tf32", "gemm"),
                    ("dense", "fp32", None), ("dense", "tf32", None), ("reference", "fp32", None)]
    assert [s[:3] for s in skipped] == [("cuda", "tf32", "direct")] and "tf32" in skipped[0][3]
    assert algorithm_skip_reason("fp32", "direct") is None and algorithm_skip_reason("tf32", "gather") is None
    # the default: one engine row per precision, as before the option
    cpu = Options(device="cpu", methods=("cpu", "dense", "vjp"), precisions=("fp32",), verbose=False)
    assert plan_methods(cpu) == [("cpu", "fp32", "auto"), ("dense", "fp32", None), ("vjp", "fp32", None)]

    def parse(*argv):
        return bench_run._options(bench_run.build_parser().parse_args(list(argv)), "cuda").algorithms

    assert parse() == ["auto"]
    assert parse("--algorithms", "direct,gather,direct") == ["direct", "gather"]
    assert parse("--algorithms", "auto,direct,gather,gemm", "--algorithms", "auto") == ["auto"]
    with pytest.raises(SystemExit):
        parse("--algorithms", "winograd")


def test_algorithms_rows_render_and_goals():
    """Several rows of one method and precision: each its own ratio against dense; the goals rate
    the engine's default (auto) row and, if another is faster, that one too (else only the
    fastest); the tables label every engine row."""
    from benchmarks.bench_scan import speedups

    def row(method, prec, s, req=None, ran=None):
        r = {"workload": "vgg16_32", "task": "stats", "method": method, "precision": prec, "device": "cuda",
             "batch": 4, "s_per_image": s, "error": None, "verified": True, "notes": [], "time_over_floor": 2.0}
        if req:
            r["requested_algorithm"], r["conv_algorithm"] = req, ran
        return r

    rows = [row("cuda", "fp32", 2e-3, "auto", "direct"), row("cuda", "fp32", 1e-3, "gather", "gather"),
            row("cuda", "tf32", 4e-4, "gemm", "gemm"), row("cuda", "tf32", 2e-4, "gather", "gather"),
            row("dense", "fp32", 0.1), row("dense", "tf32", 0.04)]
    speedups(rows)
    assert [r.get("speedup_vs_dense") for r in rows[:4]] == pytest.approx([50, 100, 100, 200])
    g = {x["goal"]: x["measured"] for x in bench_run.goals(rows, "cuda")}
    assert g["vgg16_32 cuda fp32 vs dense forward fp32"] == pytest.approx(50)            # the auto row
    assert g["vgg16_32 cuda (gather) fp32 vs dense forward fp32"] == pytest.approx(100)  # ... and the fastest
    assert g["vgg16_32 cuda (gather) tf32 vs dense forward tf32"] == pytest.approx(200)  # no auto: fastest
    assert "vgg16_32 cuda (gemm) tf32 vs dense forward tf32" not in g
    md = common.markdown_table(rows)
    for label in ("cuda (auto→direct)", "cuda (gather)", "cuda (gemm)", "dense"):
        assert f"| {label} |" in md
    # JSON of older runs (no algorithm keys) renders as before
    assert common.method_label({"method": "cuda"}) == "cuda"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton not installed")
def test_tune_implicit_smoke_under_the_triton_interpreter(tmp_path):
    """benchmarks/tune_implicit.py (run on the GPU by device_check.sh) on a tiny layer under
    Triton's CPU interpreter: every configuration it tries agrees with the gather and is timed."""
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune_implicit", "--device", "cpu", "--channels", "16",
                           "--grid", "4", "--image", "4", "--batch", "1", "--configs", "2", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [r["algorithm"] for r in rows] == ["gather", "implicit", "implicit"] * 2
    for r in rows:
        assert r.get("s", 0) > 0 and "error" not in r, r
        if r["algorithm"] == "implicit":
            assert r["max_rel_diff_vs_fp32_gather"] <= 1e-5, r
    assert doc["useful_flops"] > 0


def test_record_run_names_files_and_prints_the_section(tmp_path, capsys):
    """benchmarks/record_run.py on a device_check-like folder: the JSON copied under
    <date>_<card>_<commit> names, the RESULTS.md section with card, versions, commit, summary,
    table, goals; a run without a recorded commit says whose commit it names instead."""
    from benchmarks import record_run

    out = tmp_path / "out"
    out.mkdir()
    doc = json.loads(open(os.path.join(ROOT, "benchmarks", "results", "cpu_vgg16_32_2026-11-26.json")).read())
    doc["env"]["gpu"] = {"name": "NVIDIA H200", "memory_gib": 139.8}
    doc["env"]["commit"] = "0123456789abcdef"
    (out / "bench.json").write_text(json.dumps(doc))
    (out / "summary.txt").write_text("== device_check summary ==\ntests: 10 passed")
    (out / "tune.json").write_text(json.dumps({"layer": "L", "batch": 8, "useful_flops": 1e12, "rows": [
        {"precision": "tf32", "algorithm": "gather", "s": 0.01, "gflops": 1e5},
        {"precision": "tf32", "algorithm": "implicit", "config": [64, 128, 32, 4, 3], "s": 0.005, "gflops": 2e5,
         "vs_gather": 2.0, "max_rel_diff_vs_fp32_gather": 1e-4}]}))
    res = tmp_path / "results"
    assert record_run.main([str(out), "--write", "--results-dir", str(res)]) == 0
    text = capsys.readouterr().out
    assert sorted(os.listdir(res)) == ["2026-11-26_h200_0123456.json", "2026-11-26_h200_0123456_tune.json"]
    assert text.startswith("### 2026-11-26 — NVIDIA H200 (one card), torch ") and "commit `0123456789ab`" in text
    assert "tests: 10 passed" in text and "| vgg16_32 | cpu | fp32 |" in text and "#### Goals" in text
    assert "| tf32 | implicit | (64, 128, 32, 4, 3) | 5 | 200 | 2.00 | 1.0e-04 |" in text
    assert "(no precision.json)" in text
    doc["env"]["commit"] = "unknown"
    (out / "bench.json").write_text(json.dumps(doc))
    assert record_run.main([str(out)]) == 0
    assert "The device machine recorded no commit" in capsys.readouterr().out


def test_gates_and_act_layers_of_relu6():
    """ReLU6 (a 0/1 gate strictly inside (0, 6)) in the benchmark helpers: the conv's g_n, the
    "act" neuron set, and the floor's activity."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(4, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(30.0)
    x = torch.rand(1, 3, 8, 8)
    z = model[0](x)
    assert bool((z > 6).any()) and bool((z < 0).any())
    graph = common.build_graph(model, x)
    g = common.neuron_gates(graph, ["0"], graph.run(x))["0"]
    assert torch.equal(g, ((z > 0) & (z < 6)).float())
    assert common.conv_layer_names(model, x, neurons="act") == ["1", "2"]
    fc = common.count_floor(model, x, ["1"])
    assert fc.active == int(((z > 0) & (z < 6)).sum())
