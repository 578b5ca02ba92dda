"""The HTML report: one self-contained folder (``report.html`` + PNGs + ``metrics.json``).

:func:`write_report` turns the results of an NNS run (the dict that :func:`nns_cuda.demo.run_demo`
builds, or any dict with some of the keys below) into figures and tables next to the thesis's:

========================  ==================================================================
section                   from ``results``
========================  ==================================================================
Findings                  judged from the analyses (:func:`nns_cuda.analysis.thesis.judge_findings`);
                          above them the multi-seed verdicts of ``reproduction`` or, without that
                          key, of docs/results/reproduction.json (``nns reproduce``) when it exists
Training curves           ``training.history`` (``TrainingHistory.to_dict()``)
Learned images (Fig 3-7)  ``learned_images.samples[*]``: ``x``, ``layer_images``, ``filters``
Knowledge (Fig 3-8)       ``knowledge`` (``chapter3.KnowledgeQuantity(...).fit(...).to_dict()``)
FM↔LI (Table 3-3)         ``fq.table_3_3``
FQ mean/var (Fig 4-4)     ``fq.fig_4_4``
Pearson (Fig 4-3)         ``fq.fig_4_3``
Diversity (Table 4-3)     ``fq.table_4_3``
AIPC (Fig 5-4)            ``tip.aipc`` (property -> ``AIPCResult.to_dict()``)
Spearman (Table 5-2)      ``tip.findings.measured.spearman``
Typology (Table 5-3)      ``tip.findings.details.types`` (``FgBgTypesResult.to_dict()``)
GMM scatter (Fig 6-2)     ``gmm.scatter.anomaly`` / ``gmm.scatter.normal``
Anomaly counts (Fig 6-4)  ``gmm.counts`` (rows with ``epoch``, ``n_anomalous``)
Tables 6-2, 6-5           ``gmm.findings``
Timings                   ``timings``
========================  ==================================================================

A section whose data is missing says "not computed: <reason>" — the reason comes from
``results["errors"][key]`` when the stage that makes it failed, otherwise it names the missing
entry. Nothing is ever filled in. The HTML has no scripts and no external URLs; images are PNG
files beside it.

The seven directional findings of the thesis are judged from the measured numbers only
(:func:`nns_cuda.analysis.thesis.judge_findings`); the thesis's own numbers are quoted beside
them. The sections' renderers are in :mod:`nns_cuda.app._report_sections`.
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Mapping, Tuple, Union

from nns_cuda.analysis._toolkit import to_jsonable
from nns_cuda.analysis.thesis import judge_findings
from nns_cuda.analysis.thesis import lookup as _get
from nns_cuda.app._report_sections import RENDER, Figures, not_computed
from nns_cuda.app._report_sections import escape as _esc

__all__ = ["write_report", "write_metrics", "SECTIONS"]

#: Largest array written into ``metrics.json``; larger ones become a shape note (they are in the figures).
MAX_JSON_ARRAY = 10000

#: Section ids (HTML ``id`` attributes) in report order, with their headings.
SECTIONS: List[Tuple[str, str]] = [
    ("overview", "Overview"),
    ("findings", "Findings: the thesis's seven directional claims"),
    ("training", "Training curves"),
    ("learned-images", "Learned images per layer (Fig. 3-7)"),
    ("knowledge", "Knowledge quantity per layer (Fig. 3-8)"),
    ("fm-li", "Feature-map ↔ learned-image correlation (Table 3-3)"),
    ("pearson", "FQ–activation Pearson r per layer (Fig. 4-3)"),
    ("fq", "FQ mean and variance per layer (Fig. 4-4)"),
    ("diversity", "Masking diverse filters (Table 4-3)"),
    ("aipc", "AIPC curves (Fig. 5-4)"),
    ("spearman", "Saliency ↔ property Spearman ρ (Table 5-2)"),
    ("typology", "Foreground / background filter types (Table 5-3)"),
    ("gmm-scatter", "GMM clusters of an anomaly and a normal filter (Fig. 6-2)"),
    ("anomaly-counts", "Anomaly filters per epoch (Fig. 6-4) and Tables 6-2, 6-5"),
    ("timings", "Timings"),
]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
padding:16px 24px;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}table.kv td:first-child{color:#555}
img{max-width:100%;height:auto;display:block;margin:.5em 0}
.not-computed{color:#8a6d00;background:#fff8e1;border-left:4px solid #f0c000;padding:6px 10px}
.note{color:#555;font-style:italic}.yes{color:#0a7a2f;font-weight:bold}.no{color:#b00020;font-weight:bold}
.nc{color:#8a6d00;font-weight:bold}nav a{margin-right:.8em;font-size:.85em}small{color:#666}
"""


