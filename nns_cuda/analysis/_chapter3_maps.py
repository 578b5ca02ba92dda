"""Chapter 3 measures that compare feature maps with learned images (docs/spec.md §2).

* :class:`FeatureMapCorrelation` — ``C^l`` (eqs. 3-17, 3-18, Table 3-3): the share of each filter
  learned image's active set that the up-sampled feature map also covers.
* :class:`Top2IoU` — ``IoU^l`` of the two most activated neurons per filter (eqs. 3-19, 3-20,
  Table 3-4).

Both read the layers' outputs with a plain forward pass and the learned images from the engine
(or the injected ``filter_fn`` / ``li_fn``); each measure is computed per sample (a mean over the
layer's filters), then averaged over the samples for which it is defined. The public names are
re-exported by :mod:`nns_cuda.analysis.chapter3`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from tqdm.auto import tqdm

from nns_cuda.analysis._toolkit import (
    FilterFn,
    LiFn,
    NanMean,
    ResultEstimator,
    check_eval,
    check_layers,
    iter_batches,
    layer_outputs,
    make_filter_fn,
    make_li_fn,
    model_device,
    to_jsonable,
)

__all__ = ["FeatureMapCorrelation", "CorrelationLayer", "CorrelationResult", "Top2IoU", "Top2Layer", "Top2Result"]


@dataclass
class LayersResult:
    """``{layer: per-layer result}``, indexable by layer name, with ``to_dict``.

    Attributes
    ----------
    layers : dict of str to a per-layer result with ``to_dict(arrays)``
    """

    layers: Dict[str, Any]

    def __getitem__(self, layer: str):
        return self.layers[layer]

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        """JSON-safe summary: ``{"layers": {layer: per-layer to_dict(arrays)}}``.

        Parameters
        ----------
        arrays : bool
            Include the per-neuron / per-filter arrays of each layer.

        Returns
        -------
        dict
        """
        return {"layers": {k: v.to_dict(arrays) for k, v in self.layers.items()}}


@dataclass
class _PerFilterLayer:
    """A per-layer measure: ``value`` (the layer's number), ``per_filter`` [K], ``n_samples``;
    ``to_dict`` names the value ``_KEY``."""

    _KEY = "value"
    layer: str
    value: float
    per_filter: Tensor
    n_samples: int

    def to_dict(self, arrays: bool = False) -> Dict[str, Any]:
        """JSON-safe ``{layer, <_KEY>: value, n_samples}``; ``arrays=True`` adds ``per_filter`` ``[K]``."""
        d = {"layer": self.layer, self._KEY: to_jsonable(self.value), "n_samples": self.n_samples}
        if arrays:
            d["per_filter"] = to_jsonable(self.per_filter.detach().double().cpu().flatten())
        return d


def _check_spatial(a: Tensor, layer: str, where: str) -> None:
    if a.dim() != 4:
        raise ValueError(f"{where}: layer {layer!r} must have a 2-D feature map (output [B, K, h, w]), got "
                         f"{list(a.shape)}; choose a convolution / pooling / activation layer of the convolutional part.")


class _FilterAcc:
    """One layer's accumulators: the running mean of the per-sample values (``mean``) and per-filter
    sums / counts (``sum``, ``count`` [K] float64, created by :meth:`start`)."""

    def __init__(self) -> None:
        self.mean = NanMean()
        self.sum: Optional[Tensor] = None
        self.count: Optional[Tensor] = None

    def start(self, K: int, device: Any = None) -> None:
        if self.sum is None:
            self.sum = torch.zeros(K, dtype=torch.float64, device=device)
            self.count = torch.zeros(K, dtype=torch.float64, device=device)

    def result(self, cls: type, layer: str, n: int) -> "_PerFilterLayer":
        """``cls(layer, mean, per-filter mean on the CPU (NaN where never counted), n)``."""
        per_filter = torch.where(self.count > 0, self.sum / self.count.clamp_min(1),
                                 torch.full_like(self.count, float("nan"))).cpu()
        return cls(layer, self.mean.value, per_filter, n)


class _MapMeasure(ResultEstimator):
    """The data-set loop both measures share: per batch the layers' feature maps ``a [B, K, h, w]``
    (checked to be 2-D), handed with the layer's :class:`_FilterAcc` to :meth:`_add`."""

    _LAYER: type = _PerFilterLayer
    _RESULT: type = LayersResult

    def _fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str, fn: Any, where: str) -> None:
        layers = check_layers(model, layers, where)
        check_eval(model, where)
        acc = {l: _FilterAcc() for l in layers}
        n = 0
        batches = iter_batches(data, where, batch_size=self.batch_size, device=model_device(model),
                               max_samples=self.max_samples)
        for b in tqdm(batches, desc=where.split(".")[0], unit="batch", leave=False, disable=not self.progress):
            with torch.no_grad():
                _, acts = layer_outputs(model, b.x, layers)
            for l in layers:
                a = acts[l].detach()
                _check_spatial(a, l, where)
                self._add(model, fn, b.x, l, a, acc[l], where)
            n += b.x.shape[0]
        self.result_ = self._RESULT({l: acc[l].result(self._LAYER, l, n) for l in layers})

    def _add(self, model: nn.Module, fn: Any, x: Tensor, layer: str, a: Tensor, acc: _FilterAcc,
             where: str) -> None:
        """Add one batch of ``layer`` (``fn``: the learned-image function) to ``acc``."""
        raise NotImplementedError


