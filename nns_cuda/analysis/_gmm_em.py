"""Batched 2-D Gaussian-mixture EM for many independent data sets (private; see ``gmm.py``).

Everything here works on ``G`` independent 2-D data sets of ``S`` points at once
(``X: [G, S, 2]``), one mixture with ``k`` full-covariance components per data set. It follows
``sklearn.mixture.GaussianMixture(covariance_type="full", init_params="k-means++", n_init=1)``
step by step, so that the two give the same fits:

* **k-means++ seeding** is scikit-learn's greedy variant (``2 + ⌊ln k⌋`` local trials) *driven by
  the same random stream*: the random numbers it draws from ``np.random.RandomState(seed)`` do not
  depend on the data (the first centre is ``choice(S)``, then ``uniform(size=n_trials)`` per
  centre, scaled by the data's potential), so they are drawn once on the host and shared by all
  ``G`` data sets; the data-dependent part (cumulative potentials, ``searchsorted``, candidate
  potentials, arg-min) is batched in torch.
* **Initial parameters** from the one-hot responsibilities of the seeds (means = seeds,
  covariances = ``reg_covar · I``, weights ``(1 + 10 eps) / S``), as scikit-learn's ``_initialize``.
* **EM** with scikit-learn's stopping rule: iteration ``n`` does an E-step (mean log-likelihood
  = lower bound), an M-step, and stops when the lower bound changed by less than ``tol``;
  converged fits are frozen while the others go on (they are also dropped from the batch).
  A final E-step gives the labels (arg-max responsibility) and the final mean log-likelihood
  (= ``GaussianMixture.score``).

Speed: the Gaussian log-density is a quadratic form, so for all components at once it is one
batched matrix product of per-component coefficients (``[B, k, 6]``) with the per-point
features ``Φᵀ = [1, x, y, x², xy, y²]ᵀ`` (``[B, 6, S]``); the M-step's weighted moments are the
product ``Φᵀ respᵀ``. A 2×2 covariance is inverted in closed form; the parameters of a row are
packed in one ``[k, 6]`` tensor. The expanded quadratic form cancels badly in float32, so the
EM runs in float64 on data that has been centred and scaled per data set (EM is
affine-equivariant: ``reg_covar`` is rescaled with the data, and log-likelihoods are mapped
back to the caller's units). Rows run in a working batch that is topped up from a queue as
rows converge (each row keeps its own iteration count and stopping test), so the batched
operations stay large; the working batch is sized to stay in the CPU caches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from nns_cuda import _extension

_EPS64 = float(np.finfo(np.float64).eps)
_LOG_2PI = math.log(2.0 * math.pi)


def _sq_dist(c: Tensor, x: Tensor, x_sq: Tensor) -> Tensor:
    """Squared distances ``[G, T, S]`` between centres ``c [G, T, 2]`` and points ``x [G, S, 2]``.

    Uses scikit-learn's ``|c|² - 2 c·x + |x|²`` formula clipped at zero so that k-means++ makes
    the same choices on the same data.
    """
    cc = (c * c).sum(-1, keepdim=True)  # [G, T, 1]
    d = cc - 2.0 * torch.bmm(c, x.transpose(1, 2)) + x_sq[:, None, :]
    return d.clamp_min_(0.0)


def kmeans_plusplus(x: Tensor, k: int, seed: int) -> Tensor:
    """Batched greedy k-means++ seeding with scikit-learn's random stream.

    Parameters
    ----------
    x : Tensor, shape ``[G, S, 2]``, float64
        ``G`` independent data sets.
    k : int
        Number of seeds.
    seed : int
        Seed of ``np.random.RandomState`` (the ``random_state`` scikit-learn would get).

    Returns
    -------
    LongTensor, shape ``[G, k]``
        Indices of the seeds in each data set (``sklearn.cluster.kmeans_plusplus``'s
        ``indices`` for the same data and seed, up to floating-point ties).
    """
    g, s, _ = x.shape
    dev = x.device
    rs = np.random.RandomState(seed)
    first = int(rs.choice(s, p=np.full(s, 1.0 / s)))
    n_trials = 2 + int(np.log(k))
    x_sq = (x * x).sum(-1)  # [G, S]
    idx = torch.empty(g, k, dtype=torch.long, device=dev)
    idx[:, 0] = first
    closest = _sq_dist(x[:, first : first + 1], x, x_sq)[:, 0]  # [G, S]
    pot = closest.sum(-1)  # [G]
    ar = torch.arange(g, device=dev)
    for c in range(1, k):
        u = torch.as_tensor(rs.uniform(size=n_trials), dtype=x.dtype, device=dev)
        rand_vals = u[None, :] * pot[:, None]  # [G, T]
        cand = torch.searchsorted(closest.cumsum(-1).contiguous(), rand_vals.contiguous())
        cand.clamp_(max=s - 1)
        cpts = torch.gather(x, 1, cand[..., None].expand(g, n_trials, 2))  # [G, T, 2]
        d = torch.minimum(_sq_dist(cpts, x, x_sq), closest[:, None, :])  # [G, T, S]
        cpot = d.sum(-1)  # [G, T]
        best = cpot.argmin(-1)  # first minimum, as numpy
        pot = cpot[ar, best]
        closest = d[ar, best]
        idx[:, c] = cand[ar, best]
    return idx


def kmeans_plusplus_all(x: Tensor, ks, seed: int) -> dict:
    """:func:`kmeans_plusplus` for several ``k`` at once: ``{k: LongTensor [G, k]}``.

    scikit-learn's seeding for ``k`` draws ``choice(S)`` and then ``2 + ⌊ln k⌋`` uniforms per
    further centre from a fresh ``RandomState(seed)``, so two ``k`` with the same number of
    local trials draw the same numbers and the smaller one's seeds are a prefix of the larger
    one's: one run per distinct trial count (for ``k = 2 … 10``: ``k = 2, 7, 10``) gives all.

    Parameters
    ----------
    x : Tensor ``[G, S, 2]`` float64
        ``G`` independent data sets.
    ks : iterable of int
        The numbers of seeds wanted.
    seed : int
        Seed of ``np.random.RandomState``.

    Returns
    -------
    dict
        ``{k: LongTensor [G, k]}``, seed indices per data set.
    """
    groups: dict = {}
    for k in ks:
        groups.setdefault(2 + int(np.log(k)), []).append(k)
    out = {}
    for members in groups.values():
        big = kmeans_plusplus(x, max(members), seed)
        for k in members:
            out[k] = big[:, :k]
    return out


def argmax_dim1(v: Tensor) -> Tensor:
    """``v.argmax(1)`` (first maximum), as ``k`` element-wise passes.

    ``torch.argmax`` over a non-innermost dimension is slow on CPU.

    Parameters
    ----------
    v : Tensor ``[G, k, S]``

    Returns
    -------
    LongTensor ``[G, S]``
    """
    best = v[:, 0].clone()
    lab = torch.zeros(best.shape, dtype=torch.long, device=v.device)
    for j in range(1, v.shape[1]):
        upd = v[:, j] > best
        best = torch.where(upd, v[:, j], best)
        lab.masked_fill_(upd, j)
    return lab


def _mean_log(t: Tensor, block: int = 32) -> Tensor:
    """``t.log().mean(-1)`` for ``t [B, S]`` with entries in ``[1, k]`` (sums of ``exp(lp − max)``):
    products of ``block`` entries (``≤ k^block``, no overflow for any sane ``k``) need 32× fewer
    logarithms, the slow part on the CPU."""
    b, s = t.shape
    pad = (-s) % block
    if pad:
        t = torch.nn.functional.pad(t, (0, pad), value=1.0)
    return t.view(b, -1, block).prod(-1).log_().sum(-1) / s


def features(x: Tensor) -> Tensor:
    """Quadratic features ``Φ = [1, x, y, x², xy, y²]`` of 2-D points.

    Parameters
    ----------
    x : Tensor ``[G, S, 2]``
        Points ``(x, y)``.

    Returns
    -------
    Tensor ``[G, S, 6]``
        ``Φ`` per point, in the order above.
    """
    a, b = x[..., 0], x[..., 1]
    return torch.stack([torch.ones_like(a), a, b, a * a, a * b, b * b], dim=-1)


# Parameters of the components are packed as theta [G, k, 6] = (log w, m_x, m_y, a, b, c)
# with Σ = [[a, b], [b, c]]: one tensor to index, write back and re-pack.
_QUAD = (-0.5, -1.0, -0.5)  # Φ-coefficients of x², xy, y² in -½ (x-m)ᵀ P (x-m), times P's entries


def _coefficients(theta: Tensor, valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Coefficients ``W [G, k, 6]`` with ``W @ Φᵀ = log w_j + log N(x | m_j, Σ_j)``.

    Returns ``W`` and a ``[G]`` flag of rows where a covariance was not positive definite (its
    determinant is then clamped to a tiny positive number).
    """
    logw, m, cov = theta[..., 0], theta[..., 1:3], theta[..., 3:6]
    a, b, c = cov.unbind(-1)
    det = torch.addcmul(-(b * b), a, c)
    bad = ~(det > 0)
    det = det.masked_fill(bad, 1e-300)
    p = torch.stack([c, -b, a], -1).div_(det[..., None])  # (P11, P12, P22)
    pm = torch.stack([torch.addcmul(p[..., 0] * m[..., 0], p[..., 1], m[..., 1]),
                      torch.addcmul(p[..., 1] * m[..., 0], p[..., 2], m[..., 1])], -1)  # P m
    const = logw - 0.5 * (torch.log(det) + (m * pm).sum(-1)) - _LOG_2PI
    if valid is not None:  # masked slots: finite but hopeless, so exp() gives exactly 0
        const = const.masked_fill(~valid, _MASKED)
        bad = bad & valid
    quad = p * p.new_tensor(_QUAD)
    w = torch.cat([const[..., None], pm, quad], -1)  # [G, k, 6]
    return w, bad.any(-1)


