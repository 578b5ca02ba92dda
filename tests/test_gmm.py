"""Tests of nns_cuda.gmm and nns_cuda.analysis.thesis.chapter6 (thesis Chapter 6, docs/spec.md §5).

Every quantity is checked against an implementation that shares no code with it:
scikit-learn (PCA, k-means++, GaussianMixture, calinski_harabasz_score), torch.autograd
(explicit Hessians, per-sample backward passes, filter images), and hand-built models
(masking by zeroed weights).
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nns_cuda.analysis import gmm
from nns_cuda.analysis import _gmm_em
from nns_cuda.analysis.thesis import chapter6

from conftest import cpu_and_cuda
from nns_cuda.engine.oracle import autograd_filter_images


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: run single-threaded. On a busy 2-core machine, OpenMP's
    spin-waiting otherwise makes small autograd/EM loops up to ~50× slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers
def mixture_points(f_n: int, s: int, seed: int, *, k_lo: int = 2, k_hi: int = 5, sep: float = 8.0,
                   scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """``f_n`` data sets of ``s`` 2-D points from well-separated mixtures (random k, shapes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(f_n):
        k = int(rng.integers(k_lo, k_hi + 1))
        centres = rng.normal(0, sep, (k, 2))
        a = rng.normal(0, 1, (k, 2, 2)) * 0.5 + np.eye(2)  # per-cluster linear shape
        lab = rng.integers(0, k, s)
        z = rng.normal(0, 1, (s, 2))
        out.append(centres[lab] + np.einsum("sij,sj->si", a[lab], z))
    return torch.tensor(np.stack(out) * scale + shift)


def planted_features(f_n=8, s=300, p=40, planted=3, n_out=5, seed=0):
    """Filter-image-like features ``[F, S, P]``: three balanced clusters in a random 2-D
    subspace plus noise; filter ``planted`` gets ``n_out`` samples moved far away."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.empty(f_n, s, p, dtype=torch.float64)
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [4.0, 7.0]], dtype=torch.float64)
    for f in range(f_n):
        basis = torch.linalg.qr(torch.randn(p, 2, generator=g, dtype=torch.float64)).Q
        z = centres[torch.arange(s) % 3] + torch.randn(s, 2, generator=g, dtype=torch.float64)
        feats[f] = z @ basis.T + 0.05 * torch.randn(s, p, generator=g, dtype=torch.float64)
    out = torch.randperm(s, generator=g)[:n_out].sort().values
    d = torch.randn(p, generator=g, dtype=torch.float64)
    feats[planted, out] += 60 * d / d.norm() + torch.randn(n_out, p, generator=g, dtype=torch.float64)
    return feats, out


class TinyCNN(nn.Module):
    def __init__(self, c_in=1, c1=4, c2=6, n_cls=3, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c1, 3, padding=1)
        self.bn = nn.BatchNorm2d(c1) if bn else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, n_cls)

    def forward(self, x):
        x = self.relu1(self.bn(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


def tiny_cnn(seed=0, **kw) -> TinyCNN:
    torch.manual_seed(seed)
    m = TinyCNN(**kw).double().eval()
    if isinstance(m.bn, nn.BatchNorm2d):  # non-trivial running statistics
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.2, 0.2)
            m.bn.running_var.uniform_(0.5, 1.5)
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.uniform_(-0.1, 0.1)
    return m


def image_data(n=60, bs=20, seed=0, hw=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, hw, hw, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    fg = torch.ones(n, hw, hw)
    return [(x[i : i + bs], y[i : i + bs], fg[i : i + bs]) for i in range(0, n, bs)], x, y


def sk_pca2(x: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, svd_solver="full").fit_transform(x)


# ----------------------------------------------------------------------------------- PCA
@pytest.mark.parametrize("shape", [(5, 30, 50), (4, 60, 7)])  # S < P (Gram) and S > P (covariance)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pca2_matches_sklearn(shape, dtype):
    f_n, s, p = shape
    g = torch.Generator().manual_seed(1)
    # decaying spectrum so that the top-2 components are well defined, plus an offset
    feats = torch.randn(f_n, s, p, generator=g, dtype=torch.float64) * torch.logspace(0, -1, p, dtype=torch.float64) + 3.0
    got = gmm.pca2(feats.to(dtype))
    assert got.shape == (f_n, s, 2) and got.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for f in range(f_n):
        ref = sk_pca2(feats[f].numpy())
        scale = np.abs(ref).max()
        # same sign convention as scikit-learn (svd_flip on the principal axes), so no flips
        np.testing.assert_allclose(got[f].double().numpy(), ref, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("method", ["eigh", "lowrank"])
def test_pca2_methods_agree_and_noncontiguous(method):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 70, 40, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 40, dtype=torch.float64)
    feats = base.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not feats.is_contiguous()
    got = gmm.pca2(feats, method=method)
    for f in range(3):
        np.testing.assert_allclose(got[f].numpy(), sk_pca2(base[f].numpy()), atol=1e-6, rtol=0)


def test_pca2_constant_filter_is_zero():
    feats = torch.randn(3, 20, 10, dtype=torch.float64)
    feats[1] = 5.0
    got = gmm.pca2(feats)
    assert torch.isfinite(got).all()
    assert got[1].abs().max() == 0


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_pca2_device(device):
    feats = torch.randn(4, 40, 30, dtype=torch.float64) * torch.logspace(0, -1, 30, dtype=torch.float64)
    got = gmm.pca2(feats.to(device))
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), gmm.pca2(feats), atol=1e-8, rtol=0)


# ------------------------------------------------------------------------------------ CH
def test_calinski_harabasz_matches_sklearn():
    from sklearn.metrics import calinski_harabasz_score

    rng = np.random.default_rng(3)
    f_n, s = 12, 80
    pts = rng.normal(0, 1, (f_n, s, 2)) * rng.uniform(0.01, 100, (f_n, 1, 1))
    labels = np.stack([rng.integers(0, rng.integers(2, 9), s) for _ in range(f_n)])
    labels[3] = labels[3] * 5 - 7  # arbitrary integer values, with gaps and negatives
    labels[4] = np.where(labels[4] == 0, 1, labels[4])  # a label value that never occurs
    got = gmm.calinski_harabasz(torch.tensor(pts), torch.tensor(labels))
    for f in range(f_n):
        ref = calinski_harabasz_score(pts[f], labels[f])
        assert abs(got[f].item() - ref) <= 1e-6 * abs(ref), (f, got[f].item(), ref)


def test_calinski_harabasz_edge_cases():
    from sklearn.metrics import calinski_harabasz_score

    pts = torch.randn(3, 10, 2, dtype=torch.float64)
    lab = torch.zeros(3, 10, dtype=torch.long)
    lab[1, 5:] = 1
    pts[2, :5], pts[2, 5:] = 1.0, 2.0  # two exact point masses: SSW = 0
    lab[2, 5:] = 1
    got = gmm.calinski_harabasz(pts, lab)
    assert math.isnan(got[0].item())  # one cluster: undefined (scikit-learn raises)
    with pytest.raises(ValueError):
        calinski_harabasz_score(pts[0].numpy(), lab[0].numpy())
    assert got[1].item() == pytest.approx(calinski_harabasz_score(pts[1].numpy(), lab[1].numpy()), rel=1e-9)
    assert got[2].item() == calinski_harabasz_score(pts[2].numpy(), lab[2].numpy()) == 1.0


# ----------------------------------------------------------------------------------- GMM
def test_kmeans_plusplus_matches_sklearn():
    from sklearn.cluster import kmeans_plusplus

    x = mixture_points(10, 200, seed=4)
    z, _, _ = _gmm_em.standardise(x)
    for k in (2, 3, 7, 10):
        got = _gmm_em.kmeans_plusplus(z, k, seed=5)
        for f in range(10):
            _, ref = kmeans_plusplus(x[f].numpy(), k, random_state=np.random.RandomState(5))
            assert got[f].tolist() == ref.tolist(), (k, f)


@pytest.fixture(scope="module")
def sklearn_reference():
    """One scikit-learn loop (the slow part), shared by both batching strategies."""
    pts = mixture_points(32, 250, seed=6, scale=0.3, shift=2.0)
    return pts, gmm.select_k(pts, k_max=8, seed=0, backend="sklearn")


@pytest.mark.parametrize("strategy", ["per_k", "stacked"])
def test_select_k_matches_sklearn(strategy, sklearn_reference):
    """Batched EM vs a loop of sklearn GaussianMixture on well-separated random mixtures."""
    pts, ref = sklearn_reference
    got = gmm.select_k(pts, k_max=8, seed=0, strategy=strategy)
    # the requirement: same k on >= 95 % of filters, per-fit mean log-likelihood 1e-3 rel.
    assert (got.k == ref.k).double().mean() >= 0.95
    rel = ((got.loglik_per_k - ref.loglik_per_k) / ref.loglik_per_k).abs()
    assert rel.max() <= 1e-3
    # what the implementation actually achieves: the same fits, up to rounding
    assert torch.equal(got.k, ref.k)
    assert torch.equal(got.labels, ref.labels)
    assert rel.max() <= 1e-9
    torch.testing.assert_close(got.ch_per_k, ref.ch_per_k, rtol=1e-6, atol=0)
    assert torch.equal(got.n_iter_per_k, ref.n_iter_per_k)
    assert torch.equal(got.converged_per_k, ref.converged_per_k)
    torch.testing.assert_close(got.means, ref.means, rtol=1e-6, atol=1e-8, equal_nan=True)
    torch.testing.assert_close(got.covariances, ref.covariances, rtol=1e-6, atol=1e-8, equal_nan=True)
    # the chosen k maximises CH with ties to the larger k
    ch = got.ch_per_k.nan_to_num(-math.inf)
    is_best = ch == ch.max(1, keepdim=True).values
    last_best = 2 + (is_best * torch.arange(ch.shape[1])).max(1).values
    assert torch.equal(got.k, last_best) and torch.equal(got.ch, ch.max(1).values)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_select_k_device_and_float32(device):
    pts = mixture_points(6, 150, seed=7)
    ref = gmm.select_k(pts, k_max=5)
    got = gmm.select_k(pts.float().to(device), k_max=5)
    # float32 points are fitted in float64 after standardisation: same clustering
    assert torch.equal(got.k, ref.k)
    assert (got.labels == ref.labels).double().mean() > 0.99
    torch.testing.assert_close(got.loglik_per_k, ref.loglik_per_k, rtol=1e-4, atol=0)


def test_select_k_tie_goes_to_larger_k_and_degenerate_data():
    """Two exact point masses: every k gives SSW = 0, CH = 1.0 (scikit-learn's convention),
    so Algorithm 6.1's ``≥`` keeps the largest k. Constant filters never split."""
    pts = torch.zeros(3, 40, 2, dtype=torch.float64)
    pts[1, 20:] = torch.tensor([3.0, -1.0])
    pts[2] = torch.randn(40, 2, dtype=torch.float64)
    pts[2, :30] = 0.0  # 11 distinct points, 30 of them at the origin
    with pytest.warns(gmm.GMMDegenerateWarning, match="constant points"):
        got = gmm.select_k(pts, k_max=5)
    ref = gmm.select_k(pts, k_max=5, backend="sklearn", warn=False)
    assert got.k.tolist()[:2] == [1, 5] == ref.k.tolist()[:2]
    assert math.isnan(got.ch[0].item()) and got.ch[1].item() == 1.0
    assert got.degenerate[0] and got.degenerate[1]
    assert got.labels[0].eq(0).all() and got.n_clusters[1] == 2
    assert got.n_distinct.tolist()[:2] == [1, 2]
    assert torch.equal(got.k, ref.k) and torch.equal(got.labels[[0, 2]], ref.labels[[0, 2]])
    # filter 1 at k=5 has duplicated (identical) components: the same partition, but which of
    # the identical components takes the points is decided by rounding
    same = lambda lab: lab[:, None] == lab[None, :]  # noqa: E731
    assert torch.equal(same(got.labels[1]), same(ref.labels[1]))
    # the constant filter is never anomalous
    res = gmm.anomaly_filters(pts, torch.ones(3), preset="small", k_max=5, selection=got)
    assert not res.anomalous[0]


# ------------------------------------------------------------------------------ anomaly
def test_planted_outliers_are_found():
    feats, planted = planted_features()
    pts = gmm.pca2(feats)
    act = torch.ones(8)
    res = gmm.anomaly_filters(pts, act, lam=50, alpha=0.2, beta=1, theta=0.1, k_max=10, seed=0)
    assert res.anomaly_filters == [3]
    assert torch.equal(res.outlier_samples[3], planted)
    assert all(res.outlier_samples[f].numel() == 0 for f in range(8) if f != 3)
    assert torch.equal(res.outlier_union, planted)
    # criteria as documented
    assert res.imbalanced.tolist() == [f == 3 for f in range(8)]
    assert res.ch[3] > res.layer_mean_ch
    # criterion 3: the same filter with a weak activation is not an anomaly filter
    act2 = act.clone()
    act2[3] = 0.05
    res2 = gmm.anomaly_filters(pts, act2, preset="small", selection=res.selection)
    assert res2.anomaly_filters == [] and res2.imbalanced[3] and res2.high_ch[3]
    # boundaries of criterion 1: a small cluster has *at most* λ members; imbalanced means
    # *more than* α·(non-empty clusters) small clusters
    sel = res.selection
    n_cl = int(res.n_clusters[3])
    assert sorted(res.cluster_sizes[3].tolist())[-n_cl] == 5  # the planted cluster
    at = lambda **kw: gmm.anomaly_filters(pts, act, **{**dict(lam=50, alpha=0.2, beta=1, theta=0.1), **kw},  # noqa: E731
                                          selection=sel).anomaly_filters
    assert at(lam=5) == [3] and at(lam=4) == []
    assert at(alpha=1 / n_cl - 1e-9) == [3] and at(alpha=1 / n_cl) == []
    # criterion 2 with β large: nothing passes
    res3 = gmm.anomaly_filters(pts, act, lam=50, alpha=0.2, beta=100, theta=0.1, selection=res.selection)
    assert res3.anomaly_filters == []
    # the scikit-learn backend finds the same
    res4 = gmm.anomaly_filters(pts, act, preset="small", backend="sklearn")
    assert res4.anomaly_filters == [3] and torch.equal(res4.outlier_samples[3], planted)
    json.dumps(res.to_dict(), allow_nan=False)


def test_presets_and_parameter_resolution():
    assert gmm.PRESETS == {"small": (50, 0.2, 1, 0.1), "large": (10, 0.2, 1, 0.1)}
    pts = mixture_points(3, 60, seed=8)
    r = gmm.anomaly_filters(pts, torch.ones(3), preset="large", alpha=0.5, k_max=4)
    assert r.params["lam"] == 10 and r.params["alpha"] == 0.5 and r.params["theta"] == 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lam=-1, alpha=0.2, beta=1, theta=0.1), "lam"),
        (dict(lam=5, alpha=1.5, beta=1, theta=0.1), r"alpha .* \[0, 1\]"),
        (dict(lam=5, alpha=0.2, beta=-1, theta=0.1), "beta"),
        (dict(lam=5, alpha=0.2, beta=1, theta=-0.1), "theta"),
        (dict(lam=5, alpha=0.2, beta=1, theta=0.1, k_max=1), "k_max must be >= 2"),
        (dict(preset="medium"), "unknown preset"),
    ],
)
def test_bad_parameters(kwargs, match):
    pts = mixture_points(2, 30, seed=9)
    with pytest.raises((ValueError, TypeError), match=match):
        gmm.anomaly_filters(pts, torch.ones(2), **kwargs)


