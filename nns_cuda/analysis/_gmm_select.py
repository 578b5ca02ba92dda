"""Choice of the number of clusters per filter: Gaussian mixtures of ``k = 2 … k_max``
components and the Calinski–Harabasz index (private; the public API is ``gmm.py``).

docs/spec.md §5, Algorithm 6.1 of the thesis. The mixtures of all filters and all ``k`` are
fitted by the batched EM of :mod:`nns_cuda.analysis._gmm_em` (CPU or CUDA), which reproduces
``sklearn.mixture.GaussianMixture(covariance_type="full", init_params="k-means++",
random_state=seed)``; ``backend="sklearn"`` runs that class in a loop as the reference.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor

from nns_cuda.analysis import _gmm_em
from nns_cuda.analysis._gmm_ch import calinski_harabasz
from nns_cuda.analysis._gmm_check import check_k_max, check_points
from nns_cuda.analysis._toolkit import to_jsonable

__all__ = ["GMMDegenerateWarning", "KSelection", "select_k"]


class GMMDegenerateWarning(UserWarning):
    """Some filters have degenerate data (constant images, fewer distinct points than
    ``k_max``, or no split into two clusters); see ``KSelection.degenerate``."""


@dataclass
class KSelection:
    """Result of :func:`select_k` for ``F`` filters, ``S`` samples, ``k = 2 … k_max``.

    Attributes
    ----------
    k : LongTensor ``[F]``
        Chosen number of mixture components (largest CH, ties to the larger ``k``); 1 for a
        degenerate filter without any two-cluster split.
    labels : LongTensor ``[F, S]``
        Cluster of each sample under the chosen mixture (arg-max responsibility).
    ch : Tensor ``[F]`` float64
        CH index of the chosen clustering (NaN for ``k = 1``).
    ks : LongTensor ``[K]``
        The candidate ``k`` values ``2 … k_max`` (``K = k_max − 1``).
    ch_per_k, loglik_per_k, lower_bound_per_k : Tensor ``[F, K]`` float64
        CH index; mean log-likelihood per sample of the fitted mixture
        (``GaussianMixture.score``); EM's last lower bound (``lower_bound_``).
    n_iter_per_k : LongTensor ``[F, K]``;  converged_per_k : BoolTensor ``[F, K]``
    n_clusters_per_k : LongTensor ``[F, K]``
        Non-empty clusters of each fit (``≤ k``).
    n_clusters : LongTensor ``[F]``
        Non-empty clusters of the chosen fit.
    weights : ``[F, k_max]``, means : ``[F, k_max, 2]``, covariances : ``[F, k_max, 2, 2]``
        Chosen mixture, padded with NaN beyond ``k`` (all NaN where ``k = 1``).
    n_distinct : LongTensor ``[F]``
        Distinct points per filter.
    degenerate : BoolTensor ``[F]``
        Constant points, fewer distinct points than ``k_max``, no defined CH, or a covariance
        that had to be regularised beyond ``reg_covar``.
    labels_per_k : LongTensor ``[F, K, S]`` or None (``keep_all_labels=True``)
    backend : str;  notes : list of str;  seconds : float
    """

    k: Tensor
    labels: Tensor
    ch: Tensor
    ks: Tensor
    ch_per_k: Tensor
    loglik_per_k: Tensor
    lower_bound_per_k: Tensor
    n_iter_per_k: Tensor
    converged_per_k: Tensor
    n_clusters_per_k: Tensor
    n_clusters: Tensor
    weights: Tensor
    means: Tensor
    covariances: Tensor
    n_distinct: Tensor
    degenerate: Tensor
    labels_per_k: Optional[Tensor] = None
    backend: str = "torch"
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self, include_labels: bool = False) -> Dict[str, Any]:
        """JSON-safe summary (NaN / Inf become ``None``).

        Parameters
        ----------
        include_labels : bool
            Add the chosen labels ``[F, S]`` (``"labels"``).

        Returns
        -------
        dict
            ``backend, k [F], ch [F], ks [K], ch_per_k [F][K], loglik_per_k [F][K],
            n_iter_per_k, converged_per_k, n_clusters [F], n_distinct [F], degenerate [F],
            notes, seconds``.
        """
        d = {
            "backend": self.backend,
            "k": self.k.tolist(),
            "ch": to_jsonable(self.ch),
            "ks": self.ks.tolist(),
            "ch_per_k": [to_jsonable(r) for r in self.ch_per_k],
            "loglik_per_k": [to_jsonable(r) for r in self.loglik_per_k],
            "n_iter_per_k": self.n_iter_per_k.tolist(),
            "converged_per_k": self.converged_per_k.tolist(),
            "n_clusters": self.n_clusters.tolist(),
            "n_distinct": self.n_distinct.tolist(),
            "degenerate": self.degenerate.tolist(),
            "notes": list(self.notes),
            "seconds": self.seconds,
        }
        if include_labels:
            d["labels"] = self.labels.tolist()
        return d


def _n_distinct(points: Tensor) -> Tensor:
    """Distinct 2-D points per filter.

    Parameters
    ----------
    points : Tensor ``[F, S, 2]``
        Per-filter points; exact equality counts as the same point.

    Returns
    -------
    LongTensor ``[F]``
        Number of distinct points of each filter (``1 … S``).
    """
    i1 = torch.argsort(points[..., 1], dim=1, stable=True)
    t = torch.gather(points, 1, i1[..., None].expand_as(points))
    i2 = torch.argsort(t[..., 0], dim=1, stable=True)
    t = torch.gather(t, 1, i2[..., None].expand_as(points))
    return 1 + (t[:, 1:] != t[:, :-1]).any(-1).sum(1)


def _fit_all_torch(points: Tensor, k_max: int, *, seed: int, reg_covar: float, tol: float,
                   max_iter: int, device: Optional[torch.device], strategy: str = "auto") -> Dict[str, Tensor]:
    """All filters × all ``k = 2 … k_max`` with the batched EM.

    Parameters
    ----------
    points : Tensor ``[F, S, 2]``
    k_max, seed, reg_covar, tol, max_iter, device, strategy
        As :func:`select_k`.

    Returns
    -------
    dict of Tensor
        The same entries as ``_gmm_sklearn.fit_all`` (``K = k_max − 1``): ``labels [F, K, S]``,
        ``ch``, ``loglik``, ``lower_bound`` ``[F, K]`` float64, ``n_iter``, ``converged``,
        ``ill`` (a covariance was singular) ``[F, K]``, ``weights [F, K, k_max]``,
        ``means [F, K, k_max, 2]``, ``covariances [F, K, k_max, 2, 2]`` (NaN beyond ``k``),
        on ``device``.
    """
    dev = torch.device(device) if device is not None else points.device
    z, mu, sc = _gmm_em.standardise(points.to(dev))
    reg = reg_covar / (sc * sc)
    f_n, s, _ = z.shape
    nk = k_max - 1
    out = {
        "labels": torch.zeros(f_n, nk, s, dtype=torch.long, device=dev),
        "loglik": torch.empty(f_n, nk, dtype=torch.float64, device=dev),
        "lower_bound": torch.empty(f_n, nk, dtype=torch.float64, device=dev),
        "n_iter": torch.zeros(f_n, nk, dtype=torch.long, device=dev),
        "converged": torch.zeros(f_n, nk, dtype=torch.bool, device=dev),
        "ill": torch.zeros(f_n, nk, dtype=torch.bool, device=dev),
        "weights": torch.full((f_n, nk, k_max), math.nan, dtype=torch.float64, device=dev),
        "means": torch.full((f_n, nk, k_max, 2), math.nan, dtype=torch.float64, device=dev),
        "covariances": torch.full((f_n, nk, k_max, 2, 2), math.nan, dtype=torch.float64, device=dev),
    }
    log_s2 = 2.0 * torch.log(sc)
    if strategy == "auto":
        # stacked (all k in one batch): fewer, larger operations — wins on CUDA and for small
        # problems where per-operation overhead dominates; per-k does less arithmetic on CPU.
        small = f_n * s * (k_max - 1) * k_max <= (1 << 21)
        strategy = "stacked" if (z.is_cuda or small) else "per_k"
    if strategy == "stacked":
        fits = _gmm_em.fit_em_stacked(z, k_max, reg=reg, seed=seed, tol=tol, max_iter=max_iter)
    else:
        seeds = _gmm_em.kmeans_plusplus_all(z, range(2, k_max + 1), seed)
    for j, k in enumerate(range(2, k_max + 1)):
        if strategy == "stacked":
            fit = fits[j]
        else:
            fit = _gmm_em.fit_em(z, k, reg=reg, seed=seed, tol=tol, max_iter=max_iter, init=seeds[k])
        out["labels"][:, j] = fit.labels
        out["loglik"][:, j] = fit.loglik - log_s2
        out["lower_bound"][:, j] = fit.lower_bound - log_s2
        out["n_iter"][:, j] = fit.n_iter
        out["converged"][:, j] = fit.converged
        out["ill"][:, j] = fit.ill_conditioned
        out["weights"][:, j, :k] = fit.weights
        out["means"][:, j, :k] = fit.means * sc[:, None, None] + mu[:, None, :]
        out["covariances"][:, j, :k] = fit.covariances * (sc * sc)[:, None, None, None]
    pts = points.to(dev)
    nlab = out["labels"].shape
    out["ch"] = calinski_harabasz(
        pts[:, None].expand(f_n, nk, s, 2).reshape(f_n * nk, s, 2),
        out["labels"].reshape(f_n * nk, s),
    ).reshape(nlab[:2])
    return out


def select_k(
    points: Tensor,
    k_max: int = 10,
    seed: int = 0,
    *,
    backend: str = "torch",
    reg_covar: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 100,
    device: Optional[Union[str, torch.device]] = None,
    strategy: str = "auto",
    keep_all_labels: bool = False,
    warn: bool = True,
) -> KSelection:
    """Cluster each filter's points with GMMs of ``k = 2 … k_max`` and keep the best CH.

    Algorithm 6.1: for every filter and every ``k``, a Gaussian mixture with full covariances
    (EM, k-means++ initialisation, ``random_state = seed``, ``n_init = 1``), labels by
    maximum responsibility, CH index of the labelling; the largest CH wins, ties to the larger
    ``k``.

    Parameters
    ----------
    points : Tensor ``[F, S, 2]``
        Per-filter 2-D points (:func:`pca2`). Needs ``S > k_max``; finite values.
    k_max : int
        Largest number of components (``≥ 2``).
    seed : int
        ``random_state`` of the mixtures (k-means++ seeding).
    backend : {"torch", "sklearn"}
        ``"torch"``: batched EM over all filters (per ``k``), CPU or CUDA. ``"sklearn"``: a
        loop over ``sklearn.mixture.GaussianMixture`` and ``calinski_harabasz_score`` (the
        reference; slow).
    reg_covar, tol, max_iter : float, float, int
        As ``GaussianMixture`` (``reg_covar`` in the units of ``points``).
    device : optional
        Where the torch backend runs (default: ``points``' device).
    strategy : {"auto", "per_k", "stacked"}
        Torch backend batching: ``"per_k"`` runs one batched EM per ``k`` over all filters;
        ``"stacked"`` runs a single EM over all ``(filter, k)`` pairs with ``k_max`` slots
        (unused slots masked). Same results; ``"auto"`` picks ``"stacked"`` on CUDA and for
        small problems (``F·S·(k_max−1)·k_max ≤ 2²¹``), ``"per_k"`` otherwise.
    keep_all_labels : bool
        Keep the labels of every ``k`` (``labels_per_k``, ``[F, K, S]``).
    warn : bool
        Emit a :class:`GMMDegenerateWarning` when some filters are degenerate.

    Returns
    -------
    KSelection
        Tensors on the CPU (shapes in :class:`KSelection`).
    """
    who = "select_k"
    points = check_points(points, who)
    f_n, s, _ = points.shape
    k_max = check_k_max(k_max, s, who)
    if backend not in ("torch", "sklearn"):
        raise ValueError(f"{who}: backend must be 'torch' or 'sklearn', got {backend!r}.")
    if strategy not in ("auto", "per_k", "stacked"):
        raise ValueError(f"{who}: strategy must be 'auto', 'per_k' or 'stacked', got {strategy!r}.")
    if not reg_covar >= 0:
        raise ValueError(f"{who}: reg_covar must be >= 0, got {reg_covar}.")
    if not tol > 0:
        raise ValueError(f"{who}: tol must be > 0, got {tol}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{who}: max_iter must be an int >= 1, got {max_iter!r}.")
    t0 = time.perf_counter()
    if backend == "torch":
        fits = _fit_all_torch(points, k_max, seed=seed, reg_covar=reg_covar, tol=tol,
                              max_iter=max_iter, device=device, strategy=strategy)
        fits = {k: v.cpu() for k, v in fits.items()}
    else:
        from nns_cuda.analysis import _gmm_sklearn

        fits = _gmm_sklearn.fit_all(points, k_max, seed=seed, reg_covar=reg_covar, tol=tol,
                                    max_iter=max_iter)
        fits["ill"] = torch.zeros_like(fits["converged"])
    seconds = time.perf_counter() - t0

    ks = torch.arange(2, k_max + 1)
    ch_k = fits["ch"]
    labels_k = fits["labels"]
    # largest CH, ties to the larger k: arg-max over the reversed k axis
    score = torch.where(torch.isnan(ch_k), torch.full_like(ch_k, -math.inf), ch_k)
    j = (k_max - 2) - score.flip(-1).argmax(-1)  # [F]
    valid = torch.isfinite(score).any(-1) | (score == math.inf).any(-1)
    ar = torch.arange(f_n)
    labels = labels_k[ar, j]
    ch = ch_k[ar, j]
    k = ks[j]
    # non-empty clusters per fit
    onehot = torch.zeros(f_n, k_max - 1, k_max, dtype=torch.long)
    onehot.scatter_add_(2, labels_k, torch.ones_like(labels_k))
    ncl_k = (onehot > 0).sum(-1)
    ncl = ncl_k[ar, j]
    weights, means, covs = fits["weights"][ar, j], fits["means"][ar, j], fits["covariances"][ar, j]
    # degenerate filters: no k gives two clusters -> k = 1, one cluster
    labels = torch.where(valid[:, None], labels, torch.zeros_like(labels))
    k = torch.where(valid, k, torch.ones_like(k))
    ncl = torch.where(valid, ncl, torch.ones_like(ncl))
    ch = torch.where(valid, ch, torch.full_like(ch, math.nan))
    nanv = ~valid
    weights, means, covs = weights.clone(), means.clone(), covs.clone()
    weights[nanv], means[nanv], covs[nanv] = math.nan, math.nan, math.nan
    pcpu = points.detach().cpu().to(torch.float64)
    n_dist = _n_distinct(pcpu)
    const = n_dist == 1
    few = n_dist < k_max
    ill = fits["ill"].any(-1)
    degenerate = const | few | ~valid | ill
    notes = []
    if bool(degenerate.any()):
        parts = []
        if bool(const.any()):
            parts.append(f"{int(const.sum())} with constant points (e.g. a dead filter)")
        if bool((few & ~const).any()):
            parts.append(f"{int((few & ~const).sum())} with fewer distinct points than k_max={k_max}")
        if bool((~valid & ~const).any()):
            parts.append(f"{int((~valid & ~const).sum())} never split into two clusters")
        if bool(ill.any()):
            parts.append(f"{int(ill.sum())} with a covariance that was singular despite reg_covar={reg_covar:g}")
        msg = (
            f"select_k: {int(degenerate.sum())} of {f_n} filters have degenerate data: "
            + "; ".join(parts)
            + ". Their mixtures are regularised by reg_covar; a filter without two clusters gets "
            "k=1, CH=NaN and is never anomalous. See KSelection.degenerate "
            f"(first: {torch.nonzero(degenerate).flatten()[:10].tolist()})."
        )
        notes.append(msg)
        if warn:
            warnings.warn(msg, GMMDegenerateWarning, stacklevel=2)
    return KSelection(
        k=k, labels=labels, ch=ch, ks=ks, ch_per_k=ch_k, loglik_per_k=fits["loglik"],
        lower_bound_per_k=fits["lower_bound"], n_iter_per_k=fits["n_iter"],
        converged_per_k=fits["converged"], n_clusters_per_k=ncl_k, n_clusters=ncl,
        weights=weights, means=means, covariances=covs, n_distinct=n_dist, degenerate=degenerate,
        labels_per_k=labels_k if keep_all_labels else None, backend=backend, notes=notes,
        seconds=seconds,
    )
