"""``benchmarks/bench_res224.py`` on its quick configuration (ResNet-18 at 32 × 32): every row
checked against the users' batched VJP before its figures count, peak memory measured in fresh
processes, the plan recorded, ``uptime`` before and after, and the suite's entry point runs it
(``python -m benchmarks.run --workloads res224``)."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_res224  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402


def test_quick_run_checks_every_row_and_records_plan_memory_and_load(tmp_path, capsys):
    out = tmp_path / "res224.json"
    rc = bench_run.main(["--workloads", "res224", "--quick", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == bench_res224.SCHEMA and doc["config"]["quick"]
    for k in ("commit", "cpu", "load_average", "torch"):
        assert k in doc["env"], k
    for k in ("uptime_before", "uptime_after"):
        assert doc[k]["load_average"] and "load average" in (doc[k]["uptime"] or "load average")
    assert set(doc["workloads"]) == {"resnet18_filters", "resnet18_stats"}
    rows = {(r["workload"], r["method"]): r for r in doc["rows"]}
    assert set(rows) == {(w, m) for w in doc["workloads"] for m in ("user_vjp", "scanner")}
    for (w, m), r in rows.items():
        assert "error" not in r, r.get("error")
        assert r["total_s"] > 0 and r["peak_growth_bytes"] >= 0 and r["units_per_s"] > 0
        assert r["verified"] is True
        if m == "user_vjp":  # one sampled chunk per layer, extrapolated to all
            assert r["extrapolated"] and r["total_s"] > r["measured_s"] and r["chunks_run"] < r["chunks_all"]
        else:  # compared with what the baseline computed, layer by layer
            chk = r["check"]
            assert chk["verified"] and chk["rel_err"] <= bench_res224.TOL
            assert set(chk["layers"]) == set(doc["workloads"][w]["layers"])
            assert all(v["checked"] > 0 and v["allclose"] for v in chk["layers"].values())
            assert [lay["name"] for lay in r["plan"]["layers"]] == doc["workloads"][w]["layers"]
            assert r["speedup_vs_user_vjp"] > 0
    units = doc["workloads"]["resnet18_filters"]["filters"]
    assert units == 64 + 64 + 512  # relu, layer1.0.relu:1, layer4.1.relu:1
    assert doc["goals"] and all(g["measured"] is not None for g in doc["goals"])
    printed = capsys.readouterr().out
    assert "| workload | method |" in printed


def test_workload_specs_name_the_layers_of_the_full_run():
    full = bench_res224.workload_spec("resnet18_filters", False, 5, None)
    assert full["size"] == 224 and full["chunks"] == 0 and len(full["layers"]) == 9
    assert full["layers"][0] == "relu" and full["layers"][-1] == "layer4.1.relu:1"
    vgg = bench_res224.workload_spec("vgg16_filters", False, 5, None)
    assert len(vgg["layers"]) == 13 and vgg["chunks"] == 2
    stats = bench_res224.workload_spec("resnet18_stats", False, 5, None)
    assert stats["layers"] == full["layers"][:5] and stats["task"] == "stats"


def test_repeats_alternate_the_methods_and_report_medians_and_the_largest_peak(tmp_path):
    out = tmp_path / "res224.json"
    rc = bench_res224.main(["--quick", "--workloads", "resnet18_filters", "--repeats", "2", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["repeats"] == 2
    rows = {r["method"]: r for r in doc["rows"]}
    for r in rows.values():
        assert len(r["runs_s"]) == 2 and len(r["peak_runs_bytes"]) == 2
        assert min(r["runs_s"]) <= r["total_s"] <= max(r["runs_s"])
        assert r["peak_growth_bytes"] == max(r["peak_runs_bytes"])
    s, b = rows["scanner"], rows["user_vjp"]
    assert s["verified"] and s["speedup_vs_user_vjp"] == b["total_s"] / s["total_s"]
    assert s["speedup_per_run"] == [x / y for x, y in zip(b["runs_s"], s["runs_s"])]
    assert bench_res224.main(["--quick", "--repeats", "0"]) == 1
