"""Filter diversity from FQ and the masking experiment (thesis §4.3.3, Table 4-3; docs/spec.md §3).

Per filter of a convolutional layer, DBSCAN (scikit-learn, ``eps=0.3, min_samples=6``) on the 1-D
FQ values of its neurons; the number of clusters (noise excluded) is the filter's diversity. The
``n_mask`` most and least diverse filters (ties by the lower filter index) are masked in turn and
the change of the model's mean loss is reported: ``100 · (masked − base) / base``. The public names
are re-exported by :mod:`nns_cuda.analysis.fq`.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from tqdm.auto import tqdm

from nns_cuda.analysis._fq_score import FQLayerResult, FQResult
from nns_cuda.analysis._toolkit import (
    FQWarning,
    ResultEstimator,
    check_eval,
    check_layers,
    iter_batches,
    model_device,
    to_jsonable,
)
from nns_cuda.analysis.masking import mask_filters

__all__ = ["filter_diversity", "rank_filters", "mean_loss", "DiversityResult", "FilterDiversity"]

#: ``loss_fn(logits [B, C], y [B]) -> per-sample losses [B]``.
LossFn = Callable[[Tensor, Tensor], Tensor]


def filter_diversity(fq_values: Any, eps: float = 0.3, min_samples: int = 6) -> np.ndarray:
    """Number of DBSCAN clusters (noise excluded) of each filter's 1-D FQ values.

    Parameters
    ----------
    fq_values : array-like or Tensor [C, ...]
        Per-neuron FQ of a layer, channel first (finite).
    eps, min_samples : float, int
        DBSCAN parameters (thesis: 0.3 and 6).

    Returns
    -------
    np.ndarray [C] of int64
        The number of clusters of each filter.

    Raises
    ------
    ValueError
        For an empty array or non-finite values.
    """
    from sklearn.cluster import DBSCAN

    v = fq_values.detach().cpu().double().numpy() if isinstance(fq_values, Tensor) else np.asarray(fq_values, np.float64)
    if v.ndim < 1 or v.shape[0] == 0:
        raise ValueError(f"filter_diversity: fq_values must be [C, ...] with C > 0, got shape {list(v.shape)}.")
    if not np.isfinite(v).all():
        raise ValueError("filter_diversity: fq_values contain NaN or Inf.")
    v = v.reshape(v.shape[0], -1)
    out = np.zeros(v.shape[0], dtype=np.int64)
    for k in range(v.shape[0]):
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit(v[k].reshape(-1, 1)).labels_
        out[k] = len(set(labels.tolist()) - {-1})
    return out


def rank_filters(diversity: Any, n: int = 20) -> Tuple[List[int], List[int]]:
    """The ``n`` most and ``n`` least diverse filters; ties broken by the lower filter index.

    Parameters
    ----------
    diversity : array-like [C]
        Diversity (cluster count) per filter.
    n : int
        Filters taken at each end (at most ``C``).

    Returns
    -------
    (list of int, list of int)
        ``top`` (most diverse first) and ``bottom`` (least diverse first), filter indices.
    """
    d = np.asarray(diversity).ravel()
    idx = np.arange(d.size)
    n = min(int(n), d.size)
    top = np.lexsort((idx, -d))[:n]
    bottom = np.lexsort((idx, d))[:n]
    return top.tolist(), bottom.tolist()


def _default_loss(logits: Tensor, y: Tensor) -> Tensor:
    return TF.cross_entropy(logits, y, reduction="none")


@torch.no_grad()
def mean_loss(model: nn.Module, data: Any, *, loss_fn: Optional[LossFn] = None,
              masks: Optional[Mapping[str, Sequence[int]]] = None, batch_size: int = 64,
              max_samples: Optional[int] = None, progress: bool = True) -> float:
    """Mean per-sample loss of ``model`` on ``data``, optionally with filters masked (docs/spec.md §6).

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    data : iterable of ``(x [B, ...], y [B][, fg_mask])`` batches, or a map-style ``Dataset``
        Labels are required.
    loss_fn : callable, optional
        ``(logits [B, C], y [B]) -> per-sample losses [B]``; default cross-entropy.
    masks : dict of str to list of int, optional
        ``{layer: [channels]}`` zeroed while the loss is measured
        (:func:`nns_cuda.analysis.masking.mask_filters`); the model is unchanged afterwards.
    batch_size : int
        Used only when ``data`` is a map-style ``Dataset``.
    max_samples : int, optional
        Stop after this many samples.
    progress : bool
        A progress bar on stderr over the batches.

    Returns
    -------
    float
        The mean of the per-sample losses over the samples.
    """
    where = "fq.mean_loss"
    check_eval(model, where)
    loss_fn = loss_fn or _default_loss
    dev = model_device(model)
    total, n = 0.0, 0
    ctx = mask_filters(model, masks) if masks else contextlib.nullcontext(model)
    with ctx:
        batches = iter_batches(data, where, batch_size=batch_size, device=dev, need_labels=True,
                               max_samples=max_samples, input_dims=(2, 3, 4, 5))
        for b in tqdm(batches, desc="loss", unit="batch", leave=False, disable=not progress):
            losses = loss_fn(model(b.x), b.y)
            if losses.dim() == 0:
                raise ValueError(f"{where}: loss_fn must return per-sample losses [B] (reduction='none').")
            total += float(losses.double().sum())
            n += b.x.shape[0]
    return total / n


@dataclass
class DiversityResult:
    """Table 4-3 for one layer: diversity per filter and the loss change when masking.

    Attributes
    ----------
    layer : str
    n_clusters : np.ndarray [C] of int
        DBSCAN cluster count per filter.
    top, bottom : list of int
        The masked filters: most diverse first / least diverse first.
    loss_base, loss_top, loss_bottom : float
        Mean loss unmasked, with ``top`` masked, with ``bottom`` masked.
    eps, min_samples : float, int
        DBSCAN parameters used.
    neurons_per_filter : int
        Neurons (FQ values) per filter.
    """

    layer: str
    n_clusters: np.ndarray
    top: List[int]
    bottom: List[int]
    loss_base: float
    loss_top: float
    loss_bottom: float
    eps: float
    min_samples: int
    neurons_per_filter: int

    @property
    def pct_change_top(self) -> float:
        """``100 · (loss_top − loss_base) / loss_base`` (NaN when ``loss_base = 0``)."""
        return 100.0 * (self.loss_top - self.loss_base) / self.loss_base if self.loss_base else float("nan")

    @property
    def pct_change_bottom(self) -> float:
        """``100 · (loss_bottom − loss_base) / loss_base`` (NaN when ``loss_base = 0``)."""
        return 100.0 * (self.loss_bottom - self.loss_base) / self.loss_base if self.loss_base else float("nan")

    @property
    def degenerate(self) -> bool:
        """True when every filter has the same cluster count (the ranking is then by index only)."""
        return bool(np.all(self.n_clusters == self.n_clusters[0]))

    @property
    def overlap(self) -> List[int]:
        """Filters that are in both the top and the bottom set (a layer with < 2·n_mask filters)."""
        return sorted(set(self.top) & set(self.bottom))

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe summary.

        Returns
        -------
        dict
            The attributes, ``overlap``, ``pct_change_top`` / ``pct_change_bottom`` (``None``
            when undefined) and ``degenerate``.
        """
        return {
            "layer": self.layer, "eps": self.eps, "min_samples": self.min_samples, "overlap": self.overlap,
            "neurons_per_filter": self.neurons_per_filter,
            "n_clusters": self.n_clusters.tolist(), "top": list(self.top), "bottom": list(self.bottom),
            "loss_base": self.loss_base, "loss_top": self.loss_top, "loss_bottom": self.loss_bottom,
            "pct_change_top": to_jsonable(self.pct_change_top),
            "pct_change_bottom": to_jsonable(self.pct_change_bottom),
            "degenerate": self.degenerate,
        }


