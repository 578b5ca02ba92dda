"""The stages of the demo pipeline (:func:`nns_cuda.app.demo.run_demo`): the model, the scan
for Fig. 3-7, Chapter 3, FQ, TIP and GMM. Each takes the demo's configuration (a
:class:`nns_cuda.app.demo.DemoConfig`), the context filled by the stages before it and the
engine options, and returns its part of the results dict."""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from nns_cuda.app._common import batches, take

__all__ = ["Engine", "one_line", "need", "data_batches", "model_stage", "scan_stage", "knowledge_stage", "fq_stage",
           "tip_stage", "gmm_stage"]


# ----------------------------------------------------------------------------- engine options
@dataclass
class Engine:
    """Backend / memory options passed to every analysis through its injection points, and
    whether the analyses show progress bars."""

    backend: str = "auto"
    max_memory: Optional[int] = None
    progress: bool = True
    used: Dict[str, str] = field(default_factory=dict)

    def _note(self, res) -> None:
        b, s = getattr(res, "backend", None), getattr(res, "strategy", None)
        if b:
            self.used.setdefault("backend", b)
        if s:
            self.used.setdefault("strategy", s)

    def scan_fn(self, model, x, fg_mask, layers):
        from nns_cuda.engine.scanner import Scanner

        res = Scanner(model, list(layers), backend=self.backend, max_memory=self.max_memory, stats=True).scan(x, fg_mask)
        self._note(res)
        return res

    def filter_fn(self, model, x, layer):
        from nns_cuda.engine.scanner import Scanner

        res = Scanner(model, [layer], backend=self.backend, max_memory=self.max_memory, stats=False,
                      filter_images=True).scan(x)
        self._note(res)
        return res[layer].filter_images

    def li_fn(self, model, x, layer, neurons=None):
        from nns_cuda.engine.scanner import learned_images

        return learned_images(model, x, layer, neurons=neurons, backend=self.backend, max_memory=self.max_memory)



def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__



def need(module, name: str):
    """``module.name`` or an error saying that this piece is not available in this build."""
    fn = getattr(module, name, None)
    if fn is None:
        raise NotImplementedError(f"{module.__name__}.{name} is not available in this build")
    return fn



def data_batches(ds, indices: Sequence[int], batch_size: int, device) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A re-iterable list of ``(x, y, fg_mask)`` batches of ``ds[indices]`` on ``device``."""
    x, y, m = take(ds, indices)
    return batches(x, y, m, batch_size, device)


# ----------------------------------------------------------------------------- stages
def model_stage(cfg, dev, cache_dir, retrain: bool, progress: bool, tmp) -> Dict[str, Any]:
    """The demo model (quick: a tiny one trained now in ``tmp``): its history, the well-trained
    (``wt``) and over-fitted (``of``) models on ``dev`` and the training set."""
    from nns_cuda import models
    from nns_cuda import train as nns_train

    if cfg.quick:
        from nns_cuda import data as nns_data

        ckdir = os.path.join(tmp.name, "model")
        tr = nns_data.cluttered_digits("train", seed=0, n_train=cfg.quick_n_train, cache_dir=cache_dir)
        va = nns_data.cluttered_digits("val", seed=0, cache_dir=cache_dir)
        model = models.build(cfg.quick_model, 10, seed=0)
        hist = need(nns_train, "fit")(model, tr, va, epochs=cfg.quick_epochs, optimizer="adam", lr=3e-3,
                                      batch_size=20, seed=0, checkpoint_dir=ckdir, overwrite=True, device=dev,
                                      progress=False, num_threads=1, title=f"quick model {cfg.quick_model}")
        name, trained_now, train_ds = cfg.quick_model, True, tr
    else:
        t0 = time.time()
        demo = need(nns_train, "default_demo_model")(cache_dir, force=retrain, progress=progress, device=dev)
        hist, name, ckdir = demo.history, demo.name, demo.checkpoint_dir
        last = hist.last_checkpoint
        trained_now = bool(last) and os.path.isfile(last) and os.path.getmtime(last) >= t0 - 1
        cfgd = getattr(nns_train, "DEMO_CONFIG", {})
        from nns_cuda import data as nns_data

        train_ds = nns_data.cluttered_digits("train", seed=cfgd.get("data_seed", 0), n_train=cfgd.get("n_train"),
                                             cache_dir=cache_dir)
    wt = models.load_model(name, weights=hist.best_checkpoint).to(dev).eval()
    of = models.load_model(name, weights=hist.last_checkpoint).to(dev).eval()
    return {"history": hist, "model_name": name, "checkpoint_dir": ckdir, "trained_now": trained_now,
            "wt": wt, "of": of, "train_ds": train_ds}


def scan_stage(cfg, ctx: Dict[str, Any], eng: Engine) -> Dict[str, Any]:
    """Fig. 3-7: layer and filter learned images of a few test samples (one per class first) and
    the winner neuron's learned image."""
    from nns_cuda.engine.scanner import Scanner

    test, model, layers = ctx["test"], ctx["wt"], ctx["layers"]
    # one sample per class first, so the figure shows different digits
    picked: List[int] = []
    seen = set()
    for i in range(len(test)):
        y = int(test[i][1])
        if y not in seen:
            seen.add(y)
            picked.append(i)
        if len(picked) >= cfg.n_images:
            break
    dev = ctx["eval"][0][0].device
    x = torch.stack([test[i][0] for i in picked]).to(dev)
    y = [int(test[i][1]) for i in picked]
    res = Scanner(model, layers, backend=eng.backend, max_memory=eng.max_memory, stats=False,
                  filter_images=True).scan(x)
    eng._note(res)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1).tolist()
    samples = []
    for b in range(len(picked)):
        layer_images, filters = {}, {}
        for l in layers:
            L = res[l].filter_images[b]            # [K, D, H, W]
            layer_images[l] = L.sum(0).cpu()
            a = res[l].activations[b]
            score = a.reshape(a.shape[0], -1).sum(1) if a.dim() > 1 else a
            k = min(cfg.n_filters_drawn, L.shape[0])
            top = torch.argsort(score, descending=True, stable=True)[:k].tolist()
            filters[l] = {"indices": top, "images": L[top].cpu(),
                          "activation": [float(score[i]) for i in top]}
        samples.append({"index": picked[b], "x": x[b].cpu(), "label": y[b], "pred": int(pred[b]),
                        "layer_images": layer_images, "filters": filters})
    # the winner neuron's learned image (predicted class) — docs/spec.md §2 "winner neuron"
    out_layer = layers[-1]
    try:
        from nns_cuda.engine.scanner import learned_images

        for b, s in enumerate(samples):
            li = learned_images(model, x[b: b + 1], out_layer, neurons=[(s["pred"],)], backend=eng.backend,
                                max_memory=eng.max_memory)
            s["winner"] = li[0, 0].cpu()
    except Exception as e:  # the winner column is optional
        for s in samples:
            s["winner_error"] = one_line(e)
    return {"layers": layers, "samples": samples, "backend": res.backend, "strategy": res.strategy,
            "output_layer": out_layer}


