"""The sections of the HTML report (:mod:`nns_cuda.app.report`): one renderer per section.

Each renderer takes the results dict and a :class:`Figures` writer and returns the section's
HTML body; a section whose data is missing returns a "not computed: <reason>" paragraph.
"""
from __future__ import annotations

import html
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from nns_cuda.analysis.thesis import NOT_COMPUTED, NOT_REPRODUCED, OPPOSITE, REPRODUCED
from nns_cuda.analysis.thesis import as_number as _num
from nns_cuda.analysis.thesis import checkpoint_label as _short
from nns_cuda.analysis.thesis import format_number as _fmt
from nns_cuda.analysis.thesis import judge_findings
from nns_cuda.analysis.thesis import lookup as _get
from nns_cuda.analysis.thesis import missing_reason as _why
from nns_cuda.app import viz

__all__ = ["Figures", "RENDER", "escape", "rich", "not_computed", "anomaly_counts_figure"]


def escape(s: Any) -> str:
    """``s`` as HTML text (quotes escaped too)."""
    return html.escape(str(s), quote=True)


def rich(s: Any) -> "_Raw":
    """``s`` as HTML text with the thesis's superscripts set as such: ``C^l`` -> C<sup>l</sup>."""
    return _Raw(re.sub(r"\b([A-Za-z]+)\^([A-Za-z0-9]+)", r"\1<sup>\2</sup>", escape(s)))



class Figures:
    """Saves the report's figures as PNG files in ``out_dir`` and remembers their names."""

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
    return f'<img src="{escape(name)}" alt="{escape(alt)}"{w}>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    h = "".join(f"<th>{c if isinstance(c, _Raw) else escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    c = f' class="{cls}"' if cls else ""
    head = f"<thead><tr>{h}</tr></thead>" if any(str(x) for x in header) else ""
    return f"<table{c}>{head}<tbody>{body}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML inside a table cell."""


def not_computed(reason: str) -> str:
    """The paragraph of a section (or part) whose data is missing."""
    return f'<p class="not-computed">not computed: {escape(reason)}</p>'


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


#: CSS class of each verdict.
_VERDICT_CLS = {REPRODUCED: "yes", OPPOSITE: "no", NOT_REPRODUCED: "nc", NOT_COMPUTED: "nc"}


def _verdict(v: str, reason: str = "") -> "_Raw":
    return _Raw(f'<span class="{_VERDICT_CLS.get(v, "nc")}">{escape(v)}</span>'
                + (f"<br><small>{escape(reason)}</small>" if reason else ""))


def _counts(verdicts: Sequence[str]) -> str:
    return ", ".join(f"{v}: <b>{sum(x == v for x in verdicts)}</b>"
                     for v in (REPRODUCED, NOT_REPRODUCED, OPPOSITE, NOT_COMPUTED))


def _reproduction(rep: Mapping[str, Any]) -> str:
    """The multi-seed reproduction (``nns reproduce``, docs/reproduction.md) as a table."""
    fs = rep.get("findings") or []
    n = len(rep.get("seeds") or [])
    head = (f"<p>The declared protocol (docs/reproduction.md), run by <code>nns reproduce</code> on "
            f"{escape(str(rep.get('finished', '?'))[:10])}: {n} seed(s), commit "
            f"{escape(str(rep.get('commit') or '?')[:10])}, {_fmt((rep.get('seconds') or 0) / 60, 1)} min. "
            f"Findings {_counts([f['verdict'] for f in fs])}.</p>")
    if rep.get("quick") or rep.get("deviations"):
        head += f'<p class="note">Not the declared protocol: {escape("; ".join(rep.get("deviations") or []))}</p>'
    rows = []
    for i, f in enumerate(fs, 1):
        for k, b in enumerate(f["by_model"].values()):
            seeds = "; ".join(f"{p['seed']}: " + (", ".join(_fmt(v, 2) for v in p["values"].values())
                                                   if p.get("values") else "–") for p in b["per_seed"])
            rows.append((i if k == 0 else "", rich(f"{f['claim']} ({f['where']})") if k == 0 else "", b["label"],
                         rich(b["thesis"]), rich(b["ours"]), _Raw(f"{b['n_holds']}/{b['n_seeds']}<br><small>{escape(seeds)}</small>"),
                         _verdict(b["verdict"], b.get("reason", "")), _verdict(f["verdict"]) if k == 0 else ""))
    return head + _table(["#", "finding", "model", "thesis", "ours: mean ± sd over seeds", "seeds holding (per seed)",
                          "verdict", "overall"], rows, "findings")