class FilterDiversity(ResultEstimator):
    """DBSCAN diversity of a layer's filters and the loss change when masking them (§4.3.3, Table 4-3).

    Parameters
    ----------
    eps, min_samples : float, int
        DBSCAN parameters (thesis: ``0.3``, ``6``).
    n_mask : int
        Number of most / least diverse filters to mask (thesis: 20).
    loss_fn : callable, optional
        ``(logits [B, C], y [B]) -> per-sample losses [B]``; default cross-entropy.
    batch_size : int
        Used only when ``eval_data`` is a map-style ``Dataset``.
    max_samples : int, optional
        Samples of ``eval_data`` used for each loss.
    progress : bool
        A progress bar on stderr over the batches of each of the three losses (default True).
    """

    def __init__(self, eps: float = 0.3, min_samples: int = 6, n_mask: int = 20, *,
                 loss_fn: Optional[LossFn] = None, batch_size: int = 64,
                 max_samples: Optional[int] = None, progress: bool = True) -> None:
        self.eps, self.min_samples, self.n_mask, self.loss_fn = eps, min_samples, n_mask, loss_fn
        self.batch_size, self.max_samples, self.progress = batch_size, max_samples, progress

    def fit(self, model: nn.Module, fq: FQResult | FQLayerResult | Tensor, layer: str, eval_data: Any) -> "FilterDiversity":
        """Cluster each filter's FQ values, mask the top / bottom ``n_mask`` filters of ``layer``, measure the loss.

        Parameters
        ----------
        model : nn.Module
            In eval mode; unchanged afterwards.
        fq : FQResult (containing ``layer``), FQLayerResult, or Tensor [C, ...]
            FQ values of the layer's neurons, channel first.
        layer : str
            The layer whose output channels are the filters (masked via
            :func:`nns_cuda.analysis.masking.mask_filters`).
        eval_data : iterable of ``(x, y[, fg_mask])`` batches with labels

        Returns
        -------
        FilterDiversity
            ``self``, with the :class:`DiversityResult` in ``result_``.
        """
        where = "FilterDiversity.fit"
        check_layers(model, [layer], where)
        if isinstance(fq, FQResult):
            fq = fq[layer].fq
        elif isinstance(fq, FQLayerResult):
            fq = fq.fq
        if not isinstance(fq, Tensor) or fq.dim() < 2:
            raise ValueError(f"{where}: FQ values of {layer!r} must be [C, H, W] (a convolutional layer), got "
                             f"{list(getattr(fq, 'shape', []))}.")
        div = filter_diversity(fq, self.eps, self.min_samples)
        top, bottom = rank_filters(div, self.n_mask)
        per = int(fq[0].numel())
        if per < self.min_samples:
            warnings.warn(f"{where}: each filter of {layer!r} has {per} neurons, fewer than min_samples="
                          f"{self.min_samples}: DBSCAN finds no cluster and the ranking is by filter index only.",
                          FQWarning, stacklevel=2)
        if 2 * len(top) > fq.shape[0]:
            warnings.warn(f"{where}: {layer!r} has {fq.shape[0]} filters, fewer than 2 x n_mask = {2 * self.n_mask}: "
                          "the most and least diverse sets overlap.", FQWarning, stacklevel=2)
        kw = dict(loss_fn=self.loss_fn, batch_size=self.batch_size, max_samples=self.max_samples, progress=self.progress)
        base = mean_loss(model, eval_data, **kw)
        lt = mean_loss(model, eval_data, masks={layer: top}, **kw)
        lb = mean_loss(model, eval_data, masks={layer: bottom}, **kw)
        self.result_ = DiversityResult(layer, div, top, bottom, base, lt, lb, self.eps, self.min_samples, per)
        return self
