"""Per-filter projection of filter learned images on their top-2 principal components
(private; the public API is ``gmm.py``).

docs/spec.md §5: per layer, the learned images of one filter for ``S`` samples, flattened to
``[S, P]``, are centred over the samples and projected on the top-2 principal components.
:func:`pca2` does this for all ``F`` filters at once (``[F, S, P] -> [F, S, 2]``), exactly
(eigen-decomposition of the smaller Gram matrix) or by block subspace iteration for large
``S`` and ``P``, with scikit-learn's sign convention.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from nns_cuda.analysis._gmm_check import check_tensor
from nns_cuda.analysis._toolkit import check_finite

__all__ = ["pca2"]


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
    features = check_tensor(features, "features", who, 3)
    if not features.is_floating_point():
        raise TypeError(f"{who}: features must be floating point, got {features.dtype}; call .float().")
    f_n, s, p = features.shape
    if s < 2:
        raise ValueError(f"{who}: need at least 2 samples per filter, got S={s}.")
    if p < 1 or f_n < 1:
        raise ValueError(f"{who}: features has an empty dimension: shape {tuple(features.shape)}.")
    if method not in ("auto", "eigh", "lowrank"):
        raise ValueError(f"{who}: method must be 'auto', 'eigh' or 'lowrank', got {method!r}.")
    check_finite("features", features, who)
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

    Parameters
    ----------
    proj : Tensor ``[F, S, 2]``
        Projections on the two axes.
    axes : Tensor ``[F, P, 2]``
        The principal axes (or positive multiples of them).

    Returns
    -------
    Tensor ``[F, S, 2]``
        ``proj`` with each column's sign flipped where its axis's largest entry is negative.
    """
    i = axes.abs().argmax(1, keepdim=True)  # [F, 1, 2]
    sgn = torch.sign(torch.gather(axes, 1, i))  # [F, 1, 2]
    sgn = torch.where(sgn == 0, torch.ones_like(sgn), sgn)
    return proj * sgn


def _pca2_eigh(x: Tensor) -> Tensor:
    """Exact top-2 projection from the eigen-decomposition of the smaller Gram matrix.

    Parameters
    ----------
    x : Tensor ``[F, S, P]``
        Centred features.

    Returns
    -------
    Tensor ``[F, S, 2]``
    """
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
    """Top-2 projection by block subspace iteration with Rayleigh–Ritz (block of 10 vectors).

    Parameters
    ----------
    x : Tensor ``[F, S, P]``
        Centred features.
    tol : float
        Stopping tolerance on the relative residual of the top-2 Ritz pairs.
    max_iter : int
        Iteration limit.
    seed : int
        Seed of the random start block.

    Returns
    -------
    (Tensor ``[F, S, 2]``, BoolTensor ``[F]``)
        The projections and, per filter, whether the iteration converged.
    """
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

