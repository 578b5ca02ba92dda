"""Pattern-level analysis: GMM clustering of filter learned images and anomaly filters.

Thesis Chapter 6, SPEC §5. For one layer, every filter's learned images ``L^k(x)`` of ``S``
samples are flattened, centred over the samples and projected on their top-2 principal
components (:func:`pca2`). Each filter's ``S`` points are clustered by Gaussian mixtures with
``k = 2 … K_max`` components; the ``k`` with the largest Calinski–Harabasz index is kept
(:func:`select_k`, Algorithm 6.1). A filter is an *anomaly filter* when its clusters are
imbalanced (many clusters of at most ``λ`` points), its CH index is unusually high and its
mean activation is large enough (:func:`anomaly_filters`, Table 6-1). The samples in the small
clusters of anomaly filters are the *outlier samples*.

The mixtures of all filters and all ``k`` are fitted by a batched EM in torch (CPU or CUDA)
that reproduces ``sklearn.mixture.GaussianMixture(covariance_type="full",
init_params="k-means++", random_state=seed)`` — same k-means++ seeds (scikit-learn's random
stream), same EM updates and stopping rule — so that ``backend="sklearn"`` (a plain loop over
scikit-learn) is a reference, not a different algorithm.

Decisions (documented here and in SPEC §5):

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
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from nns_cuda.analysis import _gmm_em
from nns_cuda.analysis._gmm_model import (
    HessianEigen,
    accuracy,
    gradient_magnitudes,
    hessian_top_eigenvalue,
    iter_batches,
    n_channels,
    outlier_gradient_report,
    per_sample_gradient_magnitude,
    random_filter_baseline,
    single_filter_masking,
)
from nns_cuda._modules import resolve_module, split_call as _split_call

__all__ = [
    "PRESETS",
    "THESIS_TABLES",
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
    "anomaly_counts_over_checkpoints",
    "hessian_top_eigenvalue",
    "HessianEigen",
    "accuracy",
    "GMMAnalysis",
    "GMMAnalysisResult",
    "findings",
    "add_gmm_arguments",
    "run_gmm",
]

#: Table 6-1 presets ``(λ, α, β, θ)``: "small" = LeNet-5 / simple CNN, "large" = AlexNet,
#: ResNet-18, VGG-16 (experiment 1).
PRESETS: Dict[str, Tuple[float, float, float, float]] = {
    "small": (50, 0.2, 1, 0.1),
    "large": (10, 0.2, 1, 0.1),
}

#: The thesis's published numbers (Tables 6-2 … 6-5), for side-by-side reports.
#: Keys: model -> dataset -> values; ``None`` where the thesis has "-".
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


class GMMDegenerateWarning(UserWarning):
    """Some filters have degenerate data (constant images, fewer distinct points than
    ``k_max``, or no split into two clusters); see ``KSelection.degenerate``."""


# ------------------------------------------------------------------------------ validation
def _check_tensor(t: Any, name: str, who: str, dims: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != dims:
        raise ValueError(f"{who}: {name} must be {dims}-D, got shape {tuple(t.shape)}.")
    return t


def _check_finite(t: Tensor, name: str, who: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(
            f"{who}: {name} contains {n_nan} NaN and {n_inf} Inf values; remove or replace them "
            "(e.g. check the model for overflow, or filter the samples) before clustering."
        )


def _check_points(points: Any, who: str) -> Tensor:
    points = _check_tensor(points, "points", who, 3)
    if points.shape[-1] != 2:
        raise ValueError(
            f"{who}: points must be [F, S, 2] (2-D projections), got {tuple(points.shape)}; "
            "project filter images with gmm.pca2 first."
        )
    if not points.is_floating_point():
        raise TypeError(f"{who}: points must be floating point, got {points.dtype}.")
    _check_finite(points, "points", who)
    return points


def _check_k_max(k_max: Any, s: int, who: str) -> int:
    if isinstance(k_max, bool) or not isinstance(k_max, int):
        raise TypeError(f"{who}: k_max must be an int, got {type(k_max).__name__}.")
    if k_max < 2:
        raise ValueError(f"{who}: k_max must be >= 2 (mixtures of 2 … k_max components), got {k_max}.")
    if s <= k_max:
        raise ValueError(
            f"{who}: {s} samples but k_max={k_max}; clustering into up to k_max clusters needs more "
            f"samples than k_max (the CH index needs fewer clusters than samples). Pass at least "
            f"{k_max + 1} samples or a smaller k_max."
        )
    return k_max


# ----------------------------------------------------------------------------------- PCA
def pca2(
    features: Tensor,
    *,
    method: str = "auto",
    tol: Optional[float] = None,
    max_iter: int = 300,
    seed: int = 0,
    max_elems: int = 1 << 26,
) -> Tensor:
    """Per-filter projection on the top-2 principal components, batched over filters.

    For each filter ``f``, ``X_f = features[f] - mean over samples`` (``[S, P]``) and the result
    is ``X_f V_f`` with ``V_f`` the top-2 right singular vectors — ``sklearn.decomposition.PCA
    (n_components=2).fit_transform(X_f)``, with scikit-learn's sign convention (the entry of
    largest magnitude of each principal axis is positive).

    Parameters
    ----------
    features : Tensor ``[F, S, P]``
        Flattened filter learned images: ``F`` filters, ``S`` samples, ``P = D·H·W``. float32 or
        float64 (float16/bfloat16 are computed in float32), CPU or CUDA.
    method : {"auto", "eigh", "lowrank"}
        ``"eigh"``: exact, eigen-decomposition of the smaller Gram matrix (``X Xᵀ`` ``[S, S]``
        when ``S ≤ P``, else ``Xᵀ X``). ``"lowrank"``: block subspace iteration on ``X`` with
        Rayleigh–Ritz, iterated until the residual of the top-2 Ritz pairs is below ``tol``
        (never forms an ``S × S`` matrix). ``"auto"``: ``"eigh"`` when ``min(S, P) ≤ 1024``.
    tol : float, optional
        ``"lowrank"`` stopping tolerance on ``‖X Xᵀ u − θ u‖ / θ₁`` (default 1e-5 for float32,
        1e-9 for float64).
    max_iter : int
        ``"lowrank"`` iteration limit (a warning names the filters that did not converge).
    seed : int
        Seed of the ``"lowrank"`` start block.
    max_elems : int
        Filters are processed in chunks whose Gram matrices hold at most this many entries.

    Returns
    -------
    Tensor ``[F, S, 2]``, the input's dtype (float32 for half inputs) and device.
    """
    who = "pca2"
    features = _check_tensor(features, "features", who, 3)
    if not features.is_floating_point():
        raise TypeError(f"{who}: features must be floating point, got {features.dtype}; call .float().")
    f_n, s, p = features.shape
    if s < 2:
        raise ValueError(f"{who}: need at least 2 samples per filter, got S={s}.")
    if p < 1 or f_n < 1:
        raise ValueError(f"{who}: features has an empty dimension: shape {tuple(features.shape)}.")
    if method not in ("auto", "eigh", "lowrank"):
        raise ValueError(f"{who}: method must be 'auto', 'eigh' or 'lowrank', got {method!r}.")
    _check_finite(features, "features", who)
    x = features
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    m = min(s, p)
    if method == "auto":
        method = "eigh" if m <= 1024 else "lowrank"
    if tol is None:
        tol = 1e-9 if x.dtype == torch.float64 else 1e-5
    per = max(m * m, s * p) if method == "eigh" else s * p
    rows = max(1, min(f_n, max_elems // max(1, per)))
    out = []
    notconv = []
    for i in range(0, f_n, rows):
        xc = x[i : i + rows]
        xc = xc - xc.mean(1, keepdim=True)
        if method == "eigh":
            out.append(_pca2_eigh(xc))
        else:
            pr, ok = _pca2_lowrank(xc, tol, max_iter, seed)
            out.append(pr)
            notconv += (torch.nonzero(~ok).flatten() + i).tolist()
    if notconv:
        warnings.warn(
            f"pca2: subspace iteration did not reach tol={tol:g} in {max_iter} iterations for "
            f"{len(notconv)} filters (first: {notconv[:10]}); their top-2 components are nearly "
            "degenerate. Use method='eigh' or a larger max_iter for exact components.",
            RuntimeWarning,
        )
    return torch.cat(out)


def _sign_fix(proj: Tensor, axes: Tensor) -> Tensor:
    """scikit-learn's ``svd_flip(u_based_decision=False)``: largest-|.| entry of each axis > 0.

    proj ``[F, S, 2]``, axes ``[F, P, 2]``.
    """
    i = axes.abs().argmax(1, keepdim=True)  # [F, 1, 2]
    sgn = torch.sign(torch.gather(axes, 1, i))  # [F, 1, 2]
    sgn = torch.where(sgn == 0, torch.ones_like(sgn), sgn)
    return proj * sgn


def _pca2_eigh(x: Tensor) -> Tensor:
    f_n, s, p = x.shape
    if s <= p:
        g = torch.bmm(x, x.transpose(1, 2))  # [F, S, S]
        evals, evecs = torch.linalg.eigh(g)
        u = evecs[..., [-1, -2]]  # [F, S, 2]
        sig = evals[..., [-1, -2]].clamp_min(0).sqrt()  # [F, 2]
        proj = u * sig[:, None, :]
        axes = torch.bmm(x.transpose(1, 2), u)  # ∝ V (positive factor σ), [F, P, 2]
    else:
        c = torch.bmm(x.transpose(1, 2), x)  # [F, P, P]
        _, evecs = torch.linalg.eigh(c)
        axes = evecs[..., [-1, -2]]
        proj = torch.bmm(x, axes)
    return _sign_fix(proj, axes)


def _pca2_lowrank(x: Tensor, tol: float, max_iter: int, seed: int) -> Tuple[Tensor, Tensor]:
    f_n, s, p = x.shape
    b = min(10, s, p)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(f_n, s, b, generator=gen, dtype=x.dtype).to(x.device)
    q = torch.linalg.qr(torch.bmm(x, torch.bmm(x.transpose(1, 2), q))).Q
    ok = torch.zeros(f_n, dtype=torch.bool, device=x.device)
    for _ in range(max_iter):
        y = torch.bmm(x.transpose(1, 2), q)  # [F, P, b] = Xᵀ Q
        h = torch.bmm(y.transpose(1, 2), y)  # Qᵀ X Xᵀ Q
        theta, w = torch.linalg.eigh(h)
        w2, th2 = w[..., [-1, -2]], theta[..., [-1, -2]]  # [F, b, 2], [F, 2]
        z = torch.bmm(x, y)  # X Xᵀ Q, [F, S, b]
        r = torch.bmm(z, w2) - torch.bmm(q, w2) * th2[:, None, :]
        res = r.norm(dim=1).amax(-1) / th2[:, 0].clamp_min(torch.finfo(x.dtype).tiny)
        ok = (res <= tol) | (th2[:, 0] <= 0)
        if bool(ok.all()):
            break
        q = torch.linalg.qr(z).Q
    u = torch.bmm(q, w2)
    sig = th2.clamp_min(0).sqrt()
    proj = u * sig[:, None, :]
    axes = torch.bmm(y, w2)
    return _sign_fix(proj, axes), ok


# -------------------------------------------------------------------------------------- CH
def calinski_harabasz(points: Tensor, labels: Tensor) -> Tensor:
    """Calinski–Harabasz index per filter, batched (= ``sklearn.metrics.calinski_harabasz_score``).

    ``CH = [SSB / (L - 1)] / [SSW / (S - L)]`` with squared Euclidean distances, ``L`` the
    number of distinct labels of the filter, ``SSB = Σ_c n_c ‖m_c − m‖²``,
    ``SSW = Σ_i ‖x_i − m_{c(i)}‖²``.

    Parameters
    ----------
    points : Tensor ``[F, S, D]`` (``D = 2`` for this analysis; any ``D ≥ 1`` works)
    labels : integer Tensor ``[F, S]`` (any integer values; only equality matters)

    Returns
    -------
    Tensor ``[F]`` float64 on ``points``' device: 1.0 where ``SSW = 0`` (as scikit-learn), NaN
    where it is undefined (``L < 2`` or ``L = S``; scikit-learn raises there).
    """
    who = "calinski_harabasz"
    points = _check_tensor(points, "points", who, 3)
    labels = _check_tensor(labels, "labels", who, 2)
    if labels.shape != points.shape[:2]:
        raise ValueError(
            f"{who}: labels must be [F, S] = {tuple(points.shape[:2])} to match points "
            f"{tuple(points.shape)}, got {tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{who}: labels must be an integer tensor, got {labels.dtype}.")
    if not points.is_floating_point():
        raise TypeError(f"{who}: points must be floating point, got {points.dtype}.")
    _check_finite(points, "points", who)
    f_n, s, d = points.shape
    dev = points.device
    x = points.to(torch.float64)
    lab = labels.to(dev).long()
    lo = lab.min()
    span = int(lab.max() - lo) + 1
    key = (torch.arange(f_n, device=dev)[:, None] * span + (lab - lo)).flatten()
    xf = x.reshape(-1, d)
    if span <= 4 * s:  # small label range: direct slots (empty ones are harmless)
        inv, u_n = key, f_n * span
        slot_f = torch.arange(f_n, device=dev).repeat_interleave(span)
    else:  # arbitrary integer labels: compact them
        uniq, inv = torch.unique(key, return_inverse=True)
        u_n = uniq.numel()
        slot_f = torch.div(uniq, span, rounding_mode="floor")
    cnt = torch.zeros(u_n, dtype=torch.float64, device=dev).index_add_(0, inv, torch.ones_like(xf[:, 0]))
    sums = torch.zeros(u_n, d, dtype=torch.float64, device=dev).index_add_(0, inv, xf)
    mean_c = sums / cnt.clamp_min(1.0)[:, None]
    mean = x.mean(1)  # [F, D]
    extra_slot = cnt * ((mean_c - mean[slot_f]) ** 2).sum(-1)
    extra = torch.zeros(f_n, dtype=torch.float64, device=dev).index_add_(0, slot_f, extra_slot)
    intra = ((xf - mean_c[inv]) ** 2).sum(-1).reshape(f_n, s).sum(-1)
    n_lab = torch.zeros(f_n, dtype=torch.float64, device=dev).index_add_(
        0, slot_f, (cnt > 0).to(torch.float64))
    ch = extra * (s - n_lab) / (intra * (n_lab - 1.0))
    ch = torch.where(intra == 0, torch.ones_like(ch), ch)
    return torch.where((n_lab < 2) | (n_lab >= s), torch.full_like(ch, math.nan), ch)


# ------------------------------------------------------------------------------- select k
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
        """JSON-serialisable summary (``include_labels`` adds the ``[F, S]`` labels)."""
        d = {
            "backend": self.backend,
            "k": self.k.tolist(),
            "ch": _floats(self.ch),
            "ks": self.ks.tolist(),
            "ch_per_k": [_floats(r) for r in self.ch_per_k],
            "loglik_per_k": [_floats(r) for r in self.loglik_per_k],
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


def _floats(t: Tensor) -> List[Optional[float]]:
    """Tensor -> list of float with NaN/Inf as None (strict JSON)."""
    return [float(v) if math.isfinite(v) else None for v in t.detach().double().cpu().flatten().tolist()]


def _n_distinct(points: Tensor) -> Tensor:
    """Distinct 2-D points per filter: ``[F, S, 2] -> [F]``."""
    i1 = torch.argsort(points[..., 1], dim=1, stable=True)
    t = torch.gather(points, 1, i1[..., None].expand_as(points))
    i2 = torch.argsort(t[..., 0], dim=1, stable=True)
    t = torch.gather(t, 1, i2[..., None].expand_as(points))
    return 1 + (t[:, 1:] != t[:, :-1]).any(-1).sum(1)


def _fit_all_torch(points: Tensor, k_max: int, *, seed: int, reg_covar: float, tol: float,
                   max_iter: int, device: Optional[torch.device], strategy: str = "auto") -> Dict[str, Tensor]:
    """All filters × all k with the batched EM; same dict as ``_gmm_sklearn.fit_all``."""
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
    KSelection (tensors on the CPU).
    """
    who = "select_k"
    points = _check_points(points, who)
    f_n, s, _ = points.shape
    k_max = _check_k_max(k_max, s, who)
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


