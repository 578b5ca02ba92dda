"""scikit-learn reference backend of ``gmm.select_k`` (private).

The same pipeline as the batched torch backend, one ``(filter, k)`` at a time, with
``sklearn.mixture.GaussianMixture(covariance_type="full", init_params="k-means++", n_init=1,
random_state=seed)`` and ``sklearn.metrics.calinski_harabasz_score`` (NaN where it raises,
i.e. fewer than two clusters were found).
"""
from __future__ import annotations

import warnings
from typing import Dict

import numpy as np
import torch
from torch import Tensor


def fit_all(points: Tensor, k_max: int, *, seed: int, reg_covar: float, tol: float,
            max_iter: int) -> Dict[str, Tensor]:
    """Fit every filter and every ``k = 2..k_max`` with scikit-learn.

    Parameters
    ----------
    points : Tensor ``[F, S, 2]``
        Per-filter 2-D points (computed in float64 on the CPU).
    k_max : int
        Largest number of components.
    seed, reg_covar, tol, max_iter
        ``random_state``, ``reg_covar``, ``tol``, ``max_iter`` of ``GaussianMixture``.

    Returns
    -------
    dict of Tensor
        ``labels [F, K-1, S]``, ``ch``, ``loglik``, ``lower_bound`` (``[F, K-1]`` float64),
        ``n_iter`` (long), ``converged`` (bool), ``weights [F, K-1, k_max]``,
        ``means [F, K-1, k_max, 2]``, ``covariances [F, K-1, k_max, 2, 2]`` (padded with NaN).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import calinski_harabasz_score
    from sklearn.mixture import GaussianMixture

    from threadpoolctl import threadpool_limits

    x = points.detach().to("cpu", torch.float64).numpy()
    f_n, s, _ = x.shape
    nk = k_max - 1
    labels = np.zeros((f_n, nk, s), dtype=np.int64)
    ch = np.full((f_n, nk), np.nan)
    ll = np.full((f_n, nk), np.nan)
    lb = np.full((f_n, nk), np.nan)
    n_iter = np.zeros((f_n, nk), dtype=np.int64)
    conv = np.zeros((f_n, nk), dtype=bool)
    w = np.full((f_n, nk, k_max), np.nan)
    mu = np.full((f_n, nk, k_max, 2), np.nan)
    cov = np.full((f_n, nk, k_max, 2, 2), np.nan)
    for f in range(f_n):
        for j, k in enumerate(range(2, k_max + 1)):
            gm = GaussianMixture(n_components=k, covariance_type="full", init_params="k-means++",
                                 random_state=seed, reg_covar=reg_covar, tol=tol, max_iter=max_iter,
                                 n_init=1)
            # one BLAS thread: these arrays are tiny, and threads only add overhead
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore", ConvergenceWarning)
                lab = gm.fit_predict(x[f])
            labels[f, j] = lab
            try:
                ch[f, j] = calinski_harabasz_score(x[f], lab)
            except ValueError:
                ch[f, j] = np.nan
            ll[f, j] = gm.score(x[f])
            lb[f, j] = gm.lower_bound_
            n_iter[f, j] = gm.n_iter_
            conv[f, j] = gm.converged_
            w[f, j, :k] = gm.weights_
            mu[f, j, :k] = gm.means_
            cov[f, j, :k] = gm.covariances_
    t = torch.from_numpy
    return {"labels": t(labels), "ch": t(ch), "loglik": t(ll), "lower_bound": t(lb),
            "n_iter": t(n_iter), "converged": t(conv), "weights": t(w), "means": t(mu),
            "covariances": t(cov)}