def _sec_findings(r, figs) -> str:
    f = r.get("findings") or judge_findings(r)
    rows = [(i, rich(x["claim"]), rich(f'{x["where"]}: {x["thesis"]}'), rich(x["ours"]),
             _verdict(x["reproduced"], x.get("reason", ""))) for i, x in enumerate(f, 1)]
    rep = r.get("reproduction")
    if rep is None:  # the full protocol's JSON (docs/results/reproduction.json) when there is one
        from nns_cuda.analysis.thesis.reproduce import load_reproduction

        rep = load_reproduction()
    intro = (_reproduction(rep) + "<h3>This run</h3>") if isinstance(rep, Mapping) and rep.get("findings") else (
        '<p class="note">No reproduction results yet: the full protocol (two models, five seeds, a verdict rule '
        "declared before the run; docs/reproduction.md) is <code>nns reproduce</code>.</p>")
    head = (f"<p>One model, one seed: {_counts([x['reproduced'] for x in f])} (judged from this run's numbers only; "
            "the thesis's numbers are quoted). One run has no spread; the full protocol is "
            "<code>nns reproduce</code>.</p>")
    return intro + head + _table(["#", "finding", "thesis", "ours", "verdict"], rows, "findings")


def _sec_training(r, figs) -> str:
    h = _get(r, "training", "history")
    if not h or not h.get("epochs"):
        return not_computed(_why(r, "training", "training.history"))
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
    from matplotlib.ticker import MaxNLocator

    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
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
        return not_computed(_why(r, "learned_images", "learned_images.samples"))
    parts = []
    layers = li.get("layers") or list(samples[0].get("layer_images", {}).keys())
    rows, titles = [], []
    for s in samples:
        row = {_short_layer(l): s["layer_images"][l] for l in layers if l in s.get("layer_images", {})}
        if s.get("winner") is not None:
            row["winner neuron"] = s["winner"]
        rows.append(row)
        titles.append(f"label {s.get('label')}, pred {s.get('pred')}")
    fig = viz.layer_grid([s["x"] for s in samples], rows, row_titles=titles, colorbar=True)
    parts.append(_img(figs.save(fig, "learned_images_layers.png"), "learned images per layer"))
    fig = viz.layer_grid([s["x"] for s in samples], rows, row_titles=titles, cmap="jet", colorbar=True)
    jet = figs.save(fig, "learned_images_layers_jet.png")
    parts.append("<p>Each row: an input, then the layer learned image Σ<sub>k</sub> L<sup>k</sup> of each layer "
                 "(L<sup>k</sup> = Σ<sub>i,j</sub> LI<sub>k,i,j</sub> · a<sup>k</sup><sub>i,j</sub>) and the learned image "
                 "of the winner (predicted-class) output neuron. Diverging colours centred at zero, each panel "
                 "with its own colour scale (the bar beside it); "
                 f'the same figure with the thesis\'s "jet" colours: <a href="{escape(jet)}">{escape(jet)}</a>.</p>')
    s0 = samples[0]
    fl = {}
    for l in layers:
        f = (s0.get("filters") or {}).get(l)
        if f:
            fl[l] = (f["images"], [f"k={k}" for k in f["indices"]])
    if fl:
        fig = viz.filter_rows(s0["x"], fl, colorbar=True)
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
        return not_computed(_why(r, "knowledge", "knowledge.layers"))
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
        return not_computed(_why(r, "fq", "fq.table_3_3"))
    layers = _get(t, "layers") or [str(i) for i in range(len(vals))]
    fig = viz.line_plot(layers, {"ours": vals}, xticklabels=layers, ylabel="$C^l$", title="feature-map ↔ learned-image "
                        "correlation")
    rows = [(l, _fmt(v)) for l, v in zip(layers, vals)]
    th = _get(t, "thesis") or {}
    thesis_rows = [(k, ", ".join(_fmt(x) for x in v)) for k, v in th.items() if isinstance(v, list)]
    return (_img(figs.save(fig, "fm_li_correlation.png"), "feature-map / learned-image correlation per layer")
            + _table(["layer", rich("C^l (ours)")], rows)
            + (_table(["thesis model", rich("C^l, layers 1–5")], thesis_rows) if thesis_rows else ""))


