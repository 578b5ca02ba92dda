"""The HTML report: a quick demo run renders a self-contained report that headless Chromium opens
without console errors, with every image loaded and every section present; a synthetic results
dict checks the Findings logic and the "not computed" paths.

Chromium (Debian's ``chromium``) is installed by ``.ci/run``. Without it the browser test fails —
set ``NNS_SKIP_BROWSER=1`` to skip it deliberately. The screenshots are kept in
``test-artifacts/`` (git-ignored).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from nns_cuda.analysis import thesis
from nns_cuda.analysis._toolkit import to_jsonable
from nns_cuda.app import report as R

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- helpers
class _Parse(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.ids, self.links, self.scripts = [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "script":
            self.scripts += 1


def _parse(path: Path) -> _Parse:
    p = _Parse()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), f"missing image {path}"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 10 and im.size[1] > 10, (path, im.size)


def _check_folder(out: Path) -> _Parse:
    html = out / "report.html"
    assert html.is_file()
    text = html.read_text(encoding="utf-8")
    p = _parse(html)
    assert p.scripts == 0, "the report must not need JavaScript"
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "the report must not load anything from the network"
    for sid, _ in R.SECTIONS:
        assert f"sec-{sid}" in p.ids, f"section {sid} missing"
    assert p.imgs, "no images in the report"
    for src in p.imgs:
        assert "/" not in src and not src.startswith(".."), f"image outside the report folder: {src}"
        _check_png(out / src)
    for href in p.links:
        if not href.startswith("#"):
            _check_png(out / href)
    return p


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("NNS_SKIP_BROWSER") == "1":
        pytest.skip("NNS_SKIP_BROWSER=1: browser check skipped on request")
    pytest.fail("headless Chromium is needed for the report test but `chromium` is not on PATH; .ci/run installs it "
                "(apt-get install chromium), or set NNS_SKIP_BROWSER=1 to skip this check deliberately")


def _run_chromium(url: str, screenshot: Path, extra=()) -> str:
    exe = _chromium()
    with tempfile.TemporaryDirectory(prefix="nns_chromium_") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra,
               f"--screenshot={screenshot}", "--window-size=1280,4000", url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"chromium exited with {r.returncode}:\n{r.stderr[-3000:]}"
    assert screenshot.is_file(), f"chromium wrote no screenshot:\n{r.stderr[-3000:]}"
    return r.stderr


def _console_errors(stderr: str):
    return [l for l in stderr.splitlines() if "Uncaught" in l or "ERROR:CONSOLE" in l]


_PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = document.images, bad = [];
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) bad.push(imgs[i].getAttribute("src"));
  }
  for (var j = 0; j < bad.length; j++) console.log("NNS_IMAGE_FAILED " + bad[j]);
  console.log("NNS_PROBE images=" + imgs.length + " failed=" + bad.length +
              " sections=" + document.querySelectorAll("section").length);
});
</script>"""