def knowledge_stage(cfg, ctx: Dict[str, Any], eng: Engine) -> Dict[str, Any]:
    """Chapter 3: knowledge quantity of every scanned layer (Fig. 3-8)."""
    from nns_cuda.analysis import chapter3

    kq = need(chapter3, "KnowledgeQuantity")(batch_size=cfg.batch_size, scan_fn=eng.scan_fn, max_samples=cfg.samples)
    return kq.fit(ctx["wt"], ctx["eval"], ctx["layers"]).to_dict()


def fq_stage(cfg, ctx: Dict[str, Any], eng: Engine) -> Dict[str, Any]:
    """Chapter 4 (FQ) and the C^l part of Chapter 3 (Tables 3-3, 4-3, Figs. 4-3, 4-4)."""
    from nns_cuda.analysis.thesis import chapter4

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return need(chapter4, "findings")(
            ctx["wt"], ctx["eval"], max_samples=cfg.samples, batch_size=cfg.batch_size, scan_fn=eng.scan_fn,
            li_fn=eng.li_fn, filter_fn=eng.filter_fn, localisation=False, top2=False, ablation=False)


def tip_stage(cfg, ctx: Dict[str, Any], eng: Engine) -> Dict[str, Any]:
    """Chapter 5: the findings (T, saliency, fg/bg types over the training phases) and the AIPC curves."""
    from nns_cuda.analysis import tip
    from nns_cuda.analysis.thesis import chapter5

    layer = ctx["layer"]
    hist = ctx["history"]
    phases = hist.phase_checkpoints() if hasattr(hist, "phase_checkpoints") else None
    out: Dict[str, Any] = {"layer": layer, "checkpoints": phases}
    f = need(chapter5, "findings")(ctx["wt"], ctx["eval"], layer, checkpoints=phases, filter_fn=eng.filter_fn)
    out["findings"] = f
    T = (f.get("details") or {}).get("T") or {}
    if T:
        n = int(round(1 / cfg.aipc_step))
        ratios = [round(i * cfg.aipc_step, 10) for i in range(n + 1)]
        curves = need(tip, "aipc_curves")(ctx["wt"], ctx["eval"], layer,
                                          {k: torch.as_tensor(v, dtype=torch.float64) for k, v in T.items()}, ratios,
                                          progress=eng.progress)
        out["aipc"] = {k: c.to_dict() for k, c in curves.items()}
    else:
        out["aipc_error"] = "chapter5.findings returned no per-filter T values"
    return out


