"""``nns reproduce``: the verdict rule on planted per-seed numbers, the committed protocol, and the
quick run end to end (one seed of the small variant, through the command line).

The verdict rule is checked against numbers chosen by hand (each case says why its verdict is
what it is) and its standard error against ``scipy.stats.sem``.
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy import stats

from nns_cuda.analysis import thesis
from nns_cuda.analysis.thesis import reproduce as rp
from nns_cuda.analysis.thesis.verdict import (
    NOT_COMPUTED,
    NOT_REPRODUCED,
    OPPOSITE,
    REPRODUCED,
    Effect,
    combine,
    direction,
    judge_seeds,
    min_seeds,
    summarise,
)

D = [Effect("d", "difference", "pp")]


def _seeds(xs, key="d"):
    return [None if x is None else {key: x} for x in xs]


# ----------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("xs, verdict", [
    ([3, 5, 2, 4, 6], REPRODUCED),            # 5/5 hold, mean 4 far beyond its SE
    ([3, 5, 2, 4, -1], REPRODUCED),           # 4/5 hold, mean 2.6 > SE 1.03
    ([5, 1, 2, 0.5, -9], NOT_REPRODUCED),     # 4/5 hold but the mean (-0.1) is not beyond 0
    ([3, -2, 4, -1, 2], NOT_REPRODUCED),      # mixed directions: 3/5 hold, 2/5 the other way
    ([3, 4, None, None, 5], NOT_REPRODUCED),  # seeds without a number do not hold: 3/5
    ([-3, -5, -2, -4, 1], OPPOSITE),          # 4/5 the other way, mean -2.6 beyond -SE
    ([0, 0, 0, 0, 0], NOT_REPRODUCED),        # no direction at all
    ([None] * 5, NOT_COMPUTED),
])
def test_verdict_rule_on_planted_numbers(xs, verdict):
    j = judge_seeds(_seeds(xs), D)
    assert j["verdict"] == verdict, j["reason"]
    assert j["n_seeds"] == 5 and j["needed"] == 4
    assert j["n_holds"] == sum(x is not None and x > 0 for x in xs)
    assert j["effects"][0]["values"] == [None if x is None else float(x) for x in xs]


def test_standard_error_is_scipys_and_the_threshold_is_four_of_five():
    xs = [0.3, -1.2, 2.5, 0.7, 1.1]
    s = summarise(xs + [None, float("nan")])
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(np.mean(xs))
    assert s["sd"] == pytest.approx(np.std(xs, ddof=1))
    assert s["se"] == pytest.approx(stats.sem(xs))
    assert summarise([2.0])["se"] is None and summarise([])["mean"] is None
    assert [min_seeds(n) for n in (1, 2, 3, 4, 5, 10)] == [1, 2, 3, 4, 4, 8]
    # one seed has no standard error: never reproduced, whatever its direction
    assert judge_seeds(_seeds([7.0]), D)["verdict"] == NOT_REPRODUCED


def test_table_4_3_needs_the_loss_to_rise():
    """Masking lowers the loss in both cases (the demo's −1.07 % vs −2.81 %): the opposite of the
    thesis, even though the most diverse filters lower it less."""
    eff = thesis.EFFECTS["diversity_masking"]
    top = [-1.07, -0.9, -1.3, -1.1, -0.8]
    bottom = [-2.81, -2.5, -3.0, -2.2, -2.9]
    per = [{"top": t, "top_minus_bottom": t - b} for t, b in zip(top, bottom)]
    assert all(direction(p, eff) == "opposite" for p in per)
    assert judge_seeds(per, eff)["verdict"] == OPPOSITE
    # rising, and more for the most diverse: reproduced; rising, but less: opposite on the difference
    up = [{"top": t, "top_minus_bottom": t - b} for t, b in zip([80, 95, 70, 88, 91], [1, -2, 3, 0, -1])]
    assert judge_seeds(up, eff)["verdict"] == REPRODUCED
    less = [{"top": t, "top_minus_bottom": t - b} for t, b in zip([5, 6, 4, 5, 7], [20, 25, 18, 30, 22])]
    assert judge_seeds(less, eff)["verdict"] == OPPOSITE
    # one run (the demo): the same reading
    one = {"fq": {"table_4_3": {"pct_change_top": -1.07, "pct_change_bottom": -2.81, "degenerate": False}}}
    row = next(f for f in thesis.judge_findings(one) if f["id"] == "diversity_masking")
    assert row["reproduced"] == OPPOSITE


def test_high_spearman_is_a_threshold_and_opposite_is_negative():
    eff = thesis.EFFECTS["avou_tm_spearman"]
    assert judge_seeds(_seeds([0.9, 0.95, 0.85, 0.92, 0.97], "rho"), eff)["verdict"] == REPRODUCED
    assert judge_seeds(_seeds([0.5, 0.6, 0.7, 0.55, 0.65], "rho"), eff)["verdict"] == NOT_REPRODUCED
    assert judge_seeds(_seeds([-0.5, -0.6, -0.2, -0.4, -0.3], "rho"), eff)["verdict"] == OPPOSITE


def test_models_combine():
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([OPPOSITE, OPPOSITE]) == OPPOSITE
    assert combine([REPRODUCED, OPPOSITE]) == NOT_REPRODUCED
    assert combine([REPRODUCED, NOT_COMPUTED]) == NOT_REPRODUCED
    assert combine([NOT_COMPUTED, NOT_COMPUTED]) == NOT_COMPUTED


def _run(model, seed, top, bottom, wt, of):
    return {"model": model, "seed": seed, "errors": {},
            "results": {"fq": {"table_4_3": {"pct_change_top": top, "pct_change_bottom": bottom,
                                             "degenerate": False, "n_mask": 4, "n_filters": 16}},
                        "gmm": {"findings": {"table_6_2": {"WT": wt, "OF": of, "n_filters": 16}}}}}


def test_aggregate_reads_the_runs_per_model_and_seed():
    cfg = rp.load_protocol()
    seeds = [0, 1, 2, 3, 4]
    runs = [_run("cnn_32_64_64", s, -1.0 - s / 10, -2.8, 2, 5 + s) for s in seeds]
    runs += [_run("lenet5", s, 50.0 + s, 1.0, 3, [1, 2, 3, 9, 0][s]) for s in seeds[:4]]  # seed 4 missing
    f = {x["id"]: x for x in rp.aggregate(cfg, runs, seeds)}
    assert [x["id"] for x in rp.aggregate(cfg, runs, seeds)] == [x["id"] for x in thesis.FINDINGS]
    d = f["diversity_masking"]["by_model"]
    assert d["cnn_32_64_64"]["verdict"] == OPPOSITE            # two negative loss changes in every seed
    assert d["lenet5"]["verdict"] == REPRODUCED                # 4/5 rise (seed 4 has no run), mean ≫ SE
    assert d["lenet5"]["per_seed"][4]["values"] is None and d["lenet5"]["per_seed"][4]["direction"] is None
    assert f["diversity_masking"]["verdict"] == NOT_REPRODUCED  # the models disagree
    a = f["anomaly_overfit"]["by_model"]
    assert a["cnn_32_64_64"]["verdict"] == REPRODUCED and a["cnn_32_64_64"]["effects"][0]["mean"] == 5.0
    assert a["lenet5"]["verdict"] == NOT_REPRODUCED            # 3→1, 3→2, 3→3, 3→9: mixed
    assert f["hh_vs_ll"]["verdict"] == NOT_COMPUTED
    assert "CIFAR-10: 5 → 12" in a["cnn_32_64_64"]["thesis"] and "CIFAR-10: 2 → 12" in a["lenet5"]["thesis"]


# ----------------------------------------------------------------------------- the protocol
def test_protocol_is_the_declared_one():
    from nns_cuda.analysis import gmm
    from nns_cuda.data import source_split_indices

    cfg = rp.load_protocol()
    assert cfg["seeds"] == [0, 1, 2, 3, 4] and not cfg["quick"]
    assert [m["name"] for m in cfg["models"]] == ["cnn_32_64_64", "lenet5"]
    assert cfg["data"]["n_train"] is None                      # the full training split
    assert sum(len(v) for v in source_split_indices().values()) == 1797
    n_eval = min(cfg["data"]["eval_samples"], cfg["data"]["eval_renderings"] * len(source_split_indices()["test"]))
    assert n_eval >= 500 and cfg["data"]["gmm_samples"] >= 500
    assert cfg["data"]["val_renderings"] * len(source_split_indices()["val"]) >= 500
    c6 = cfg["analyses"]["chapter6"]
    assert tuple(c6["experiment_1"][k] for k in ("lam", "alpha", "beta", "theta")) == gmm.PRESETS["small"]
    assert (c6["experiment_3"]["lam"], c6["experiment_3"]["theta"]) == (20, 0.5)   # Table 6-1, experiment 3
    assert c6["lambda_is"] == "count"
    q = rp.load_protocol(quick=True)
    assert q["quick"] and q["seeds"] == [0] and q["training"]["epochs"] < cfg["training"]["epochs"]
    with pytest.raises(ValueError, match="lacks"):
        rp.load_protocol({"seeds": [0]})


# ----------------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from nns_cuda.app import cli

    out = tmp_path_factory.mktemp("reproduce")
    t0 = time.perf_counter()
    rc = cli.main(["reproduce", "--quick", "--out", str(out), "--no-progress"])
    return rc, time.perf_counter() - t0, out / "reproduction_quick.json"


def test_quick_run_end_to_end(quick):
    rc, seconds, path = quick
    assert rc == 0 and path.is_file()
    assert seconds < 180, f"nns reproduce --quick took {seconds:.0f} s (budget 3 minutes)"
    r = json.loads(path.read_text())
    assert rp.load_reproduction(path) == r
    assert r["errors"] == {}, r["errors"]
    assert r["quick"] and r["seeds"] == [0] and any("quick" in d for d in r["deviations"])
    for k in ("machine", "commit", "versions", "started", "finished", "seconds_per_seed"):
        assert k in r, k
    assert [f["id"] for f in r["findings"]] == [f["id"] for f in thesis.FINDINGS]
    for f in r["findings"]:
        assert f["verdict"] in thesis.VERDICTS
        assert set(f["by_model"]) == {"cnn_32_64_64", "lenet5"}
        for b in f["by_model"].values():
            assert len(b["per_seed"]) == 1 and b["per_seed"][0]["seed"] == 0
            v = b["per_seed"][0]["values"]
            keys = {e["key"] for e in f["effects"]}
            assert (v is None and b["per_seed"][0]["reason"]) or set(v) == keys, (f["id"], b["per_seed"])
            assert b["verdict"] in (NOT_REPRODUCED, NOT_COMPUTED)   # one seed: no standard error
    # Chapter 6 made inspectable: every counted checkpoint says which criterion stops a filter
    for run in r["runs"]:
        c6 = run["chapter6"]
        eps = [c["epoch"] for c in c6["checkpoints"]]
        assert eps == sorted(eps) and run["training"]["overfitted_epoch"] in eps
        assert run["training"]["well_trained_epoch"] in eps
        for c in c6["checkpoints"]:
            for exp in ("experiment_1", "experiment_3"):
                n = c[exp]
                assert n["all_three"] <= min(n["imbalanced_high_ch"], n["imbalanced_high_activation"],
                                             n["high_ch_high_activation"])
                assert n["imbalanced_high_ch"] <= min(n["imbalanced"], n["high_ch"]) <= n["n_filters"]
        for exp, lam in c6["lambda"].items():
            assert math.isclose(lam["fraction_of_gmm_samples"], lam["count"] / c6["n_samples"])
        wt = next(c for c in c6["checkpoints"] if c["well_trained"])
        assert c6["table_6_2"]["WT"] == wt["experiment_1"]["all_three"]


def test_readme_table_renders_the_json(quick, capsys):
    _, _, path = quick
    r = rp.load_reproduction(path)
    table = rp.readme_table(r)
    rows = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| #")]
    assert len(rows) == 2 * len(thesis.FINDINGS)
    assert "QUICK RUN" in table
    assert rp.main(["--readme-table", str(path)]) == 0
    assert capsys.readouterr().out.strip() == rp.readme_block(r) and rp.readme_block(r).startswith(table)
    assert rp.main(["--readme-table", str(path.with_name("missing.json"))]) == 2


def test_chapter6_table_counts_each_criterion_per_checkpoint(quick):
    _, _, path = quick
    r = rp.load_reproduction(path)
    t = rp.chapter6_table(r)
    assert "λ = 50 samples" in t and "as a **count**" in t
    table: dict = {}
    model = None
    for line in t.splitlines():
        if not line.startswith("| ") or line.startswith("| model"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        model = cells[0] or model
        table[(model, cells[1])] = cells[2:]
    for run in r["runs"]:  # one seed: the cells are that seed's counts, read here from the JSON
        c6 = run["chapter6"]
        name = f"{run['label']} ({c6['checkpoints'][0]['experiment_1']['n_filters']} filters)"
        for c in c6["checkpoints"]:
            key = (f"{c['epoch']} (OF)" if c["overfitted"] else str(c["epoch"]))
            if c["well_trained"] and not (c["overfitted"] or c["epoch"] % 2 == 0):
                key = f"WT (epochs {c['epoch']})"
            e1, e3 = c["experiment_1"], c["experiment_3"]
            assert table[(name, key)][1:] == [f"{e1['imbalanced']:.1f}", f"{e1['high_ch']:.1f}",
                                              f"{e1['high_activation']:.1f}", f"{e1['all_three']:.1f} ({e1['all_three']})",
                                              f"{e3['all_three']:.1f} ({e3['all_three']})"], (name, key)
        wt = next(c for c in c6["checkpoints"] if c["well_trained"])
        assert table[(name, f"WT (epochs {wt['epoch']})")][4] == f"{wt['experiment_1']['all_three']:.1f} " \
                                                                 f"({wt['experiment_1']['all_three']})"


def test_readme_markers_are_rewritten_from_the_json(quick, tmp_path):
    _, _, path = quick
    r = rp.load_reproduction(path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{rp.README_BEGIN}\nstale text\n{rp.README_END}\n\n## next\n", encoding="utf-8")
    rp.update_readme(readme, r)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# x\n\n") and text.endswith(f"{rp.README_END}\n\n## next\n") and "stale text" not in text
    assert rp.readme_section(text) == rp.readme_block(r)
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="markers"):
        rp.update_readme(readme, r)


def test_the_readme_shows_the_committed_run():
    """The README's tables are the rendering of docs/results/reproduction.json (or say that the
    protocol has not been run when there is no such file)."""
    from pathlib import Path

    root = Path(rp.__file__).resolve().parents[3]
    section = rp.readme_section((root / "README.md").read_text(encoding="utf-8"))
    assert section is not None, "README.md lacks the reproduction markers"
    r = rp.load_reproduction(root / rp.DEFAULT_OUT)
    if r is None:
        assert section == "The full protocol has not been run yet."
    else:
        assert not r["quick"] and r["seeds"] == rp.load_protocol()["seeds"]
        assert section == rp.readme_block(r), "run: python -m nns_cuda.analysis.thesis.reproduce --write-readme README.md"


def test_the_report_reads_the_reproduction(quick, tmp_path, monkeypatch):
    from nns_cuda.app import report

    _, _, path = quick
    r = rp.load_reproduction(path)
    html = open(report.write_report({"reproduction": r}, tmp_path / "a")).read()
    assert "nns reproduce" in html and "Not the declared protocol" in html
    assert html.count("Simple CNN 32-64-64") >= len(thesis.FINDINGS)
    # without the key the report reads the default file: pointed here at the quick run's JSON
    monkeypatch.setattr(rp, "DEFAULT_OUT", str(path))
    html = open(report.write_report({}, tmp_path / "b")).read()
    assert "Not the declared protocol" in html and "No reproduction results yet" not in html
    monkeypatch.setattr(rp, "DEFAULT_OUT", str(tmp_path / "none.json"))
    html = open(report.write_report({}, tmp_path / "c")).read()
    assert "No reproduction results yet" in html