# ============================================================================================
# Feature-map ↔ learned-image correlation (eqs. 3-17, 3-18, Table 3-3)
# ============================================================================================
@dataclass
class CorrelationLayer(_PerFilterLayer):
    """``value``: ``C^l`` — mean over samples of the mean over filters with ``|A^k| > 0`` of
    ``C^k = |S^k ∩ A^k| / |A^k|``; ``per_filter`` [K]: mean of ``C^k`` over the samples where
    ``|A^k| > 0`` (NaN if never)."""

    _KEY = "C_l"


@dataclass
class CorrelationResult(LayersResult):
    """``{layer: CorrelationLayer}``: the result of :meth:`FeatureMapCorrelation.fit`."""

    layers: Dict[str, CorrelationLayer]


class FeatureMapCorrelation(_MapMeasure):
    """``C^l`` between feature maps and filter learned images (eqs. 3-17, 3-18).

    ``S^k`` = bilinear up-sampling (``align_corners=False``) of ``a^k`` to ``H × W``, active where
    ``> 0``; ``A^k`` = entries where ``Σ_d |L^k_d| ≠ 0``, ``L^k`` the filter learned image
    (docs/spec.md §1).

    Parameters
    ----------
    batch_size, filter_fn, max_samples, progress
        See :mod:`nns_cuda.analysis.chapter3`.
    """

    _LAYER, _RESULT = CorrelationLayer, CorrelationResult

    def __init__(self, *, batch_size: int = 64, filter_fn: Optional[FilterFn] = None,
                 max_samples: Optional[int] = None, progress: bool = True) -> None:
        self.batch_size, self.filter_fn, self.max_samples = batch_size, filter_fn, max_samples
        self.progress = progress

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> "FeatureMapCorrelation":
        """Compute ``C^l`` per layer over ``data``.

        Parameters
        ----------
        model, data
            As :meth:`nns_cuda.analysis.chapter3.KnowledgeQuantity.fit`, with image inputs ``x [B, D, H, W]``.
        layers : str or list of str
            Layers with 2-D feature maps (output ``[B, K, h, w]``).

        Returns
        -------
        FeatureMapCorrelation
            ``self``, with the :class:`CorrelationResult` in ``result_``.
        """
        self._fit(model, data, layers, make_filter_fn(self.filter_fn), "FeatureMapCorrelation.fit")
        return self

    def _add(self, model: nn.Module, filter_fn: FilterFn, x: Tensor, l: str, a: Tensor, acc: _FilterAcc,
             where: str) -> None:
        H, W = x.shape[-2:]
        S = TF.interpolate(a.double(), size=(H, W), mode="bilinear", align_corners=False) > 0  # [B, K, H, W]
        L = filter_fn(model, x, l)
        if tuple(L.shape) != (a.shape[0], a.shape[1], *x.shape[1:]):
            raise ValueError(f"{where}: filter images of {l!r} must be [B, K, D, H, W] = "
                             f"{[a.shape[0], a.shape[1], *x.shape[1:]]}, got {list(L.shape)}.")
        A = L.abs().sum(2) != 0
        sizeA = A.flatten(2).sum(2).double()
        inter = (S & A).flatten(2).sum(2).double()
        ok = sizeA > 0
        ck = torch.where(ok, inter / sizeA.clamp_min(1), torch.zeros_like(sizeA))  # [B, K]
        nk = ok.sum(1).double()
        acc.mean.add(torch.where(nk > 0, ck.sum(1) / nk.clamp_min(1), torch.full_like(nk, float("nan"))))
        acc.start(a.shape[1], ck.device)
        acc.sum += ck.sum(0)
        acc.count += ok.sum(0).double()


# ============================================================================================
# Top-2 neuron IoU (eqs. 3-19, 3-20, Table 3-4)
# ============================================================================================
@dataclass
class Top2Layer(_PerFilterLayer):
    """``value``: ``IoU^l`` — mean over samples of the mean over filters whose top-2 neurons are both
    active of the IoU of their channel-summed ``|LI|`` active sets; ``per_filter`` [K] likewise per filter."""

    _KEY = "IoU_l"


@dataclass
class Top2Result(LayersResult):
    """``{layer: Top2Layer}``: the result of :meth:`Top2IoU.fit`."""

    layers: Dict[str, Top2Layer]