class _Memo:
    """Wrap a GMMAnalysis so that the same (model, data, layer) is analysed only once per demo.

    An estimator like the one it wraps: ``fit`` sets ``result_`` (the wrapped analysis's
    ``result_``, from the cache ``cache_`` when seen before) and returns ``self``.
    """

    def __init__(self, analysis):
        self.analysis = analysis

    def fit(self, model, data, layer):
        cache: Dict[Tuple[int, int, str], Any] = self.__dict__.setdefault("cache_", {})
        key = (id(model), id(data), layer)
        if key not in cache:
            cache[key] = self.analysis.fit(model, data, layer).result_
        self.result_ = cache[key]
        return self

    def to_dict(self, include_labels: bool = False) -> Dict[str, Any]:
        return self.result_.to_dict(include_labels=include_labels)

    def __getattr__(self, name):
        return getattr(self.analysis, name)


def gmm_stage(cfg, ctx: Dict[str, Any], eng: Engine) -> Dict[str, Any]:
    """Chapter 6: the findings (Tables 6-2 … 6-5), the scatter panels of Fig. 6-2 and the
    anomaly-filter counts over checkpoints (Fig. 6-4)."""
    from nns_cuda import models
    from nns_cuda.analysis import gmm
    from nns_cuda.analysis.thesis import chapter6

    layer, hist = ctx["layer"], ctx["history"]
    wt, of = ctx["wt"], ctx["of"]
    dev = ctx["eval"][0][0].device
    tr = ctx["train_ds"]
    S = min(cfg.gmm_samples, len(tr))
    adata = data_batches(tr, list(range(S)), max(cfg.batch_size, 50), dev)
    train_all = data_batches(tr, list(range(len(tr))), 100, dev)
    val_all = data_batches(ctx["val"], list(range(len(ctx["val"]))), 100, dev)
    analysis = _Memo(need(gmm, "GMMAnalysis")(k_max=cfg.k_max, seed=0, filter_fn=eng.filter_fn, progress=eng.progress))
    out: Dict[str, Any] = {"layer": layer, "n_samples": S, "samples": "training samples (the thesis clusters "
                                                                       "training samples)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = need(chapter6, "findings")(wt, of, layer, train_all, val_all, analysis_data=adata, analysis=analysis,
                                       R=cfg.random_filters, seed=0)
    out["findings"] = f
    out["well_trained_epoch"], out["overfitted_epoch"] = hist.best_epoch, (hist.epochs[-1] if hist.epochs else None)
    # Fig. 6-2: an anomaly filter and a normal filter of the over-fitted model
    r = analysis.fit(of, adata, layer).result_
    out["scatter"] = _scatter_panels(r)
    # Fig. 6-4: anomaly-filter counts over the training checkpoints
    epochs = _count_epochs(hist, cfg.count_checkpoints)
    rows = []
    counter = need(gmm, "anomaly_counts_over_checkpoints")
    for e in epochs:
        if e == hist.best_epoch:
            m = wt
        elif e == hist.epochs[-1]:
            m = of
        else:
            m = models.load_model(ctx["model_name"], weights=hist.checkpoint(e)).to(dev).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = counter({f"epoch {e}": m}, adata, layer, analysis)[0]
        row["epoch"] = e
        rows.append(row)
    out["counts"] = rows
    out["count_epochs_note"] = "well-trained = best validation accuracy, over-fitted = last epoch"
    return out


def _count_epochs(hist, n: int) -> List[int]:
    """``n`` epochs for Fig. 6-4: the well-trained and the over-fitted ones, then farthest-point
    fill (each added epoch is the one farthest from those chosen; ties to the earlier)."""
    eps = list(hist.epochs)
    if not eps:
        return []
    want = {eps[-1]}
    if hist.best_epoch is not None:
        want.add(hist.best_epoch)
    while len(want) < min(n, len(eps)):
        e = max((e for e in eps if e not in want), key=lambda e: (min(abs(e - w) for w in want), -e))
        want.add(e)
    return sorted(want)


def _scatter_panels(r) -> Dict[str, Any]:
    an = r.anomaly
    anomalous = an.anomalous.cpu()
    act = an.mean_activation.double().cpu()
    panels: Dict[str, Any] = {"layer": r.layer, "n_anomalous": int(anomalous.sum())}

    def panel(f: int, kind: str) -> Dict[str, Any]:
        return {"filter": int(f), "kind": kind, "points": r.points[f].cpu(), "labels": an.labels[f].cpu(),
                "outliers": an.outlier_samples[f].tolist() if kind == "anomaly" else [],
                "k": int(an.k[f]), "ch": float(an.ch[f]) if math.isfinite(float(an.ch[f])) else None,
                "mean_activation": float(act[f])}

    if bool(anomalous.any()):
        idx = torch.nonzero(anomalous).flatten()
        n_out = torch.tensor([an.outlier_samples[int(i)].numel() for i in idx])
        f_an = int(idx[int(torch.argmax(n_out))])
        panels["anomaly"] = panel(f_an, "anomaly")
    else:
        panels["anomaly"] = None
        panels["anomaly_note"] = "no anomaly filter in the over-fitted model"
    normal = torch.nonzero(~anomalous).flatten()
    if normal.numel():
        f_n = int(normal[int(torch.argmax(act[normal]))])  # the most active normal filter
        panels["normal"] = panel(f_n, "normal")
    else:
        panels["normal"] = None
    return panels

