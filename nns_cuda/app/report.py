"""The HTML report: one self-contained folder (``report.html`` + PNGs + ``metrics.json``).

:func:`write_report` turns the results of an NNS run (the dict that :func:`nns_cuda.demo.run_demo`
builds, or any dict with some of the keys below) into figures and tables next to the thesis's:

========================  ==================================================================
section                   from ``results``
========================  ==================================================================
Findings                  computed here from the analyses (:func:`compute_findings`)
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
(:func:`compute_findings`); the thesis's own numbers are quoted beside them.
"""
from __future__ import annotations

import html
import json
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nns_cuda.app import viz

__all__ = ["write_report", "write_metrics", "compute_findings", "jsonable", "FINDINGS", "HIGH_SPEARMAN",
           "SECTIONS"]

#: ``ρ(AVoU, T_m)`` at or above this counts as "high" (the thesis reports 0.97–1.00, Table 5-2).
HIGH_SPEARMAN = 0.8

#: The thesis's seven directional findings: id, claim, where, and the thesis's numbers (quoted).
FINDINGS: List[Dict[str, str]] = [
    {"id": "fm_li_depth", "claim": "Feature-map ↔ learned-image correlation C^l falls with depth",
     "where": "Table 3-3",
     "thesis": "C^l over layers 1–5: AlexNet 0.998 → 0.623, VGG-16 0.952 → 0.538"},
    {"id": "fq_pearson", "claim": "Pearson r between a neuron's FQ and its activation is positive",
     "where": "Fig. 4-3",
     "thesis": "positive in most conv layers; VGG-16 mid/high layers > 0.8, ResNet-18 ≥ 0.85"},
    {"id": "diversity_masking", "claim": "Masking the most diverse filters costs more loss than the least diverse",
     "where": "Table 4-3",
     "thesis": "% loss change top-20 vs bottom-20: VGG-16 +95.2 vs −0.01, AlexNet +108.3 vs −12.8 (data set 1)"},
    {"id": "avou_tm_spearman", "claim": f"Spearman ρ between AVoU and T_m is high (≥ {HIGH_SPEARMAN})",
     "where": "Table 5-2",
     "thesis": "ρ(AVoU, T_m) = 0.97–1.00 (AlexNet, VGG-11, VGG-16; three data sets)"},
    {"id": "hh_vs_ll", "claim": "Masking H-H filters costs more accuracy than masking L-L filters",
     "where": "Table 5-3",
     "thesis": "VGG-16 / CUB-200: H-H 17.4–26.0 pp vs L-L 0.0–0.4 pp (phases 1–3)"},
    {"id": "anomaly_overfit", "claim": "More anomaly filters when the model is over-fitted",
     "where": "Table 6-2",
     "thesis": "WT → OF: Simple CNN / CIFAR-10 5 → 12, LeNet-5 2 → 12, AlexNet 10 → 53 (VGG-16 11 → 10)"},
    {"id": "anomaly_masking", "claim": "Masking an anomaly filter costs less validation accuracy than a random filter",
     "where": "Table 6-5",
     "thesis": "mean val. acc. change, anomaly vs random: Simple CNN / CIFAR-10 +0.10 % vs −1.51 %, "
               "LeNet-5 −1.21 % vs −3.94 %"},
]

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

YES, NO, NOT = "yes", "no", "not computed"