def _browser_check(out: Path, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    if shot.exists():
        shot.unlink()
    # 1. the report as it is: rendered, no console errors; the screenshot is kept
    err = _run_chromium((out / "report.html").resolve().as_uri(), shot)
    assert not _console_errors(err), "console errors:\n" + "\n".join(_console_errors(err))
    _check_png(shot)
    from PIL import Image

    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"), dtype=np.float64)
    assert a.std() > 5, "the screenshot is blank"
    # 2. a probe copy (same folder, one script added) reports whether every image loaded
    probe = out / "_browser_probe.html"
    probe.write_text((out / "report.html").read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                     encoding="utf-8")
    try:
        err = _run_chromium(probe.resolve().as_uri(), ARTIFACTS / f"{name}_probe.png",
                            extra=("--virtual-time-budget=5000",))
    finally:
        probe.unlink()
    m = re.search(r"NNS_PROBE images=(\d+) failed=(\d+) sections=(\d+)", err)
    assert m, "the browser did not run the image probe:\n" + err[-3000:]
    n_img, failed, n_sec = map(int, m.groups())
    assert failed == 0, "images that did not load in the browser:\n" + "\n".join(
        l for l in err.splitlines() if "NNS_IMAGE_FAILED" in l)
    assert n_img == len(_parse(out / "report.html").imgs)
    assert n_sec == len(R.SECTIONS)
    assert not _console_errors(err), "console errors:\n" + "\n".join(_console_errors(err))


# ----------------------------------------------------------------------------- the quick demo
@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``nns demo --quick`` through the command line (the same code path as ``make demo``)."""
    from nns_cuda.app.cli import main

    out = tmp_path_factory.mktemp("demo_quick")
    rc = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out


def test_quick_demo_writes_a_complete_folder(quick_demo):
    out = quick_demo
    _check_folder(out)
    m = json.loads((out / "metrics.json").read_text())
    # every stage timed, the total too
    for stage in ("data", "model", "scan", "chapter3", "fq", "tip", "gmm", "report", "total"):
        assert stage in m["timings"], stage
        assert m["timings"][stage] >= 0
    # seven findings, each judged reproduced / not reproduced / opposite / not computed, a reason
    # whenever not computed
    f = m["findings"]
    assert [x["id"] for x in f] == [x["id"] for x in thesis.FINDINGS]
    for x in f:
        assert x["reproduced"] in thesis.VERDICTS
        if x["reproduced"] == "not computed":
            assert x["reason"], x
        else:
            assert x["ours"] not in ("", "–"), x
    # the demo's stages ran here (a failure would show up as an error with its reason)
    assert m["errors"] == {}, f"demo stages failed (their report sections say not computed): {m['errors']}"
    assert m["meta"]["backend"] in ("reference", "cpu", "cuda")
    # what the report shows is what the analyses measured, not a copy of the thesis
    for v in m["fq"]["table_3_3"]["ours_C_l"]:
        assert thesis.format_number(v) in f[0]["ours"]
    for v in m["fq"]["fig_4_3"]["pearson_r"].values():
        assert thesis.format_number(v, 2) in f[1]["ours"]


def test_quick_demo_report_opens_in_chromium(quick_demo):
    _browser_check(quick_demo, "report_quick")


# ----------------------------------------------------------------------------- synthetic results
def _synthetic(**over):
    """A results dict with chosen numbers (not the thesis's) to check the judgement logic."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, 8, generator=g)
    li = torch.randn(3, 8, 8, generator=g)
    r = {
        "meta": {"title": "synthetic", "model": "m", "device": "cpu"},
        "errors": {},
        "timings": {"scan": 1.0, "total": 2.0},
        "training": {"history": {"epochs": [1, 2, 3], "train_loss": [2.0, 1.0, 0.5], "val_loss": [2.1, 1.5, 1.8],
                                 "train_acc": [0.2, 0.6, 0.9], "val_acc": [0.2, 0.5, 0.45], "best_epoch": 2}},
        "learned_images": {"layers": ["a", "b"], "samples": [
            {"x": x, "label": 1, "pred": 1, "layer_images": {"a": li, "b": -li}, "winner": li,
             "filters": {"a": {"indices": [0, 2], "images": torch.stack([li, 2 * li]), "activation": [1.0, 0.5]}}}]},
        "knowledge": {"layers": {"a": {"count_ratio": 0.1, "strength_ratio": 0.01, "count_ratio_active": 0.2,
                                       "strength_ratio_active": 0.02, "active_fraction": 0.5},
                                 "b": {"count_ratio": 0.3, "strength_ratio": 0.02, "count_ratio_active": 0.4,
                                       "strength_ratio_active": 0.03, "active_fraction": 0.6}}},
        "fq": {"table_3_3": {"layers": ["p1", "p2", "p3"], "ours_C_l": [0.5, 0.7, 0.9]},        # rises -> opposite
               "fig_4_3": {"pearson_r": {"a": -0.2, "b": -0.1, "c": 0.3}},                     # 1/3 > 0 -> opposite
               "fig_4_4": {"layers": ["a", "b"], "fq_mean": [1.0, 2.0], "fq_var": [0.5, 3.0]},
               "table_4_3": {"pct_change_top": 12.0, "pct_change_bottom": 1.0, "degenerate": False,  # -> reproduced
                             "n_mask": 2, "n_filters": 8}},
        "tip": {"layer": "b", "aipc": {"mean": {"ratios": [0, 0.5, 1], "drop": [0, 10, 40], "area_top10": 1.0,
                                                "area": 2.0, "base_accuracy": 90}},
                "findings": {"layer": "b", "measured": {
                    "spearman_AVoU_T_m": 0.5,                                        # < 0.8 -> not reproduced
                    "spearman": {"AVoU": {"mean": 0.5, "variance": 0.1}, "SoU": {"mean": 0.2, "variance": None}},
                    "accuracy_drop_masking_HH_vs_LL": [{"checkpoint": "e1", "H-H": 5.0, "L-L": 1.0},
                                                       {"checkpoint": "e2", "H-H": 7.0, "L-L": 0.0}]},  # reproduced
                    "details": {"types": {"checkpoints": ["e1", "e2"], "per": 30,
                                          "share": [{"H-H": 0.3, "L-L": 0.2}, {"H-H": 0.25, "L-L": 0.3}],
                                          "accuracy_drop": [{"H-H": 5.0, "L-L": 1.0}, {"H-H": 7.0, "L-L": 0.0}],
                                          "base_accuracy": [80, 85]}}}},
        "gmm": {"layer": "b", "n_samples": 20, "well_trained_epoch": 2, "overfitted_epoch": 3,
                "findings": {"table_6_2": {"WT": 1, "OF": 4, "n_filters": 8},                # -> reproduced
                             "table_6_5": {"anomaly_mean_val_change": -2.0, "random_mean_val_change": -1.0,
                                           "R": 5}},                                               # -> opposite
                "scatter": {"layer": "b", "anomaly": {"filter": 1, "points": torch.randn(20, 2, generator=g),
                                                      "labels": torch.arange(20) % 3, "outliers": [0, 3], "k": 3,
                                                      "ch": 10.0},
                            "normal": {"filter": 2, "points": torch.randn(20, 2, generator=g),
                                       "labels": torch.zeros(20, dtype=torch.long), "k": 2, "ch": 3.0}},
                "counts": [{"epoch": 1, "n_anomalous": 0, "n_filters": 8}, {"epoch": 3, "n_anomalous": 4,
                                                                             "n_filters": 8}]},
    }
    r.update(over)
    return r


def test_findings_are_judged_from_the_numbers():
    f = {x["id"]: x for x in thesis.judge_findings(_synthetic())}
    assert f["fm_li_depth"]["reproduced"] == "opposite"           # C^l rises with depth here
    assert f["fq_pearson"]["reproduced"] == "opposite"            # only 1 of 3 layers positive
    assert f["diversity_masking"]["reproduced"] == "reproduced"   # +12 % vs +1 %: rises, more
    assert f["avou_tm_spearman"]["reproduced"] == "not reproduced"  # 0 < 0.5 < 0.8
    assert f["hh_vs_ll"]["reproduced"] == "reproduced"
    assert f["anomaly_overfit"]["reproduced"] == "reproduced"     # 1 -> 4
    assert f["anomaly_masking"]["reproduced"] == "opposite"       # −2 % is worse than −1 %
    # flip every number: every judgement flips
    r = _synthetic()
    r["fq"]["table_3_3"]["ours_C_l"] = [0.9, 0.7, 0.5]
    r["fq"]["fig_4_3"]["pearson_r"] = {"a": 0.2, "b": 0.1, "c": -0.3}
    r["fq"]["table_4_3"].update(pct_change_top=1.0, pct_change_bottom=12.0)
    r["tip"]["findings"]["measured"]["spearman_AVoU_T_m"] = 0.95
    for row in r["tip"]["findings"]["measured"]["accuracy_drop_masking_HH_vs_LL"]:
        row["L-L"] = 9.0
    r["gmm"]["findings"]["table_6_2"].update(WT=4, OF=1)
    r["gmm"]["findings"]["table_6_5"].update(anomaly_mean_val_change=0.5)
    g = {x["id"]: x["reproduced"] for x in thesis.judge_findings(r)}
    assert g == {"fm_li_depth": "reproduced", "fq_pearson": "reproduced", "diversity_masking": "opposite",
                 "avou_tm_spearman": "reproduced", "hh_vs_ll": "opposite", "anomaly_overfit": "opposite",
                 "anomaly_masking": "reproduced"}


def test_missing_sections_say_not_computed_with_the_reason(tmp_path):
    r = _synthetic()
    for k in ("fq", "tip", "gmm", "knowledge"):
        del r[k]
    r["errors"] = {"gmm": "stage 'gmm' failed: NotImplementedError: nns_cuda.gmm.findings is not available"}
    r["tip"] = {"findings": {"measured": {"spearman_AVoU_T_m": None}}}  # present but undefined
    path = R.write_report(r, tmp_path)
    p = _check_folder(tmp_path)
    html = Path(path).read_text()
    secs = {sid: html.split(f'id="sec-{sid}"')[1].split("</section>")[0] for sid, _ in R.SECTIONS}
    for sid in ("knowledge", "fm-li", "pearson", "fq", "diversity", "aipc", "spearman", "typology", "gmm-scatter",
                "anomaly-counts"):
        assert "not computed:" in secs[sid], sid
    assert "nns_cuda.gmm.findings is not available" in secs["gmm-scatter"]
    assert "nns_cuda.gmm.findings is not available" in secs["anomaly-counts"]
    for sid in ("training", "learned-images"):
        assert "not computed" not in secs[sid], sid
    f = {x["id"]: x for x in json.loads((tmp_path / "metrics.json").read_text())["findings"]}
    assert all(x["reproduced"] == "not computed" and x["reason"] for x in f.values())
    assert "gmm.findings is not available" in f["anomaly_overfit"]["reason"]
    assert len(p.imgs) >= 3


def test_synthetic_report_metrics_are_json_without_arrays(tmp_path):
    r = _synthetic()
    R.write_report(r, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    s = m["learned_images"]["samples"][0]
    assert set(s) >= {"label", "pred", "filters"} and "x" not in s and "layer_images" not in s
    assert "points" not in m["gmm"]["scatter"]["anomaly"]
    assert [x["reproduced"] for x in m["findings"]] == [x["reproduced"] for x in thesis.judge_findings(_synthetic())]
    assert to_jsonable({"a": float("nan"), "b": torch.ones(2), "c": np.float32(1.5)}) == {"a": None, "b": [1.0, 1.0],
                                                                                          "c": 1.5}
    # arrays larger than the report's limit become a shape note in metrics.json (they are in the figures)
    big = np.zeros(R.MAX_JSON_ARRAY + 1)
    assert to_jsonable({"big": big}, max_array=R.MAX_JSON_ARRAY)["big"] == {
        "array_shape": [R.MAX_JSON_ARRAY + 1], "note": "omitted (large array; see the report's figures)"}
    R.write_metrics({"big": torch.zeros(3, R.MAX_JSON_ARRAY)}, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["big"]["array_shape"] == [3, R.MAX_JSON_ARRAY]


# ----------------------------------------------------------------------------- figures and typesetting
def _vlines(ax):
    """``{legend label: (x, colour, line style)}`` of the vertical marker lines of ``ax``."""
    out = {}
    for ln in ax.get_lines():
        xs = set(np.asarray(ln.get_xdata(), dtype=float).tolist())
        if len(xs) == 1 and not ln.get_label().startswith("_") and ln.get_label() != "anomaly filters":
            out[ln.get_label()] = (xs.pop(), ln.get_color(), ln.get_linestyle())
    return out


def test_anomaly_count_figure_markers_ticks_and_axis():
    from nns_cuda.app._report_sections import anomaly_counts_figure

    zero = [{"epoch": e, "n_anomalous": 0} for e in (1, 2, 4)]
    # the well-trained and over-fitted epochs coincide: one marker that names both
    ax = anomaly_counts_figure(zero, 4, 4, "relu3").axes[0]
    assert set(_vlines(ax)) == {"well-trained = over-fitted (epoch 4)"}
    assert [t.get_text() for t in ax.get_legend().get_texts()][1] == "well-trained = over-fitted (epoch 4)"
    # all counts zero: the axis starts at 0 and reaches 1 (not -0.04 … 0.04); integer ticks on both axes
    lo, hi = ax.get_ylim()
    assert lo <= 0 and hi >= 1 and lo > -0.5
    ax.figure.canvas.draw()
    for ticks, (a, b) in ((ax.get_yticks(), ax.get_ylim()), (ax.get_xticks(), ax.get_xlim())):
        shown = [t for t in ticks if a <= t <= b]
        assert shown and all(float(t).is_integer() for t in shown), ticks
    assert {0.0, 1.0} <= set(t for t in ax.get_yticks() if lo <= t <= hi)
    # distinct epochs: two markers, told apart by colour and line style
    rows = [{"epoch": e, "n_anomalous": n} for e, n in ((1, 0), (2, 3), (3, 5))]
    v = _vlines(anomaly_counts_figure(rows, 2, 3).axes[0])
    assert set(v) == {"well-trained (epoch 2)", "over-fitted (epoch 3)"}
    (x1, c1, s1), (x2, c2, s2) = v["well-trained (epoch 2)"], v["over-fitted (epoch 3)"]
    assert (x1, x2) == (2, 3) and c1 != c2 and s1 != s2


def test_superscripts_are_typeset_not_careted(tmp_path):
    from nns_cuda.app._report_sections import rich

    assert rich("C^l falls; T^k <b>") == "C<sup>l</sup> falls; T<sup>k</sup> &lt;b&gt;"
    R.write_report(_synthetic(), tmp_path)
    html = (tmp_path / "report.html").read_text()
    body = html.split("<body", 1)[1]
    assert "C<sup>l</sup>" in body and "C^l" not in body


def test_report_figures_have_colour_scales_integer_counts_and_no_carets(tmp_path, monkeypatch):
    """Every figure of the report as drawn: a colour scale beside each heat map, no ``^`` outside
    mathtext in any text, and the anomaly-count axis starting at exactly 0 with integer ticks."""
    from nns_cuda.app import _report_sections as S
    from nns_cuda.app import viz

    drawn = {}
    save = S.Figures.save

    def keep(self, fig, name):
        drawn[name] = fig
        return save(self, fig, name)

    monkeypatch.setattr(S.Figures, "save", keep)
    r = _synthetic()
    R.write_report(r, tmp_path)
    assert {"learned_images_layers.png", "learned_images_layers_jet.png", "filter_images.png",
            "anomaly_counts.png", "fm_li_correlation.png"} <= set(drawn), sorted(drawn)
    for name, fig in drawn.items():
        maps = [a for a in fig.axes if a.images and a.images[0].get_cmap().name in (viz.DEFAULT_CMAP, "jet")
                and a.get_label() != "<colorbar>"]
        bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
        assert len(bars) == len(maps), (name, len(maps), len(bars))
        fig.canvas.draw()
        texts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text") and callable(o.get_text))]
        careted = [t for t in texts if "^" in re.sub(r"\$[^$]*\$", "", t)]
        assert not careted, (name, careted)
    assert sum(len([a for a in drawn[n].axes if a.get_label() == "<colorbar>"])
               for n in ("learned_images_layers.png", "filter_images.png")) > 0
    assert any("$C^l$" in (a.get_ylabel() or "") for a in drawn["fm_li_correlation.png"].axes)
    ax = drawn["anomaly_counts.png"].axes[0]
    lo, hi = ax.get_ylim()
    assert lo == 0 and hi >= 1, (lo, hi)
    shown = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert shown[0] == 0 and all(float(t).is_integer() for t in shown), shown
    shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert shown and all(float(t).is_integer() for t in shown), shown
    counts = [ln for ln in ax.get_lines() if ln.get_label() == "anomaly filters"]
    assert counts and not counts[0].get_clip_on(), "zero counts must not be clipped at the lower edge"