def _sec_pearson(r, figs) -> str:
    pr = _get(r, "fq", "fig_4_3", "pearson_r")
    if not isinstance(pr, Mapping) or not pr:
        return not_computed(_why(r, "fq", "fq.fig_4_3.pearson_r"))
    names = list(pr.keys())
    fig = viz.bar_plot(names, {"Pearson r (mean F vs mean activation)": [pr[n] for n in names]}, ylabel="r",
                       title="FQ ↔ activation")
    return (_img(figs.save(fig, "fq_pearson.png"), "Pearson r per layer")
            + _table(["layer", "r"], [(n, _fmt(pr[n])) for n in names]))


def _sec_fq(r, figs) -> str:
    t = _get(r, "fq", "fig_4_4")
    layers, mean, var = _get(t, "layers"), _get(t, "fq_mean"), _get(t, "fq_var")
    if not (isinstance(layers, list) and isinstance(mean, list) and isinstance(var, list)):
        return not_computed(_why(r, "fq", "fq.fig_4_4"))
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
            + (f"<p>Thesis: {escape(th)}.</p>" if th else ""))


def _sec_diversity(r, figs) -> str:
    t = _get(r, "fq", "table_4_3")
    if not isinstance(t, Mapping):
        return not_computed(_why(r, "fq", "fq.table_4_3"))
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
        return not_computed(reason)
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
        return not_computed(_why(r, "tip", "tip.findings.measured.spearman"))
    props = list(next(iter(sp.values())).keys())
    rows = [[s] + [_fmt(v.get(p), 2) for p in props] for s, v in sp.items()]
    th = _get(r, "tip", "findings", "thesis", "spearman_AVoU_T_m")
    txt = ""
    if isinstance(th, Mapping):
        txt = "<p>Thesis ρ(AVoU, T_m): " + escape("; ".join(f"{k} {', '.join(_fmt(x, 2) for x in v)}"
                                                           for k, v in th.items() if isinstance(v, list))) + "</p>"
    return _table(["saliency"] + [f"T ({p})" for p in props], rows) + txt


def _sec_typology(r, figs) -> str:
    ty = _get(r, "tip", "findings", "details", "types")
    if not isinstance(ty, Mapping) or not ty.get("checkpoints"):
        return not_computed(_why(r, "tip", "tip.findings.details.types"))
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
           f"(property T_m, per = {escape(ty.get('per'))} %, base accuracy "
           f"{escape(', '.join(_fmt(b, 1) for b in ty.get('base_accuracy') or []))} %).</p>")
    if isinstance(th, Mapping):
        txt += "<p>Thesis (VGG-16 / CUB-200, phases 1–3): " + escape("; ".join(
            f"{k} {', '.join(_fmt(x, 1) for x in v)} pp" for k, v in th.items())) + "</p>"
    return _table(["type"] + names, rows) + txt


def _sec_gmm_scatter(r, figs) -> str:
    sc = _get(r, "gmm", "scatter")
    if not isinstance(sc, Mapping):
        return not_computed(_why(r, "gmm", "gmm.scatter"))
    panels = []
    for kind in ("anomaly", "normal"):
        p = sc.get(kind)
        if p:
            panels.append({"points": p["points"], "labels": p["labels"], "outliers": p.get("outliers") or [],
                           "title": f"{kind} filter {p['filter']} (k = {p.get('k')}, CH = {_fmt(p.get('ch'), 1)})"})
    if not panels:
        return not_computed("no filter to draw")
    fig = viz.scatter_clusters(panels)
    note = ""
    if not sc.get("anomaly"):
        note = not_computed(f"anomaly-filter panel: {sc.get('anomaly_note', 'no anomaly filter found')}")
    return (_img(figs.save(fig, "gmm_scatter.png"), "GMM clusters") + note
            + f"<p>Filter learned images of {escape(_get(r, 'gmm', 'n_samples'))} training samples, layer "
              f"{escape(sc.get('layer'))}, projected on their top-2 principal components and clustered by a Gaussian "
              "mixture (k by Calinski–Harabasz). Over-fitted model.</p>")