# -------------------------------------------------------------------------------- anomaly
@dataclass
class AnomalyResult:
    """Anomaly filters of one layer (SPEC §5, Table 6-1, Algorithm 6.1).

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
    params : dict with ``lam, alpha, beta, theta, k_max, seed``
    selection : KSelection
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
        return int(self.anomalous.sum())

    def to_dict(self, include_labels: bool = False) -> Dict[str, Any]:
        """JSON-serialisable dict (per-filter lists; outlier samples of anomaly filters)."""
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
            "ch": _floats(self.ch),
            "n_clusters": self.n_clusters.tolist(),
            "cluster_sizes": self.cluster_sizes.tolist(),
            "n_small": self.n_small.tolist(),
            "imbalanced": self.imbalanced.tolist(),
            "high_ch": self.high_ch.tolist(),
            "high_activation": self.high_activation.tolist(),
            "mean_activation": _floats(self.mean_activation),
            "selection": self.selection.to_dict(include_labels=include_labels),
        }


def _resolve_params(lam, alpha, beta, theta, preset, who) -> Tuple[float, float, float, float]:
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
    """Anomaly filters and outlier samples of one layer (SPEC §5, §6.2.5 of the thesis).

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
    """
    who = "anomaly_filters"
    lam, alpha, beta, theta = _resolve_params(lam, alpha, beta, theta, preset, who)
    points = _check_points(points, who)
    f_n, s, _ = points.shape
    if not isinstance(mean_activation, Tensor):
        mean_activation = torch.as_tensor(mean_activation)
    mean_activation = mean_activation.detach().cpu().to(torch.float64)
    if mean_activation.shape != (f_n,):
        raise ValueError(
            f"{who}: mean_activation must be [F] = [{f_n}] (one value per filter of points), got "
            f"{tuple(mean_activation.shape)}."
        )
    _check_finite(mean_activation, "mean_activation", who)
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


# ---------------------------------------------------------------------------- model level
@dataclass
class GMMAnalysisResult:
    """Result of :meth:`GMMAnalysis.fit` for one model and layer.

    Attributes
    ----------
    layer : str
    points : Tensor ``[F, S, 2]``  (PCA projections of the filter images)
    mean_activation : Tensor ``[F]``
    targets : LongTensor ``[S]`` or None  (labels ``y`` of the analysed samples, in order)
    anomaly : AnomalyResult
    seconds : dict  (``images``, ``pca``, ``gmm`` wall times)
    """

    layer: str
    points: Tensor
    mean_activation: Tensor
    targets: Optional[Tensor]
    anomaly: AnomalyResult
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.points.shape[1])

    def to_dict(self, include_labels: bool = False) -> Dict[str, Any]:
        """JSON-serialisable dict (``include_labels`` adds labels and points)."""
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
    """Forward hook accumulating the per-channel mean of a module's output (one call)."""

    def __init__(self, model: nn.Module, layer: str):
        base, call = _split_call(layer)
        self.layer, self.call = layer, call
        self.module = resolve_module(model, base)
        self.model = model
        self.sum: Optional[Tensor] = None
        self.count = 0
        self._calls = 0

    recording = False  # only the analysis's own forward pass is counted (image_fn may run others)

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
        return self.sum / self.count


