"""Thesis Chapter 6 (GMM anomaly filters): the published numbers and the side-by-side comparison.

:data:`THESIS_TABLES` holds Tables 6-2 … 6-5 as printed; :func:`findings` measures the same
quantities on a well-trained / over-fitted checkpoint pair with :mod:`nns_cuda.analysis.gmm`
(docs/spec.md §5) and quotes the thesis's numbers next to them.

>>> from nns_cuda.analysis.thesis import chapter6
>>> out = chapter6.findings(wt, of, "features.9", train, val,                    # doctest: +SKIP
...                         thesis_model="LeNet-5", thesis_dataset="CIFAR-10")
>>> out["table_6_2"], out["thesis"]["table_6_2_anomaly_counts"]                  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from torch import nn

from nns_cuda.analysis import gmm
from nns_cuda.analysis._toolkit import to_jsonable

__all__ = ["THESIS_TABLES", "findings"]

#: The thesis's published numbers (Tables 6-2 … 6-5), for side-by-side reports.
#: Keys: table -> model -> dataset -> values; ``None`` where the thesis has "-".
THESIS_TABLES: Dict[str, Any] = {
    "table_6_2_anomaly_counts": {  # (WT, OF)
        "LeNet-5": {"CIFAR-10": (2, 12), "CIFAR-100": (8, 13), "ILSVRC-2013 DET": None},
        "Simple CNN": {"CIFAR-10": (5, 12), "CIFAR-100": (3, 20), "ILSVRC-2013 DET": None},
        "AlexNet": {"CIFAR-10": (10, 53), "CIFAR-100": (30, 37), "ILSVRC-2013 DET": (6, 4)},
        "ResNet-18": {"CIFAR-10": (123, 374), "CIFAR-100": (104, 419), "ILSVRC-2013 DET": (207, 301)},
        "VGG-16": {"CIFAR-10": (11, 10), "CIFAR-100": (16, 29), "ILSVRC-2013 DET": (2, 3)},
    },
    "table_6_3_gradients": {  # (outlier, normal) for WT and OF
        "LeNet-5": {"CIFAR-10": {"WT": (0.461, 0.052), "OF": (2.811, 0.201)},
                    "CIFAR-100": {"WT": (0.163, 0.032), "OF": (0.264, 0.162)}},
        "Simple CNN": {"CIFAR-10": {"WT": (0.079, 0.024), "OF": (0.281, 0.066)},
                       "CIFAR-100": {"WT": (0.083, 0.015), "OF": (0.312, 0.178)}},
        "AlexNet": {"CIFAR-10": {"WT": (0.005, 0.001), "OF": (0.014, 0.005)},
                    "CIFAR-100": {"WT": (0.017, 0.002), "OF": (0.063, 0.005)},
                    "ILSVRC-2013 DET": {"WT": (0.012, 0.016), "OF": (0.045, 0.014)}},
        "ResNet-18": {"CIFAR-10": {"WT": (0.003, 0.003), "OF": (0.006, 0.008)},
                      "CIFAR-100": {"WT": (0.003, 0.002), "OF": (0.009, 0.008)},
                      "ILSVRC-2013 DET": {"WT": (0.006, 0.007), "OF": (0.010, 0.010)}},
        "VGG-16": {"CIFAR-10": {"WT": (0.006, 0.004), "OF": (0.003, 0.004)},
                   "CIFAR-100": {"WT": (0.004, 0.004), "OF": (0.017, 0.010)},
                   "ILSVRC-2013 DET": {"WT": (0.018, 0.020), "OF": (0.070, 0.032)}},
    },
    "table_6_4_masking_counts": {  # (train down, val up, n anomaly filters)
        "LeNet-5": {"CIFAR-10": (3, 1, 3), "CIFAR-100": (2, 0, 2)},
        "Simple CNN": {"CIFAR-10": (3, 1, 3), "CIFAR-100": (8, 6, 8)},
        "AlexNet": {"CIFAR-10": (6, 5, 6), "CIFAR-100": (13, 13, 15), "ILSVRC-2013 DET": (4, 2, 4)},
        "ResNet-18": {"CIFAR-10": (218, 102, 234), "CIFAR-100": (316, 247, 356), "ILSVRC-2013 DET": (3, 2, 3)},
        "VGG-16": {"CIFAR-10": (7, 5, 8), "CIFAR-100": (14, 12, 16), "ILSVRC-2013 DET": (209, 114, 237)},
    },
    "table_6_5_val_change_pct": {  # (anomaly, random) mean validation accuracy change, %
        "LeNet-5": {"CIFAR-10": (-1.21, -3.94), "CIFAR-100": (-1.27, -6.92)},
        "Simple CNN": {"CIFAR-10": (0.10, -1.51), "CIFAR-100": (-0.18, -0.74)},
        "AlexNet": {"CIFAR-10": (0.06, -0.15), "CIFAR-100": (0.01, -0.43), "ILSVRC-2013 DET": (0.02, -0.10)},
        "ResNet-18": {"CIFAR-10": (0.15, -0.04), "CIFAR-100": (0.02, -0.30), "ILSVRC-2013 DET": (0.01, -0.09)},
        "VGG-16": {"CIFAR-10": (0.01, -0.48), "CIFAR-100": (0.00, -0.61), "ILSVRC-2013 DET": (0.02, -0.04)},
    },
}


def findings(
    wt_model: nn.Module,
    of_model: nn.Module,
    layer: str,
    train_data,
    val_data,
    *,
    analysis_data=None,
    analysis: Optional[gmm.GMMAnalysis] = None,
    R: int = 10,
    seed: int = 0,
    loss_fn=None,
    max_eval_samples: Optional[int] = None,
    hessian_data=None,
    hessian_iters: int = 20,
    checkpoints: Optional[Mapping[str, nn.Module]] = None,
    thesis_model: Optional[str] = None,
    thesis_dataset: Optional[str] = None,
) -> Dict[str, Any]:
    """Tables 6-2 … 6-5 (and optionally Fig. 6-4 and the sharpness) for a WT/OF checkpoint pair.

    * Table 6-2: anomaly-filter counts of ``layer`` in the well-trained (best validation
      accuracy) and over-fitted (last) model.
    * Table 6-3: mean per-sample gradient magnitude of outlier vs normal samples, for both
      models, with each model's own outlier samples (``"own"``) and with the over-fitted
      model's outliers on both (``"of_outliers"``).
    * Table 6-4: single-filter masking of each anomaly filter of the over-fitted model:
      filters whose train accuracy drops / validation accuracy rises.
    * Table 6-5: mean validation accuracy change, anomaly filters vs ``R`` random filters.

    Parameters
    ----------
    wt_model, of_model : nn.Module
        The well-trained and the over-fitted checkpoint of one model.
    layer : str
        The analysed layer (``model.named_modules()`` name, ``"name:1"`` for a repeated module).
    train_data, val_data : ``(x, y)`` or iterables of ``(x, y[, fg_mask])`` batches
        Data for the accuracies.
    analysis_data : optional
        Samples to cluster and for the gradients (default ``train_data``; the thesis clusters
        training samples).
    analysis : GMMAnalysis, optional
        Default ``GMMAnalysis(seed=seed, max_samples=1000)``, preset "small": the first 1,000
        samples of ``analysis_data``. Any object with ``fit(model, data, layer)`` returning an
        object with ``result_`` works.
    R : int
        Number of random filters of the Table 6-5 baseline (at most the layer's filters).
    seed : int
        Seed of the random filters, the default analysis and the Hessian's start vector.
    loss_fn : callable ``(output, target) -> scalar``, optional
        Loss of the gradients and the Hessian (default cross-entropy).
    max_eval_samples : int, optional
        Evaluate accuracies on at most this many samples per set.
    hessian_data : optional
        If given, also the largest Hessian eigenvalue of both models on it.
    hessian_iters : int
        Hessian-vector products per power iteration.
    checkpoints : mapping ``name -> model``, optional
        If given, anomaly counts over these checkpoints (Fig. 6-4).
    thesis_model, thesis_dataset : str, optional
        Keys of :data:`THESIS_TABLES` to quote next to the results.

    Returns
    -------
    dict
        JSON-safe: ``layer``, ``params``, ``n_samples``, ``n_filters``, ``anomaly_filters``
        (``{"WT": [...], "OF": [...]}``), ``table_6_2`` … ``table_6_5``, optionally
        ``sharpness``, ``fig_6_4`` and ``thesis``, and ``seconds``.
    """
    analysis = analysis or gmm.GMMAnalysis(seed=seed, max_samples=1000)
    adata = train_data if analysis_data is None else analysis_data
    res = {name: analysis.fit(m, adata, layer).result_ for name, m in (("WT", wt_model), ("OF", of_model))}
    out: Dict[str, Any] = {
        "layer": layer,
        "params": dict(res["OF"].anomaly.params),
        "n_samples": res["OF"].n_samples,
        "table_6_2": {n: r.anomaly.n_anomalous for n, r in res.items()},
        "n_filters": int(res["OF"].points.shape[0]),
        "anomaly_filters": {n: r.anomaly.anomaly_filters for n, r in res.items()},
    }
    out["table_6_2"]["n_filters"] = out["n_filters"]
    models = {"WT": wt_model, "OF": of_model}
    mags = {n: gmm.gradient_magnitudes(m, adata, loss_fn, max_samples=res[n].n_samples) for n, m in models.items()}
    own = gmm.outlier_gradient_report(models, adata, {n: r.anomaly.outlier_union for n, r in res.items()},
                                      loss_fn, magnitudes=mags)
    ofo = gmm.outlier_gradient_report(models, adata, res["OF"].anomaly.outlier_union, loss_fn, magnitudes=mags)
    out["table_6_3"] = {"own": own, "of_outliers": ofo}
    anom = res["OF"].anomaly.anomaly_filters
    bt, _ = gmm.accuracy(of_model, train_data, max_samples=max_eval_samples)
    bv, _ = gmm.accuracy(of_model, val_data, max_samples=max_eval_samples)
    base = {"train_acc": bt, "val_acc": bv}
    m_anom = gmm.single_filter_masking(of_model, layer, anom, train_data, val_data,
                                       max_samples=max_eval_samples, base=base)
    c = gmm.n_channels(of_model, layer, train_data)
    r_eff = min(R, c)
    m_rand = gmm.random_filter_baseline(of_model, layer, train_data, val_data, R=r_eff, seed=seed,
                                        max_samples=max_eval_samples, base=base)
    out["table_6_4"] = {"n_anomaly": m_anom["n_filters"], "train_down": m_anom["n_train_down"],
                        "val_up": m_anom["n_val_up"], "per_filter": m_anom["filters"],
                        "base_train_acc": bt, "base_val_acc": bv}
    out["table_6_5"] = {"anomaly_mean_val_change": m_anom["mean_val_change"],
                        "random_mean_val_change": m_rand["mean_val_change"],
                        "anomaly_mean_train_change": m_anom["mean_train_change"],
                        "random_mean_train_change": m_rand["mean_train_change"],
                        "R": r_eff, "random_filters": [r["filter"] for r in m_rand["filters"]]}
    if hessian_data is not None:
        out["sharpness"] = {n: gmm.hessian_top_eigenvalue(m, loss_fn, hessian_data, hessian_iters, seed).to_dict()
                            for n, m in models.items()}
    if checkpoints is not None:
        out["fig_6_4"] = gmm.anomaly_counts_over_checkpoints(checkpoints, adata, layer, analysis)
    if thesis_model is not None and thesis_dataset is not None:
        out["thesis"] = {t: v.get(thesis_model, {}).get(thesis_dataset) for t, v in THESIS_TABLES.items()}
    out["seconds"] = {n: r.seconds for n, r in res.items()}
    return to_jsonable(out)
