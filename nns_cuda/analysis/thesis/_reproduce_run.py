"""One seed of one model of the reproduction protocol (private; the public API is ``reproduce``).

:func:`run_model_seed` renders the data of the seed, trains the model with a checkpoint per
epoch, takes the well-trained (best validation accuracy) and over-fitted (last) checkpoints
(thesis §6.3.2) and measures the seven findings' numbers with the chapter modules; Chapter 6
also gets, for a declared set of epoch checkpoints, how many filters meet each anomaly
criterion. Every stage is timed; a stage that fails leaves its message in ``errors`` and the
findings it feeds without numbers.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import TensorDataset

from nns_cuda.analysis._toolkit import to_jsonable

__all__ = ["STAGES", "run_model_seed", "checkpoint_epochs", "criteria_counts", "Reparametrised"]

#: The stages of one model and seed, in order (the progress bar counts them).
STAGES = ("data", "train", "chapter4", "chapter5", "chapter6")

Batches = List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _rendered(split: str, seed: int, renderings: int, offset: int, cache_dir: Optional[str],
              n_train: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, fg_mask)`` of ``renderings`` renderings of a split (rendering seeds
    ``seed, seed + offset, seed + 2·offset, …``), concatenated in that order."""
    from nns_cuda.data import cluttered_digits

    parts = []
    for r in range(renderings):
        kw = {"n_train": n_train} if split == "train" and n_train is not None else {}
        parts.append(cluttered_digits(split, seed=seed + r * offset, cache_dir=cache_dir, **kw).tensors())
    return tuple(torch.cat(t) for t in zip(*parts))  # type: ignore[return-value]


