"""The thesis's tables and the judging of its seven directional findings.

``chapter4`` (Chapters 3 and 4: FQ), ``chapter5`` (TIP) and ``chapter6`` (GMM anomaly filters)
hold each chapter's published numbers and a ``findings(...)`` function that measures the same
quantities on a model and puts them next to the thesis's. This module holds the seven
directional findings (:data:`FINDINGS`) and :func:`judge_findings`, which judges them from a
results dict of measured numbers only (the thesis's numbers are quoted, never used to judge).
It does not import the chapter modules: it reads their JSON-able output.

Each finding is measured by one or more signed numbers, its *effects* (:data:`EFFECTS`,
:class:`~nns_cuda.analysis.thesis.verdict.Effect`); :func:`finding_values` reads them from a
results dict. One run is judged by their direction ("reproduced", "not reproduced",
"opposite", "not computed"); several seeds by the rule of
:mod:`nns_cuda.analysis.thesis.verdict`, which ``nns reproduce``
(:mod:`nns_cuda.analysis.thesis.reproduce`) applies.

>>> from nns_cuda.analysis import thesis
>>> rows = thesis.judge_findings({"fq": fq_findings, "tip": {...}, "gmm": {...}})   # doctest: +SKIP
>>> [(r["id"], r["reproduced"]) for r in rows]                                      # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from nns_cuda.analysis.thesis.verdict import (
    NOT_COMPUTED,
    NOT_REPRODUCED,
    OPPOSITE,
    REPRODUCED,
    VERDICTS,
    Effect,
    direction,
)

__all__ = ["FINDINGS", "EFFECTS", "HIGH_SPEARMAN", "REPRODUCED", "NOT_REPRODUCED", "OPPOSITE", "NOT_COMPUTED",
           "VERDICTS", "judge_findings", "finding_values", "lookup", "as_number", "format_number", "missing_reason",
           "checkpoint_label"]

#: ``ρ(AVoU, T_m)`` at or above this counts as "high" (the thesis reports 0.97–1.00, Table 5-2).
HIGH_SPEARMAN = 0.8

#: The thesis's seven directional findings, in report order: (id, claim, where, the thesis's numbers).
_FINDING_ROWS = (
    ("fm_li_depth", "Feature-map ↔ learned-image correlation C^l falls with depth", "Table 3-3",
     "C^l over layers 1–5: AlexNet 0.998 → 0.623, VGG-16 0.952 → 0.538"),
    ("fq_pearson", "Pearson r between a neuron's FQ and its activation is positive", "Fig. 4-3",
     "positive in most conv layers; VGG-16 mid/high layers > 0.8, ResNet-18 ≥ 0.85"),
    ("diversity_masking", "Masking the most diverse filters raises the loss, more than masking the least diverse",
     "Table 4-3",
     "% loss change top-20 vs bottom-20: VGG-16 +95.2 vs −0.01, AlexNet +108.3 vs −12.8 (data set 1)"),
    ("avou_tm_spearman", f"Spearman ρ between AVoU and T_m is high (≥ {HIGH_SPEARMAN})", "Table 5-2",
     "ρ(AVoU, T_m) = 0.97–1.00 (AlexNet, VGG-11, VGG-16; three data sets)"),
    ("hh_vs_ll", "Masking H-H filters costs more accuracy than masking L-L filters", "Table 5-3",
     "VGG-16 / CUB-200: H-H 17.4–26.0 pp vs L-L 0.0–0.4 pp (phases 1–3)"),
    ("anomaly_overfit", "More anomaly filters when the model is over-fitted", "Table 6-2",
     "WT → OF: Simple CNN / CIFAR-10 5 → 12, LeNet-5 2 → 12, AlexNet 10 → 53 (VGG-16 11 → 10)"),
    ("anomaly_masking", "Masking an anomaly filter costs less validation accuracy than a random filter", "Table 6-5",
     "mean val. acc. change, anomaly vs random: Simple CNN / CIFAR-10 +0.10 % vs −1.51 %, LeNet-5 −1.21 % vs −3.94 %"),
)

#: The thesis's seven directional findings: dicts with ``id``, ``claim``, ``where`` (table or
#: figure) and ``thesis`` (the thesis's numbers, quoted).
FINDINGS: List[Dict[str, str]] = [dict(zip(("id", "claim", "where", "thesis"), row)) for row in _FINDING_ROWS]

#: The signed numbers that measure each finding and the direction the thesis claims for them.
EFFECTS: Dict[str, List[Effect]] = {
    "fm_li_depth": [Effect("rho_depth", "Spearman ρ of C^l with depth", "", sense=-1)],
    "fq_pearson": [Effect("fraction_positive", "share of conv layers with r > 0", "", hold=0.5, opposite=0.5)],
    "diversity_masking": [Effect("top", "loss change, most diverse masked", "%"),
                          Effect("top_minus_bottom", "most − least diverse loss change", "pp")],
    "avou_tm_spearman": [Effect("rho", "ρ(AVoU, T_m)", "", hold=HIGH_SPEARMAN, opposite=0.0)],
    "hh_vs_ll": [Effect("hh_minus_ll", "H-H − L-L accuracy drop, mean over checkpoints", "pp")],
    "anomaly_overfit": [Effect("of_minus_wt", "OF − WT anomaly filters", "filters")],
    "anomaly_masking": [Effect("anomaly_minus_random", "anomaly − random val. acc. change", "pp")],
}


# --------------------------------------------------------------------------------------------
# reading a results dict
# --------------------------------------------------------------------------------------------
def lookup(d: Any, *keys: Any) -> Any:
    """``d[k1][k2]...`` through mappings and sequences; None when any level is missing."""
    for k in keys:
        if isinstance(d, Mapping):
            d = d.get(k)
        elif isinstance(d, (list, tuple)) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
        if d is None:
            return None
    return d


def as_number(v: Any) -> Optional[float]:
    """``float(v)`` when that is a finite number, else None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def format_number(v: Any, nd: int = 3) -> str:
    """``v`` with ``nd`` decimals (``nd`` significant digits when very large or small); "–" for no number."""
    f = as_number(v)
    if f is None:
        return "–"
    if f != 0 and (abs(f) >= 1e4 or abs(f) < 10 ** (-nd)):
        return f"{f:.{nd}g}"
    return f"{f:.{nd}f}"