def test_bad_inputs():
    pts = mixture_points(2, 30, seed=9)
    with pytest.raises(TypeError, match="missing lam, alpha, beta, theta"):
        gmm.anomaly_filters(pts, torch.ones(2))
    with pytest.raises(ValueError, match="8 samples but k_max=10.*at least 11 samples"):
        gmm.select_k(pts[:, :8], k_max=10)
    bad = pts.clone()
    bad[1, 3, 0] = float("nan")
    bad[0, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="1 NaN and 1 Inf"):
        gmm.select_k(bad, k_max=3)
    with pytest.raises(ValueError, match="NaN"):
        gmm.pca2(torch.full((2, 5, 3), float("nan")))
    with pytest.raises(ValueError, match=r"\[F, S, 2\]"):
        gmm.select_k(torch.randn(2, 30, 3), k_max=3)
    with pytest.raises(ValueError, match="must be 3-D"):
        gmm.pca2(torch.randn(30, 3))
    with pytest.raises(ValueError, match=r"mean_activation must be \[F\] = \[2\]"):
        gmm.anomaly_filters(pts, torch.ones(3), preset="small", k_max=3)
    with pytest.raises(ValueError, match="labels must be"):
        gmm.calinski_harabasz(pts, torch.zeros(2, 29, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        gmm.calinski_harabasz(pts, torch.zeros(2, 30))
    with pytest.raises(ValueError, match="backend"):
        gmm.select_k(pts, k_max=3, backend="numpy")


# ---------------------------------------------------------------------- model helpers
def test_per_sample_gradient_magnitude_matches_loop():
    model = tiny_cnn(bn=True)
    _, x, y = image_data(n=7)
    got = gmm.per_sample_gradient_magnitude(model, x, y, batch_size=3)
    params = [p for p in model.parameters()]
    n_total = sum(p.numel() for p in params)
    ref = []
    for i in range(7):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        ref.append(sum(p.grad.abs().sum() for p in params) / n_total)
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-10, atol=0)
    # the model is left as it was (eval mode, parameters)
    assert not model.training


def test_outlier_gradient_report():
    model = tiny_cnn()
    batches, x, y = image_data(n=20, bs=8)
    mag = gmm.per_sample_gradient_magnitude(model, x, y)
    rep = gmm.outlier_gradient_report({"WT": model}, batches, torch.tensor([1, 4]))
    assert rep["WT"]["n_outlier"] == 2 and rep["WT"]["n_normal"] == 18
    assert rep["WT"]["outlier"] == pytest.approx(mag[[1, 4]].double().mean().item(), rel=1e-12)
    keep = torch.ones(20, dtype=torch.bool)
    keep[[1, 4]] = False
    assert rep["WT"]["normal"] == pytest.approx(mag[keep].double().mean().item(), rel=1e-12)


def test_hessian_top_eigenvalue_matches_explicit_hessian():
    from torch.func import functional_call

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def explicit(loss_fn):
        def f(flat):
            ps, i = {}, 0
            for n, sh in zip(names, shapes):
                ps[n] = flat[i : i + sh.numel()].view(sh)
                i += sh.numel()
            return loss_fn(functional_call(model, ps, (x,)), y)

        return torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat0))

    ev = explicit(F.cross_entropy)
    data = [(x[:10], y[:10]), (x[10:], y[10:])]  # two batches of unequal size: weighting matters
    got = gmm.hessian_top_eigenvalue(model, F.cross_entropy, data, iters=3000, seed=0, tol=1e-12)
    assert got.eigenvalue == pytest.approx(ev.max().item(), rel=1e-6)

    # negated loss: the dominant eigenvalue is negative, the shifted iteration finds λ_max
    neg = lambda o, t: -F.cross_entropy(o, t)  # noqa: E731
    ev2 = explicit(neg)
    assert abs(ev2.min()) > abs(ev2.max())  # the case the shift exists for
    got2 = gmm.hessian_top_eigenvalue(model, neg, (x, y), iters=20000, seed=1, tol=1e-13)
    assert got2.dominant == pytest.approx(ev2.min().item(), rel=1e-6)
    assert got2.eigenvalue == pytest.approx(ev2.max().item(), rel=1e-4, abs=1e-8)