# ============================================================================================
# writers
# ============================================================================================
def write_report(results: Mapping[str, Any], out_dir: Union[str, "os.PathLike[str]"]) -> str:
    """Write ``report.html`` and its PNGs (and ``metrics.json``) into ``out_dir``.

    Parameters
    ----------
    results : dict (see the module docstring); tensors allowed where images are expected.
        ``results["findings"]`` is (re)computed by
        :func:`nns_cuda.analysis.thesis.judge_findings` and stored back when ``results`` is a
        mutable dict.
    out_dir : folder (created)

    Returns
    -------
    str — path of ``report.html``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    findings = judge_findings(results)
    if isinstance(results, dict):
        results["findings"] = findings
        res = results
    else:
        res = {**results, "findings": findings}
    figs = Figures(out_dir)
    body = []
    for sid, title in SECTIONS:
        try:
            content = RENDER[sid](res, figs)
        except Exception as e:  # a broken section must not take the report down
            content = not_computed(f"the section could not be drawn: {type(e).__name__}: {e}")
        body.append(f'<section id="sec-{sid}"><h2>{_esc(title)}</h2>{content}</section>')
    title = _get(res, "meta", "title") or "NNS report"
    nav = "".join(f'<a href="#sec-{sid}">{_esc(t.split(" (")[0].split(":")[0])}</a>' for sid, t in SECTIONS)
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_esc(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1><nav>{nav}</nav>"
           + "".join(body)
           + "<footer><p><small>Neural Network Scanner (nns_cuda). Thesis figures and tables are quoted for comparison; "
             "every judgement in the Findings table is computed from this run's numbers.</small></p></footer>"
           + "</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(doc)
    if isinstance(results, dict):
        results.setdefault("report_files", figs.files)
    write_metrics(res, out_dir)
    return path


def write_metrics(results: Mapping[str, Any], out_dir: Union[str, "os.PathLike[str]"]) -> str:
    """Write ``metrics.json``: the JSON-able results (image arrays replaced by notes), the findings
    and the timings. Returns its path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    res = dict(results)
    if "findings" not in res:
        res["findings"] = judge_findings(results)
    li = res.get("learned_images")
    if isinstance(li, Mapping):  # images are in the PNGs; keep the small per-sample facts
        res["learned_images"] = {
            **{k: v for k, v in li.items() if k != "samples"},
            "samples": [{k: v for k, v in s.items() if k in ("index", "label", "pred")} | {
                "filters": {l: {"indices": f.get("indices"), "activation": f.get("activation")}
                            for l, f in (s.get("filters") or {}).items()}}
                for s in li.get("samples") or []],
        }
    sc = _get(res, "gmm", "scatter")
    if isinstance(sc, Mapping):
        g = dict(res["gmm"])
        g["scatter"] = {k: ({kk: vv for kk, vv in v.items() if kk not in ("points", "labels")}
                            if isinstance(v, Mapping) else v) for k, v in sc.items()}
        res["gmm"] = g
    path = os.path.join(out_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(to_jsonable(res, max_array=MAX_JSON_ARRAY), fh, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path