def _sec_anomaly_counts(r, figs) -> str:
    parts = []
    rows = _get(r, "gmm", "counts")
    if isinstance(rows, list) and rows:
        g = r.get("gmm") or {}
        fig = anomaly_counts_figure(rows, g.get("well_trained_epoch"), g.get("overfitted_epoch"), g.get("layer"))
        parts.append(_img(figs.save(fig, "anomaly_counts.png"), "anomaly filters per epoch"))
        parts.append(_table(["epoch", "anomaly filters", "filters", "outlier samples"],
                            [(x.get("epoch"), x.get("n_anomalous"), x.get("n_filters"), x.get("n_outlier_samples"))
                             for x in rows]))
    else:
        parts.append(not_computed(_why(r, "gmm", "gmm.counts")))
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
        parts.append(not_computed(_why(r, "gmm", "gmm.findings")))
    return "".join(parts)


def anomaly_counts_figure(rows: Sequence[Mapping[str, Any]], well_trained: Optional[int], overfitted: Optional[int],
                          layer: Optional[str] = None):
    """Fig. 6-4: anomaly filters per epoch, with the well-trained and over-fitted epochs marked.

    Parameters
    ----------
    rows : sequence of mappings with ``"epoch"`` (int) and ``"n_anomalous"`` (int or None)
    well_trained, overfitted : int or None
        Epochs marked by a vertical line each (distinct colour, style and legend entry; one line
        labelled with both names when they coincide).
    layer : str, optional
        Named in the title.

    Returns
    -------
    Figure
        Integer ticks on both axes; the count axis starts at 0 and reaches at least 1, so
        all-zero counts lie on its visible floor (the markers are drawn unclipped).
    """
    from matplotlib.ticker import MaxNLocator

    ep = [int(x["epoch"]) for x in rows]
    n = [np.nan if _num(x.get("n_anomalous")) is None else float(x["n_anomalous"]) for x in rows]
    fig = viz.new_figure(5.5, 3.4)
    ax = fig.subplots()
    # not clipped: counts of 0 sit on the lower edge of the axes, which starts at 0
    ax.plot(ep, n, "o-", ms=4, color="C0", label="anomaly filters", clip_on=False, zorder=3)
    marks = [(well_trained, "well-trained", "C2", "--"), (overfitted, "over-fitted", "C3", ":")]
    if well_trained is not None and well_trained == overfitted:
        marks = [(well_trained, "well-trained = over-fitted", "C4", "-.")]
    for e, name, colour, style in marks:
        if e is not None:
            ax.axvline(e, color=colour, ls=style, lw=1.4, label=f"{name} (epoch {e})")
    top = max([1.0] + [v for v in n if np.isfinite(v)])
    ax.set_ylim(0, 1.15 * top)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    span = [e for e in ep + [well_trained, overfitted] if e is not None]
    ax.set_xlim(min(span) - 0.5, max(span) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("anomaly filters")
    ax.set_title(f"anomaly filters per epoch{f' ({layer})' if layer else ''}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _sec_timings(r, figs) -> str:
    t = r.get("timings") or {}
    if not t:
        return not_computed("no timings recorded")
    return _table(["stage", "seconds"], [(k, _fmt(v, 2)) for k, v in t.items()])


RENDER: Dict[str, Callable[[Mapping[str, Any], Figures], str]] = {
    "overview": _sec_overview, "findings": _sec_findings, "training": _sec_training,
    "learned-images": _sec_learned_images, "knowledge": _sec_knowledge, "fm-li": _sec_fm_li,
    "pearson": _sec_pearson, "fq": _sec_fq, "diversity": _sec_diversity, "aipc": _sec_aipc,
    "spearman": _sec_spearman, "typology": _sec_typology, "gmm-scatter": _sec_gmm_scatter,
    "anomaly-counts": _sec_anomaly_counts, "timings": _sec_timings,
}
