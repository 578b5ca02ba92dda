"""Thesis Chapter 5 (TIP): the published numbers and the side-by-side comparison.

:data:`THESIS_REFERENCE` holds Tables 5-1 … 5-3 as printed; :func:`findings` measures the same
quantities on a model with :mod:`nns_cuda.analysis.tip` (docs/spec.md §4) and quotes the
thesis's numbers next to them; :func:`findings_from_results` does the same from results
already computed.

>>> from nns_cuda.analysis.thesis import chapter5
>>> out = chapter5.findings(model, data, "features.9", checkpoints={"phase1": p1, "phase2": p2})  # doctest: +SKIP
>>> out["measured"]["spearman_AVoU_T_m"], out["thesis"]["spearman_AVoU_T_m"]                     # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from torch import nn

from nns_cuda.analysis import tip
from nns_cuda.analysis._toolkit import FilterFn, to_jsonable

__all__ = ["THESIS_REFERENCE", "findings", "findings_from_results"]

#: Numbers printed in the thesis (Chapter 5), for side-by-side reports. Datasets 1, 2, 3 =
#: ILSVRC-2013 DET, CUB-200-2011, Pascal VOC 2012 (input 32×32, last conv layer).
THESIS_REFERENCE: Dict[str, Any] = {
    "table_5_1_aipc_area_top10": {  # model -> property -> [dataset1, dataset2, dataset3]
        "AlexNet": {"mean": [41.20, 31.51, 18.46], "variance": [41.40, 26.05, 22.31],
                    "covariance": [52.40, 36.72, 36.92], "correlation": [24.40, 28.26, 24.61]},
        "VGG-11": {"mean": [40.60, 35.67, 25.38], "variance": [19.40, 32.94, 17.70],
                   "covariance": [7.40, 11.20, 8.46], "correlation": [10.20, 12.24, 4.62]},
        "VGG-16": {"mean": [55.20, 52.61, 56.15], "variance": [53.00, 52.34, 66.15],
                   "covariance": [36.40, 21.23, 17.69], "correlation": [29.40, 14.32, 15.38]},
    },
    "table_5_2_spearman": {  # saliency -> model -> property -> [dataset1, dataset2, dataset3]
        "AVoU": {
            "AlexNet": {"mean": [0.99, 1.00, 0.99], "variance": [0.97, 1.00, 0.95],
                        "covariance": [-0.46, -0.09, 0.22], "correlation": [-0.50, -0.51, 0.06]},
            "VGG-11": {"mean": [0.99, 1.00, 1.00], "variance": [0.98, 0.98, 0.99],
                       "covariance": [-0.40, -0.16, -0.54], "correlation": [-0.32, -0.12, -0.43]},
            "VGG-16": {"mean": [0.98, 0.98, 0.97], "variance": [0.84, 0.88, 0.83],
                       "covariance": [-0.54, -0.47, -0.42], "correlation": [-0.37, -0.32, -0.22]},
        },
        "SoU": {
            "AlexNet": {"mean": [0.74, 0.92, 0.75], "variance": [0.77, 0.92, 0.79],
                        "covariance": [-0.21, -0.09, 0.18], "correlation": [-0.26, -0.49, 0.10]},
            "VGG-11": {"mean": [0.83, 0.77, 0.83], "variance": [0.84, 0.78, 0.83],
                       "covariance": [-0.29, -0.23, -0.42], "correlation": [-0.22, -0.22, -0.33]},
            "VGG-16": {"mean": [0.57, 0.58, 0.57], "variance": [0.56, 0.61, 0.47],
                       "covariance": [-0.29, -0.23, -0.18], "correlation": [-0.16, -0.14, -0.06]},
        },
    },
    "table_5_3": {  # VGG-16 on CUB-200-2011, T_m, per = 30; phases 1, 2, 3
        "share": {"H-H": [0.28, 0.28, 0.28], "H-noH": [0.03, 0.03, 0.03], "noH-H": [0.03, 0.03, 0.03],
                  "L-L": [0.29, 0.29, 0.29], "L-noL": [0.02, 0.02, 0.02], "noL-L": [0.02, 0.02, 0.02]},
        "accuracy_change": {"H-H": [17.4, 22.00, 26.00], "H-noH": [0.40, 0.40, 0.80], "noH-H": [1.60, 1.40, 1.80],
                            "L-L": [0.00, 0.40, 0.00], "L-noL": [0.20, 0.20, 0.80], "noL-L": [0.00, 0.20, 0.00]},
    },
}


def findings(model: nn.Module, data: Iterable, layer: str, checkpoints: Union[None, Sequence[Any], Mapping[str, Any]] = None,
             *, filter_fn: Optional[FilterFn] = None, per: float = 30.0, sou_method: str = "taylor",
             weight_layer: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Measured Chapter-5 findings next to the thesis's numbers (JSON-able; nothing is tuned).

    Computes on ``layer``: ``T`` of the four built-ins (all entries), AVoU and SoU and their
    Spearman ρ with each ``T`` (thesis Table 5-2: AVoU–T_m ≈ 0.97–1.00), and the fg/bg types
    by ``T_m`` with the accuracy cost of masking H-H versus L-L filters per checkpoint (thesis
    Table 5-3: H-H 17.4–26.0 pp, L-L 0.0–0.4 pp).

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``[B, classes]``; its weights and modes are restored
        afterwards.
    data : re-iterable of ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)`` batches
    layer : str
        The layer analysed (the thesis uses the last conv layer's activation).
    checkpoints : None, sequence or mapping
        As in :func:`nns_cuda.analysis.tip.fg_bg_types` (None: current weights); the Spearman
        part uses the model's current weights.
    filter_fn : callable ``(model, x, layer) -> [B, C, D, H, W]``, optional
        Filter images (default the engine's).
    per : float
        Percentage of high / low filters (default 30).
    sou_method : "taylor" or "exact"
        See :func:`nns_cuda.analysis.tip.sou`.
    weight_layer : str, optional
        See :func:`nns_cuda.analysis.tip.sou`.
    progress : bool
        Progress bars on stderr over the batches of each pass (default True); False: none.

    Returns
    -------
    dict
        As :func:`findings_from_results`.
    """
    names = list(tip.BUILTIN_PROPERTIES)
    ip = tip.InterpretableProperties(names, "all", filter_fn=filter_fn, progress=progress).fit(model, data, layer)
    T = {n: ip.T(layer, n, "all") for n in names}
    sal = tip.saliency(model, data, layer, T, sou_method=sou_method, weight_layer=weight_layer, progress=progress)
    types = tip.fg_bg_types(model, data, layer, checkpoints, property="mean", per=per, filter_fn=filter_fn,
                            progress=progress)
    return findings_from_results(layer, {n: v.tolist() for n, v in T.items()}, sal, types)


