"""Localisation IoU of FQ, Grad-CAM and CAM maps against bounding boxes (thesis §4.4.5, Table 4-5;
docs/spec.md §3).

Per image, each method gives a saliency map of the input's size; the map is min-max normalised,
thresholded (``≥ threshold``) and compared with the foreground mask by IoU:

* ``fq`` — the output neuron with the largest ``F`` (eq. 4-6); its channel-summed ``|LI|``;
* ``gradcam`` — Captum's ``LayerGradCam`` with ReLU (as in its paper) on the last convolutional
  layer, up-sampled bilinearly with ``LayerAttribution.interpolate``;
* ``cam`` — the class activation map ``Σ_k w_{c,k} A^k`` of a ``features → global average pool →
  Linear`` model (checked numerically; other models skip it with a reason), up-sampled the same way.

Grad-CAM and CAM explain the predicted class by default (``target="pred"``). A constant map gives
an empty mask; samples with an empty box are left out. The public names are re-exported by
:mod:`nns_cuda.analysis.fq`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nns_cuda.analysis._fq_score import C1_DEFAULT, C2_DEFAULT, C3_DEFAULT, K_DEFAULT, check_params, f_from_stats
from nns_cuda.analysis._toolkit import (
    EmptyForegroundWarning,
    LiFn,
    ResultEstimator,
    ScanFn,
    check_eval,
    check_layers,
    checked_scan,
    conv_act_layers,
    iter_batches,
    make_li_fn,
    make_scan,
    model_device,
    output_layer_name,
    resolve_module,
    split_call,
    to_jsonable,
    trace_calls,
    warn_once,
)

__all__ = ["saliency_mask", "mask_iou", "LocalisationResult", "LocalisationIoU"]

_METHODS = ("fq", "gradcam", "cam")


def saliency_mask(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """Min-max normalise each map and threshold it: ``(m − min)/(max − min) ≥ threshold``.

    Parameters
    ----------
    maps : Tensor [B, H, W]
    threshold : float

    Returns
    -------
    bool Tensor [B, H, W]
        All False for a constant map.
    """
    flat = maps.flatten(1).double()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    rng = hi - lo
    norm = torch.where(rng > 0, (flat - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(flat))
    out = (norm >= threshold) & (rng > 0)
    return out.view_as(maps)


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of bool masks.

    Parameters
    ----------
    a, b : bool Tensor [B, H, W]

    Returns
    -------
    float64 Tensor [B]
        ``|a ∩ b| / |a ∪ b|``; 1 when both masks are empty.
    """
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@dataclass
class LocalisationResult:
    """Per-image IoU of each method's thresholded saliency with the box mask (Table 4-5).

    Attributes
    ----------
    iou : dict of str to list of float
        ``{method: [IoU per kept image]}`` for the methods computed.
    skipped : dict of str to str
        ``{method: reason}`` for the methods left out (e.g. CAM on a model without global pooling).
    threshold : float
    output_layer : str
        Layer whose neurons' ``F`` selects the FQ map.
    gradcam_layer : str or None
        Layer of the Grad-CAM / CAM feature maps.
    n_samples : int
        Samples seen, those with an empty mask included.
    """

    iou: Dict[str, List[float]]
    skipped: Dict[str, str]
    threshold: float
    output_layer: str
    gradcam_layer: Optional[str]
    n_samples: int

    def mean(self, method: str) -> float:
        """Mean IoU of ``method`` over the kept images (NaN when it has none)."""
        v = self.iou.get(method, [])
        return float(np.mean(v)) if v else float("nan")

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        """JSON-safe summary.

        Parameters
        ----------
        arrays : bool
            Include the per-image IoUs (``iou``).

        Returns
        -------
        dict
            ``threshold``, ``output_layer``, ``gradcam_layer``, ``n_samples``, ``mean_iou``
            (``{method: mean or None}``) and ``skipped``.
        """
        d = {
            "threshold": self.threshold, "output_layer": self.output_layer, "gradcam_layer": self.gradcam_layer,
            "n_samples": self.n_samples, "mean_iou": {k: to_jsonable(self.mean(k)) for k in self.iou},
            "skipped": dict(self.skipped),
        }
        if arrays:
            d["iou"] = {k: list(v) for k, v in self.iou.items()}
        return d


_POOLS_NON_GAP = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)


def _find_gap(calls) -> Optional[Tuple[nn.Module, nn.Module]]:
    """(pooling module, final Linear) when the model ends ``features → global average pool → Linear``."""
    last = calls[-1].module if calls else None
    if not isinstance(last, nn.Linear):
        return None
    for c in reversed(calls[:-1]):
        if isinstance(c.module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) and len(c.out_shape) == 3:
            if c.out_shape[1:] == (1, 1) and c.out_shape[0] == last.in_features:
                return c.module, last
            return None
        if isinstance(c.module, (nn.Conv2d, nn.Linear, _POOLS_NON_GAP)):
            return None
    return None