def missing_reason(results: Mapping[str, Any], key: str, what: str) -> str:
    """Why ``what`` is missing: the failed stage's message ``results["errors"][key]`` if there is one."""
    err = lookup(results, "errors", key)
    if err:
        return str(err)
    return f"{what} is not in the results"


def checkpoint_label(path: Any) -> str:
    """A checkpoint's file name without the ``.pt`` suffix."""
    b = os.path.basename(str(path))
    return b[:-3] if b.endswith(".pt") else b


def _spearman_depth(values: Sequence[Optional[float]]) -> Optional[float]:
    pts = [(i, v) for i, v in enumerate(values) if as_number(v) is not None]
    if len(pts) < 2 or len({v for _, v in pts}) < 2:
        return None
    from scipy.stats import spearmanr

    r = float(spearmanr([p[0] for p in pts], [p[1] for p in pts]).statistic)
    return r if math.isfinite(r) else None


# --------------------------------------------------------------------------------------------
# the numbers of each finding
# --------------------------------------------------------------------------------------------
def _val(values: Optional[Dict[str, float]], ours: str, reason: str = "") -> Dict[str, Any]:
    return {"values": values, "ours": ours, "reason": reason}


def _fm_li_depth(results: Mapping[str, Any]) -> Dict[str, Any]:
    t33 = lookup(results, "fq", "table_3_3")
    vals = lookup(t33, "ours_C_l")
    if not isinstance(vals, (list, tuple)):
        return _val(None, "–", missing_reason(results, "fq", "fq.table_3_3.ours_C_l"))
    layers = lookup(t33, "layers") or [str(i + 1) for i in range(len(vals))]
    rho = _spearman_depth(vals)
    ours = ", ".join(f"{l}: {format_number(v)}" for l, v in zip(layers, vals))
    if rho is None:
        return _val(None, ours, "fewer than two layers with a defined, distinct C^l")
    return _val({"rho_depth": rho}, f"{ours} (Spearman with depth ρ = {rho:+.2f})")