def findings_from_results(layer: str, T: Mapping[str, List[float]], sal: tip.SaliencyResult,
                          types: tip.FgBgTypesResult) -> Dict[str, Any]:
    """Put measured Chapter-5 results next to the thesis's numbers.

    Parameters
    ----------
    layer : str
        The analysed layer.
    T : mapping of str to list of float [K]
        ``T`` per property name (all entries).
    sal : SaliencyResult
        From :func:`nns_cuda.analysis.tip.saliency` (its Spearman table must hold ``"mean"``
        for the ``*_T_m`` entries to be numbers).
    types : FgBgTypesResult
        From :func:`nns_cuda.analysis.tip.fg_bg_types`.

    Returns
    -------
    dict
        JSON-safe: ``layer``; ``measured`` (``spearman_AVoU_T_m``, ``spearman_SoU_T_m``,
        ``spearman``, ``sou_method``, ``accuracy_drop_masking_HH_vs_LL`` per checkpoint,
        ``types_property``, ``per``); ``thesis`` (the reference numbers of Tables 5-2, 5-3);
        ``details`` (``T``, saliency, per-checkpoint types).
    """
    hh_ll = [{"checkpoint": c, "H-H": d["H-H"], "L-L": d["L-L"], "share_H-H": s["H-H"], "share_L-L": s["L-L"],
              "base_accuracy": b}
             for c, d, s, b in zip(types.checkpoints, types.accuracy_drop, types.share, types.base_accuracy)]
    ref = THESIS_REFERENCE
    return to_jsonable({
        "layer": layer,
        "measured": {
            "spearman_AVoU_T_m": sal.spearman["AVoU"].get("mean"),
            "spearman_SoU_T_m": sal.spearman["SoU"].get("mean"),
            "spearman": sal.spearman,
            "sou_method": sal.sou_method,
            "accuracy_drop_masking_HH_vs_LL": hh_ll,
            "types_property": types.property,
            "per": types.per,
        },
        "thesis": {
            "spearman_AVoU_T_m": {m: v["mean"] for m, v in ref["table_5_2_spearman"]["AVoU"].items()},
            "spearman_SoU_T_m": {m: v["mean"] for m, v in ref["table_5_2_spearman"]["SoU"].items()},
            "table_5_3_accuracy_change": {t: ref["table_5_3"]["accuracy_change"][t] for t in ("H-H", "L-L")},
            "table_5_3_share": {t: ref["table_5_3"]["share"][t] for t in ("H-H", "L-L")},
            "note": "Table 5-2: datasets 1-3 per model; Table 5-3: VGG-16 on CUB-200-2011, phases 1-3, T_m, per 30 %.",
        },
        "details": {"T": T, "saliency": sal.to_dict(), "types": types.to_dict()},
    })
