"""Feature quantity (FQ) of neurons — thesis Chapter 4, docs/spec.md §3.

``F(I, n)`` (eq. 4-6) measures how much of the foreground of input ``I`` neuron ``n``'s learned
image ``LI`` reproduces, weighted by how much background it also uses:
``F = K · (N^n / N) · (N^e / N_f) · l · c · s`` with the literal similarity terms ``l, c, s`` of
eqs. 4-3 … 4-5 (see :mod:`nns_cuda.analysis._fq_score` for every definition).

Over a data set :class:`FeatureQuantity` keeps, per neuron, ``FQ = max_i F`` (eq. 4-7), its
arg-max sample, the mean ``F`` and the mean activation, computed **from the fused per-neuron
statistics** of the scan (:mod:`nns_cuda.ops.reference.stats`), so memory is proportional to the
number of neurons, never to neurons × pixels. :func:`fit_variants` gives the five ablation variants
of §4.4.4 from the same scan.

This module is the public entry of the FQ analyses and re-exports

* ``F`` for one sample from dense learned images or from the statistics: :func:`f_score`,
  :func:`f_components`, :func:`f_from_stats`, :func:`f_components_from_stats`,
  :func:`input_constants`, and :func:`pearson_r` (eq. 4-12);
* the DBSCAN diversity of the filters of a layer with top-/bottom-``n`` masking
  (:class:`FilterDiversity`, :func:`filter_diversity`, :func:`rank_filters`, :func:`mean_loss`;
  Table 4-3);
* the localisation IoU against Grad-CAM and CAM (:class:`LocalisationIoU`, :func:`saliency_mask`,
  :func:`mask_iou`; Table 4-5).

The comparison with the thesis's printed numbers is :func:`nns_cuda.analysis.thesis.chapter4.findings`.

Choices made here (beyond the [decision]s of docs/spec.md), so that users can see them:

* A sample whose mask covers the whole image has no background, so ``N^n = 0`` and ``F = 0`` for
  every neuron (the literal eq. 4-6); this is reported with :class:`NoBackgroundWarning`.
* ``argmax`` ties go to the first sample; ``F`` may be negative (``l`` and ``s`` can be).
* Masks must be ``torch.bool`` (a float or 0/1 mask is an error, not silently thresholded).
* Filter ranking ties are broken by the lower filter index; the loss is the mean per-sample
  cross-entropy (or ``loss_fn``) and the change is ``100 · (masked − base) / base``.
* Localisation: min-max normalised maps thresholded with ``≥ threshold``; a constant map gives an
  empty mask; samples with an empty box are left out. Grad-CAM and CAM explain the predicted class
  by default (``target="pred"``), Grad-CAM with ReLU (as in its paper), both up-sampled bilinearly
  with Captum's ``LayerAttribution.interpolate``. CAM needs ``features → global average pool →
  Linear`` and is checked numerically; other models skip it with a reason.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nns_cuda.analysis._fq_diversity import DiversityResult, FilterDiversity, filter_diversity, mean_loss, rank_filters
from nns_cuda.analysis._fq_localisation import LocalisationIoU, LocalisationResult, mask_iou, saliency_mask
from nns_cuda.analysis._fq_score import (
    ABLATIONS,
    C1_DEFAULT,
    C2_DEFAULT,
    C3_DEFAULT,
    K_DEFAULT,
    FQLayerResult,
    FQResult,
    check_params,
    f_components,
    f_components_from_stats,
    f_from_stats,
    f_score,
    input_constants,
    pearson_r,
)
from nns_cuda.analysis._toolkit import (
    EmptyForegroundWarning,
    FQWarning,
    NoBackgroundWarning,
    ResultEstimator,
    ScanFn,
    check_eval,
    check_layers,
    checked_scan,
    iter_batches,
    make_scan,
    model_device,
    warn_once,
)

__all__ = [
    "ABLATIONS",
    "FQWarning",
    "EmptyForegroundWarning",
    "NoBackgroundWarning",
    "f_score",
    "f_components",
    "f_from_stats",
    "f_components_from_stats",
    "input_constants",
    "pearson_r",
    "FeatureQuantity",
    "FQLayerResult",
    "FQResult",
    "fit_variants",
    "filter_diversity",
    "rank_filters",
    "mean_loss",
    "FilterDiversity",
    "DiversityResult",
    "saliency_mask",
    "mask_iou",
    "LocalisationIoU",
    "LocalisationResult",
]


class _LayerAcc:
    """Running per-neuron max / arg-max / sums (memory ∝ neurons)."""

    def __init__(self) -> None:
        self.max_f: Optional[Tensor] = None
        self.argmax: Optional[Tensor] = None
        self.sum_f: Optional[Tensor] = None
        self.sum_a: Optional[Tensor] = None
        self.n = 0

    def update(self, F: Tensor, act: Tensor, offset: int) -> None:
        bm, bi = F.max(dim=0)  # first maximal index within the batch
        if self.max_f is None:
            self.max_f, self.argmax = bm.clone(), bi + offset
            self.sum_f = F.sum(0)
            self.sum_a = act.double().sum(0)
        else:
            better = bm > self.max_f  # strict: ties keep the earlier sample
            self.max_f = torch.where(better, bm, self.max_f)
            self.argmax = torch.where(better, bi + offset, self.argmax)
            self.sum_f += F.sum(0)
            self.sum_a += act.double().sum(0)
        self.n += F.shape[0]

    def result(self, layer: str) -> FQLayerResult:
        return FQLayerResult(layer, self.max_f.cpu(), self.argmax.cpu(), (self.sum_f / self.n).cpu(),
                             (self.sum_a / self.n).cpu(), self.n)


def _fit_fq(model: nn.Module, data: Any, layers: Sequence[str] | str, *, variants: Sequence[Optional[str]], K: float,
            C1: float, C2: float, C3: float, batch_size: int, scan_fn: Optional[ScanFn], max_samples: Optional[int],
            where: str, progress: bool = True) -> Dict[Optional[str], FQResult]:
    """One streaming pass over ``data``: ``{variant: FQResult}`` for every ablation variant."""
    for v in variants:
        check_params(K, C1, C2, C3, v, where)
    layers = check_layers(model, layers, where)
    check_eval(model, where)
    dev = model_device(model)
    scan = make_scan(model, layers, scan_fn, stats=True)
    accs = {v: {l: _LayerAcc() for l in layers} for v in variants}
    empty: List[int] = []
    nobg: List[int] = []
    n = 0
    batches = iter_batches(data, where, batch_size=batch_size, device=dev, need_mask=True, max_samples=max_samples)
    for batch in tqdm(batches, desc="FQ", unit="batch", leave=False, disable=not progress):
        x, m = batch.x, batch.fg_mask
        consts = input_constants(x, m)
        empty += (consts[1] == 0).nonzero().flatten().add(batch.offset).tolist()
        nobg += m.flatten(1).all(1).nonzero().flatten().add(batch.offset).tolist()
        res = checked_scan(scan, x, m, layers, where)
        for l in layers:
            act, st = res[l]
            for v in variants:
                F = f_from_stats(st, x, m, K=K, C1=C1, C2=C2, C3=C3, ablate=v, warn=False, constants=consts)
                accs[v][l].update(F, act, batch.offset)
        n += x.shape[0]
    warn_once(EmptyForegroundWarning, f"{where}: samples with no active input entry in the foreground "
              "(N_f = 0: empty mask, or zero input inside it) get F = 0 for every neuron (docs/spec.md §3)",
              len(empty), n, empty)
    warn_once(NoBackgroundWarning, f"{where}: samples whose foreground mask covers the whole image have "
              "N^n = 0, so F = 0 for every neuron (eq. 4-6 used literally)", len(nobg), n, nobg)
    out = {}
    for v in variants:
        params = dict(K=K, C1=C1, C2=C2, C3=C3, ablate=v)
        out[v] = FQResult({l: accs[v][l].result(l) for l in layers}, params, n, empty, nobg)
    return out


def _fit_fq_dataset(model: nn.Module, dataset: Any, layers: Sequence[str] | str, *, ablate: Optional[str], K: float,
                    C1: float, C2: float, C3: float, out_dir: str, scan_options: Dict[str, Any],
                    max_samples: Optional[int], where: str) -> Optional[FQResult]:
    """FQ through :class:`~nns_cuda.engine.dataset_scan.DatasetScan`: ``F`` is a per-sample
    measure of the scan, so its maximum, arg-max and mean come from the scan's accumulators
    (resumable, and distributed under ``torchrun``). ``None`` on ranks other than 0."""
    from torch.utils.data import Subset

    from nns_cuda.engine.dataset_scan import DatasetScan

    check_params(K, C1, C2, C3, ablate, where)
    layers = check_layers(model, layers, where)
    check_eval(model, where)
    if max_samples is not None:
        dataset = Subset(dataset, range(min(int(max_samples), len(dataset))))

    def f_measure(layer, lr, x, fg):
        if fg is None:
            raise ValueError(f"{where}: FQ needs a foreground mask per sample (docs/spec.md §3), but the data set "
                             "yields (x, y) items; give (x, y, fg_mask)")
        return f_from_stats(lr.stats, x, fg, K=K, C1=C1, C2=C2, C3=C3, ablate=ablate, warn=False)

    def sample_flags(layer, lr, x, fg):  # [B, 2]: N_f = 0, and no background; once, on the first layer
        if layer != layers[0] or fg is None:
            return None
        return torch.stack([input_constants(x, fg)[1] == 0, fg.flatten(1).all(1)], 1).double()

    opts = dict(scan_options or {})
    opts.setdefault("progress", True)
    res = DatasetScan(model, layers, stats=True, measures={"F": f_measure, "sample_flags": sample_flags},
                      **opts).run(dataset, out_dir, resume=True)
    if res is None:
        return None
    n = res.samples
    counts = res.measure_mean(layers[0], "sample_flags") * n
    first = res.measure_argmax(layers[0], "sample_flags")
    flagged = [[int(first[j])] if round(float(counts[j])) else [] for j in range(2)]
    for j, (cat, what) in enumerate(((EmptyForegroundWarning, "no active input entry in the foreground (N_f = 0)"),
                                     (NoBackgroundWarning, "a foreground mask covering the whole image (N^n = 0)"))):
        warn_once(cat, f"{where}: samples with {what} get F = 0 for every neuron (docs/spec.md §3)",
                  int(round(float(counts[j]))), n, flagged[j])
    out = {L: FQLayerResult(L, res.measure_max(L, "F"), res.measure_argmax(L, "F"), res.measure_mean(L, "F"),
                            res.mean_activation(L), n) for L in layers}
    return FQResult(out, dict(K=K, C1=C1, C2=C2, C3=C3, ablate=ablate), n, flagged[0], flagged[1])


class FeatureQuantity(ResultEstimator):
    """Data-set feature quantity (eq. 4-7) of every neuron of the given layers, streaming.

    Parameters
    ----------
    K, C1, C2, C3 : float
        Constants of eqs. 4-3 … 4-6 (thesis: ``1e4, 1e-4, 3e-4, 1.5e-4``).
    ablate : {None, "l", "c", "s", "vf", "nf"}
        Component of eq. 4-6 replaced by 1 (§4.4.4).
    batch_size : int
        Used only when ``data`` is a map-style ``Dataset`` of single samples.
    scan_fn : callable, optional
        ``scan_fn(model, x, fg_mask, layers) -> {layer: (activations [B, *shape], stats [B, *shape, NUM_STATS])}``.
        Default: the engine's ``Scanner(model, layers, stats=True).scan(x, fg_mask=fg_mask)``.
    max_samples : int, optional
        Stop after this many samples.
    out_dir : str, optional
        Run as a data-set scan into this folder (:class:`nns_cuda.DatasetScan`): ``data`` is then
        a map-style data set of ``(x, y, fg_mask)`` items, finished blocks survive an
        interruption (a rerun continues), and under ``torchrun`` the ranks share the blocks
        (``result_`` is set on rank 0, ``None`` elsewhere). ``FQ`` is the maximum of ``F`` over
        the data set, as in memory. ``scan_fn`` does not apply.
    scan_options : dict, optional
        Options of the data-set scan (``block_size``, ``batch_size``, ``backend``,
        ``precision``, ``max_memory``, ``num_workers``, ``progress``, ``top_k``).
    progress : bool
        A progress bar on stderr over the batches (default True); also the data-set scan's
        unless ``scan_options`` sets ``progress``.

    Examples
    --------
    >>> res = FeatureQuantity().fit(model.eval(), loader, ["features.1", "features.4"]).result_
    >>> res["features.4"].fq.shape, res["features.4"].pearson_r
    """

    def __init__(self, K: float = K_DEFAULT, C1: float = C1_DEFAULT, C2: float = C2_DEFAULT, C3: float = C3_DEFAULT,
                 ablate: Optional[str] = None, *, batch_size: int = 64, scan_fn: Optional[ScanFn] = None,
                 max_samples: Optional[int] = None, out_dir: Optional[str] = None,
                 scan_options: Optional[Dict[str, Any]] = None, progress: bool = True) -> None:
        self.K, self.C1, self.C2, self.C3, self.ablate, self.batch_size = K, C1, C2, C3, ablate, batch_size
        self.scan_fn, self.max_samples = scan_fn, max_samples
        self.out_dir, self.scan_options = out_dir, scan_options
        self.progress = progress

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> "FeatureQuantity":
        """Scan ``data`` once: per layer ``fq`` (max), ``argmax``, ``mean_f`` and ``mean_activation``.

        Parameters
        ----------
        model : nn.Module
            In eval mode.
        data : iterable of ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)`` batches, or a map-style ``Dataset``
            ``y`` may be absent; the foreground masks are required.
        layers : str or list of str
            Qualified module names (``model.named_modules()``), call indices allowed (``"relu:1"``).

        Returns
        -------
        FeatureQuantity
            ``self``, with the :class:`FQResult` in ``result_``.

        Raises
        ------
        ValueError
            For invalid constants or ``ablate``, a model in training mode, missing or malformed
            masks, non-finite inputs or an empty data set.
        KeyError
            For an unknown layer name.
        """
        if self.out_dir is not None:
            if self.scan_fn is not None:
                raise ValueError("FeatureQuantity.fit: scan_fn does not apply to a data-set scan (out_dir=); "
                                 "pass one of them")
            self.result_ = _fit_fq_dataset(model, data, layers, ablate=self.ablate, K=self.K, C1=self.C1, C2=self.C2,
                                           C3=self.C3, out_dir=self.out_dir,
                                           scan_options={"progress": self.progress, **(self.scan_options or {})},
                                           max_samples=self.max_samples, where="FeatureQuantity.fit")
            return self
        self.result_ = _fit_fq(model, data, layers, variants=[self.ablate], K=self.K, C1=self.C1, C2=self.C2,
                               C3=self.C3, batch_size=self.batch_size, scan_fn=self.scan_fn,
                               max_samples=self.max_samples, where="FeatureQuantity.fit", progress=self.progress)[self.ablate]
        return self


def fit_variants(model: nn.Module, data: Any, layers: Sequence[str] | str,
                 ablations: Sequence[Optional[str]] = ABLATIONS, *, K: float = K_DEFAULT, C1: float = C1_DEFAULT,
                 C2: float = C2_DEFAULT, C3: float = C3_DEFAULT, batch_size: int = 64, scan_fn: Optional[ScanFn] = None,
                 max_samples: Optional[int] = None, progress: bool = True) -> Dict[str, FQResult]:
    """FQ for several ablation variants (§4.4.4) from **one** scan of the data.

    Parameters
    ----------
    model, data, layers
        As :meth:`FeatureQuantity.fit`.
    ablations : sequence of {None, "l", "c", "s", "vf", "nf"}
        The variants (default: all six).
    K, C1, C2, C3, batch_size, scan_fn, max_samples, progress
        As :class:`FeatureQuantity`.

    Returns
    -------
    dict of str to FQResult
        ``"full" | "l" | "c" | "s" | "vf" | "nf" -> FQResult`` (``"full"`` is ``ablate=None``).
    """
    res = _fit_fq(model, data, layers, variants=list(ablations), K=K, C1=C1, C2=C2, C3=C3, batch_size=batch_size,
                  scan_fn=scan_fn, max_samples=max_samples, where="fq.fit_variants", progress=progress)
    return {("full" if k is None else k): v for k, v in res.items()}