def _fq_pearson(results: Mapping[str, Any]) -> Dict[str, Any]:
    pr = lookup(results, "fq", "fig_4_3", "pearson_r")
    if not isinstance(pr, Mapping) or not pr:
        return _val(None, "–", missing_reason(results, "fq", "fq.fig_4_3.pearson_r"))
    finite = {k: as_number(v) for k, v in pr.items() if as_number(v) is not None}
    ours = ", ".join(f"{k}: {format_number(v, 2)}" for k, v in pr.items())
    if not finite:
        return _val(None, ours, "r undefined in every layer (constant FQ or activation)")
    pos = sum(v > 0 for v in finite.values())
    return _val({"fraction_positive": pos / len(finite)}, f"{ours} ({pos}/{len(finite)} layers > 0)")


def _diversity_masking(results: Mapping[str, Any]) -> Dict[str, Any]:
    t43 = lookup(results, "fq", "table_4_3")
    top, bot = as_number(lookup(t43, "pct_change_top")), as_number(lookup(t43, "pct_change_bottom"))
    if t43 is None:
        return _val(None, "–", missing_reason(results, "fq", "fq.table_4_3"))
    if lookup(t43, "degenerate"):
        return _val(None, "–", "every filter has the same DBSCAN diversity: no ranking")
    if top is None or bot is None:
        return _val(None, "–", "loss change undefined (zero base loss?)")
    n = lookup(t43, "n_mask")
    return _val({"top": top, "top_minus_bottom": top - bot},
                f"% loss change, {n or '?'} most vs least diverse of {lookup(t43, 'n_filters') or '?'} filters: "
                f"{top:+.2f} % vs {bot:+.2f} %")


def _avou_tm_spearman(results: Mapping[str, Any], tipf: Mapping[str, Any]) -> Dict[str, Any]:
    rho = lookup(tipf, "measured", "spearman_AVoU_T_m")
    if as_number(rho) is None:
        return _val(None, "–", "ρ undefined (constant AVoU or T_m over the filters)")
    return _val({"rho": float(rho)}, f"ρ(AVoU, T_m) = {float(rho):.3f} ({lookup(tipf, 'layer') or ''})")


def _hh_vs_ll(results: Mapping[str, Any], tipf: Mapping[str, Any]) -> Dict[str, Any]:
    rows = lookup(tipf, "measured", "accuracy_drop_masking_HH_vs_LL")
    if not isinstance(rows, list) or not rows:
        return _val(None, "–", "no fg/bg filter types in the results (no foreground masks?)")
    pairs = [(str(r.get("checkpoint")), as_number(r.get("H-H")), as_number(r.get("L-L"))) for r in rows]
    ok = [(c, h, l) for c, h, l in pairs if h is not None and l is not None]
    if not ok:
        return _val(None, "–", "accuracy drops undefined")
    ours = "; ".join(f"{checkpoint_label(c)}: H-H {format_number(h, 1)} pp vs L-L {format_number(l, 1)} pp"
                     for c, h, l in ok)
    return _val({"hh_minus_ll": sum(h - l for _, h, l in ok) / len(ok)}, ours + " (accuracy drop when masked)")


def _anomaly_overfit(results: Mapping[str, Any], gmmf: Mapping[str, Any]) -> Dict[str, Any]:
    t62 = lookup(gmmf, "table_6_2")
    wt, of = as_number(lookup(t62, "WT")), as_number(lookup(t62, "OF"))
    if wt is None or of is None:
        return _val(None, "–", "anomaly counts missing from gmm.findings.table_6_2")
    g = results.get("gmm") or {}
    return _val({"of_minus_wt": of - wt},
                f"WT (epoch {g.get('well_trained_epoch', '?')}) {int(wt)} → OF (epoch "
                f"{g.get('overfitted_epoch', '?')}) {int(of)} of {lookup(t62, 'n_filters') or '?'} filters")