def _m_step(mom: Tensor, reg: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Packed parameters ``theta [G, k, 6]`` from weighted moments ``mom = respᵀ Φ``
    ``[G, k, 6]`` (scikit-learn's M-step; ``reg [G, 1]``).

    With ``r = Σ resp``, ``n = r + 10 eps`` and ``m = S_x / n``:
    ``Σ resp (x-m)(x-m)ᵀ / n = (S_xx − (2n − r) m mᵀ) / n``, plus ``reg_covar · I``.
    """
    r = mom[..., 0]
    nk = r + 10.0 * _EPS64
    m = mom[..., 1:3] / nk[..., None]
    outer = m[..., [0, 0, 1]] * m[..., [0, 1, 1]]  # (mx², mx my, my²)
    cov = torch.addcmul(mom[..., 3:6], (r - 2.0 * nk)[..., None], outer).div_(nk[..., None])
    cov[..., 0] += reg
    cov[..., 2] += reg
    if valid is not None:
        nk = nk * valid
    logw = torch.log(nk / nk.sum(-1, keepdim=True))
    return torch.cat([logw[..., None], m, cov], -1)


@dataclass
class EMFit:
    """Result of :func:`fit_em` for ``G`` data sets and one ``k`` (internal units undone)."""

    labels: Tensor  # [G, S] long
    weights: Tensor  # [G, k]
    means: Tensor  # [G, k, 2]
    covariances: Tensor  # [G, k, 2, 2]
    loglik: Tensor  # [G] mean log-likelihood of the final model (GaussianMixture.score)
    lower_bound: Tensor  # [G] lower bound of the last iteration (GaussianMixture.lower_bound_)
    n_iter: Tensor  # [G] long
    converged: Tensor  # [G] bool
    ill_conditioned: Tensor  # [G] bool: a covariance was not positive definite at some step
    init_indices: Tensor  # [G, k] long


def standardise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Centre and scale each data set: ``z = (x - μ) / s``, ``s`` = RMS distance to ``μ``.

    Parameters
    ----------
    x : Tensor ``[G, S, 2]``

    Returns
    -------
    (Tensor, Tensor, Tensor)
        ``z [G, S, 2]`` (float64), ``μ [G, 2]``, ``s [G]`` (1 where the data is constant).
    """
    x = x.to(torch.float64)
    mu = x.mean(1)
    z = x - mu[:, None]
    s = (z * z).sum(-1).mean(-1).sqrt()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return z / s[:, None, None], mu, s


def fit_em(
    z: Tensor,
    k: int,
    *,
    reg: Tensor,
    seed: int,
    tol: float,
    max_iter: int,
    chunk_elems: int = 1 << 19,
    init: Optional[Tensor] = None,
) -> EMFit:
    """Fit ``G`` mixtures of ``k`` components to standardised data (see module docstring).

    Parameters
    ----------
    z : Tensor ``[G, S, 2]`` float64, standardised points.
    k : int
    reg : Tensor ``[G]`` float64, ``reg_covar`` in standardised units (``reg_covar / s²``).
    seed, tol, max_iter : as ``GaussianMixture``.
    chunk_elems : int
        Size of the working batch in ``(point, component)`` pairs, so that the working tensors
        stay in the CPU caches (at least ``2**26`` on CUDA).
    init : LongTensor ``[G, k]``, optional
        k-means++ seeds (:func:`kmeans_plusplus_all`); computed when absent.

    Returns
    -------
    EMFit in standardised units (the caller maps means, covariances and log-likelihoods back).
    """
    if init is None:
        init = kmeans_plusplus(z, k, seed)
    return _chunked(z, init, None, reg, tol, max_iter, chunk_elems)


def fit_em_stacked(
    z: Tensor,
    k_max: int,
    *,
    reg: Tensor,
    seed: int,
    tol: float,
    max_iter: int,
    chunk_elems: int = 1 << 19,
) -> List[EMFit]:
    """All ``k = 2 … k_max`` at once: one EM over ``G·(k_max−1)`` rows of ``k_max`` slots.

    Row ``j·G + g`` is data set ``g`` with ``k = j + 2`` components; the slots beyond ``k`` are
    masked (zero weight, never responsible). Fewer, larger batched operations than
    :func:`fit_em` per ``k`` (better when per-operation overhead dominates: small problems, GPUs),
    at the cost of ``k_max / mean(k)`` more arithmetic.

    Parameters
    ----------
    z : Tensor ``[G, S, 2]`` float64, standardised points.
    k_max : int
    reg, seed, tol, max_iter, chunk_elems
        As :func:`fit_em`.

    Returns
    -------
    list of EMFit
        One per ``k = 2 … k_max``, in standardised units.
    """
    g = z.shape[0]
    ks = list(range(2, k_max + 1))
    seeds = kmeans_plusplus_all(z, ks, seed)
    inits = []
    for k in ks:
        ini = seeds[k]
        if k < k_max:
            ini = torch.cat([ini, ini[:, :1].expand(g, k_max - k)], 1)
        inits.append(ini)
    init = torch.cat(inits)  # [(K-1)·G, k_max]
    nvalid = torch.tensor(ks, device=z.device).repeat_interleave(g)
    zz = z.repeat(len(ks), 1, 1)
    fit = _chunked(zz, init, nvalid, reg.repeat(len(ks)), tol, max_iter, chunk_elems)
    out = []
    for j, k in enumerate(ks):
        sl = slice(j * g, (j + 1) * g)
        out.append(EMFit(
            labels=fit.labels[sl], weights=fit.weights[sl, :k], means=fit.means[sl, :k],
            covariances=fit.covariances[sl, :k], loglik=fit.loglik[sl],
            lower_bound=fit.lower_bound[sl], n_iter=fit.n_iter[sl], converged=fit.converged[sl],
            ill_conditioned=fit.ill_conditioned[sl], init_indices=fit.init_indices[sl, :k]))
    return out


def _chunked(z, init, nvalid, reg, tol, max_iter, chunk_elems) -> EMFit:
    """Run :func:`_em_queue` with a working batch of about ``chunk_elems`` (point, slot) pairs."""
    g, s, _ = z.shape
    kc = init.shape[1]
    if z.is_cuda:
        chunk_elems = max(chunk_elems, 1 << 26)
    rows = max(1, min(g, chunk_elems // max(1, s * kc)))
    return _em_queue(z, init, nvalid, reg, tol, max_iter, rows)


_MASKED = -1e300  # log-weight term of a masked slot: exp(·) underflows to exactly 0

#: E-step implementation on the CPU: ``"auto"`` (the fused C++ kernel when the extension has
#: it), ``"fused"`` (require it) or ``"torch"`` (the batched torch operations below; always used
#: on CUDA). Both give the same fits to rounding (tests/test_gmm_estep.py).
ESTEP = "auto"


def _has_fused() -> bool:
    return _extension.has_op("gmm_estep")


def use_fused(z: Tensor) -> bool:
    """Whether the EM on ``z`` runs its E-steps in the fused C++ kernel (see :data:`ESTEP`).

    Parameters
    ----------
    z : Tensor ``[G, S, 2]``
        The standardised points (only the device matters).

    Returns
    -------
    bool
        True on the CPU when the extension has ``gmm_estep`` and :data:`ESTEP` allows it.
    """
    if ESTEP not in ("auto", "fused", "torch"):
        raise ValueError(f"_gmm_em.ESTEP must be 'auto', 'fused' or 'torch', got {ESTEP!r}.")
    if ESTEP == "torch" or z.device.type != "cpu":
        return False
    ok = _has_fused()
    if ESTEP == "fused" and not ok:
        raise RuntimeError("_gmm_em.ESTEP='fused' needs the C++ extension (nns_cuda._C with the gmm_estep op); "
                           "build it with `make build` or set ESTEP='auto'.")
    return ok


def _estep_torch(w: Tensor, phit: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """E-step with batched torch operations: moments ``[B, k, 6]`` and mean log-likelihood ``[B]``."""
    lp = torch.bmm(w, phit)  # [B, k, S]
    mx = lp.amax(1, keepdim=True)  # [B, 1, S]
    e = lp.sub_(mx).exp_()
    tot = e.sum(1)  # [B, S]
    new_lb = _mean_log(tot) + mx[:, 0].mean(-1)
    # Σ_s resp[k, s] Φ[s] with resp = e / tot: divide whichever of e (k per point) and
    # Φ (6 per point) is smaller
    # (as (Φᵀ respᵀ)ᵀ: both operands are read in their stored layout)
    if k < 6:
        mom = torch.bmm(phit, e.div_(tot[:, None, :]).transpose(1, 2)).transpose(1, 2)
    else:
        mom = torch.bmm(phit / tot[:, None, :], e.transpose(1, 2)).transpose(1, 2)  # [B, k, 6]
    return mom, new_lb


def _em_queue(z: Tensor, init: Tensor, nvalid: Optional[Tensor], reg: Tensor, tol: float,
              max_iter: int, batch: int, refill_below: float = 0.75, compact_below: float = 0.5) -> EMFit:
    """EM for ``G`` independent rows with a continuously refilled working batch.

    Every row runs scikit-learn's loop on its own (its own iteration count, lower bound and
    stopping test); the working batch holds up to ``batch`` rows at different iterations. When
    rows finish (converged or ``max_iter``) their parameters are written back, and the batch is
    topped up with rows that have not started, so that the batched operations stay large
    until the queue runs dry. Layout ``[B, k, S]``: reductions over ``k`` are element-wise over
    contiguous ``S``. ``nvalid [G]``: number of real components per row (the others masked).
    """
    g, s, _ = z.shape
    k = init.shape[1]
    dev = z.device
    phit = features(z).transpose(1, 2).contiguous()  # Φᵀ [G, 6, S]
    valid = None if nvalid is None else torch.arange(k, device=dev)[None, :] < nvalid[:, None]
    # scikit-learn's _initialize: one-hot responsibilities of the seeds
    mom0 = torch.gather(phit, 2, init[:, None, :].expand(g, 6, k)).transpose(1, 2)  # [G, k, 6]
    theta = _m_step(mom0, reg[:, None], valid)
    theta[..., 0] = math.log((1.0 + 10.0 * _EPS64) / s)
    if valid is not None:
        theta[..., 0].masked_fill_(~valid, -math.inf)
    lb = torch.full((g,), -math.inf, dtype=z.dtype, device=dev)
    n_iter = torch.zeros(g, dtype=torch.long, device=dev)
    converged = torch.zeros(g, dtype=torch.bool, device=dev)
    ill = torch.zeros(g, dtype=torch.bool, device=dev)

    def take(idx):
        return (phit[idx], reg[idx][:, None], None if valid is None else valid[idx],
                theta[idx], lb[idx], torch.zeros(idx.numel(), dtype=torch.long, device=dev),
                torch.zeros(idx.numel(), dtype=torch.bool, device=dev))

    nxt = min(batch, g)
    act = torch.arange(nxt, device=dev)
    if nxt == g:  # everything fits: no copies
        phit_a, reg_a, valid_a = phit, reg[:, None], valid
        theta_a, lb_a = theta.clone(), lb.clone()
        it_a = torch.zeros(g, dtype=torch.long, device=dev)
        ill_a = torch.zeros(g, dtype=torch.bool, device=dev)
    else:
        phit_a, reg_a, valid_a, theta_a, lb_a, it_a, ill_a = take(act)
    run = torch.ones(act.numel(), dtype=torch.bool, device=dev)  # batch rows still iterating
    all_run = True
    fused = use_fused(z)
    while act.numel():
        w, bad = _coefficients(theta_a, valid_a)
        if fused:  # one pass over the points in the C++ kernel (csrc/cpu/gmm_estep_kernel.cpp)
            mom, new_lb, _ = torch.ops.nns_cuda.gmm_estep(w, phit_a, True, False)
        else:
            mom, new_lb = _estep_torch(w, phit_a, k)
        theta_a = _m_step(mom, reg_a, valid_a)
        it_a += 1
        ill_a |= bad
        done = (new_lb - lb_a).abs() < tol
        lb_a = new_lb
        fin = done | (it_a >= max_iter)
        if not all_run:
            fin &= run
        if not bool(fin.any()):
            continue
        # write back the rows that finished (the others' state lives in the batch)
        rows = act[fin]
        theta[rows], lb[rows], n_iter[rows], ill[rows] = theta_a[fin], lb_a[fin], it_a[fin], ill_a[fin]
        converged[rows] = done[fin]
        run = run & ~fin
        all_run = False
        n_run = int(run.sum())
        pending = g - nxt
        if pending:
            if n_run >= refill_below * batch:
                continue  # finished rows ride along (masked by `run`) until enough have left
        elif n_run and n_run >= compact_below * run.numel():
            continue
        # re-pack: keep the running rows, top up from the queue
        keep = run.nonzero().flatten()
        add = torch.arange(nxt, min(g, nxt + batch - n_run), device=dev)
        nxt += add.numel()
        if add.numel():
            n_pt, n_rg, n_va, n_th, n_lb, n_it, n_il = take(add)
            cat = lambda a, b: torch.cat([a[keep], b])  # noqa: E731
            phit_a, reg_a = cat(phit_a, n_pt), cat(reg_a, n_rg)
            valid_a = None if valid is None else cat(valid_a, n_va)
            theta_a, lb_a, it_a, ill_a = cat(theta_a, n_th), cat(lb_a, n_lb), cat(it_a, n_it), cat(ill_a, n_il)
            act = torch.cat([act[keep], add])
        else:
            phit_a, reg_a = phit_a[keep], reg_a[keep]
            valid_a = None if valid is None else valid_a[keep]
            theta_a, lb_a, it_a, ill_a = theta_a[keep], lb_a[keep], it_a[keep], ill_a[keep]
            act = act[keep]
        run = torch.ones(act.numel(), dtype=torch.bool, device=dev)
        all_run = True
    # final E-step (labels, final mean log-likelihood = GaussianMixture.score), in batches
    labels = torch.empty(g, s, dtype=torch.long, device=dev)
    loglik = torch.empty(g, dtype=z.dtype, device=dev)
    for i in range(0, g, batch):
        sl = slice(i, i + batch)
        w, bad = _coefficients(theta[sl], None if valid is None else valid[sl])
        ill[sl] |= bad
        if fused:
            _, loglik[sl], labels[sl] = torch.ops.nns_cuda.gmm_estep(w, phit[sl], False, True)
            continue
        lp = torch.bmm(w, phit[sl])  # [B, k, S]
        labels[sl] = argmax_dim1(lp)
        mx = lp.amax(1, keepdim=True)
        loglik[sl] = _mean_log(lp.sub_(mx).exp_().sum(1)) + mx[:, 0].mean(-1)
    mean, cov = theta[..., 1:3], theta[..., 3:6]
    a, b_, c = cov.unbind(-1)
    cov22 = torch.stack([torch.stack([a, b_], -1), torch.stack([b_, c], -1)], -2)
    return EMFit(labels=labels, weights=theta[..., 0].exp(), means=mean, covariances=cov22,
                 loglik=loglik, lower_bound=lb, n_iter=n_iter, converged=converged,
                 ill_conditioned=ill, init_indices=init)
