"""Pattern-level analysis: GMM clustering of filter learned images and anomaly filters.

Thesis Chapter 6, docs/spec.md §5. For one layer, every filter's learned images ``L^k(x)`` of
``S`` samples are flattened, centred over the samples and projected on their top-2 principal
components (:func:`pca2`). Each filter's ``S`` points are clustered by Gaussian mixtures with
``k = 2 … K_max`` components; the ``k`` with the largest Calinski–Harabasz index is kept
(:func:`select_k`, Algorithm 6.1). A filter is an *anomaly filter* when its clusters are
imbalanced (many clusters of at most ``λ`` points), its CH index is unusually high and its
mean activation is large enough (:func:`anomaly_filters`, Table 6-1). The samples in the small
clusters of anomaly filters are the *outlier samples*. :class:`GMMAnalysis` runs the whole
pipeline on a model, a layer and data — in memory, or with ``out_dir=`` as a data-set scan
(:class:`~nns_cuda.engine.dataset_scan.DatasetScan`: resumable, shared among the ranks under
``torchrun`` or among shards; see :class:`GMMAnalysis`); the model-level measures of the
chapter (per-sample gradient magnitudes, single-filter masking, the sharpness) are here too.
The comparison with the thesis's published numbers is :mod:`nns_cuda.analysis.thesis.chapter6`.

The mixtures of all filters and all ``k`` are fitted by a batched EM in torch (CPU or CUDA)
that reproduces ``sklearn.mixture.GaussianMixture(covariance_type="full",
init_params="k-means++", random_state=seed)`` — same k-means++ seeds (scikit-learn's random
stream), same EM updates and stopping rule — so that ``backend="sklearn"`` (a plain loop over
scikit-learn) is a reference, not a different algorithm.

Decisions (documented here and in docs/spec.md §5):

* CH is the standard index with squared distances (``sklearn.metrics.calinski_harabasz_score``;
  eq. 6-6/6-7 print unsquared norms). Like scikit-learn it uses the number of *non-empty*
  clusters and is 1.0 when all clusters are single points; it is undefined (NaN) with fewer
  than two clusters. The layer mean CH (criterion 2) is over filters with a defined CH.
* ``k`` with the largest CH wins; ties go to the larger ``k`` (Algorithm 6.1 uses ``≥``).
  A filter whose points never split into two clusters (constant images, e.g. a dead filter)
  gets ``k = 1``, all labels 0, CH NaN, and ``degenerate = True``.
* Criterion 1 counts non-empty clusters only: a cluster is *small* if it has ``1 … λ``
  members; the filter is imbalanced if ``#small > α · #non-empty clusters``.
* Criterion 3 compares a filter's mean activation with ``θ ×`` the mean over the layer's
  filters (``≥``); criterion 2 uses ``CH > β ×`` the layer mean CH (strict).
* ``reg_covar`` (default ``1e-6``, as scikit-learn) is in the units of the points.
* Gradient magnitudes, masking accuracies and Hessians use the model in eval mode.

Contract::

    pca2(features [F, S, P]) -> [F, S, 2]
    calinski_harabasz(points [F, S, 2], labels [F, S]) -> [F]
    select_k(points, k_max=10, seed=0) -> KSelection (.k [F], .labels [F, S], .ch [F], ...)
    anomaly_filters(points, mean_activation, *, lam, alpha, beta, theta, k_max=10, seed=0)
        -> AnomalyResult (.anomalous [F], .outlier_samples [list of LongTensor], .k, .ch, ...)
    GMMAnalysis(k_max=10, preset="small", ...).fit(model, data, layer)
        -> self (.result_: GMMAnalysisResult; .to_dict())
    GMMAnalysis(..., out_dir="scans/gmm").fit(model, dataset, layer)
        -> self (the same result from a data-set scan; None on ranks other than 0)

The code lives in private modules: ``_gmm_check`` (input checks), ``_gmm_pca`` (PCA),
``_gmm_ch`` (Calinski–Harabasz), ``_gmm_select`` (k selection), ``_gmm_em`` (the batched EM),
``_gmm_sklearn`` (the scikit-learn reference), ``_gmm_anomaly`` (the criteria, Table 6-1
presets), ``_gmm_model`` (model-level measures); this module is the public API.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nns_cuda._modules import eval_mode, model_device, resolve_module, split_call
from nns_cuda.analysis._gmm_anomaly import PRESETS, AnomalyResult, anomaly_filters, resolve_params
from nns_cuda.analysis._gmm_ch import calinski_harabasz
from nns_cuda.analysis._gmm_model import (
    HessianEigen,
    accuracy,
    gradient_magnitudes,
    hessian_top_eigenvalue,
    n_channels,
    outlier_gradient_report,
    per_sample_gradient_magnitude,
    random_filter_baseline,
    single_filter_masking,
)
from nns_cuda.analysis._gmm_pca import pca2
from nns_cuda.analysis._gmm_select import GMMDegenerateWarning, KSelection, select_k
from nns_cuda.analysis._toolkit import ResultEstimator, iter_raw_batches, make_filter_fn

__all__ = [
    "PRESETS",
    "GMMDegenerateWarning",
    "pca2",
    "calinski_harabasz",
    "select_k",
    "KSelection",
    "anomaly_filters",
    "AnomalyResult",
    "per_sample_gradient_magnitude",
    "gradient_magnitudes",
    "outlier_gradient_report",
    "single_filter_masking",
    "random_filter_baseline",
    "n_channels",
    "anomaly_counts_over_checkpoints",
    "hessian_top_eigenvalue",
    "HessianEigen",
    "accuracy",
    "GMMAnalysis",
    "GMMAnalysisResult",
]


@dataclass
class GMMAnalysisResult:
    """Result of :meth:`GMMAnalysis.fit` for one model and layer.

    Attributes
    ----------
    layer : str
        The analysed layer.
    points : Tensor ``[F, S, 2]``
        PCA projections of the filter images (CPU).
    mean_activation : Tensor ``[F]``
        Mean of each filter's output over positions and samples (float64, CPU).
    targets : LongTensor ``[S]`` or None
        Labels ``y`` of the analysed samples, in order.
    anomaly : AnomalyResult
        The anomaly filters and outlier samples.
    seconds : dict
        Wall times of the stages ``images``, ``pca``, ``gmm``.
    """

    layer: str
    points: Tensor
    mean_activation: Tensor
    targets: Optional[Tensor]
    anomaly: AnomalyResult
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        """Number of analysed samples ``S``."""
        return int(self.points.shape[1])

    def to_dict(self, include_labels: bool = False) -> Dict[str, Any]:
        """JSON-safe dict.

        Parameters
        ----------
        include_labels : bool
            Add the labels ``[F, S]`` and the points ``[F][S][2]``.

        Returns
        -------
        dict
            ``layer``, ``n_samples``, ``n_filters``, ``seconds`` and the entries of
            :meth:`AnomalyResult.to_dict`.
        """
        d = {
            "layer": self.layer,
            "n_samples": self.n_samples,
            "n_filters": int(self.points.shape[0]),
            "seconds": dict(self.seconds),
            **self.anomaly.to_dict(include_labels=include_labels),
        }
        if include_labels:
            d["points"] = self.points.tolist()
        return d


class _ActivationMean:
    """Forward hook accumulating the per-channel mean of a module's output (one call).

    Parameters
    ----------
    model : nn.Module
    layer : str
        Module name, ``"name:k"`` for the ``k``-th call of a repeated module.
    """

    def __init__(self, model: nn.Module, layer: str):
        base, call = split_call(layer)
        self.layer, self.call = layer, call
        self.module = resolve_module(model, base)
        self.model = model
        self.sum: Optional[Tensor] = None
        self.count = 0
        self._calls = 0

    recording = False  # only the analysis's own forward pass is counted (filter_fn may run others)

    def _pre(self, *_):
        self._calls = 0

    def _hook(self, mod, inputs, out):
        if not self.recording:
            return
        n = self._calls
        self._calls += 1
        if self.call is not None and n != self.call:
            return
        if self.call is None and n > 0:
            raise ValueError(
                f"GMMAnalysis: module {self.layer!r} runs more than once per forward pass; name the "
                f"call, e.g. '{self.layer}:0' or '{self.layer}:1'."
            )
        if not isinstance(out, Tensor) or out.dim() < 2:
            raise ValueError(f"GMMAnalysis: layer {self.layer!r} output has no channel dimension.")
        o = out.detach().double()
        dims = [0] + list(range(2, o.dim()))
        s = o.sum(dims).cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.count += o.numel() // o.shape[1]

    def __enter__(self):
        self._h = [self.module.register_forward_hook(self._hook),
                   self.model.register_forward_pre_hook(self._pre)]
        return self

    def __exit__(self, *exc):
        for h in self._h:
            h.remove()

    @property
    def mean(self) -> Tensor:
        """Per-channel mean ``[C]`` (float64) of the recorded outputs."""
        return self.sum / self.count


#: Name of the per-sample value (the flattened filter images) of the GMM data-set scan.
_FEATURES = "gmm_features"


class GMMAnalysis(ResultEstimator):
    """Chapter-6 analysis of one layer: filter images → PCA → GMM → anomaly filters.

    An estimator: the constructor stores the hyper-parameters unchanged; :meth:`fit` checks
    them, takes the model, the data and the layer, and stores the result in ``result_``;
    ``to_dict(include_labels=False)`` is ``result_.to_dict(...)``
    (:meth:`GMMAnalysisResult.to_dict`).

    Parameters
    ----------
    k_max : int
        Largest number of mixture components (default 10, ``≥ 2``).
    preset : {"small", "large"} or None
        Table 6-1 preset for ``lam, alpha, beta, theta`` (explicit values override it).
    lam, alpha, beta, theta : float, optional
        Table 6-1 hyper-parameters (:func:`anomaly_filters`).
    seed : int
        ``random_state`` of the mixtures.
    backend : {"torch", "sklearn"}
        GMM backend (:func:`select_k`).
    max_samples : int, optional
        Analyse at most this many samples (the first ones in data order); more than ``k_max``.
    pca_method : str
        :func:`pca2` method.
    device : optional
        Where PCA and GMM run (default: the model's device).
    filter_fn : callable ``(model, x [B, ...], layer) -> Tensor [B, C, ...]``, optional
        Filter learned images of a batch; default ``nns_cuda.engine.filter_images``.
    reg_covar, tol, max_iter : float, float, int
        GMM settings (:func:`select_k`).
    progress : bool
        A progress bar on stderr over the batches whose filter images are computed (default
        True); also the data-set scan's unless ``scan_options`` sets ``progress``.
    out_dir : str, optional
        Run as a data-set scan into this folder (:class:`nns_cuda.DatasetScan`): ``data`` is then
        a map-style data set of ``(x, y, fg_mask)`` or ``(x, y)`` items. Each block of samples
        stores its samples' flattened filter images (the rows the PCA projects, per-sample
        value ``gmm_features`` ``[N, C, P]``, float32) with their global sample indices and
        labels; finished blocks survive an interruption (a rerun continues). Under ``torchrun``
        the ranks share the blocks and the blocks are gathered to rank 0, which projects and
        clusters exactly the samples, in the order, of a one-process run (``result_`` is
        ``None`` on the other ranks). The result equals the in-memory fit on the same samples
        (bitwise, for the same batches and per-sample computation). ``filter_fn`` does not apply.
    scan_options : dict, optional
        Options of the data-set scan (``block_size``, ``batch_size``, ``backend``,
        ``precision``, ``max_memory``, ``num_workers``, ``progress``, ``top_k``; ``labels=False``
        for data sets without integer labels, then ``targets`` is ``None``), and ``shard``:
        ``(i, n)`` computes only that share of the blocks (job arrays without a process group;
        ``result_`` stays ``None`` until every shard is done, and the shard that completes the
        folder, or a later fit on it, merges and fits; ``nns merge`` merges by hand).

    Attributes
    ----------
    result_ : GMMAnalysisResult
        Set by :meth:`fit` (``None`` on ranks other than 0 of a data-set scan, and for a shard
        while other shards are missing).
    params_ : (float, float, float, float)
        The resolved ``(λ, α, β, θ)``, set by :meth:`fit`.
    """

    def __init__(
        self,
        k_max: int = 10,
        preset: Optional[str] = "small",
        *,
        lam: Optional[float] = None,
        alpha: Optional[float] = None,
        beta: Optional[float] = None,
        theta: Optional[float] = None,
        seed: int = 0,
        backend: str = "torch",
        max_samples: Optional[int] = None,
        pca_method: str = "auto",
        device: Optional[Union[str, torch.device]] = None,
        filter_fn: Optional[Callable[[nn.Module, Tensor, str], Tensor]] = None,
        reg_covar: float = 1e-6,
        tol: float = 1e-3,
        max_iter: int = 100,
        progress: bool = True,
        out_dir: Optional[str] = None,
        scan_options: Optional[Dict[str, Any]] = None,
    ):
        self.k_max = k_max
        self.preset = preset
        self.lam = lam
        self.alpha = alpha
        self.beta = beta
        self.theta = theta
        self.seed = seed
        self.backend = backend
        self.max_samples = max_samples
        self.pca_method = pca_method
        self.device = device
        self.filter_fn = filter_fn
        self.reg_covar = reg_covar
        self.tol = tol
        self.max_iter = max_iter
        self.progress = progress
        self.out_dir = out_dir
        self.scan_options = scan_options

    def _check_params(self) -> Tuple[float, float, float, float]:
        """Check the hyper-parameters; return the resolved ``(λ, α, β, θ)``."""
        params = resolve_params(self.lam, self.alpha, self.beta, self.theta, self.preset, "GMMAnalysis")
        k_max, max_samples = self.k_max, self.max_samples
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 2:
            raise ValueError(f"GMMAnalysis: k_max must be an int >= 2, got {k_max!r}.")
        if max_samples is not None and max_samples <= k_max:
            raise ValueError(
                f"GMMAnalysis: max_samples={max_samples} must exceed k_max={k_max}; pass more samples."
            )
        return params

    def filter_features(self, model: nn.Module, data, layer: str) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Filter images and mean activations of ``layer``, streamed over the batches of ``data``.

        Parameters
        ----------
        model : nn.Module
        data : ``(x, y)`` or an iterable of ``(x, y[, fg_mask])`` batches
            At most ``max_samples`` samples are used.
        layer : str
            Module name (``"name:1"`` for a repeated module).

        Returns
        -------
        (Tensor ``[F, S, P]``, Tensor ``[F]``, LongTensor ``[S]`` or None)
            Flattened filter images (float32, CPU), mean activations (float64, CPU) and the
            targets (``None`` when a batch has none).
        """
        filter_fn = make_filter_fn(self.filter_fn)
        dev = model_device(model)
        feats: List[Tensor] = []
        ys: List[Tensor] = []
        has_y = True
        with _ActivationMean(model, layer) as act, eval_mode(model):
            batches = iter_raw_batches(data, "GMMAnalysis.fit", max_samples=self.max_samples)
            for x, y, _fg in tqdm(batches, desc="GMM filter images", unit="batch", leave=False, disable=not self.progress):
                xd = x.to(dev)
                act.recording = True
                try:
                    with torch.no_grad():
                        model(xd)
                finally:
                    act.recording = False
                imgs = filter_fn(model, xd, layer)
                if imgs.dim() < 3 or imgs.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"GMMAnalysis: filter images must be [B, C, ...] with B={x.shape[0]}, got "
                        f"{tuple(imgs.shape)}."
                    )
                feats.append(imgs.detach().flatten(2).transpose(0, 1).float().cpu())  # [C, B, P]
                if y is None:
                    has_y = False
                else:
                    ys.append(torch.as_tensor(y).cpu())
        if not feats:
            raise ValueError("GMMAnalysis.fit: data is empty.")
        if act.sum is None:
            raise ValueError(f"GMMAnalysis.fit: layer {layer!r} did not run in the forward pass.")
        f = torch.cat(feats, dim=1)
        if f.shape[0] != act.sum.shape[0]:
            raise ValueError(
                f"GMMAnalysis.fit: {f.shape[0]} filter images per sample but layer {layer!r} has "
                f"{act.sum.shape[0]} channels; filter_fn must return [B, C, ...] for that layer."
            )
        return f, act.mean, (torch.cat(ys) if has_y else None)

    def fit(self, model: nn.Module, data, layer: str) -> "GMMAnalysis":
        """Run the analysis of ``layer`` on the samples of ``data``.

        Parameters
        ----------
        model : nn.Module
        data : ``(x, y)`` or an iterable of ``(x, y[, fg_mask])`` batches (a map-style data set with ``out_dir``)
            Sample ``i`` is the ``i``-th sample in iteration order (outlier indices refer to it);
            of a data set, sample ``i`` is ``data[i]``.
        layer : str
            Module name in ``model.named_modules()`` (``"name:1"`` for a repeated module).

        Returns
        -------
        GMMAnalysis
            ``self``, with ``result_`` (:class:`GMMAnalysisResult`: ``points [F, S, 2]``,
            ``mean_activation [F]``, ``targets [S]``, ``anomaly``) and ``params_``.

        Raises
        ------
        ScanDirError
            With ``out_dir``: the folder holds a scan of another model, layer, options or data set.
        """
        params = self._check_params()
        if self.out_dir is not None:
            return self._fit_dataset(model, data, layer, params)
        t0 = time.perf_counter()
        feats, mean_act, targets = self.filter_features(model, data, layer)
        return self._fit_features(model, layer, params, feats, mean_act, targets, time.perf_counter() - t0)

    def _fit_features(self, model: nn.Module, layer: str, params: Tuple[float, float, float, float],
                      feats: Tensor, mean_act: Tensor, targets: Optional[Tensor],
                      images_s: float) -> "GMMAnalysis":
        """PCA, mixtures and criteria on the flattened filter images ``feats [F, S, P]``."""
        lam, alpha, beta, theta = params
        t1 = time.perf_counter()
        if feats.shape[1] <= self.k_max:
            raise ValueError(
                f"GMMAnalysis.fit: {feats.shape[1]} samples but k_max={self.k_max}; pass more than "
                f"k_max samples."
            )
        dev = torch.device(self.device) if self.device is not None else model_device(model)
        points = pca2(feats.to(dev), method=self.pca_method, seed=self.seed).cpu()
        del feats
        t2 = time.perf_counter()
        res = anomaly_filters(
            points, mean_act, lam=lam, alpha=alpha, beta=beta, theta=theta, k_max=self.k_max,
            seed=self.seed, backend=self.backend, reg_covar=self.reg_covar, tol=self.tol,
            max_iter=self.max_iter, device=dev if self.backend == "torch" else None,
        )
        res.params["preset"] = self.preset
        t3 = time.perf_counter()
        self.params_ = (lam, alpha, beta, theta)
        self.result_ = GMMAnalysisResult(layer=layer, points=points, mean_activation=mean_act,
                                         targets=targets, anomaly=res,
                                         seconds={"images": images_s, "pca": t2 - t1, "gmm": t3 - t2})
        return self

    def _fit_dataset(self, model: nn.Module, dataset: Any, layer: str,
                     params: Tuple[float, float, float, float]) -> "GMMAnalysis":
        """The fit through a data-set scan: the per-sample rows are the flattened filter images
        (exactly :meth:`filter_features`' ``imgs.flatten(2).float()``), assembled in global
        sample order on rank 0; the mean activation is the scan's ``act_sum`` averaged over
        samples and positions."""
        from torch.utils.data import Subset

        from nns_cuda.engine.dataset_scan import DatasetScan

        where = "GMMAnalysis.fit"
        if self.filter_fn is not None:
            raise ValueError(f"{where}: filter_fn does not apply to a data-set scan (out_dir=); pass one of them")
        opts = dict(self.scan_options or {})
        fixed = sorted(k for k in ("stats", "filter_images", "measures", "per_sample") if k in opts)
        if fixed:
            raise ValueError(f"{where}: scan_options may not set {fixed}; the GMM analysis sets them")
        opts.setdefault("progress", self.progress)
        opts.setdefault("labels", True)
        shard = opts.pop("shard", None)
        if self.max_samples is not None and hasattr(dataset, "__len__"):
            dataset = Subset(dataset, range(min(int(self.max_samples), len(dataset))))

        def features(name, lr, x, fg):  # [B, C, P], as filter_features stores them
            return lr.filter_images.detach().flatten(2).float()

        t0 = time.perf_counter()
        res = DatasetScan(model, [layer], stats=False, filter_images=True, per_sample={_FEATURES: features},
                          **opts).run(dataset, self.out_dir, resume=True, shard=shard)
        self.params_ = params
        if res is None:
            self.result_ = None
            return self
        n = res.samples
        if not torch.equal(res.sample_index(layer, _FEATURES), torch.arange(n)):
            raise ValueError(f"{where}: {self.out_dir} does not hold one feature row per sample in order; "
                             "remove the folder and scan again")
        feats = res.tensors.pop(f"{layer}/sample/{_FEATURES}/values").transpose(0, 1).contiguous()  # [C, S, P]
        act = res.get(layer, "act_sum")
        act = act.reshape(act.shape[0], -1)
        mean_act = act.sum(1) / (res.count(layer) * act.shape[1])
        targets = res.labels() if res.has_labels else None
        del res
        return self._fit_features(model, layer, params, feats, mean_act, targets, time.perf_counter() - t0)