def _batches(t: Tuple[torch.Tensor, ...], n: Optional[int], batch_size: int) -> Batches:
    x, y, m = (a[:n] if n is not None else a for a in t)
    return [(x[i:i + batch_size], y[i:i + batch_size], m[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def _data(cfg: Mapping[str, Any], seed: int, cache_dir: Optional[str]) -> Dict[str, Any]:
    d, bs = cfg["data"], cfg["analyses"]["batch_size"]
    off = int(d["rendering_offset"])
    train = _rendered("train", seed, d["train_renderings"], off, cache_dir, d.get("n_train"))
    val = _rendered("val", seed, d["val_renderings"], off, cache_dir)
    test = _rendered("test", seed, d["eval_renderings"], off, cache_dir)
    n_eval = min(int(d["eval_samples"]), len(test[1]))
    n_gmm = min(int(d["gmm_samples"]), len(train[1]))
    return {
        "train_set": TensorDataset(*train), "val_set": TensorDataset(*val),
        "train": _batches(train, None, 250), "val": _batches(val, None, 250),
        "eval": _batches(test, n_eval, bs), "gmm": _batches(train, n_gmm, bs),
        "sizes": {"train": len(train[1]), "val": len(val[1]), "eval": n_eval, "gmm": n_gmm,
                  "train_digits": len(train[1]) // d["train_renderings"],
                  "val_digits": len(val[1]) // d["val_renderings"],
                  "eval_digits": len(test[1]) // d["eval_renderings"]},
    }


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _train(cfg: Mapping[str, Any], mcfg: Mapping[str, Any], seed: int, data: Mapping[str, Any],
           ckdir: str) -> Dict[str, Any]:
    from nns_cuda import models
    from nns_cuda import train as nns_train

    t = cfg["training"]
    model = models.build(mcfg["name"], 10, seed=seed)
    hist = nns_train.fit(model, data["train_set"], data["val_set"], epochs=int(t["epochs"]),
                         optimizer=t["optimizer"], lr=float(t["lr"]), momentum=float(t.get("momentum", 0.0)),
                         weight_decay=float(t.get("weight_decay", 0.0)), batch_size=int(t["batch_size"]),
                         seed=seed, checkpoint_dir=ckdir, overwrite=True, progress=False,
                         num_threads=t.get("num_threads"), title=f"{mcfg['label']}, seed {seed}")
    of = hist.overfitting()
    chk = t["overfit_check"]
    rise = (of["last_val_loss"] / of["min_val_loss"]) if of and of["min_val_loss"] > 0 else None
    passed = bool(rise is not None and rise >= chk["min_val_loss_ratio"]
                  and of["min_val_loss_epoch"] <= chk["max_min_epoch_fraction"] * len(hist))
    wt = models.load_model(mcfg["name"], weights=hist.best_checkpoint).eval()
    last = models.load_model(mcfg["name"], weights=hist.last_checkpoint).eval()
    h = hist.to_dict()
    summary = {k: h[k] for k in ("epochs", "train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds")}
    summary.update(well_trained_epoch=hist.best_epoch, overfitted_epoch=hist.epochs[-1], overfitting=of,
                   overfit_check={"val_loss_ratio": rise, **chk, "passed": passed},
                   phase_epochs=hist.phase_epochs(tuple(cfg["analyses"]["chapter5"]["phases"])))
    return {"history": hist, "wt": wt, "of": last, "summary": summary}


# --------------------------------------------------------------------------------------------
# Chapter 6 helpers
# --------------------------------------------------------------------------------------------
class Reparametrised:
    """A GMM analysis whose clustering is computed once per model and whose anomaly criteria
    use other Table 6-1 parameters.

    An estimator in the manner of :class:`nns_cuda.analysis.gmm.GMMAnalysis` (what
    :func:`nns_cuda.analysis.thesis.chapter6.findings` accepts as ``analysis``): ``fit``
    sets ``result_`` and returns ``self``. The clustering (filter images, PCA, the choice of
    ``k``) does not depend on ``λ, α, β, θ``, so it is shared through ``cache``.

    Parameters
    ----------
    analysis : GMMAnalysis
        Computes the clustering.
    params : mapping
        ``lam, alpha, beta, theta`` applied to the shared clustering.
    cache : dict
        ``id(model) -> GMMAnalysisResult`` of ``analysis``, shared by several instances.
    """

    def __init__(self, analysis: Any, params: Mapping[str, float], cache: Dict[int, Any]):
        self.analysis = analysis
        self.params = params
        self.cache = cache

    def base(self, model: nn.Module, data: Any, layer: str) -> Any:
        """The shared clustering result of ``model`` (computed on first use)."""
        key = id(model)
        if key not in self.cache:
            self.cache[key] = self.analysis.fit(model, data, layer).result_
        return self.cache[key]

    def fit(self, model: nn.Module, data: Any, layer: str) -> "Reparametrised":
        from nns_cuda.analysis import gmm

        r = self.base(model, data, layer)
        p = self.params
        an = gmm.anomaly_filters(r.points, r.mean_activation, lam=p["lam"], alpha=p["alpha"], beta=p["beta"],
                                 theta=p["theta"], k_max=int(r.anomaly.params["k_max"]),
                                 seed=int(r.anomaly.params["seed"]), selection=r.anomaly.selection)
        self.result_ = dataclasses.replace(r, anomaly=an)
        return self


def criteria_counts(anomaly: Any) -> Dict[str, Any]:
    """How many filters meet each anomaly criterion, each pair and all three.

    Parameters
    ----------
    anomaly : AnomalyResult
        Of :func:`nns_cuda.analysis.gmm.anomaly_filters`.

    Returns
    -------
    dict
        ``n_filters``, ``imbalanced`` (criterion 1), ``high_ch`` (2), ``high_activation`` (3),
        the pairs ``imbalanced_high_ch``, ``imbalanced_high_activation``,
        ``high_ch_high_activation``, ``all_three`` (the anomaly filters), ``with_small_cluster``
        (filters with at least one cluster of at most λ members), ``mean_k`` and ``params``.
    """
    i, c, a = anomaly.imbalanced.bool(), anomaly.high_ch.bool(), anomaly.high_activation.bool()
    return {"n_filters": int(i.numel()), "imbalanced": int(i.sum()), "high_ch": int(c.sum()),
            "high_activation": int(a.sum()), "imbalanced_high_ch": int((i & c).sum()),
            "imbalanced_high_activation": int((i & a).sum()), "high_ch_high_activation": int((c & a).sum()),
            "all_three": int(anomaly.anomalous.sum()), "with_small_cluster": int((anomaly.n_small > 0).sum()),
            "mean_k": float(anomaly.k.double().mean()),
            "params": {k: anomaly.params[k] for k in ("lam", "alpha", "beta", "theta")}}


def checkpoint_epochs(n_epochs: int, every: int, wt: int) -> List[int]:
    """The epochs whose anomaly criteria are counted: every ``every``-th epoch, the last one
    (over-fitted) and the well-trained one ``wt``, sorted."""
    eps = set(range(every, n_epochs + 1, every)) if every > 0 else set()
    return sorted(eps | {n_epochs, wt})


def _chapter6(cfg: Mapping[str, Any], mcfg: Mapping[str, Any], seed: int, data: Mapping[str, Any],
              tr: Mapping[str, Any]) -> Dict[str, Any]:
    from nns_cuda import models
    from nns_cuda.analysis import gmm
    from nns_cuda.analysis.thesis import chapter6

    c6 = cfg["analyses"]["chapter6"]
    layer, hist = mcfg["filter_layer"], tr["history"]
    n_gmm = data["sizes"]["gmm"]
    base = gmm.GMMAnalysis(k_max=int(c6["k_max"]), seed=seed, progress=False, **c6["experiment_1"])
    cache: Dict[int, Any] = {}
    exp = {name: Reparametrised(base, c6[name], cache) for name in ("experiment_1", "experiment_3")}
    wt_e, of_e = hist.best_epoch, hist.epochs[-1]
    rows = []
    for e in checkpoint_epochs(len(hist), int(c6["count_every"]), wt_e):
        m = tr["wt"] if e == wt_e else tr["of"] if e == of_e else \
            models.load_model(mcfg["name"], weights=hist.checkpoint(e)).eval()
        row: Dict[str, Any] = {"epoch": e, "well_trained": e == wt_e, "overfitted": e == of_e,
                               "val_loss": hist.val_loss[e - 1], "val_acc": hist.val_acc[e - 1]}
        for name, an in exp.items():
            row[name] = criteria_counts(an.fit(m, data["gmm"], layer).result_.anomaly)
        rows.append(row)
        if m is not tr["wt"] and m is not tr["of"]:
            cache.pop(id(m), None)
    counts = {r["epoch"]: r["experiment_1"] for r in rows}
    t62 = {"WT": counts[wt_e]["all_three"], "OF": counts[of_e]["all_three"], "n_filters": counts[of_e]["n_filters"],
           "params": "experiment_1"}
    f6 = chapter6.findings(tr["wt"], tr["of"], layer, data["train"], data["val"], analysis_data=data["gmm"],
                           analysis=exp["experiment_3"], R=int(c6["R"]), seed=seed)
    lam = {name: {"count": c6[name]["lam"], "fraction_of_gmm_samples": c6[name]["lam"] / n_gmm}
           for name in ("experiment_1", "experiment_3")}
    return {"layer": layer, "n_samples": n_gmm, "lambda": lam, "checkpoints": rows, "table_6_2": t62,
            "experiment_3": {k: f6.get(k) for k in ("table_6_2", "table_6_3", "table_6_4", "table_6_5", "params",
                                                      "anomaly_filters")}}


# --------------------------------------------------------------------------------------------
# one model and seed
# --------------------------------------------------------------------------------------------
def _slim(f: Mapping[str, Any], drop: Sequence[str] = ("fq",)) -> Dict[str, Any]:
    """A chapter's findings without the thesis's numbers (quoted once, in the findings) and
    without the per-neuron arrays in ``drop``."""
    return {t: ({k: v for k, v in part.items() if k != "thesis"} if isinstance(part, Mapping) else part)
            for t, part in f.items() if t not in drop and t != "thesis"}


def run_model_seed(cfg: Mapping[str, Any], mcfg: Mapping[str, Any], seed: int, *, work_dir: str,
                   cache_dir: Optional[str] = None, tick: Callable[[str], None] = lambda s: None,
                   debug: bool = False) -> Dict[str, Any]:
    """Run the protocol for one model and one seed.

    Parameters
    ----------
    cfg : mapping
        The protocol (``protocol.json``; quick overrides already applied).
    mcfg : mapping
        One entry of ``cfg["models"]``: ``name`` (zoo), ``label``, ``thesis_key``,
        ``conv_layers``, ``filter_layer``.
    seed : int
        Seeds the rendering of the data, the initial weights, the sample order and the GMMs.
    work_dir : str
        Folder for the checkpoints of this run.
    cache_dir : str, optional
        Cache of the rendered data (default ``$NNS_CACHE_DIR`` or ``~/.cache/nns_cuda``).
    tick : callable ``(stage) -> None``
        Called after each stage of :data:`STAGES`.
    debug : bool
        Print the traceback of a failed stage.

    Returns
    -------
    dict
        JSON-safe: ``seed``, ``model``, ``data`` (sizes), ``training`` (curves, WT / OF epochs,
        the over-fitting check), ``results`` (``fq``, ``tip.findings``, ``gmm.findings`` in the
        shape :func:`nns_cuda.analysis.thesis.finding_values` reads), ``chapter6`` (criteria
        counts per checkpoint, λ as count and fraction, the experiment-3 tables), ``seconds``
        (wall) and ``cpu_seconds`` (this process, all threads) per stage, and ``errors``
        (stage -> message).
    """
    from nns_cuda.analysis.thesis import chapter4, chapter5

    a = cfg["analyses"]
    out: Dict[str, Any] = {"seed": seed, "model": mcfg["name"], "label": mcfg["label"], "seconds": {},
                           "cpu_seconds": {}, "errors": {}}
    results: Dict[str, Any] = {"errors": {}}
    ctx: Dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], Any], *needs: str) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            missing = [n for n in needs if n not in ctx]
            if missing:
                raise RuntimeError(f"no {missing[0]} (see the {missing[0]} stage)")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctx[name] = fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            if debug:
                traceback.print_exc()
            out["errors"][name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        finally:
            out["seconds"][name] = round(time.perf_counter() - t0, 2)
            out["cpu_seconds"][name] = round(time.process_time() - c0, 2)
            tick(name)

    stage("data", lambda: _data(cfg, seed, cache_dir))
    stage("train", lambda: _train(cfg, mcfg, seed, ctx["data"], os.path.join(work_dir, f"{mcfg['name']}_s{seed}")),
          "data")
    layers, flayer = list(mcfg["conv_layers"]), mcfg["filter_layer"]
    stage("chapter4", lambda: chapter4.findings(
        ctx["train"]["wt"], ctx["data"]["eval"], eval_data=ctx["data"]["eval"], fq_layers=layers, depth_layers=layers,
        diversity_layer=flayer, n_mask=a["chapter4"].get("n_mask"), max_samples=ctx["data"]["sizes"]["eval"],
        batch_size=a["batch_size"], localisation=False, top2=False, ablation=False), "data", "train")
    stage("chapter5", lambda: chapter5.findings(
        ctx["train"]["wt"], ctx["data"]["eval"], flayer,
        checkpoints=ctx["train"]["history"].phase_checkpoints(tuple(a["chapter5"]["phases"])),
        per=float(a["chapter5"]["per"]), sou_method=a["chapter5"]["sou_method"]), "data", "train")
    stage("chapter6", lambda: _chapter6(cfg, mcfg, seed, ctx["data"], ctx["train"]), "data", "train")

    if "data" in ctx:
        out["data"] = ctx["data"]["sizes"]
    if "train" in ctx:
        out["training"] = ctx["train"]["summary"]
    if "chapter4" in ctx:
        results["fq"] = _slim(ctx["chapter4"])
    if "chapter5" in ctx:
        results["tip"] = {"findings": _slim(ctx["chapter5"], ())}
    if "chapter6" in ctx:
        c6 = ctx["chapter6"]
        results["gmm"] = {"findings": {"table_6_2": c6["table_6_2"], "table_6_5": c6["experiment_3"]["table_6_5"]},
                          "well_trained_epoch": out["training"]["well_trained_epoch"],
                          "overfitted_epoch": out["training"]["overfitted_epoch"]}
        out["chapter6"] = c6
    for k in ("fq", "tip", "gmm"):  # a failed stage names itself where its part is missing
        src = {"fq": "chapter4", "tip": "chapter5", "gmm": "chapter6"}[k]
        if src in out["errors"]:
            results["errors"][k] = f"stage '{src}' failed: {out['errors'][src]}"
    out["results"] = results
    return to_jsonable(out)