def _masked_copy(model: TinyCNN, channel: int) -> TinyCNN:
    """Independent masking: zero the conv2 output channel through its weights and bias."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.conv2.weight[channel] = 0
        m.conv2.bias[channel] = 0
    return m


def test_single_filter_masking_and_model_unchanged():
    model = tiny_cnn(seed=3)
    train, _, _ = image_data(n=40, bs=16, seed=1)
    val, _, _ = image_data(n=30, bs=16, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = gmm.single_filter_masking(model, "relu2", [0, 2, 5], train, val)
    base_t, _ = gmm.accuracy(model, train)
    base_v, _ = gmm.accuracy(model, val)
    assert rep["base_train_acc"] == base_t and rep["base_val_acc"] == base_v
    for row in rep["filters"]:
        ref = _masked_copy(model, row["filter"])
        assert row["train_acc"] == gmm.accuracy(ref, train)[0]
        assert row["val_acc"] == gmm.accuracy(ref, val)[0]
        assert row["train_change"] == row["train_acc"] - base_t
    assert rep["n_train_down"] == sum(r["train_change"] < 0 for r in rep["filters"])
    assert rep["n_val_up"] == sum(r["val_change"] > 0 for r in rep["filters"])
    # the model is unchanged and no hook is left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    rb = gmm.random_filter_baseline(model, "relu2", train, val, R=3, seed=4, exclude=[0])
    rb2 = gmm.random_filter_baseline(model, "relu2", train, val, R=3, seed=4, exclude=[0])
    chosen = [r["filter"] for r in rb["filters"]]
    assert chosen == [r["filter"] for r in rb2["filters"]]
    assert len(set(chosen)) == 3 and 0 not in chosen and all(0 <= c < 6 for c in chosen)
    with pytest.raises(ValueError, match="R=9"):
        gmm.random_filter_baseline(model, "relu2", train, val, R=9)


# ------------------------------------------------------------------------ GMMAnalysis
def test_gmm_analysis_fit_streams_batches():
    model = tiny_cnn(seed=5)
    batches, x, y = image_data(n=60, bs=25)
    an = gmm.GMMAnalysis(k_max=4, preset="small", lam=5, filter_fn=autograd_filter_images)
    assert an.fit(model, batches, "relu2") is an
    res = an.result_
    # independent: features of all samples at once, and the activation mean by hand
    feats = autograd_filter_images(model, x, "relu2").flatten(2).transpose(0, 1)
    torch.testing.assert_close(res.points, gmm.pca2(feats.float()), rtol=0, atol=1e-5)
    a = model.relu2(model.conv2(model.relu1(model.conv1(x))))
    torch.testing.assert_close(res.mean_activation, a.mean((0, 2, 3)), rtol=1e-12, atol=0)
    assert torch.equal(res.targets, y)
    assert res.points.shape == (6, 60, 2) and res.anomaly.params["lam"] == 5
    d = res.to_dict()
    assert an.to_dict() == d
    json.dumps(d, allow_nan=False)
    assert d["n_samples"] == 60 and d["layer"] == "relu2"
    # max_samples keeps the first samples in order
    res2 = gmm.GMMAnalysis(k_max=4, max_samples=30, filter_fn=autograd_filter_images).fit(model, batches, "relu2").result_
    assert res2.n_samples == 30 and torch.equal(res2.targets, y[:30])
    with pytest.raises(KeyError, match="unknown layer name"):
        an.fit(model, batches, "relu3")


def test_gmm_analysis_default_engine_matches_autograd():
    engine = pytest.importorskip("nns_cuda.engine")
    if not callable(getattr(engine, "filter_images", None)):
        pytest.skip("nns_cuda.engine.filter_images is not available")
    model = tiny_cnn(seed=6)
    batches, _, _ = image_data(n=40, bs=20)
    a = gmm.GMMAnalysis(k_max=3).fit(model, batches, "relu2").result_
    b = gmm.GMMAnalysis(k_max=3, filter_fn=autograd_filter_images).fit(model, batches, "relu2").result_
    torch.testing.assert_close(a.points, b.points, rtol=0, atol=1e-4)


def test_counts_over_checkpoints_and_findings():
    wt, of = tiny_cnn(seed=7), tiny_cnn(seed=8)
    train, _, _ = image_data(n=48, bs=16, seed=3)
    val, _, _ = image_data(n=32, bs=16, seed=4)
    an = gmm.GMMAnalysis(k_max=3, lam=3, filter_fn=autograd_filter_images)
    rows = gmm.anomaly_counts_over_checkpoints({"e1": wt, "e2": of}, train, "relu2", an)
    assert [r["checkpoint"] for r in rows] == ["e1", "e2"] and all(r["n_filters"] == 6 for r in rows)
    out = chapter6.findings(wt, of, "relu2", train, val, analysis=an, R=2, hessian_data=val,
                            hessian_iters=3, thesis_model="LeNet-5", thesis_dataset="CIFAR-10")
    json.dumps(out, allow_nan=False)
    assert set(out) >= {"table_6_2", "table_6_3", "table_6_4", "table_6_5", "sharpness", "thesis"}
    assert out["table_6_2"]["OF"] == len(out["anomaly_filters"]["OF"])
    assert out["thesis"]["table_6_2_anomaly_counts"] == [2, 12]



def test_gmm_analysis_estimator_contract():
    """Parameters are stored unchanged and checked by fit; the results live in result_."""
    an = gmm.GMMAnalysis(k_max=1, preset="medium", lam=-1, filter_fn=autograd_filter_images)
    assert (an.k_max, an.preset, an.lam, an.filter_fn) == (1, "medium", -1, autograd_filter_images)
    model = tiny_cnn(seed=5)
    batches, x, y = image_data(n=30, bs=15)
    with pytest.raises(ValueError, match="unknown preset"):
        an.fit(model, batches, "relu2")
    with pytest.raises(ValueError, match="k_max must be an int >= 2"):
        gmm.GMMAnalysis(k_max=1).fit(model, batches, "relu2")
    with pytest.raises(ValueError, match="max_samples=3 must exceed k_max=4"):
        gmm.GMMAnalysis(k_max=4, max_samples=3).fit(model, batches, "relu2")
    with pytest.raises(ValueError, match="not fitted"):
        gmm.GMMAnalysis().to_dict()
    assert not hasattr(an, "result_")
    # every module's own mode is restored (a model in training mode with one frozen module)
    model.train()
    model.conv1.eval()
    gmm.accuracy(model, (x, y))
    assert model.training and not model.conv1.training and model.conv2.training