def _default_images(model: nn.Module, x: Tensor, layer: str) -> Tensor:
    from nns_cuda.engine.scanner import filter_images  # lazy: the engine imports heavier modules

    return filter_images(model, x, layer)


class GMMAnalysis:
    """Chapter-6 analysis of one layer: filter images → PCA → GMM → anomaly filters.

    scikit-learn habits: hyper-parameters here, model and data in :meth:`fit`.

    Parameters
    ----------
    k_max : int
        Largest number of mixture components (default 10).
    preset : {"small", "large"} or None
        Table 6-1 preset for ``lam, alpha, beta, theta`` (explicit values override it).
    lam, alpha, beta, theta : float, optional
    seed : int
        ``random_state`` of the mixtures.
    backend : {"torch", "sklearn"}
        GMM backend (:func:`select_k`).
    max_samples : int, optional
        Analyse at most this many samples (the first ones in data order).
    pca_method : str
        :func:`pca2` method.
    device : optional
        Where PCA and GMM run (default: the model's device).
    image_fn : callable ``(model, x [B, ...], layer) -> Tensor [B, C, ...]``, optional
        Filter learned images of a batch; default ``nns_cuda.engine.filter_images``.
    reg_covar, tol, max_iter : GMM settings (:func:`select_k`).
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
        image_fn: Optional[Callable[[nn.Module, Tensor, str], Tensor]] = None,
        reg_covar: float = 1e-6,
        tol: float = 1e-3,
        max_iter: int = 100,
    ):
        self.params = _resolve_params(lam, alpha, beta, theta, preset, "GMMAnalysis")
        if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 2:
            raise ValueError(f"GMMAnalysis: k_max must be an int >= 2, got {k_max!r}.")
        if max_samples is not None and max_samples <= k_max:
            raise ValueError(
                f"GMMAnalysis: max_samples={max_samples} must exceed k_max={k_max}; pass more samples."
            )
        self.k_max, self.preset, self.seed = k_max, preset, seed
        self.backend, self.max_samples, self.pca_method = backend, max_samples, pca_method
        self.device, self.image_fn = device, image_fn
        self.reg_covar, self.tol, self.max_iter = reg_covar, tol, max_iter

    def filter_features(self, model: nn.Module, data, layer: str) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Flattened filter images ``[F, S, P]`` (float32, CPU), mean activations ``[F]`` and
        targets ``[S]`` (or None), streaming over the batches of ``data``."""
        image_fn = self.image_fn or _default_images
        from nns_cuda.analysis._gmm_model import _device_of, _eval_mode

        dev = _device_of(model)
        feats: List[Tensor] = []
        ys: List[Tensor] = []
        has_y = True
        n = 0
        with _ActivationMean(model, layer) as act, _eval_mode(model):
            for x, y, _fg in iter_batches(data, "GMMAnalysis.fit"):
                if self.max_samples is not None:
                    x = x[: self.max_samples - n]
                    y = None if y is None else y[: self.max_samples - n]
                if x.shape[0] == 0:
                    break
                xd = x.to(dev)
                act.recording = True
                try:
                    with torch.no_grad():
                        model(xd)
                finally:
                    act.recording = False
                imgs = image_fn(model, xd, layer)
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
                n += x.shape[0]
                if self.max_samples is not None and n >= self.max_samples:
                    break
        if not feats:
            raise ValueError("GMMAnalysis.fit: data is empty.")
        if act.sum is None:
            raise ValueError(f"GMMAnalysis.fit: layer {layer!r} did not run in the forward pass.")
        f = torch.cat(feats, dim=1)
        if f.shape[0] != act.sum.shape[0]:
            raise ValueError(
                f"GMMAnalysis.fit: {f.shape[0]} filter images per sample but layer {layer!r} has "
                f"{act.sum.shape[0]} channels; image_fn must return [B, C, ...] for that layer."
            )
        return f, act.mean, (torch.cat(ys) if has_y else None)

    def fit(self, model: nn.Module, data, layer: str) -> GMMAnalysisResult:
        """Run the analysis of ``layer`` on the samples of ``data``.

        Parameters
        ----------
        model : nn.Module
        data : ``(x, y)`` or an iterable of ``(x, y[, fg_mask])`` batches. Sample ``i`` is the
            ``i``-th sample in iteration order (outlier indices refer to it).
        layer : str
            Module name in ``model.named_modules()`` (``"name:1"`` for a repeated module).

        Returns
        -------
        GMMAnalysisResult
        """
        from nns_cuda.analysis._gmm_model import _device_of

        t0 = time.perf_counter()
        feats, mean_act, targets = self.filter_features(model, data, layer)
        t1 = time.perf_counter()
        if feats.shape[1] <= self.k_max:
            raise ValueError(
                f"GMMAnalysis.fit: {feats.shape[1]} samples but k_max={self.k_max}; pass more than "
                f"k_max samples."
            )
        dev = torch.device(self.device) if self.device is not None else _device_of(model)
        points = pca2(feats.to(dev), method=self.pca_method, seed=self.seed).cpu()
        del feats
        t2 = time.perf_counter()
        lam, alpha, beta, theta = self.params
        res = anomaly_filters(
            points, mean_act, lam=lam, alpha=alpha, beta=beta, theta=theta, k_max=self.k_max,
            seed=self.seed, backend=self.backend, reg_covar=self.reg_covar, tol=self.tol,
            max_iter=self.max_iter, device=dev if self.backend == "torch" else None,
        )
        res.params["preset"] = self.preset
        t3 = time.perf_counter()
        return GMMAnalysisResult(layer=layer, points=points, mean_activation=mean_act,
                                 targets=targets, anomaly=res,
                                 seconds={"images": t1 - t0, "pca": t2 - t1, "gmm": t3 - t2})


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
    checkpoints : mapping ``name -> model`` (e.g. ``{"epoch_5": m5, ...}``) or a sequence of
        models (named ``"0", "1", …``).
    data : samples to analyse (the same for every checkpoint).
    layer : str
    analysis : GMMAnalysis, optional (else ``GMMAnalysis(**analysis_kwargs)``)

    Returns
    -------
    list of ``{"checkpoint", "n_anomalous", "n_filters", "anomaly_filters", "n_outlier_samples"}``.
    """
    analysis = analysis or GMMAnalysis(**analysis_kwargs)
    items = checkpoints.items() if isinstance(checkpoints, Mapping) else ((str(i), m) for i, m in enumerate(checkpoints))
    rows = []
    for name, model in items:
        r = analysis.fit(model, data, layer)
        rows.append({
            "checkpoint": name,
            "n_anomalous": r.anomaly.n_anomalous,
            "n_filters": int(r.points.shape[0]),
            "anomaly_filters": r.anomaly.anomaly_filters,
            "n_outlier_samples": int(r.anomaly.outlier_union.numel()),
        })
    return rows


def findings(
    wt_model: nn.Module,
    of_model: nn.Module,
    layer: str,
    train_data,
    val_data,
    *,
    analysis_data=None,
    analysis: Optional[GMMAnalysis] = None,
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
    layer : str
    train_data, val_data : data for accuracies (``(x, y)`` or iterables of batches).
    analysis_data : samples to cluster and for gradients (default ``train_data``; the thesis
        clusters training samples).
    analysis : GMMAnalysis, optional (default ``GMMAnalysis(seed=seed, max_samples=1000)``,
        preset "small": the first 1,000 samples of ``analysis_data``).
    R, seed : random-baseline size and seed.
    max_eval_samples : evaluate accuracies on at most this many samples per set.
    hessian_data : if given, also the largest Hessian eigenvalue of both models on it.
    checkpoints : if given, anomaly counts over these checkpoints (Fig. 6-4).
    thesis_model, thesis_dataset : keys of :data:`THESIS_TABLES` to quote next to the results.

    Returns
    -------
    JSON-serialisable dict.
    """
    analysis = analysis or GMMAnalysis(seed=seed, max_samples=1000)
    adata = train_data if analysis_data is None else analysis_data
    res = {name: analysis.fit(m, adata, layer) for name, m in (("WT", wt_model), ("OF", of_model))}
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
    mags = {n: gradient_magnitudes(m, adata, loss_fn, max_samples=res[n].n_samples) for n, m in models.items()}
    own = outlier_gradient_report(models, adata, {n: r.anomaly.outlier_union for n, r in res.items()},
                                  loss_fn, magnitudes=mags)
    ofo = outlier_gradient_report(models, adata, res["OF"].anomaly.outlier_union, loss_fn, magnitudes=mags)
    out["table_6_3"] = {"own": own, "of_outliers": ofo}
    anom = res["OF"].anomaly.anomaly_filters
    bt, _ = accuracy(of_model, train_data, max_samples=max_eval_samples)
    bv, _ = accuracy(of_model, val_data, max_samples=max_eval_samples)
    base = {"train_acc": bt, "val_acc": bv}
    m_anom = single_filter_masking(of_model, layer, anom, train_data, val_data,
                                   max_samples=max_eval_samples, base=base)
    c = n_channels(of_model, layer, train_data)
    r_eff = min(R, c)
    m_rand = random_filter_baseline(of_model, layer, train_data, val_data, R=r_eff, seed=seed,
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
        out["sharpness"] = {n: hessian_top_eigenvalue(m, loss_fn, hessian_data, hessian_iters, seed).to_dict()
                            for n, m in models.items()}
    if checkpoints is not None:
        out["fig_6_4"] = anomaly_counts_over_checkpoints(checkpoints, adata, layer, analysis)
    if thesis_model is not None and thesis_dataset is not None:
        out["thesis"] = {t: v.get(thesis_model, {}).get(thesis_dataset) for t, v in THESIS_TABLES.items()}
    out["seconds"] = {n: r.seconds for n, r in res.items()}
    return _jsonable(out)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Tensor):
        return _jsonable(o.tolist())
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, bool) or o is None or isinstance(o, (int, str)):
        return o
    return str(o)