def anomaly_counts_over_checkpoints(
    checkpoints: Union[Mapping[str, nn.Module], Sequence[nn.Module]],
    data,
    layer: str,
    analysis: Optional[GMMAnalysis] = None,
    **analysis_kwargs: Any,
) -> List[Dict[str, Any]]:
    """Number of anomaly filters of ``layer`` for each checkpoint (Fig. 6-4).

    Parameters
    ----------
    checkpoints : mapping ``name -> model`` or a sequence of models
        E.g. ``{"epoch_5": m5, ...}``; a sequence is named ``"0", "1", …``.
    data : ``(x, y)`` or an iterable of batches
        The samples to analyse (the same for every checkpoint).
    layer : str
    analysis : GMMAnalysis, optional
        Default ``GMMAnalysis(**analysis_kwargs)``.

    Returns
    -------
    list of dict
        One ``{"checkpoint", "n_anomalous", "n_filters", "anomaly_filters",
        "n_outlier_samples"}`` per checkpoint, in order.
    """
    analysis = analysis or GMMAnalysis(**analysis_kwargs)
    items = checkpoints.items() if isinstance(checkpoints, Mapping) else ((str(i), m) for i, m in enumerate(checkpoints))
    rows = []
    for name, model in items:
        r = analysis.fit(model, data, layer).result_
        rows.append({
            "checkpoint": name,
            "n_anomalous": r.anomaly.n_anomalous,
            "n_filters": int(r.points.shape[0]),
            "anomaly_filters": r.anomaly.anomaly_filters,
            "n_outlier_samples": int(r.anomaly.outlier_union.numel()),
        })
    return rows
