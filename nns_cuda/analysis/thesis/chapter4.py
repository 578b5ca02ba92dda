"""Thesis Chapters 3 and 4 (neuron-level measures, FQ): the published numbers and the comparison.

:data:`THESIS` holds Tables 3-3, 3-4, 4-3 … 4-5 and the claim of Fig. 4-3 as printed;
:func:`findings` measures the same quantities on a model with :mod:`nns_cuda.analysis.chapter3`
and :mod:`nns_cuda.analysis.fq` (docs/spec.md §2, §3) and quotes the thesis's numbers next to them.
Nothing is tuned to match the thesis.

>>> from nns_cuda.analysis.thesis import chapter4
>>> out = chapter4.findings(model.eval(), loader, max_samples=256)            # doctest: +SKIP
>>> out["table_4_3"]["pct_change_top"], out["table_4_3"]["thesis"]["VGG-16"]  # doctest: +SKIP
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence

import numpy as np
from torch import nn

from nns_cuda.analysis._toolkit import (
    FilterFn,
    FQWarning,
    LiFn,
    ScanFn,
    check_eval,
    conv_act_layers,
    iter_batches,
    model_device,
    pool_layers,
    to_jsonable,
    trace_calls,
)
from nns_cuda.analysis.chapter3 import FeatureMapCorrelation, Top2IoU
from nns_cuda.analysis.fq import ABLATIONS, FilterDiversity, LocalisationIoU, fit_variants

__all__ = ["THESIS", "findings"]

#: CUB-200-2011 and Pascal VOC 2012 in the order of §4.4.1.
THESIS: Dict[str, Any] = {
    "table_3_3_C_l": {  # feature-map ↔ learned-image correlation, layers 1..5
        "AlexNet": [0.998, 0.872, 0.641, 0.634, 0.623],
        "VGG-16": [0.952, 0.923, 0.688, 0.620, 0.538],
        "trend": "decreasing with depth",
    },
    "table_3_4_top2_iou": {
        "AlexNet": [0.999, 0.953, 0.761, 0.676, 0.615],
        "VGG-16": [0.997, 0.990, 0.873, 0.835, 0.804],
        "trend": "decreasing with depth",
    },
    "fig_4_3_pearson": {
        "claim": "positive in most conv layers; VGG-16 mid/high layers > 0.8; ResNet-18 most mid/high layers >= 0.85",
        "sign": "positive",
    },
    "table_4_3_pct_loss_change": {  # (top-20, bottom-20) per data set 1..3
        "AlexNet": [[108.3, -12.8], [84.9, -8.7], [112.5, 0.03]],
        "VGG-11": [[93.4, -1.9], [90.5, -10.3], [92.8, -2.7]],
        "VGG-16": [[95.2, -0.01], [89.6, 0.01], [88.7, -3.1]],
        "ResNet-18": [[78.2, -2.6], [88.3, -0.4], [82.2, 1.3]],
        "sign": "masking the 20 most diverse filters raises the loss more than masking the 20 least diverse",
    },
    "table_4_4_pct_loss_change": {  # ILSVRC-2013 DET; (top-20, bottom-20) per ablated component
        "AlexNet": {"l": [-32.7, 23.4], "c": [1.4, 3.5], "s": [34.1, -10.4], "vf": [56.8, 58.4], "nf": [56.8, 58.4]},
        "VGG-11": {"l": [-0.18, 67.3], "c": [-19.6, -8.7], "s": [-4.2, -0.12], "vf": [70.6, 65.8], "nf": [70.6, 65.8]},
    },
    "table_4_5_iou": {  # (CAM, Grad-CAM, FQ) per data set 1..3
        "AlexNet": [[0.08, 0.17, 0.32], [0.09, 0.23, 0.46], [0.08, 0.22, 0.34]],
        "VGG-11": [[0.11, 0.24, 0.52], [0.14, 0.19, 0.45], [0.09, 0.21, 0.35]],
        "VGG-16": [[0.17, 0.31, 0.49], [0.16, 0.36, 0.53], [0.07, 0.15, 0.28]],
        "ResNet-18": [[0.19, 0.29, 0.58], [0.21, 0.28, 0.34], [0.12, 0.32, 0.44]],
        "order": "CAM < Grad-CAM < FQ",
    },
}



def _spearman(v: Sequence[float]) -> Optional[float]:
    """Spearman ρ of ``v`` with its position (depth); None when undefined."""
    from scipy.stats import spearmanr

    v = [float(a) for a in v]
    if len(v) < 2 or len(set(v)) < 2:
        return None
    return to_jsonable(float(spearmanr(np.arange(len(v)), v).statistic))


def _trend(rho: Optional[float]) -> Optional[str]:
    return None if rho is None else ("decreasing" if rho < 0 else "increasing" if rho > 0 else "flat")


def findings(model: nn.Module, data: Any, *, eval_data: Any = None, fq_layers: Optional[Sequence[str]] = None,
             depth_layers: Optional[Sequence[str]] = None, diversity_layer: Optional[str] = None,
             n_mask: Optional[int] = None, max_samples: Optional[int] = 256, batch_size: int = 64,
             scan_fn: Optional[ScanFn] = None, li_fn: Optional[LiFn] = None, filter_fn: Optional[FilterFn] = None,
             localisation: bool = True, top2: bool = True, ablation: bool = True,
             progress: bool = True) -> Dict[str, Any]:
    """Run the Chapter 3 / 4 analyses on a (trained) model and put the results next to the thesis's.

    Measured as is — nothing is tuned to match the thesis.

    Parameters
    ----------
    model : nn.Module
        A classifier in eval mode.
    data : iterable of ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)`` batches
        With bounding-box masks.
    eval_data : iterable of batches, optional
        Batches for the loss of the masking experiment (default: ``data``).
    fq_layers : list of str, optional
        Layers for FQ / Pearson (default: every conv + activation layer).
    depth_layers : list of str, optional
        Layers for ``C^l`` and ``IoU^l`` by depth (default: the 2-D pooling layers if there are at
        least two, else the conv + activation layers).
    diversity_layer : str, optional
        Layer for DBSCAN + masking (default: the last conv + activation layer).
    n_mask : int, optional
        Filters masked at each end; default: the thesis's 20 when the layer has at least 80
        filters, else ``max(1, C // 4)`` (20 of a 10-filter layer would mask the same filters
        twice). The choice is recorded in the output.
    max_samples : int, optional
        Samples used from ``data`` (and ``eval_data``).
    batch_size : int
        Used only for map-style data sets.
    scan_fn, li_fn, filter_fn : callable, optional
        Injected engine functions (see :mod:`nns_cuda.analysis._toolkit`); default: the engine's.
    localisation, top2, ablation : bool
        Include Table 4-5, Table 3-4, and the §4.4.4 ablations (Fig. 4-5, Table 4-4; the five
        variants come from the same scan).
    progress : bool
        Progress bars on stderr over the batches of each analysis (default True); False: none.

    Returns
    -------
    dict
        JSON-safe, with keys ``model``, ``max_samples``, ``table_3_3``, ``table_3_4`` (if ``top2``),
        ``fig_4_3``, ``fig_4_4``, ``fq``, ``table_4_3``, ``ablation`` (if ``ablation``) and
        ``table_4_5`` (if ``localisation``); each holds our numbers, the thesis's, and whether the
        thesis's qualitative claim (trend / sign / order) holds here.
    """
    where = "chapter4.findings"
    check_eval(model, where)
    eval_data = data if eval_data is None else eval_data
    first = next(iter(iter_batches(data, where, batch_size=batch_size, device=model_device(model), max_samples=1)))
    calls = trace_calls(model, first.x[:1])
    convs = conv_act_layers(calls)
    if not convs and (fq_layers is None or diversity_layer is None):
        raise ValueError(f"{where}: no conv + activation layer found; pass fq_layers= and diversity_layer=.")
    fq_layers = list(fq_layers) if fq_layers is not None else convs
    pools = pool_layers(calls)
    depth_layers = list(depth_layers) if depth_layers is not None else (pools if len(pools) >= 2 else convs)
    diversity_layer = diversity_layer or convs[-1]
    out: Dict[str, Any] = {"model": type(model).__name__, "max_samples": max_samples}

    # Table 3-3: C^l by depth
    cl = FeatureMapCorrelation(filter_fn=filter_fn, batch_size=batch_size, max_samples=max_samples,
                               progress=progress).fit(
        model, data, depth_layers).result_
    vals = [cl[l].value for l in depth_layers]
    rho = _spearman(vals)
    out["table_3_3"] = {
        "layers": depth_layers, "ours_C_l": [to_jsonable(v) for v in vals], "thesis": THESIS["table_3_3_C_l"],
        "spearman_with_depth": rho, "ours_trend": _trend(rho),
        "matches_thesis_trend": None if rho is None else bool(rho < 0),
    }

    # Table 3-4: top-2 neuron IoU by depth
    if top2:
        t2 = Top2IoU(li_fn=li_fn, batch_size=batch_size, max_samples=max_samples, progress=progress).fit(
            model, data, depth_layers).result_
        tv = [t2[l].value for l in depth_layers]
        rho2 = _spearman(tv)
        out["table_3_4"] = {"layers": depth_layers, "ours_IoU_l": [to_jsonable(v) for v in tv],
                            "thesis": THESIS["table_3_4_top2_iou"], "spearman_with_depth": rho2,
                            "matches_thesis_trend": None if rho2 is None else bool(rho2 < 0)}

    # Fig. 4-3 / 4-4: FQ, Pearson per layer, FQ mean / variance by depth
    all_layers = list(dict.fromkeys(fq_layers + [diversity_layer]))
    variants = fit_variants(model, data, all_layers, ABLATIONS if ablation else (None,), batch_size=batch_size,
                            scan_fn=scan_fn, max_samples=max_samples, progress=progress)
    fqres = variants["full"]
    rs = {l: to_jsonable(fqres[l].pearson_r) for l in fq_layers}
    finite = [r for r in rs.values() if r is not None]
    out["fig_4_3"] = {
        "pearson_r": rs, "n_positive": sum(r > 0 for r in finite), "n_layers": len(fq_layers),
        "fraction_positive": (sum(r > 0 for r in finite) / len(finite)) if finite else None,
        "thesis": THESIS["fig_4_3_pearson"],
        "matches_thesis_sign": (sum(r > 0 for r in finite) > len(finite) / 2) if finite else None,
    }
    out["fig_4_4"] = {"layers": fq_layers, "fq_mean": [fqres[l].fq_mean for l in fq_layers],
                      "fq_var": [fqres[l].fq_var for l in fq_layers],
                      "thesis": "mean and variance rise then fall with depth (non-monotone)"}
    out["fq"] = fqres.to_dict()

    # Table 4-3: diversity masking
    with warnings.catch_warnings():
        warnings.simplefilter("always", FQWarning)
        with warnings.catch_warnings(record=True) as rec:
            n_filters = int(fqres[diversity_layer].fq.shape[0])
            if n_mask is None:
                n_mask = 20 if n_filters >= 80 else max(1, n_filters // 4)
            div = FilterDiversity(n_mask=n_mask, batch_size=batch_size, max_samples=max_samples, progress=progress).fit(
                model, fqres, diversity_layer, eval_data).result_
    d = div.to_dict()
    d["n_mask"] = n_mask
    d["n_filters"] = n_filters
    d["warnings"] = [str(w.message) for w in rec]
    d["thesis"] = THESIS["table_4_3_pct_loss_change"]
    d["matches_thesis_sign"] = (None if div.degenerate else bool(div.pct_change_top > div.pct_change_bottom))
    out["table_4_3"] = d

    # §4.4.4 ablations: Fig. 4-5 (Pearson, mean, variance per variant) and Table 4-4 (masking per variant)
    if ablation:
        abl: Dict[str, Any] = {"thesis_table_4_4": THESIS["table_4_4_pct_loss_change"], "variants": {}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FQWarning)
            for name, res in variants.items():
                dv = FilterDiversity(n_mask=n_mask, batch_size=batch_size, max_samples=max_samples,
                                     progress=progress).fit(model, res, diversity_layer, eval_data).result_
                abl["variants"][name] = {
                    "pearson_r": {l: to_jsonable(res[l].pearson_r) for l in fq_layers},
                    "fq_mean": [res[l].fq_mean for l in fq_layers], "fq_var": [res[l].fq_var for l in fq_layers],
                    "pct_change_top": to_jsonable(dv.pct_change_top),
                    "pct_change_bottom": to_jsonable(dv.pct_change_bottom),
                    "top": dv.top, "bottom": dv.bottom,
                }
        out["ablation"] = abl

    # Table 4-5: localisation IoU
    if localisation:
        ld = LocalisationIoU(batch_size=batch_size, scan_fn=scan_fn, li_fn=li_fn, max_samples=max_samples,
                             progress=progress).fit(
            model, data).to_dict()
        ld["thesis"] = THESIS["table_4_5_iou"]
        means = ld["mean_iou"]
        ld["fq_beats_gradcam"] = (None if means.get("fq") is None or means.get("gradcam") is None
                                  else bool(means["fq"] > means["gradcam"]))
        out["table_4_5"] = ld
    return out
