"""Anomaly criteria of the GMM pattern-level analysis (private; the public API is ``gmm.py``).

docs/spec.md §5, §6.2.5 and Table 6-1 of the thesis: a filter is an *anomaly filter* when its
clusters are imbalanced, its Calinski–Harabasz index is high and its mean activation is large
enough; the samples in the small clusters of anomaly filters are the *outlier samples*.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from nns_cuda.analysis._gmm_check import check_points
from nns_cuda.analysis._gmm_select import KSelection, select_k
from nns_cuda.analysis._toolkit import check_finite, to_jsonable

__all__ = ["PRESETS", "AnomalyResult", "anomaly_filters", "resolve_params"]

#: Table 6-1 presets ``(λ, α, β, θ)``: "small" = LeNet-5 / simple CNN, "large" = AlexNet,
#: ResNet-18, VGG-16 (experiment 1).
PRESETS: Dict[str, Tuple[float, float, float, float]] = {
    "small": (50, 0.2, 1, 0.1),
    "large": (10, 0.2, 1, 0.1),
}


@dataclass
class AnomalyResult:
    """Anomaly filters of one layer (docs/spec.md §5, Table 6-1, Algorithm 6.1).

    Attributes
    ----------
    anomalous : BoolTensor ``[F]``
        All three criteria hold.
    outlier_samples : list of ``F`` LongTensors
        Sample indices in the small clusters of each anomaly filter (empty for the others).
    outlier_union : LongTensor
        Sorted union of ``outlier_samples`` over the anomaly filters.
    k, ch, labels, n_clusters : from :class:`KSelection`.
    cluster_sizes : LongTensor ``[F, k_max]``
        Members per cluster of the chosen fit (0 beyond ``k`` and for empty clusters).
    n_small : LongTensor ``[F]``
        Small (non-empty, ``≤ λ`` members) clusters.
    imbalanced, high_ch, high_activation : BoolTensor ``[F]``
        Criteria 1 (``n_small > α · n_clusters``), 2 (``CH > β · layer_mean_ch``),
        3 (``mean_activation ≥ θ · layer_mean_activation``).
    layer_mean_ch, layer_mean_activation : float
    mean_activation : Tensor ``[F]``
    params : dict
        ``lam, alpha, beta, theta, k_max, seed, preset``.
    selection : KSelection
        The clustering the criteria were applied to.
    """

    anomalous: Tensor
    outlier_samples: List[Tensor]
    outlier_union: Tensor
    k: Tensor
    ch: Tensor
    labels: Tensor
    n_clusters: Tensor
    cluster_sizes: Tensor
    n_small: Tensor
    imbalanced: Tensor
    high_ch: Tensor
    high_activation: Tensor
    layer_mean_ch: float
    layer_mean_activation: float
    mean_activation: Tensor
    params: Dict[str, Any]
    selection: KSelection

    @property
    def anomaly_filters(self) -> List[int]:
        """Indices of the anomaly filters."""
        return torch.nonzero(self.anomalous).flatten().tolist()

    @property
    def n_anomalous(self) -> int:
        """Number of anomaly filters."""
        return int(self.anomalous.sum())

    def to_dict(self, include_labels: bool = False) -> Dict[str, Any]:
        """JSON-safe dict: per-filter lists and the outlier samples of the anomaly filters.

        Parameters
        ----------
        include_labels : bool
            Add the chosen labels ``[F, S]`` to ``"selection"``.

        Returns
        -------
        dict
            ``params``, ``n_filters``, ``n_anomalous``, ``anomaly_filters``,
            ``outlier_samples`` (``{filter: [sample, ...]}``), ``outlier_union``,
            ``layer_mean_ch`` (``None`` if undefined), ``layer_mean_activation``, per-filter
            lists ``k, ch, n_clusters, n_small, imbalanced, high_ch, high_activation,
            mean_activation`` (``[F]``), ``cluster_sizes`` (``[F][k_max]``) and ``selection``
            (:meth:`KSelection.to_dict`).
        """
        return {
            "params": dict(self.params),
            "n_filters": int(self.anomalous.numel()),
            "n_anomalous": self.n_anomalous,
            "anomaly_filters": self.anomaly_filters,
            "outlier_samples": {str(f): self.outlier_samples[f].tolist() for f in self.anomaly_filters},
            "outlier_union": self.outlier_union.tolist(),
            "layer_mean_ch": self.layer_mean_ch if math.isfinite(self.layer_mean_ch) else None,
            "layer_mean_activation": self.layer_mean_activation,
            "k": self.k.tolist(),
            "ch": to_jsonable(self.ch),
            "n_clusters": self.n_clusters.tolist(),
            "cluster_sizes": self.cluster_sizes.tolist(),
            "n_small": self.n_small.tolist(),
            "imbalanced": self.imbalanced.tolist(),
            "high_ch": self.high_ch.tolist(),
            "high_activation": self.high_activation.tolist(),
            "mean_activation": to_jsonable(self.mean_activation),
            "selection": self.selection.to_dict(include_labels=include_labels),
        }


def resolve_params(lam: Optional[float], alpha: Optional[float], beta: Optional[float],
                   theta: Optional[float], preset: Optional[str], who: str) -> Tuple[float, float, float, float]:
    """Fill the Table 6-1 hyper-parameters from a preset and check them.

    Parameters
    ----------
    lam, alpha, beta, theta : float or None
        Explicit values (``None``: take the preset's).
    preset : {"small", "large"} or None
        A key of :data:`PRESETS`.
    who : str
        The caller, prefix of error messages.

    Returns
    -------
    (float, float, float, float)
        ``(λ, α, β, θ)`` with ``λ ≥ 0``, ``α ∈ [0, 1]``, ``β ≥ 0``, ``θ ≥ 0``.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"{who}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
        p = PRESETS[preset]
        lam = p[0] if lam is None else lam
        alpha = p[1] if alpha is None else alpha
        beta = p[2] if beta is None else beta
        theta = p[3] if theta is None else theta
    missing = [n for n, v in (("lam", lam), ("alpha", alpha), ("beta", beta), ("theta", theta)) if v is None]
    if missing:
        raise TypeError(
            f"{who}: missing {', '.join(missing)}; pass lam, alpha, beta, theta or a preset "
            f"({', '.join(f'{k}={v}' for k, v in PRESETS.items())})."
        )
    for n, v in (("lam", lam), ("alpha", alpha), ("beta", beta), ("theta", theta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{who}: {n} must be a finite number, got {v!r}.")
    if lam < 0:
        raise ValueError(f"{who}: lam (λ, largest size of a small cluster) must be >= 0, got {lam}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"{who}: alpha (α, fraction of small clusters) must be in [0, 1], got {alpha}.")
    if beta < 0:
        raise ValueError(f"{who}: beta (β, CH factor over the layer mean) must be >= 0, got {beta}.")
    if theta < 0:
        raise ValueError(f"{who}: theta (θ, activation factor over the layer mean) must be >= 0, got {theta}.")
    return float(lam), float(alpha), float(beta), float(theta)


def anomaly_filters(
    points: Tensor,
    mean_activation: Tensor,
    *,
    lam: Optional[float] = None,
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    theta: Optional[float] = None,
    preset: Optional[str] = None,
    k_max: int = 10,
    seed: int = 0,
    selection: Optional[KSelection] = None,
    **select_kwargs: Any,
) -> AnomalyResult:
    """Anomaly filters and outlier samples of one layer (docs/spec.md §5, §6.2.5 of the thesis).

    A filter is anomalous when (1) its clusters are imbalanced — more than ``α · n_clusters``
    of its non-empty clusters have at most ``λ`` members —, (2) its CH index exceeds ``β ×``
    the layer's mean CH, and (3) its mean activation is at least ``θ ×`` the layer's mean.

    Parameters
    ----------
    points : Tensor ``[F, S, 2]``
        Per-filter 2-D points (:func:`pca2` of the filter learned images).
    mean_activation : Tensor ``[F]``
        Mean over positions and samples of each filter's output ``a^k``.
    lam, alpha, beta, theta : float
        Table 6-1 hyper-parameters ``λ ≥ 0, α ∈ [0, 1], β ≥ 0, θ ≥ 0``; missing ones come from
        ``preset`` (``"small"`` = (50, 0.2, 1, 0.1), ``"large"`` = (10, 0.2, 1, 0.1)).
    k_max, seed : int
        As :func:`select_k`.
    selection : KSelection, optional
        Reuse a :func:`select_k` result for these points instead of fitting again.
    **select_kwargs
        Passed to :func:`select_k` (``backend``, ``reg_covar``, ``device``, ...).

    Returns
    -------
    AnomalyResult
        Per-filter tensors of length ``F`` (see :class:`AnomalyResult`), on the CPU.
    """
    who = "anomaly_filters"
    lam, alpha, beta, theta = resolve_params(lam, alpha, beta, theta, preset, who)
    points = check_points(points, who)
    f_n, s, _ = points.shape
    if not isinstance(mean_activation, Tensor):
        mean_activation = torch.as_tensor(mean_activation)
    mean_activation = mean_activation.detach().cpu().to(torch.float64)
    if mean_activation.shape != (f_n,):
        raise ValueError(
            f"{who}: mean_activation must be [F] = [{f_n}] (one value per filter of points), got "
            f"{tuple(mean_activation.shape)}."
        )
    check_finite("mean_activation", mean_activation, who)
    if selection is None:
        selection = select_k(points, k_max=k_max, seed=seed, **select_kwargs)
    else:
        if selection.labels.shape != (f_n, s):
            raise ValueError(
                f"{who}: selection was computed for {tuple(selection.labels.shape)} points, not "
                f"{(f_n, s)}; pass the KSelection of these points or selection=None."
            )
        k_max = int(selection.ks[-1])
    labels = selection.labels
    kcap = max(k_max, int(labels.max()) + 1)
    sizes = torch.zeros(f_n, kcap, dtype=torch.long).scatter_add_(1, labels, torch.ones_like(labels))
    nonempty = sizes > 0
    small = nonempty & (sizes <= lam)
    n_small = small.sum(1)
    n_cl = nonempty.sum(1)
    imbalanced = n_small.double() > alpha * n_cl.double()
    ch = selection.ch
    finite = torch.isfinite(ch)
    layer_ch = float(ch[finite].mean()) if bool(finite.any()) else math.nan
    high_ch = finite & (ch > beta * layer_ch) if math.isfinite(layer_ch) else torch.zeros(f_n, dtype=torch.bool)
    layer_act = float(mean_activation.mean())
    high_act = mean_activation >= theta * layer_act
    anomalous = imbalanced & high_ch & high_act
    out_mask = torch.gather(small, 1, labels) & anomalous[:, None]  # [F, S]
    outliers = [torch.nonzero(out_mask[f]).flatten() for f in range(f_n)]
    union = torch.nonzero(out_mask.any(0)).flatten()
    return AnomalyResult(
        anomalous=anomalous, outlier_samples=outliers, outlier_union=union, k=selection.k,
        ch=ch, labels=labels, n_clusters=n_cl, cluster_sizes=sizes[:, :k_max], n_small=n_small,
        imbalanced=imbalanced, high_ch=high_ch, high_activation=high_act,
        layer_mean_ch=layer_ch, layer_mean_activation=layer_act,
        mean_activation=mean_activation,
        params={"lam": lam, "alpha": alpha, "beta": beta, "theta": theta, "k_max": k_max,
                "seed": seed, "preset": preset},
        selection=selection,
    )