def _cam_features(model: nn.Module, x: Tensor, pool: nn.Module, fc: nn.Module) -> Tuple[Tensor, Tensor]:
    """The feature maps entering the global pool ``[B, K, h, w]`` and the classifier's input ``[B, K]``."""
    feats: Dict[str, Tensor] = {}
    with contextlib.ExitStack() as hooks:
        for key, module in (("A", pool), ("z", fc)):
            handle = module.register_forward_hook(lambda mod, i, o, _key=key: feats.__setitem__(_key, i[0]))
            hooks.callback(handle.remove)
        with torch.no_grad():
            model(x)
    return feats["A"], feats["z"]


class LocalisationIoU(ResultEstimator):
    """Localisation IoU of FQ, Grad-CAM and CAM maps against the boxes (§4.4.5, Table 4-5).

    Per image: ``fq`` — the output neuron with the largest ``F``; its channel-summed ``|LI|``;
    ``gradcam`` — Captum's ``LayerGradCam`` (ReLU on) on ``gradcam_layer``, up-sampled bilinearly
    with ``LayerAttribution.interpolate``; ``cam`` — class activation map of a global-average-pool
    model (``Σ_k w_{c,k} A^k``, up-sampled the same way; skipped for other models). Each map is
    min-max normalised and thresholded at ``threshold``; IoU with the foreground mask. Samples
    with an empty mask are left out (:class:`EmptyForegroundWarning`).

    Parameters
    ----------
    threshold : float, default 0.5
    methods : sequence of str
        A subset of ``("fq", "gradcam", "cam")``.
    output_layer : str, optional
        Name of the output layer (default: the last leaf module called).
    gradcam_layer : str, optional
        Layer for Grad-CAM / CAM features (default: the last conv + activation layer).
    target : {"pred", "label"}
        The class Grad-CAM / CAM explain: the predicted one (default) or the label.
    K, C1, C2, C3 : float
        Constants of ``F`` (eq. 4-6).
    batch_size, scan_fn, max_samples
        As :class:`nns_cuda.analysis.fq.FeatureQuantity`.
    li_fn : callable, optional
        ``li_fn(model, x, layer, neurons) -> [B, n, D, H, W]`` (default: the engine's ``learned_images``).
    progress : bool
        A progress bar on stderr over the batches (default True).
    """

    def __init__(self, threshold: float = 0.5, methods: Sequence[str] = _METHODS, *,
                 output_layer: Optional[str] = None, gradcam_layer: Optional[str] = None, target: str = "pred",
                 K: float = K_DEFAULT, C1: float = C1_DEFAULT, C2: float = C2_DEFAULT, C3: float = C3_DEFAULT,
                 batch_size: int = 64, scan_fn: Optional[ScanFn] = None, li_fn: Optional[LiFn] = None,
                 max_samples: Optional[int] = None, progress: bool = True) -> None:
        self.threshold, self.methods, self.target = threshold, methods, target
        self.progress = progress
        self.output_layer, self.gradcam_layer = output_layer, gradcam_layer
        self.K, self.C1, self.C2, self.C3 = K, C1, C2, C3
        self.batch_size, self.scan_fn, self.li_fn, self.max_samples = batch_size, scan_fn, li_fn, max_samples

    def _check_params(self) -> Tuple[str, ...]:
        methods = tuple(self.methods)
        bad = set(methods) - set(_METHODS)
        if bad:
            raise ValueError(f"LocalisationIoU: unknown methods {sorted(bad)}; choose from 'fq', 'gradcam', 'cam'.")
        if self.target not in ("pred", "label"):
            raise ValueError(f"LocalisationIoU: target must be 'pred' or 'label', got {self.target!r}.")
        check_params(self.K, self.C1, self.C2, self.C3, None, "LocalisationIoU")
        return methods

    def fit(self, model: nn.Module, data: Any) -> "LocalisationIoU":
        """Per-image IoUs over ``data``.

        Parameters
        ----------
        model : nn.Module
            A classifier in eval mode.
        data : iterable of ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)`` batches
            ``y`` is needed for ``target="label"`` only.

        Returns
        -------
        LocalisationIoU
            ``self``, with the :class:`LocalisationResult` in ``result_``.
        """
        methods = self._check_params()
        from captum.attr import LayerAttribution, LayerGradCam

        where = "LocalisationIoU.fit"
        check_eval(model, where)
        dev = model_device(model)
        li_fn = make_li_fn(self.li_fn)
        iou: Dict[str, List[float]] = {m: [] for m in methods}
        skipped: Dict[str, str] = {}
        scan = None
        out_layer = gc_layer = None
        gap = None
        empty: List[int] = []
        n = 0
        batches = iter_batches(data, where, batch_size=self.batch_size, device=dev, need_mask=True,
                               need_labels=self.target == "label", max_samples=self.max_samples)
        for b in tqdm(batches, desc="localisation IoU", unit="batch", leave=False, disable=not self.progress):
            x, m = b.x, b.fg_mask
            if scan is None:  # first batch: resolve layers from the model's structure
                calls = trace_calls(model, x[:1])
                out_layer = self.output_layer or output_layer_name(calls)
                check_layers(model, [out_layer], where)
                convs = conv_act_layers(calls)
                gc_layer = self.gradcam_layer or (convs[-1] if convs else None)
                if gc_layer is not None:
                    check_layers(model, [gc_layer], where)
                scan = make_scan(model, [out_layer], self.scan_fn, stats=True) if "fq" in methods else False
                if "cam" in methods:
                    gap = _find_gap(calls)
                    if gap is None:
                        skipped["cam"] = "not a global-average-pool model (features → GAP → Linear)"
                        iou.pop("cam", None)
                if "gradcam" in methods and gc_layer is None:
                    skipped["gradcam"] = "no convolutional layer found; pass gradcam_layer="
                    iou.pop("gradcam", None)
            keep = m.flatten(1).any(1)
            empty += (~keep).nonzero().flatten().add(b.offset).tolist()
            n += x.shape[0]
            if not bool(keep.any()):
                continue
            x, m = x[keep], m[keep]
            y = b.y[keep] if b.y is not None else None
            H, W = x.shape[-2:]
            with torch.no_grad():
                logits = model(x)
            tgt = logits.argmax(1) if self.target == "pred" else y
            if "fq" in iou:
                maps = self._fq_maps(model, x, m, scan, out_layer, li_fn, where)
                iou["fq"] += mask_iou(saliency_mask(maps, self.threshold), m).tolist()
            if "gradcam" in iou:
                gc = LayerGradCam(model, resolve_module(model, split_call(gc_layer)[0]))
                attr = gc.attribute(x, target=tgt, relu_attributions=True)
                up = LayerAttribution.interpolate(attr.detach(), (H, W), interpolate_mode="bilinear")
                iou["gradcam"] += mask_iou(saliency_mask(up[:, 0], self.threshold), m).tolist()
            if "cam" in iou:
                pool, fc = gap
                A, z = _cam_features(model, x, pool, fc)
                if not torch.allclose(z.flatten(1), A.mean((2, 3)), rtol=1e-4, atol=1e-6):
                    # something between the pooling and the classifier (e.g. a BatchNorm1d): no CAM
                    skipped["cam"] = "the classifier's input is not the global average of the last feature maps"
                    iou.pop("cam")
                else:
                    cam = torch.einsum("bk,bkhw->bhw", fc.weight[tgt].to(A.dtype), A).detach()
                    up = LayerAttribution.interpolate(cam.unsqueeze(1), (H, W), interpolate_mode="bilinear")
                    iou["cam"] += mask_iou(saliency_mask(up[:, 0], self.threshold), m).tolist()
        warn_once(EmptyForegroundWarning, f"{where}: samples with an empty foreground mask have no box to "
                  "localise and are left out", len(empty), n, empty)
        self.result_ = LocalisationResult(iou, skipped, self.threshold, out_layer, gc_layer, n)
        return self

    def _fq_maps(self, model: nn.Module, x: Tensor, m: Tensor, scan, out_layer: str, li_fn: LiFn,
                 where: str) -> Tensor:
        """Channel-summed ``|LI|`` ``[B, H, W]`` of each sample's output neuron with the largest ``F``."""
        act, st = checked_scan(scan, x, m, [out_layer], where, finite=False)[out_layer]
        F = f_from_stats(st, x, m, K=self.K, C1=self.C1, C2=self.C2, C3=self.C3, warn=False)
        shape = tuple(act.shape[1:])
        best = F.flatten(1).argmax(1)
        maps = torch.empty(x.shape[0], *x.shape[-2:], dtype=torch.float64, device=x.device)
        for o in best.unique().tolist():
            sel = (best == o).nonzero().flatten()
            neuron = tuple(int(v) for v in np.unravel_index(o, shape))
            li = li_fn(model, x[sel], out_layer, neurons=[neuron])  # [b, 1, D, H, W]
            maps[sel] = li[:, 0].abs().sum(1).double()
        return maps