def _anomaly_masking(results: Mapping[str, Any], gmmf: Mapping[str, Any]) -> Dict[str, Any]:
    t65 = lookup(gmmf, "table_6_5")
    an, rnd = as_number(lookup(t65, "anomaly_mean_val_change")), as_number(lookup(t65, "random_mean_val_change"))
    if t65 is None:
        return _val(None, "–", "gmm.findings.table_6_5 is missing")
    if an is None:
        return _val(None, "–", "no anomaly filter in the over-fitted model, so none to mask")
    if rnd is None:
        return _val(None, "–", "random-filter baseline missing")
    return _val({"anomaly_minus_random": an - rnd},
                f"mean val. acc. change: anomaly {an:+.2f} vs random {rnd:+.2f} (R = {lookup(t65, 'R') or '?'})")


#: id -> (reader, the results part it reads or None); a reader with a part gets it as its second
#: argument and is not called when the part is missing (the finding is then not computed).
_READERS = {"fm_li_depth": (_fm_li_depth, None), "fq_pearson": (_fq_pearson, None),
            "diversity_masking": (_diversity_masking, None),
            "avou_tm_spearman": (_avou_tm_spearman, ("tip", "findings")),
            "hh_vs_ll": (_hh_vs_ll, ("tip", "findings")),
            "anomaly_overfit": (_anomaly_overfit, ("gmm", "findings")),
            "anomaly_masking": (_anomaly_masking, ("gmm", "findings"))}


def _read(fid: str, results: Mapping[str, Any]) -> Dict[str, Any]:
    reader, path = _READERS[fid]
    if path is None:
        return reader(results)
    part = lookup(results, *path)
    if part is None:
        return _val(None, "–", missing_reason(results, path[0], ".".join(path)))
    return reader(results, part)


def finding_values(results: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The numbers of each of the seven findings in one run.

    Parameters
    ----------
    results : mapping
        As :func:`judge_findings`.

    Returns
    -------
    dict
        finding id -> ``{"values": {effect key: float} or None, "ours": str, "reason": str}``;
        ``values`` holds the keys of :data:`EFFECTS` ``[id]``, None when the run lacks them
        (``reason`` says why).
    """
    return {f["id"]: _read(f["id"], results) for f in FINDINGS}


# --------------------------------------------------------------------------------------------
# judging one run
# --------------------------------------------------------------------------------------------
_ONE_RUN = {"holds": REPRODUCED, "opposite": OPPOSITE, "neither": NOT_REPRODUCED, None: NOT_COMPUTED}


def judge_findings(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Judge each of the thesis's seven directional findings from the measured numbers of one run.

    Parameters
    ----------
    results : mapping
        Measured numbers, JSON-like: ``fq`` (``table_3_3.ours_C_l``, ``fig_4_3.pearson_r``,
        ``table_4_3``: the output of ``thesis.chapter4.findings``), ``tip.findings`` (of
        ``thesis.chapter5.findings``), ``gmm.findings`` (of ``thesis.chapter6.findings``) with
        ``gmm.well_trained_epoch`` / ``gmm.overfitted_epoch``, and ``errors`` (stage -> message,
        quoted when a part is missing). Any part may be absent.

    Returns
    -------
    list of 7 dicts
        ``{id, claim, where, thesis, ours, reproduced, reason, values}`` in the order of
        :data:`FINDINGS`. ``reproduced`` is "reproduced" when every effect of the finding
        (:data:`EFFECTS`) goes the thesis's way, "opposite" when one goes the other way, "not
        reproduced" otherwise, "not computed" when the numbers are missing (``reason`` says
        why). One run has no spread: ``nns reproduce`` judges several seeds.
    """
    out = []
    for f in FINDINGS:
        v = _read(f["id"], results)
        verdict = _ONE_RUN[direction(v["values"], EFFECTS[f["id"]])]
        out.append({**f, "ours": v["ours"], "reproduced": verdict, "reason": v["reason"], "values": v["values"]})
    return out
