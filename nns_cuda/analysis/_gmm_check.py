"""Input checks of the GMM pattern-level analysis (private; the public API is ``gmm.py``).

Each check raises an error that names the argument, the problem and the fix
(docs/spec.md §6); non-finite values are refused with :func:`_toolkit.check_finite`.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from nns_cuda.analysis._toolkit import check_finite


def check_tensor(t: Any, name: str, who: str, dims: int) -> Tensor:
    """Check that ``t`` is a tensor with ``dims`` dimensions.

    Parameters
    ----------
    t : Any
        The argument to check.
    name : str
        Its name in error messages.
    who : str
        The calling function, prefix of error messages.
    dims : int
        The required number of dimensions.

    Returns
    -------
    Tensor
        ``t`` unchanged.

    Raises
    ------
    TypeError
        If ``t`` is not a ``torch.Tensor``.
    ValueError
        If it has another number of dimensions.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if t.dim() != dims:
        raise ValueError(f"{who}: {name} must be {dims}-D, got shape {tuple(t.shape)}.")
    return t


def check_points(points: Any, who: str) -> Tensor:
    """Check per-filter 2-D points.

    Parameters
    ----------
    points : Any
        Expected: a finite floating-point Tensor ``[F, S, 2]`` (the output of ``gmm.pca2``).
    who : str
        The calling function, prefix of error messages.

    Returns
    -------
    Tensor ``[F, S, 2]``
        ``points`` unchanged.
    """
    points = check_tensor(points, "points", who, 3)
    if points.shape[-1] != 2:
        raise ValueError(
            f"{who}: points must be [F, S, 2] (2-D projections), got {tuple(points.shape)}; "
            "project filter images with gmm.pca2 first."
        )
    if not points.is_floating_point():
        raise TypeError(f"{who}: points must be floating point, got {points.dtype}.")
    check_finite("points", points, who)
    return points


def check_k_max(k_max: Any, s: int, who: str) -> int:
    """Check the largest number of mixture components against the number of samples.

    Parameters
    ----------
    k_max : Any
        Expected: an int ``≥ 2`` with ``k_max < s``.
    s : int
        Samples per filter ``S``.
    who : str
        The calling function, prefix of error messages.

    Returns
    -------
    int
        ``k_max`` unchanged.
    """
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