# ============================================================================================
# helpers
# ============================================================================================
def _get(d: Any, *keys: Any) -> Any:
    """Nested lookup that returns None when any level is missing."""
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


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, nd: int = 3) -> str:
    f = _num(v)
    if f is None:
        return "–"
    if f != 0 and (abs(f) >= 1e4 or abs(f) < 10 ** (-nd)):
        return f"{f:.{nd}g}"
    return f"{f:.{nd}f}"


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _is_array(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return True
    try:
        import torch

        return isinstance(v, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


def jsonable(obj: Any, max_array: int = 10000) -> Any:
    """Tensors / numpy -> lists (arrays with more than ``max_array`` entries -> a shape note),
    NaN / Inf -> None, tuples -> lists, keys -> str, other objects -> str."""
    if _is_array(obj):
        a = viz.to_numpy(obj)
        if a.size > max_array:
            return {"array_shape": list(a.shape), "note": "omitted (large array; see the report's figures)"}
        return jsonable(a.tolist(), max_array)
    if isinstance(obj, (bool, type(None), str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v, max_array) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, max_array) for v in obj]
    return str(obj)


def _spearman_depth(values: Sequence[Optional[float]]) -> Optional[float]:
    pts = [(i, v) for i, v in enumerate(values) if _num(v) is not None]
    if len(pts) < 2 or len({v for _, v in pts}) < 2:
        return None
    from scipy.stats import spearmanr

    r = float(spearmanr([p[0] for p in pts], [p[1] for p in pts]).statistic)
    return r if math.isfinite(r) else None


def _why(results: Mapping[str, Any], key: str, what: str) -> str:
    err = _get(results, "errors", key)
    if err:
        return str(err)
    return f"{what} is not in the results"


# ============================================================================================
# findings
# ============================================================================================
def _finding(fid: str, reproduced: str, ours: str, reason: str = "") -> Dict[str, Any]:
    base = next(f for f in FINDINGS if f["id"] == fid)
    return {**base, "ours": ours, "reproduced": reproduced, "reason": reason}


def compute_findings(results: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Judge each of the thesis's seven directional findings from the measured numbers.

    Returns
    -------
    list of dicts ``{id, claim, where, thesis, ours, reproduced, reason}`` with ``reproduced`` in
    ``{"yes", "no", "not computed"}``; ``reason`` says why when not computed.
    """
    out: List[Dict[str, Any]] = []
    fq, tipf, gmmf = results.get("fq"), _get(results, "tip", "findings"), _get(results, "gmm", "findings")

    # 1. C^l falls with depth (Table 3-3)
    t33 = _get(fq, "table_3_3")
    vals = _get(t33, "ours_C_l")
    if not isinstance(vals, (list, tuple)):
        out.append(_finding("fm_li_depth", NOT, "–", _why(results, "fq", "fq.table_3_3.ours_C_l")))
    else:
        layers = _get(t33, "layers") or [str(i + 1) for i in range(len(vals))]
        rho = _spearman_depth(vals)
        ours = ", ".join(f"{l}: {_fmt(v)}" for l, v in zip(layers, vals))
        if rho is None:
            out.append(_finding("fm_li_depth", NOT, ours, "fewer than two layers with a defined, distinct C^l"))
        else:
            out.append(_finding("fm_li_depth", YES if rho < 0 else NO, f"{ours} (Spearman with depth ρ = {rho:+.2f})"))

    # 2. Pearson > 0 (Fig. 4-3)
    pr = _get(fq, "fig_4_3", "pearson_r")
    if not isinstance(pr, Mapping) or not pr:
        out.append(_finding("fq_pearson", NOT, "–", _why(results, "fq", "fq.fig_4_3.pearson_r")))
    else:
        finite = {k: _num(v) for k, v in pr.items() if _num(v) is not None}
        ours = ", ".join(f"{k}: {_fmt(v, 2)}" for k, v in pr.items())
        if not finite:
            out.append(_finding("fq_pearson", NOT, ours, "r undefined in every layer (constant FQ or activation)"))
        else:
            pos = sum(v > 0 for v in finite.values())
            out.append(_finding("fq_pearson", YES if pos > len(finite) / 2 else NO,
                                f"{ours} ({pos}/{len(finite)} layers > 0)"))

    # 3. diversity masking (Table 4-3)
    t43 = _get(fq, "table_4_3")
    top, bot = _num(_get(t43, "pct_change_top")), _num(_get(t43, "pct_change_bottom"))
    if t43 is None:
        out.append(_finding("diversity_masking", NOT, "–", _why(results, "fq", "fq.table_4_3")))
    elif _get(t43, "degenerate"):
        out.append(_finding("diversity_masking", NOT, "–", "every filter has the same DBSCAN diversity: no ranking"))
    elif top is None or bot is None:
        out.append(_finding("diversity_masking", NOT, "–", "loss change undefined (zero base loss?)"))
    else:
        n = _get(t43, "n_mask")
        out.append(_finding("diversity_masking", YES if top > bot else NO,
                            f"% loss change, {n or '?'} most vs least diverse of "
                            f"{_get(t43, 'n_filters') or '?'} filters: {top:+.2f} % vs {bot:+.2f} %"))

    # 4. AVoU ↔ T_m (Table 5-2)
    rho = _get(tipf, "measured", "spearman_AVoU_T_m")
    if tipf is None:
        out.append(_finding("avou_tm_spearman", NOT, "–", _why(results, "tip", "tip.findings")))
    elif _num(rho) is None:
        out.append(_finding("avou_tm_spearman", NOT, "–", "ρ undefined (constant AVoU or T_m over the filters)"))
    else:
        out.append(_finding("avou_tm_spearman", YES if float(rho) >= HIGH_SPEARMAN else NO,
                            f"ρ(AVoU, T_m) = {float(rho):.3f} ({_get(tipf, 'layer') or ''})"))

    # 5. H-H vs L-L (Table 5-3)
    rows = _get(tipf, "measured", "accuracy_drop_masking_HH_vs_LL")
    if tipf is None:
        out.append(_finding("hh_vs_ll", NOT, "–", _why(results, "tip", "tip.findings")))
    elif not isinstance(rows, list) or not rows:
        out.append(_finding("hh_vs_ll", NOT, "–", "no fg/bg filter types in the results (no foreground masks?)"))
    else:
        pairs = [(str(r.get("checkpoint")), _num(r.get("H-H")), _num(r.get("L-L"))) for r in rows]
        ok = [(c, h, l) for c, h, l in pairs if h is not None and l is not None]
        ours = "; ".join(f"{_short(c)}: H-H {_fmt(h, 1)} pp vs L-L {_fmt(l, 1)} pp" for c, h, l in ok)
        if not ok:
            out.append(_finding("hh_vs_ll", NOT, "–", "accuracy drops undefined"))
        else:
            out.append(_finding("hh_vs_ll", YES if all(h > l for _, h, l in ok) else NO,
                                ours + " (accuracy drop when masked; yes = H-H larger at every checkpoint)"))

    # 6. more anomaly filters when over-fitted (Table 6-2)
    t62 = _get(gmmf, "table_6_2")
    wt, of = _num(_get(t62, "WT")), _num(_get(t62, "OF"))
    if gmmf is None:
        out.append(_finding("anomaly_overfit", NOT, "–", _why(results, "gmm", "gmm.findings")))
    elif wt is None or of is None:
        out.append(_finding("anomaly_overfit", NOT, "–", "anomaly counts missing from gmm.findings.table_6_2"))
    else:
        g = results.get("gmm") or {}
        out.append(_finding("anomaly_overfit", YES if of > wt else NO,
                            f"WT (epoch {g.get('well_trained_epoch', '?')}) {int(wt)} → OF (epoch "
                            f"{g.get('overfitted_epoch', '?')}) {int(of)} of {_get(t62, 'n_filters') or '?'} filters"))

    # 7. anomaly vs random masking (Table 6-5)
    t65 = _get(gmmf, "table_6_5")
    an, rnd = _num(_get(t65, "anomaly_mean_val_change")), _num(_get(t65, "random_mean_val_change"))
    if gmmf is None:
        out.append(_finding("anomaly_masking", NOT, "–", _why(results, "gmm", "gmm.findings")))
    elif t65 is None:
        out.append(_finding("anomaly_masking", NOT, "–", "gmm.findings.table_6_5 is missing"))
    elif an is None:
        out.append(_finding("anomaly_masking", NOT, "–", "no anomaly filter in the over-fitted model, so none to mask"))
    elif rnd is None:
        out.append(_finding("anomaly_masking", NOT, "–", "random-filter baseline missing"))
    else:
        out.append(_finding("anomaly_masking", YES if an > rnd else NO,
                            f"mean val. acc. change: anomaly {an:+.2f} vs random {rnd:+.2f} "
                            f"(R = {_get(t65, 'R') or '?'})"))
    return out


def _short(path: str) -> str:
    b = os.path.basename(str(path))
    return b[:-3] if b.endswith(".pt") else b


# ============================================================================================
# figures
# ============================================================================================
class _Figs:
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.files: List[str] = []

    def save(self, fig, name: str) -> str:
        path = os.path.join(self.out_dir, name)
        viz.save(fig, path, dpi=100)
        self.files.append(name)
        return name


def _img(name: str, alt: str, width: Optional[int] = None) -> str:
    w = f' style="max-width:{width}px"' if width else ""
    return f'<img src="{_esc(name)}" alt="{_esc(alt)}"{w}>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _esc(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    c = f' class="{cls}"' if cls else ""
    head = f"<thead><tr>{h}</tr></thead>" if any(str(x) for x in header) else ""
    return f"<table{c}>{head}<tbody>{body}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML inside a table cell."""


def _not_computed(reason: str) -> str:
    return f'<p class="not-computed">not computed: {_esc(reason)}</p>'


# --- sections -----------------------------------------------------------------------------
def _sec_overview(r, figs) -> str:
    m = r.get("meta") or {}
    rows = []
    for k, label in (("model", "model"), ("data", "data"), ("n_eval_samples", "test samples analysed"),
                     ("well_trained_epoch", "well-trained epoch (best validation accuracy)"),
                     ("overfitted_epoch", "over-fitted epoch (last)"), ("filter_layer", "filter-level layer"),
                     ("device", "device"), ("backend", "engine backend used"), ("strategy", "engine strategy"),
                     ("created", "created")):
        if m.get(k) is not None:
            rows.append((label, m[k]))
    tn = _get(r, "training", "trained_now")
    if tn is not None:
        rows.insert(1, ("model weights", "trained in this run" if tn else
                        f"reused from the cache ({_get(r, 'training', 'checkpoint_dir')})"))
    v = m.get("versions") or {}
    if v:
        rows.append(("versions", ", ".join(f"{k} {val}" for k, val in v.items() if k != "extension")))
    intro = ("<p>The Neural Network Scanner computes the exact <em>learned image</em> of every neuron: "
             "the input pixels weighted by what the gate-frozen, bias-free network passes on to that neuron "
             "(LI<sub>n</sub>(x) = g<sub>n</sub> · x ⊙ J<sub>n</sub>). Heat maps: red = positive contribution, "
             "blue = negative, white = zero.</p>")
    if m.get("quick"):
        intro += ('<p class="note">Quick run: a tiny model trained for a few epochs and a handful of samples — '
                  "the numbers exercise the pipeline and say nothing about the thesis.</p>")
    return intro + (_table(["", ""], rows, "kv") if rows else "")


def _sec_findings(r, figs) -> str:
    f = r.get("findings") or compute_findings(r)
    rows = []
    for i, x in enumerate(f, 1):
        cls = {"yes": "yes", "no": "no"}.get(x["reproduced"], "nc")
        rep = _Raw(f'<span class="{cls}">{_esc(x["reproduced"])}</span>'
                   + (f'<br><small>{_esc(x["reason"])}</small>' if x.get("reason") else ""))
        rows.append((i, x["claim"], f'{x["where"]}: {x["thesis"]}', x["ours"], rep))
    n_yes = sum(x["reproduced"] == YES for x in f)
    n_no = sum(x["reproduced"] == NO for x in f)
    n_nc = len(f) - n_yes - n_no
    head = (f"<p>Reproduced: <b>{n_yes}</b>, not reproduced: <b>{n_no}</b>, not computed: <b>{n_nc}</b> "
            "(judged from the measured numbers only; the thesis's numbers are quoted).</p>")
    return head + _table(["#", "finding", "thesis", "ours", "reproduced"], rows, "findings")


def _sec_training(r, figs) -> str:
    h = _get(r, "training", "history")
    if not h or not h.get("epochs"):
        return _not_computed(_why(r, "training", "training.history"))
    ep = h["epochs"]
    fig = viz.new_figure(9, 3.4)
    a1, a2 = fig.subplots(1, 2)
    nan = lambda seq: [np.nan if v is None else v for v in seq]  # noqa: E731
    a1.plot(ep, nan(h.get("train_loss", [])), "o-", ms=3, label="train")
    a1.plot(ep, nan(h.get("val_loss", [])), "s-", ms=3, label="validation")
    a1.set_xlabel("epoch"); a1.set_ylabel("cross-entropy loss")  # noqa: E702
    a2.plot(ep, [np.nan if v is None else 100 * v for v in h.get("train_acc", [])], "o-", ms=3, label="train")
    a2.plot(ep, [np.nan if v is None else 100 * v for v in h.get("val_acc", [])], "s-", ms=3, label="validation")
    a2.set_xlabel("epoch"); a2.set_ylabel("accuracy (%)")  # noqa: E702
    b = h.get("best_epoch")
    for ax in (a1, a2):
        if b is not None:
            ax.axvline(b, color="grey", ls="--", lw=0.8, label=f"well-trained (epoch {b})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    name = figs.save(fig, "training_curves.png")
    of = _get(r, "training", "overfitting") or {}
    txt = ""
    if of:
        txt = (f"<p>Validation loss: minimum {_fmt(of.get('min_val_loss'))} at epoch {of.get('min_val_loss_epoch')}, "
               f"last {_fmt(of.get('last_val_loss'))}; last train accuracy {_fmt(100 * (of.get('last_train_acc') or 0), 1)} %, "
               f"best validation accuracy {_fmt(100 * (of.get('best_val_acc') or 0), 1)} %.</p>")
    return _img(name, "training curves") + txt


def _sec_learned_images(r, figs) -> str:
    li = r.get("learned_images") or {}
    samples = li.get("samples") or []
    if not samples:
        return _not_computed(_why(r, "learned_images", "learned_images.samples"))
    parts = []
    layers = li.get("layers") or list(samples[0].get("layer_images", {}).keys())
    rows, titles = [], []
    for s in samples:
        row = {_short_layer(l): s["layer_images"][l] for l in layers if l in s.get("layer_images", {})}
        if s.get("winner") is not None:
            row["winner neuron"] = s["winner"]
        rows.append(row)
        titles.append(f"label {s.get('label')}, pred {s.get('pred')}")
    fig = viz.layer_grid([s["x"] for s in samples], rows, row_titles=titles)
    parts.append(_img(figs.save(fig, "learned_images_layers.png"), "learned images per layer"))
    fig = viz.layer_grid([s["x"] for s in samples], rows, row_titles=titles, cmap="jet")
    jet = figs.save(fig, "learned_images_layers_jet.png")
    parts.append("<p>Each row: an input, then the layer learned image Σ<sub>k</sub> L<sup>k</sup> of each layer "
                 "(L<sup>k</sup> = Σ<sub>i,j</sub> LI<sub>k,i,j</sub> · a<sup>k</sup><sub>i,j</sub>) and the learned image "
                 "of the winner (predicted-class) output neuron. Diverging colours centred at zero; "
                 f'the same figure with the thesis\'s "jet" colours: <a href="{_esc(jet)}">{_esc(jet)}</a>.</p>')
    s0 = samples[0]
    fl = {}
    for l in layers:
        f = (s0.get("filters") or {}).get(l)
        if f:
            fl[l] = (f["images"], [f"k={k}" for k in f["indices"]])
    if fl:
        fig = viz.filter_rows(s0["x"], fl)
        parts.append("<p>Filter learned images L<sup>k</sup> of the most active filters of each layer "
                     "(first sample; k = filter index):</p>")
        parts.append(_img(figs.save(fig, "filter_images.png"), "filter learned images per layer"))
    return "".join(parts)


def _short_layer(name: str) -> str:
    parts = str(name).split(".")
    return ".".join(parts[-2:]) if len(name) > 16 else name


def _sec_knowledge(r, figs) -> str:
    k = _get(r, "knowledge", "layers")
    if not isinstance(k, Mapping) or not k:
        return _not_computed(_why(r, "knowledge", "knowledge.layers"))
    names = list(k.keys())
    fig = viz.new_figure(9, 3.4)
    axes = fig.subplots(1, 2)
    xs = list(range(len(names)))
    for ax, key, lab in ((axes[0], "count", "activation-count ratio (%)"), (axes[1], "strength", "activation-strength ratio (%)")):
        for suffix, desc in (("_ratio", "all neurons"), ("_ratio_active", "active neurons")):
            ax.plot(xs, [np.nan if _pct(_get(k, n, key + suffix)) is None else _pct(_get(k, n, key + suffix))
                         for n in names], "o-", ms=3, label=desc)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(lab)
        ax.margins(x=0.06)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    rows = [(n, _fmt(_pct(_get(k, n, "count_ratio")), 2), _fmt(_pct(_get(k, n, "strength_ratio")), 2),
             _fmt(_pct(_get(k, n, "count_ratio_active")), 2), _fmt(_pct(_get(k, n, "strength_ratio_active")), 2),
             _fmt(_pct(_get(k, n, "active_fraction")), 1)) for n in names]
    return (_img(figs.save(fig, "knowledge_quantity.png"), "knowledge quantity per layer")
            + _table(["layer", "count %", "strength %", "count % (active)", "strength % (active)", "active neurons %"],
                     rows))


def _pct(v):
    f = _num(v)
    return None if f is None else 100 * f


def _sec_fm_li(r, figs) -> str:
    t = _get(r, "fq", "table_3_3")
    vals = _get(t, "ours_C_l")
    if not isinstance(vals, list):
        return _not_computed(_why(r, "fq", "fq.table_3_3"))
    layers = _get(t, "layers") or [str(i) for i in range(len(vals))]
    fig = viz.line_plot(layers, {"ours": vals}, xticklabels=layers, ylabel="C^l", title="feature-map ↔ learned-image "
                        "correlation")
    rows = [(l, _fmt(v)) for l, v in zip(layers, vals)]
    th = _get(t, "thesis") or {}
    thesis_rows = [(k, ", ".join(_fmt(x) for x in v)) for k, v in th.items() if isinstance(v, list)]
    return (_img(figs.save(fig, "fm_li_correlation.png"), "C^l per layer") + _table(["layer", "C^l (ours)"], rows)
            + (_table(["thesis model", "C^l layers 1–5"], thesis_rows) if thesis_rows else ""))


def _sec_pearson(r, figs) -> str:
    pr = _get(r, "fq", "fig_4_3", "pearson_r")
    if not isinstance(pr, Mapping) or not pr:
        return _not_computed(_why(r, "fq", "fq.fig_4_3.pearson_r"))
    names = list(pr.keys())
    fig = viz.bar_plot(names, {"Pearson r (mean F vs mean activation)": [pr[n] for n in names]}, ylabel="r",
                       title="FQ ↔ activation")
    return (_img(figs.save(fig, "fq_pearson.png"), "Pearson r per layer")
            + _table(["layer", "r"], [(n, _fmt(pr[n])) for n in names]))


def _sec_fq(r, figs) -> str:
    t = _get(r, "fq", "fig_4_4")
    layers, mean, var = _get(t, "layers"), _get(t, "fq_mean"), _get(t, "fq_var")
    if not (isinstance(layers, list) and isinstance(mean, list) and isinstance(var, list)):
        return _not_computed(_why(r, "fq", "fq.fig_4_4"))
    fig = viz.new_figure(9, 3.3)
    a1, a2 = fig.subplots(1, 2)
    xs = list(range(len(layers)))
    for ax, ys, lab in ((a1, mean, "mean of FQ"), (a2, var, "variance of FQ")):
        ax.plot(xs, [np.nan if _num(v) is None else v for v in ys], "o-", ms=4)
        ax.set_xticks(xs)
        ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        if all((_num(v) or 0) > 0 for v in ys):
            ax.set_yscale("log")
    fig.tight_layout()
    rows = [(l, _fmt(m), _fmt(v)) for l, m, v in zip(layers, mean, var)]
    th = _get(t, "thesis")
    return (_img(figs.save(fig, "fq_mean_var.png"), "FQ mean and variance per layer")
            + _table(["layer", "FQ mean", "FQ variance"], rows)
            + (f"<p>Thesis: {_esc(th)}.</p>" if th else ""))


def _sec_diversity(r, figs) -> str:
    t = _get(r, "fq", "table_4_3")
    if not isinstance(t, Mapping):
        return _not_computed(_why(r, "fq", "fq.table_4_3"))
    rows = [("layer", t.get("layer", "–")), ("filters / masked at each end", f"{t.get('n_filters', '?')} / {t.get('n_mask', '?')}"),
            ("base loss", _fmt(t.get("loss_base"))),
            ("loss, most diverse masked", f"{_fmt(t.get('loss_top'))} ({_fmt(t.get('pct_change_top'), 2)} %)"),
            ("loss, least diverse masked", f"{_fmt(t.get('loss_bottom'))} ({_fmt(t.get('pct_change_bottom'), 2)} %)"),
            ("degenerate ranking", t.get("degenerate", "–"))]
    return _table(["", "ours"], rows, "kv")


def _sec_aipc(r, figs) -> str:
    a = _get(r, "tip", "aipc")
    if not isinstance(a, Mapping) or not a:
        reason = _get(r, "tip", "aipc_error") or _why(r, "tip", "tip.aipc")
        return _not_computed(reason)
    fig = viz.new_figure(5.8, 3.6)
    ax = fig.subplots()
    rows = []
    for name, c in a.items():
        rat = [100 * float(x) for x in c.get("ratios", [])]
        ax.plot(rat, [np.nan if _num(v) is None else v for v in c.get("drop", [])], marker="o", ms=2, label=name)
        rows.append((name, _fmt(c.get("area_top10"), 2), _fmt(c.get("area"), 1), _fmt(c.get("base_accuracy"), 2)))
    ax.set_xlabel("filters masked (%), highest T first")
    ax.set_ylabel("accuracy drop (pp)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    layer = _get(r, "tip", "layer") or ""
    ax.set_title(f"AIPC, {layer}", fontsize=10)
    fig.tight_layout()
    return (_img(figs.save(fig, "aipc.png"), "AIPC curves")
            + _table(["property", "area 0–10 % (pp·%)", "area 0–100 %", "base accuracy %"], rows))


def _sec_spearman(r, figs) -> str:
    sp = _get(r, "tip", "findings", "measured", "spearman")
    if not isinstance(sp, Mapping) or not sp:
        return _not_computed(_why(r, "tip", "tip.findings.measured.spearman"))
    props = list(next(iter(sp.values())).keys())
    rows = [[s] + [_fmt(v.get(p), 2) for p in props] for s, v in sp.items()]
    th = _get(r, "tip", "findings", "thesis", "spearman_AVoU_T_m")
    txt = ""
    if isinstance(th, Mapping):
        txt = "<p>Thesis ρ(AVoU, T_m): " + _esc("; ".join(f"{k} {', '.join(_fmt(x, 2) for x in v)}"
                                                           for k, v in th.items() if isinstance(v, list))) + "</p>"
    return _table(["saliency"] + [f"T ({p})" for p in props], rows) + txt


def _sec_typology(r, figs) -> str:
    ty = _get(r, "tip", "findings", "details", "types")
    if not isinstance(ty, Mapping) or not ty.get("checkpoints"):
        return _not_computed(_why(r, "tip", "tip.findings.details.types"))
    cps = [_short(c) for c in ty["checkpoints"]]
    share, drop = ty.get("share") or [], ty.get("accuracy_drop") or []
    types = list((share[0] if share else {}).keys())
    rows = []
    for t in types:
        rows.append([t] + [f"{_fmt(100 * (_num(s.get(t)) or 0), 0)} % / {_fmt(d.get(t), 1)} pp"
                           for s, d in zip(share, drop)])
    phases = _get(r, "tip", "checkpoints")
    names = cps
    if isinstance(phases, Mapping):
        inv = {_short(v): k for k, v in phases.items()}
        names = [f"{c} ({_short(phases[c]).replace('_', ' ')})" if c in phases and phases[c]
                 else (f"{inv[c]} ({c})" if c in inv else c) for c in cps]
    th = _get(r, "tip", "findings", "thesis", "table_5_3_accuracy_change")
    txt = (f"<p>Each cell: share of the layer's filters / accuracy drop when that type is masked "
           f"(property T_m, per = {_esc(ty.get('per'))} %, base accuracy "
           f"{_esc(', '.join(_fmt(b, 1) for b in ty.get('base_accuracy') or []))} %).</p>")
    if isinstance(th, Mapping):
        txt += "<p>Thesis (VGG-16 / CUB-200, phases 1–3): " + _esc("; ".join(
            f"{k} {', '.join(_fmt(x, 1) for x in v)} pp" for k, v in th.items())) + "</p>"
    return _table(["type"] + names, rows) + txt


def _sec_gmm_scatter(r, figs) -> str:
    sc = _get(r, "gmm", "scatter")
    if not isinstance(sc, Mapping):
        return _not_computed(_why(r, "gmm", "gmm.scatter"))
    panels = []
    for kind in ("anomaly", "normal"):
        p = sc.get(kind)
        if p:
            panels.append({"points": p["points"], "labels": p["labels"], "outliers": p.get("outliers") or [],
                           "title": f"{kind} filter {p['filter']} (k = {p.get('k')}, CH = {_fmt(p.get('ch'), 1)})"})
    if not panels:
        return _not_computed("no filter to draw")
    fig = viz.scatter_clusters(panels)
    note = ""
    if not sc.get("anomaly"):
        note = _not_computed(f"anomaly-filter panel: {sc.get('anomaly_note', 'no anomaly filter found')}")
    return (_img(figs.save(fig, "gmm_scatter.png"), "GMM clusters") + note
            + f"<p>Filter learned images of {_esc(_get(r, 'gmm', 'n_samples'))} training samples, layer "
              f"{_esc(sc.get('layer'))}, projected on their top-2 principal components and clustered by a Gaussian "
              "mixture (k by Calinski–Harabasz). Over-fitted model.</p>")


def _sec_anomaly_counts(r, figs) -> str:
    parts = []
    rows = _get(r, "gmm", "counts")
    if isinstance(rows, list) and rows:
        ep = [x.get("epoch") for x in rows]
        fig = viz.line_plot(ep, {"anomaly filters": [x.get("n_anomalous") for x in rows]}, xlabel="epoch",
                            ylabel="anomaly filters", title=f"anomaly filters per epoch ({_get(r, 'gmm', 'layer')})")
        g = r.get("gmm") or {}
        ax = fig.axes[0]
        for e, lab in ((g.get("well_trained_epoch"), "well-trained"), (g.get("overfitted_epoch"), "over-fitted")):
            if e is not None:
                ax.axvline(e, color="grey", ls="--", lw=0.8)
                ax.annotate(lab, (e, ax.get_ylim()[1]), fontsize=7, ha="center", va="bottom")
        parts.append(_img(figs.save(fig, "anomaly_counts.png"), "anomaly filters per epoch"))
        parts.append(_table(["epoch", "anomaly filters", "filters", "outlier samples"],
                            [(x.get("epoch"), x.get("n_anomalous"), x.get("n_filters"), x.get("n_outlier_samples"))
                             for x in rows]))
    else:
        parts.append(_not_computed(_why(r, "gmm", "gmm.counts")))
    f = _get(r, "gmm", "findings")
    if isinstance(f, Mapping):
        t62, t65, t64 = f.get("table_6_2") or {}, f.get("table_6_5") or {}, f.get("table_6_4") or {}
        kv = [("anomaly filters, well-trained / over-fitted", f"{t62.get('WT', '–')} / {t62.get('OF', '–')} "
                                                              f"of {t62.get('n_filters', '?')}"),
              ("mean val. acc. change, anomaly filters masked (%)", _fmt(t65.get("anomaly_mean_val_change"), 2)),
              ("mean val. acc. change, random filters masked (%)", _fmt(t65.get("random_mean_val_change"), 2)),
              ("anomaly filters with train acc. ↓ / val. acc. ↑",
               f"{t64.get('train_down', '–')} / {t64.get('val_up', '–')} of {t64.get('n_anomaly', '–')}"),
              ("parameters (λ, α, β, θ)", ", ".join(str((f.get("params") or {}).get(k, "?"))
                                                   for k in ("lam", "alpha", "beta", "theta")))]
        parts.append(_table(["", "ours"], kv, "kv"))
    else:
        parts.append(_not_computed(_why(r, "gmm", "gmm.findings")))
    return "".join(parts)


def _sec_timings(r, figs) -> str:
    t = r.get("timings") or {}
    if not t:
        return _not_computed("no timings recorded")
    return _table(["stage", "seconds"], [(k, _fmt(v, 2)) for k, v in t.items()])


_RENDER: Dict[str, Callable[[Mapping[str, Any], _Figs], str]] = {
    "overview": _sec_overview, "findings": _sec_findings, "training": _sec_training,
    "learned-images": _sec_learned_images, "knowledge": _sec_knowledge, "fm-li": _sec_fm_li,
    "pearson": _sec_pearson, "fq": _sec_fq, "diversity": _sec_diversity, "aipc": _sec_aipc,
    "spearman": _sec_spearman, "typology": _sec_typology, "gmm-scatter": _sec_gmm_scatter,
    "anomaly-counts": _sec_anomaly_counts, "timings": _sec_timings,
}

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
        ``results["findings"]`` is (re)computed by :func:`compute_findings` and stored back when
        ``results`` is a mutable dict.
    out_dir : folder (created)

    Returns
    -------
    str — path of ``report.html``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    findings = compute_findings(results)
    if isinstance(results, dict):
        results["findings"] = findings
        res = results
    else:
        res = {**results, "findings": findings}
    figs = _Figs(out_dir)
    body = []
    for sid, title in SECTIONS:
        try:
            content = _RENDER[sid](res, figs)
        except Exception as e:  # a broken section must not take the report down
            content = _not_computed(f"the section could not be drawn: {type(e).__name__}: {e}")
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
        res["findings"] = compute_findings(results)
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
        json.dump(jsonable(res), fh, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path
