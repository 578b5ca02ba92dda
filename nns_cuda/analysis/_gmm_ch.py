"""Calinski–Harabasz index of many labelled point sets at once (private; the public API is
``gmm.py``).

docs/spec.md §5: the standard index with squared distances, as
``sklearn.metrics.calinski_harabasz_score`` (eq. 6-6/6-7 of the thesis print unsquared norms).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from nns_cuda.analysis._gmm_check import check_tensor
from nns_cuda.analysis._toolkit import check_finite

__all__ = ["calinski_harabasz"]


def calinski_harabasz(points: Tensor, labels: Tensor) -> Tensor:
    """Calinski–Harabasz index per filter, batched (= ``sklearn.metrics.calinski_harabasz_score``).

    ``CH = [SSB / (L - 1)] / [SSW / (S - L)]`` with squared Euclidean distances, ``L`` the
    number of distinct labels of the filter, ``SSB = Σ_c n_c ‖m_c − m‖²``,
    ``SSW = Σ_i ‖x_i − m_{c(i)}‖²``.

    Parameters
    ----------
    points : Tensor ``[F, S, D]``
        ``F`` point sets of ``S`` points (``D = 2`` for this analysis; any ``D ≥ 1`` works).
        Finite floating-point values.
    labels : integer Tensor ``[F, S]``
        Cluster of each point (any integer values; only equality matters).

    Returns
    -------
    Tensor ``[F]``
        float64 on ``points``' device: 1.0 where ``SSW = 0`` (as scikit-learn), NaN where the
        index is undefined (``L < 2`` or ``L = S``; scikit-learn raises there).
    """
    who = "calinski_harabasz"
    points = check_tensor(points, "points", who, 3)
    labels = check_tensor(labels, "labels", who, 2)
    if labels.shape != points.shape[:2]:
        raise ValueError(
            f"{who}: labels must be [F, S] = {tuple(points.shape[:2])} to match points "
            f"{tuple(points.shape)}, got {tuple(labels.shape)}."
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{who}: labels must be an integer tensor, got {labels.dtype}.")
    if not points.is_floating_point():
        raise TypeError(f"{who}: points must be floating point, got {points.dtype}.")
    check_finite("points", points, who)
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