class Top2IoU(_MapMeasure):
    """IoU of the learned images of the two most activated neurons of each filter (eqs. 3-19, 3-20).

    Per sample and filter ``k``: the two positions with the largest ``a^k`` (ties: lower flat index
    first); the filter counts only if both have ``a > 0`` and the union of the two active sets
    (``Σ_d |LI_d| ≠ 0``) is non-empty.

    Parameters
    ----------
    batch_size, li_fn, max_samples, progress
        See :mod:`nns_cuda.analysis.chapter3`.
    max_neurons_per_call : int
        The neurons differ per sample, so one learned-image call covers a group of consecutive
        samples with the union of their top-2 neurons; samples are added to a group while the union
        stays within this many neurons (at least one sample per call). The default, 64, keeps the
        engine on its reverse (selected-neuron) strategy.
    """

    _LAYER, _RESULT = Top2Layer, Top2Result

    def __init__(self, *, batch_size: int = 64, li_fn: Optional[LiFn] = None, max_samples: Optional[int] = None,
                 max_neurons_per_call: int = 64, progress: bool = True) -> None:
        self.batch_size, self.li_fn, self.max_samples = batch_size, li_fn, max_samples
        self.max_neurons_per_call, self.progress = max_neurons_per_call, progress

    def fit(self, model: nn.Module, data: Any, layers: Sequence[str] | str) -> "Top2IoU":
        """Compute ``IoU^l`` per layer over ``data``.

        Parameters
        ----------
        model, data
            As :meth:`FeatureMapCorrelation.fit`.
        layers : str or list of str
            Layers with 2-D feature maps of at least two positions.

        Returns
        -------
        Top2IoU
            ``self``, with the :class:`Top2Result` in ``result_``.
        """
        if self.max_neurons_per_call < 1:
            raise ValueError(f"Top2IoU: max_neurons_per_call must be >= 1, got {self.max_neurons_per_call}.")
        self._fit(model, data, layers, make_li_fn(self.li_fn), "Top2IoU.fit")
        return self

    def _add(self, model: nn.Module, li_fn: LiFn, x: Tensor, l: str, a: Tensor, acc: _FilterAcc,
             where: str) -> None:
        B, K, h, w = a.shape
        if h * w < 2:
            raise ValueError(f"{where}: layer {l!r} has a {h}x{w} feature map; top-2 needs at least 2 positions.")
        acc.start(K)
        vals, idx = torch.sort(a.flatten(2), dim=2, descending=True, stable=True)
        top = idx[..., :2].cpu()                # [B, K, 2] flat positions
        both = (vals[..., 1] > 0).cpu()         # top-2 both active (the second is the smaller)
        for rows, union in self._groups(top, both):
            if not union:
                for _ in rows:
                    acc.mean.add(torch.tensor([float("nan")]))
                continue
            neurons = [(k, p // w, p % w) for (k, p) in union]
            li = li_fn(model, x[rows], l, neurons=neurons)          # [g, n_u, D, H, W]
            sets = (li.abs().sum(2) != 0).cpu()                      # [g, n_u, H, W]
            del li
            for r, i in enumerate(rows):
                ks = both[i].nonzero().flatten().tolist()
                if not ks:
                    acc.mean.add(torch.tensor([float("nan")]))
                    continue
                u1 = torch.tensor([union[(k, int(top[i, k, 0]))] for k in ks])
                u2 = torch.tensor([union[(k, int(top[i, k, 1]))] for k in ks])
                s1, s2 = sets[r, u1].flatten(1), sets[r, u2].flatten(1)
                inter = (s1 & s2).sum(1).double()
                uni = (s1 | s2).sum(1).double()
                ok = uni > 0
                v = torch.where(ok, inter / uni.clamp_min(1), torch.zeros_like(uni))
                acc.mean.add(v[ok].mean() if bool(ok.any()) else torch.tensor([float("nan")]))
                kk = torch.tensor(ks)[ok]
                acc.sum.index_add_(0, kk, v[ok])
                acc.count.index_add_(0, kk, torch.ones(int(ok.sum()), dtype=torch.float64))

    def _groups(self, top: Tensor, both: Tensor):
        """Yield ``(rows, union)``: consecutive samples whose top-2 neurons' union fits one call;
        ``union`` maps ``(filter, flat position)`` to its index in the call."""
        rows: List[int] = []
        union: Dict[Tuple[int, int], int] = {}
        for i in range(top.shape[0]):
            need = {(k, int(top[i, k, j])) for k in both[i].nonzero().flatten().tolist() for j in range(2)}
            if rows and len(set(union) | need) > self.max_neurons_per_call:
                yield rows, union
                rows, union = [], {}
            rows.append(i)
            for key in sorted(need):
                union.setdefault(key, len(union))
        if rows:
            yield rows, union
