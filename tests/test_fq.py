"""Tests of nns_cuda.fq (docs/spec.md §3): F against an independent numpy implementation of eqs. 4-1 … 4-6,
the fused-statistics path, the streaming data-set path, DBSCAN / masking, localisation IoU, the
comparison with the thesis (nns_cuda.analysis.thesis.chapter4) and bad input. Learned images come
from plain per-neuron autograd written here (docs/spec.md §1, identity 1)."""
from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

from nns_cuda.analysis import fq
from nns_cuda.analysis.thesis import chapter4
from nns_cuda.engine.oracle import autograd_filter_images, autograd_learned_images, autograd_scan
from nns_cuda.ops.reference.stats import li_stats_dense

K, C1, C2, C3 = 1e4, 1e-4, 3e-4, 1.5e-4


# --------------------------------------------------------------------------------------------
# independent oracles
# --------------------------------------------------------------------------------------------
def np_F(li, x, mask, ablate=None, K=K, C1=C1, C2=C2, C3=C3):
    """Eqs. 4-1 … 4-6 for ONE neuron, literally, in numpy. li, x: [D, H, W]; mask: [H, W] bool."""
    li = np.asarray(li, np.float64)
    x = np.asarray(x, np.float64)
    fg = np.broadcast_to(np.asarray(mask, bool)[None], x.shape)
    N = np.count_nonzero(x)
    Nf = np.count_nonzero(x[fg])
    nz = li != 0
    if Nf == 0 or not nz.any():
        return 0.0, None
    Nn = np.count_nonzero(nz[~fg])
    Ne = np.count_nonzero(nz[fg])
    Ie = li[fg]                      # eq. 4-1
    Ife = (x * nz)[fg]               # eq. 4-2
    mu_e, mu_fe = Ie.mean(), Ife.mean()
    sd_e, sd_fe = Ie.std(), Ife.std()
    cov = np.mean((Ie - mu_e) * (Ife - mu_fe))
    comp = {
        "l": 2 * mu_fe * mu_e / (mu_fe ** 2 + mu_e ** 2 + C1),
        "c": 2 * sd_fe * sd_e / (sd_fe ** 2 + sd_e ** 2 + C2),
        "s": cov / (sd_fe * sd_e + C3),
        "vf": Ne / Nf,
        "nf": Nn / N,
    }
    if ablate:
        comp[ablate] = 1.0
    return K * comp["nf"] * comp["vf"] * comp["l"] * comp["c"] * comp["s"], comp


def np_F_many(li, x, mask, **kw):
    li = np.asarray(li)
    lead = li.shape[:-3]
    flat = li.reshape(-1, *li.shape[-3:])
    return np.array([np_F(v, x, mask, **kw)[0] for v in flat]).reshape(lead)


def dense_li(model, x, layer):
    """Per-neuron autograd: LI_n = x * d(a_n)/dx -> (LI [B, *shape, D, H, W], a [B, *shape])."""
    mod = dict(model.named_modules())[layer]
    store = {}
    h = mod.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    xg = x.clone().requires_grad_(True)
    try:
        model(xg)
    finally:
        h.remove()
    a = store["a"]
    flat = a.flatten(1)
    out = []
    for n in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, n].sum(), xg, retain_graph=True)
        out.append(x * g)
    return torch.stack(out, 1).reshape(x.shape[0], *a.shape[1:], *x.shape[1:]).detach(), a.detach()


def gap_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double().eval()


def flat_net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    ).double().eval()


def make_data(n=7, seed=0, empty=(), full=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x[x < 0.15] = 0
    mask = torch.zeros(n, 8, 8, dtype=torch.bool)
    for i in range(n):
        r0, c0 = torch.randint(0, 4, (2,), generator=g).tolist()
        mask[i, r0:r0 + 4, c0:c0 + 3] = True
    for i in empty:
        mask[i] = False
    for i in full:
        mask[i] = True
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y, mask


def batches(x, y, mask, sizes=(3, 4)):
    out, s = [], 0
    for b in sizes:
        out.append((x[s:s + b], y[s:s + b], mask[s:s + b]))
        s += b
    return out


def random_lis(shape, seed=0, sparsity=0.4):
    g = torch.Generator().manual_seed(seed)
    li = torch.randn(*shape, generator=g, dtype=torch.float64)
    li[torch.rand(*shape, generator=g, dtype=torch.float64) < sparsity] = 0
    return li


# --------------------------------------------------------------------------------------------
# F for one sample
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ablate", fq.ABLATIONS)
def test_f_score_matches_numpy(ablate):
    x, _, mask = make_data(1, seed=3)
    x, mask = x[0], mask[0]
    li = random_lis((4, 3, 3, 8, 8), seed=1)
    li[0, 0] = 0                                   # inactive neuron
    li[1, 2] = x * 0.7                             # proportional image
    li[2, 1] = torch.where(mask.expand(3, 8, 8), torch.zeros_like(x), li[2, 1])  # background only
    F = fq.f_score(li, x, mask, ablate=ablate)
    ref = np_F_many(li.numpy(), x.numpy(), mask.numpy(), ablate=ablate)
    assert F.shape == (4, 3)
    np.testing.assert_allclose(F.numpy(), ref, rtol=1e-10, atol=1e-10)
    assert F[0, 0] == 0
    assert np.abs(ref).max() > 1  # not trivially zero
    # the components agree too
    comps = fq.f_components(li, x, mask, ablate=ablate)
    _, rc = np_F(li[1, 2].numpy(), x.numpy(), mask.numpy(), ablate=ablate)
    for k in ("l", "c", "s", "vf", "nf"):
        assert math.isclose(float(comps[k][1, 2]), rc[k], rel_tol=1e-10)


def test_f_components_are_the_thesis_ones_and_change_the_result():
    x, _, mask = make_data(1, seed=4)
    li = random_lis((6, 3, 8, 8), seed=2)
    full = fq.f_score(li, x[0], mask[0])
    for ab in ("l", "c", "s", "vf", "nf"):
        abl = fq.f_score(li, x[0], mask[0], ablate=ab)
        comps = fq.f_components(li, x[0], mask[0])
        np.testing.assert_allclose((abl * comps[ab]).numpy(), full.numpy(), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(abl, full)


def test_f_from_stats_equals_f_score_float64_and_float32():
    x, _, mask = make_data(3, seed=5)
    li = random_lis((3, 5, 2, 3, 8, 8), seed=3)
    li[1, 2, 1] = 0
    for ab in fq.ABLATIONS:
        dense = fq.f_score(li, x, mask, ablate=ab)                   # batched call
        st = li_stats_dense(li, x, mask)
        fast = fq.f_from_stats(st, x, mask, ablate=ab)
        np.testing.assert_allclose(fast.numpy(), dense.numpy(), rtol=1e-9, atol=1e-9)
        # per-sample signature gives the same
        for b in range(3):
            np.testing.assert_allclose(fq.f_from_stats(st[b], x[b], mask[b], ablate=ab).numpy(), dense[b].numpy(), rtol=1e-9, atol=1e-9)
    st32 = li_stats_dense(li.float(), x.float(), mask)
    f32 = fq.f_from_stats(st32, x.float(), mask)
    np.testing.assert_allclose(f32.numpy(), fq.f_score(li, x, mask).numpy(), rtol=2e-3, atol=2e-3 * float(fq.f_score(li, x, mask).abs().max()))


def test_inactive_neuron_gives_zero():
    x, _, mask = make_data(1, seed=6)
    li = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    for ab in fq.ABLATIONS:
        assert torch.equal(fq.f_score(li, x[0], mask[0], ablate=ab), torch.zeros(2, dtype=torch.float64))


def test_li_equal_x_gives_unit_similarity():
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.7 * torch.rand(3, 10, 10, generator=g, dtype=torch.float64)
    x[:, ::3, ::4] = 0
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:7, 3:8] = True
    comps = fq.f_components(x.unsqueeze(0), x, mask)
    for k in ("l", "c", "s"):
        assert abs(float(comps[k][0]) - 1) < 1e-2, (k, float(comps[k][0]))
    N = int((x != 0).sum())
    Nf = int(((x != 0) & mask).sum())
    expected = K * (N - Nf) / N * 1.0  # N^n/N with N^n = N - N_f, N^e/N_f = 1
    assert abs(float(comps["F"][0]) / expected - 1) < 1e-2
    assert float(comps["vf"][0]) == 1.0


def test_empty_foreground_warns_and_gives_zero():
    x, _, _ = make_data(1, seed=7)
    li = random_lis((3, 3, 8, 8), seed=4)
    empty = torch.zeros(8, 8, dtype=torch.bool)
    with pytest.warns(fq.EmptyForegroundWarning, match="N_f = 0"):
        F = fq.f_score(li, x[0], empty)
    assert torch.equal(F, torch.zeros(3, dtype=torch.float64))
    assert np.all(np_F_many(li.numpy(), x[0].numpy(), empty.numpy()) == 0)
    # non-empty mask but zero input inside it: N_f = 0 too
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[0:2, 0:2] = True
    x0 = x[0].clone()
    x0[:, 0:2, 0:2] = 0
    with pytest.warns(fq.EmptyForegroundWarning):
        assert torch.equal(fq.f_score(li, x0, m), torch.zeros(3, dtype=torch.float64))
    with pytest.warns(fq.EmptyForegroundWarning):
        fq.f_from_stats(li_stats_dense(li.unsqueeze(0), x[0:1], empty.unsqueeze(0))[0], x[0], empty)


def test_full_foreground_gives_zero_with_named_warning():
    x, _, _ = make_data(1, seed=8)
    li = random_lis((3, 3, 8, 8), seed=5)
    full = torch.ones(8, 8, dtype=torch.bool)
    with pytest.warns(fq.NoBackgroundWarning):
        F = fq.f_score(li, x[0], full)
    assert torch.equal(F, torch.zeros(3, dtype=torch.float64))
    np.testing.assert_array_equal(np_F_many(li.numpy(), x[0].numpy(), full.numpy()), 0)  # N^n = 0 literally
    # with nf ablated F is not zero: the zero really comes from N^n
    with pytest.warns(fq.NoBackgroundWarning):
        assert float(fq.f_score(li, x[0], full, ablate="nf").abs().max()) > 0


def test_bad_inputs_single_sample():
    x, _, mask = make_data(1, seed=9)
    x, mask = x[0], mask[0]
    li = random_lis((2, 3, 8, 8))
    with pytest.raises(TypeError, match="torch.bool"):
        fq.f_score(li, x, mask.double())
    with pytest.raises(TypeError, match="torch.bool"):
        fq.f_score(li, x, mask.to(torch.uint8))
    with pytest.raises(ValueError, match=r"fg_mask must have shape \[8, 8\]"):
        fq.f_score(li, x, torch.ones(8, 9, dtype=torch.bool))
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fq.f_score(li, bad, mask)
    bli = li.clone()
    bli[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        fq.f_score(bli, x, mask)
    with pytest.raises(ValueError, match="learned_images must be"):
        fq.f_score(li[..., :7], x, mask)
    with pytest.raises(ValueError, match="ablate must be one of"):
        fq.f_score(li, x, mask, ablate="q")
    with pytest.raises(ValueError, match="stats must be"):
        fq.f_from_stats(torch.zeros(2, 5, dtype=torch.float64), x, mask)
    with pytest.raises(ValueError, match="foreground mask is required"):
        fq.f_score(li, x, None)


def test_pearson_matches_scipy():
    from scipy.stats import pearsonr

    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    b = 0.5 * a + rng.normal(size=50)
    assert math.isclose(fq.pearson_r(a, b), pearsonr(a, b).statistic, rel_tol=1e-12)
    assert math.isnan(fq.pearson_r(np.ones(5), a[:5]))


# --------------------------------------------------------------------------------------------
# data-set FQ
# --------------------------------------------------------------------------------------------
def _dense_fq(model, x, mask, layer, ablate=None):
    li, a = dense_li(model, x, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fq.FQWarning)
        F = torch.stack([fq.f_score(li[i], x[i], mask[i], ablate=ablate) for i in range(x.shape[0])]).numpy()
    return F, a.numpy()


def test_streaming_equals_dense_per_sample_path():
    model = flat_net()
    x, y, mask = make_data(7, seed=10, empty=(4,))
    layers = ["1", "4", "6"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = fq.FeatureQuantity(scan_fn=autograd_scan).fit(model, batches(x, y, mask), layers).result_
    empties = [w for w in rec if issubclass(w.category, fq.EmptyForegroundWarning)]
    assert len(empties) == 1 and "first indices: 4" in str(empties[0].message)
    assert res.n_samples == 7 and res.empty_foreground == [4]
    from scipy.stats import pearsonr
    for layer in layers:
        F, a = _dense_fq(model, x, mask, layer)
        assert np.all(F[4] == 0)
        r = res[layer]
        assert tuple(r.fq.shape) == F.shape[1:]
        np.testing.assert_allclose(r.fq.numpy(), F.max(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(r.mean_f.numpy(), F.mean(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(r.mean_activation.numpy(), a.mean(0), rtol=1e-12, atol=1e-12)
        srt = np.sort(F, axis=0)
        clear = (srt[-1] - srt[-2]) > 1e-6 * (1 + np.abs(srt[-1]))
        np.testing.assert_array_equal(r.argmax.numpy()[clear], F.argmax(0)[clear])
        zero = np.all(F == 0, axis=0)
        assert np.all(r.argmax.numpy()[zero] == 0)  # ties: the first sample
        if layer == "1":
            assert zero.any()
        np.testing.assert_allclose(r.pearson_r, pearsonr(a.mean(0).ravel(), F.mean(0).ravel()).statistic, rtol=1e-9)
        np.testing.assert_allclose(r.fq_mean, F.max(0).mean(), rtol=1e-9)
        np.testing.assert_allclose(r.fq_var, F.max(0).var(), rtol=1e-9)
        assert F.max() > 0
    json.dumps(res.to_dict(arrays=True))


def test_fit_variants_one_scan_equals_separate_fits_and_dense():
    model = gap_net()
    x, y, mask = make_data(5, seed=11)
    data = batches(x, y, mask, (2, 3))
    many = fq.fit_variants(model, data, ["4"], scan_fn=autograd_scan)
    assert set(many) == {"full", "l", "c", "s", "vf", "nf"}
    for ab in ("l", "s", "nf"):
        one = fq.FeatureQuantity(ablate=ab, scan_fn=autograd_scan).fit(model, data, "4").result_
        assert torch.allclose(one["4"].fq, many[ab]["4"].fq, rtol=1e-12, atol=0)
        F, _ = _dense_fq(model, x, mask, "4", ablate=ab)
        np.testing.assert_allclose(many[ab]["4"].fq.numpy(), F.max(0), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(many["full"]["4"].fq, many["c"]["4"].fq)


def test_fit_accepts_dataset_and_dicts_and_respects_max_samples():
    from torch.utils.data import TensorDataset

    model = gap_net()
    x, y, mask = make_data(6, seed=12)
    ref = fq.FeatureQuantity(scan_fn=autograd_scan).fit(model, batches(x, y, mask, (2, 4)), ["4"]).result_
    ds = fq.FeatureQuantity(scan_fn=autograd_scan, batch_size=4).fit(model, TensorDataset(x, y, mask), ["4"]).result_
    assert torch.allclose(ref["4"].fq, ds["4"].fq) and torch.equal(ref["4"].argmax, ds["4"].argmax)
    dicts = [{"x": x, "y": y, "fg_mask": mask}]
    dd = fq.FeatureQuantity(scan_fn=autograd_scan).fit(model, dicts, ["4"]).result_
    assert torch.allclose(ref["4"].mean_f, dd["4"].mean_f)
    part = fq.FeatureQuantity(scan_fn=autograd_scan, max_samples=3).fit(model, batches(x, y, mask, (2, 4)), ["4"]).result_
    assert part.n_samples == 3
    F, _ = _dense_fq(model, x[:3], mask[:3], "4")
    np.testing.assert_allclose(part["4"].fq.numpy(), F.max(0), rtol=1e-9)


def test_fit_bad_inputs():
    model = gap_net()
    x, y, mask = make_data(3, seed=13)
    est = fq.FeatureQuantity(scan_fn=autograd_scan)
    with pytest.raises(KeyError, match="unknown layer name 'features.9'"):
        est.fit(model, [(x, y, mask)], ["features.9"])
    with pytest.raises(ValueError, match="needs a foreground mask"):
        est.fit(model, [(x, y)], ["4"])
    with pytest.raises(TypeError, match="torch.bool"):
        est.fit(model, [(x, y, mask.float())], ["4"])
    with pytest.raises(ValueError, match=r"fg_mask must have shape \[3, 8, 8\]"):
        est.fit(model, [(x, y, mask[:, :7])], ["4"])
    xn = x.clone()
    xn[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.fit(model, [(xn, y, mask)], ["4"])
    with pytest.raises(ValueError, match="empty"):
        est.fit(model, [], ["4"])
    model.train()
    with pytest.raises(ValueError, match="model.eval"):
        est.fit(model, [(x, y, mask)], ["4"])
    model.eval()
    with pytest.raises(ValueError, match="ablate must be one of"):
        fq.FeatureQuantity(ablate="x").fit(model, [(x, y, mask)], ["4"])
    with pytest.raises(ValueError, match="C2 must be >= 0"):
        fq.FeatureQuantity(C2=-1.0).fit(model, [(x, y, mask)], ["4"])


def test_estimators_store_parameters_and_fit_returns_self():
    # scikit-learn rules: __init__ stores its parameters unchanged (no validation), fit returns
    # self with the result object in result_, to_dict() is the result's.
    bad = fq.FeatureQuantity(K=float("nan"), ablate="x")
    assert bad.ablate == "x" and math.isnan(bad.K)
    methods = ["fq"]
    loc = fq.LocalisationIoU(methods=methods, target="nope")
    assert loc.methods is methods and loc.target == "nope"
    with pytest.raises(AttributeError, match="not fitted"):
        fq.FeatureQuantity().to_dict()
    model = gap_net()
    x, y, mask = make_data(4, seed=22)
    est = fq.FeatureQuantity(scan_fn=autograd_scan)
    assert est.fit(model, [(x, y, mask)], ["4"]) is est
    assert isinstance(est.result_, fq.FQResult)
    assert est.to_dict() == est.result_.to_dict() and est.to_dict(arrays=True) == est.result_.to_dict(arrays=True)
    div = fq.FilterDiversity(min_samples=3, n_mask=2)
    assert div.fit(model, est.result_, "4", [(x, y)]) is div and isinstance(div.result_, fq.DiversityResult)
    assert div.to_dict() == div.result_.to_dict()
    with pytest.raises(ValueError, match="unknown methods"):
        fq.LocalisationIoU(methods=("fq", "saliency")).fit(model, [(x, y, mask)])
    with pytest.raises(ValueError, match="target must be"):
        fq.LocalisationIoU(target="nope").fit(model, [(x, y, mask)])


def test_all_background_samples_in_dataset_give_zero_and_one_named_warning():
    model = gap_net()
    x, y, mask = make_data(4, seed=14, empty=(0, 1, 2, 3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = fq.FeatureQuantity(scan_fn=autograd_scan).fit(model, batches(x, y, mask, (2, 2)), ["1", "4"]).result_
    named = [w for w in rec if issubclass(w.category, fq.EmptyForegroundWarning)]
    assert len(named) == 1
    assert float(res["1"].fq.abs().max()) == 0 and float(res["4"].mean_f.abs().max()) == 0


# --------------------------------------------------------------------------------------------
# DBSCAN diversity and masking (Table 4-3)
# --------------------------------------------------------------------------------------------
def test_dbscan_counts_equal_sklearn_and_known_clusters():
    from sklearn.cluster import DBSCAN

    rng = np.random.default_rng(0)
    vals = rng.gamma(1.0, 0.6, size=(7, 5, 5))
    got = fq.filter_diversity(torch.from_numpy(vals))
    for k in range(7):
        lab = DBSCAN(eps=0.3, min_samples=6).fit(vals[k].reshape(-1, 1)).labels_
        assert got[k] == len(set(lab) - {-1})
    assert got.max() > 0
    known = np.zeros((3, 18))
    known[0] = np.repeat([0.0, 10.0, 20.0], 6) + rng.uniform(0, 0.01, 18)  # 3 clusters
    known[1] = rng.uniform(5, 5.1, 18)                                      # 1 cluster
    known[2] = np.arange(18) * 1.0                                          # all noise
    np.testing.assert_array_equal(fq.filter_diversity(known), [3, 1, 0])


def test_rank_filters_ties_by_index():
    top, bottom = fq.rank_filters([2, 3, 3, 0, 2, 0], n=3)
    assert top == [1, 2, 0]
    assert bottom == [3, 5, 0]


def _manual_mean_loss(model, x, y):
    with torch.no_grad():
        return float(TF.cross_entropy(model(x), y))


def test_masking_diverse_filters_loss_change_and_model_unchanged():
    model = flat_net(seed=3)
    x, y, mask = make_data(8, seed=15)
    data = batches(x, y, mask, (3, 5))
    fqres = fq.FeatureQuantity(scan_fn=autograd_scan).fit(model, data, ["4"]).result_
    before = copy.deepcopy(model.state_dict())
    res = fq.FilterDiversity(eps=0.3, min_samples=3, n_mask=2).fit(model, fqres, "4", data).result_
    # model unchanged, no hook left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    # diversity == sklearn on the same values; ranking as documented
    np.testing.assert_array_equal(res.n_clusters, fq.filter_diversity(fqres["4"].fq, 0.3, 3))
    assert (res.top, res.bottom) == fq.rank_filters(res.n_clusters, 2)
    # losses equal an independent computation: zero the conv's weights and bias of those channels
    base = _manual_mean_loss(model, x, y)
    assert math.isclose(res.loss_base, base, rel_tol=1e-12)
    for chans, got in ((res.top, res.loss_top), (res.bottom, res.loss_bottom)):
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            m2[3].weight[chans] = 0
            m2[3].bias[chans] = 0
        assert math.isclose(got, _manual_mean_loss(m2, x, y), rel_tol=1e-12)
    assert math.isclose(res.pct_change_top, 100 * (res.loss_top - base) / base, rel_tol=1e-12)
    assert res.loss_top != base
    json.dumps(res.to_dict())


def test_diversity_warns_when_filters_are_smaller_than_min_samples():
    model = flat_net()
    x, y, mask = make_data(3, seed=16)
    fqres = fq.FeatureQuantity(scan_fn=autograd_scan).fit(model, [(x, y, mask)], ["4"]).result_
    with pytest.warns(fq.FQWarning, match="fewer than min_samples"):
        res = fq.FilterDiversity(min_samples=20, n_mask=2).fit(model, fqres, "4", [(x, y)]).result_
    assert res.degenerate and res.top == [0, 1] and res.bottom == [0, 1]
    with pytest.raises(ValueError, match="needs class labels"):
        fq.FilterDiversity(n_mask=2).fit(model, fqres, "4", [(x,)])


# --------------------------------------------------------------------------------------------
# Localisation IoU (Table 4-5)
# --------------------------------------------------------------------------------------------
def _np_mask(m, thr=0.5):
    lo, hi = m.min(), m.max()
    if hi == lo:
        return np.zeros_like(m, bool)
    return (m - lo) / (hi - lo) >= thr


def _np_iou(a, b):
    u = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / u if u else 1.0


def _manual_gradcam(model, x, layer, target):
    mod = dict(model.named_modules())[layer]
    store = {}
    h = mod.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = model(x)
    finally:
        h.remove()
    A = store["a"]
    (g,) = torch.autograd.grad(out[torch.arange(x.shape[0]), target].sum(), A)
    w = g.mean((2, 3), keepdim=True)
    cam = torch.relu((w * A).sum(1, keepdim=True))
    return TF.interpolate(cam.detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()


def test_localisation_iou_fq_gradcam_cam_against_manual():
    model = gap_net(seed=5)
    x, y, mask = make_data(6, seed=17, empty=(2,))
    data = batches(x, y, mask, (2, 4))
    with pytest.warns(fq.EmptyForegroundWarning, match="left out"):
        res = fq.LocalisationIoU(scan_fn=autograd_scan, li_fn=autograd_learned_images).fit(model, data).result_
    keep = [i for i in range(6) if i != 2]
    li, logits = dense_li(model, x, "7")
    pred = logits.argmax(1)
    fq_ref, gc_ref, cam_ref = [], [], []
    gc = _manual_gradcam(model, x, "4", pred)
    with torch.no_grad():
        A = model[:5](x)
    Wfc = model[7].weight.detach()
    for i in keep:
        F = np_F_many(li[i].numpy(), x[i].numpy(), mask[i].numpy())
        o = int(np.argmax(F))
        fmap = np.abs(li[i, o].numpy()).sum(0)
        fq_ref.append(_np_iou(_np_mask(fmap), mask[i].numpy()))
        gc_ref.append(_np_iou(_np_mask(gc[i]), mask[i].numpy()))
        cam = torch.einsum("k,khw->hw", Wfc[pred[i]], A[i])
        up = TF.interpolate(cam[None, None], size=(8, 8), mode="bilinear", align_corners=False)[0, 0].numpy()
        cam_ref.append(_np_iou(_np_mask(up), mask[i].numpy()))
    np.testing.assert_allclose(res.iou["fq"], fq_ref, rtol=1e-12)
    np.testing.assert_allclose(res.iou["gradcam"], gc_ref, rtol=1e-12)
    np.testing.assert_allclose(res.iou["cam"], cam_ref, rtol=1e-12)
    assert res.gradcam_layer == "4" and res.output_layer == "7" and res.n_samples == 6
    json.dumps(res.to_dict(arrays=True))


def test_cam_skipped_for_non_gap_model_and_labels_target():
    model = flat_net()
    x, y, mask = make_data(3, seed=18)
    res = fq.LocalisationIoU(scan_fn=autograd_scan, li_fn=autograd_learned_images, target="label").fit(model, [(x, y, mask)]).result_
    assert "cam" in res.skipped and "cam" not in res.iou
    gc = _manual_gradcam(model, x, "4", y)
    ref = [_np_iou(_np_mask(gc[i]), mask[i].numpy()) for i in range(3)]
    np.testing.assert_allclose(res.iou["gradcam"], ref, rtol=1e-12)
    with pytest.raises(ValueError, match="needs class labels"):
        fq.LocalisationIoU(target="label", methods=("gradcam",)).fit(model, [(x, None, mask)])


def test_saliency_mask_and_iou_helpers():
    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[3.0, 3.0], [3.0, 3.0]]])
    s = fq.saliency_mask(m, 0.5)
    assert s.tolist() == [[[False, False], [True, True]], [[False, False], [False, False]]]
    box = torch.tensor([[[False, True], [False, True]], [[True, True], [True, True]]])
    assert fq.mask_iou(s, box).tolist() == [1 / 3, 0.0]


# --------------------------------------------------------------------------------------------
# findings against the thesis (nns_cuda.analysis.thesis.chapter4)
# --------------------------------------------------------------------------------------------
def test_findings_structure_and_thesis_numbers():
    model = gap_net(seed=7)
    x, y, mask = make_data(8, seed=19)
    out = chapter4.findings(model, batches(x, y, mask, (4, 4)), scan_fn=autograd_scan, li_fn=autograd_learned_images,
                            filter_fn=autograd_filter_images, n_mask=2, max_samples=6)
    s = json.dumps(out)
    assert out["table_3_3"]["thesis"]["VGG-16"] == [0.952, 0.923, 0.688, 0.620, 0.538]
    assert out["table_4_3"]["thesis"]["VGG-16"][0] == [95.2, -0.01]
    assert out["fig_4_3"]["n_layers"] == 2 and set(out["fig_4_3"]["pearson_r"]) == {"1", "4"}
    assert out["table_3_3"]["layers"] == ["1", "4"]  # one 2-D pool with >1x1 output -> conv layers
    assert out["table_4_3"]["layer"] == "4"
    assert "fq" in out["table_4_5"]["mean_iou"] and "NaN" not in s
    assert set(out["ablation"]["variants"]) == {"full", "l", "c", "s", "vf", "nf"}
    assert out["table_3_4"]["layers"] == ["1", "4"] and out["table_3_4"]["thesis"]["VGG-16"][0] == 0.997
    assert out["table_3_3"]["thesis"] is chapter4.THESIS["table_3_3_C_l"]


# --------------------------------------------------------------------------------------------
# CUDA: same numbers as on the CPU (model on the GPU, data on the CPU or the GPU)
# --------------------------------------------------------------------------------------------
@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = gap_net(seed=8)
    x, y, mask = make_data(6, seed=20, empty=(1,))
    data = batches(x, y, mask, (2, 4))
    gpu_model = copy.deepcopy(model).cuda()
    gpu_data = [(a.cuda(), b.cuda(), c.cuda()) for a, b, c in data]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fq.FQWarning)
        cpu = fq.fit_variants(model, data, ["1", "4", "7"], scan_fn=autograd_scan)
        for d in (data, gpu_data):
            gpu = fq.fit_variants(gpu_model, d, ["1", "4", "7"], scan_fn=autograd_scan)
            for v in cpu:
                for l in ("1", "4", "7"):
                    assert torch.allclose(cpu[v][l].fq, gpu[v][l].fq, rtol=1e-9, atol=1e-9)
                    assert torch.allclose(cpu[v][l].mean_activation, gpu[v][l].mean_activation, rtol=1e-9, atol=1e-12)
        li = random_lis((3, 3, 8, 8), seed=9)
        assert torch.allclose(fq.f_score(li.cuda(), x[0].cuda(), mask[0].cuda()).cpu(), fq.f_score(li, x[0], mask[0]))
    import importlib.util

    if importlib.util.find_spec("captum") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fq.FQWarning)
            for d in (data, gpu_data):
                a = fq.LocalisationIoU(scan_fn=autograd_scan, li_fn=autograd_learned_images).fit(model, data).result_
                b = fq.LocalisationIoU(scan_fn=autograd_scan, li_fn=autograd_learned_images).fit(gpu_model, d).result_
                for k in a.iou:
                    np.testing.assert_allclose(a.iou[k], b.iou[k], rtol=1e-9)
    if importlib.util.find_spec("sklearn") is not None:
        ra = fq.FilterDiversity(min_samples=3, n_mask=2).fit(model, cpu["full"], "4", data).result_
        rb = fq.FilterDiversity(min_samples=3, n_mask=2).fit(gpu_model, cpu["full"], "4", gpu_data).result_
        assert ra.top == rb.top and math.isclose(ra.loss_top, rb.loss_top, rel_tol=1e-9)


# --------------------------------------------------------------------------------------------
# the default path (the engine's Scanner / learned_images) gives the oracle's numbers
# --------------------------------------------------------------------------------------------
def test_engine_default_path_equals_autograd_oracle():
    pytest.importorskip("nns_cuda.engine")
    model = flat_net(seed=9)
    x, y, mask = make_data(5, seed=21, empty=(2,))
    data = batches(x, y, mask, (2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fq.FQWarning)
        eng = fq.fit_variants(model, data, ["1", "2", "4", "6"], ablations=(None, "s"))
        ora = fq.fit_variants(model, data, ["1", "2", "4", "6"], ablations=(None, "s"), scan_fn=autograd_scan)
        for v in eng:
            for l in eng[v]:
                np.testing.assert_allclose(eng[v][l].fq.numpy(), ora[v][l].fq.numpy(), rtol=1e-8, atol=1e-8)
                np.testing.assert_allclose(eng[v][l].mean_f.numpy(), ora[v][l].mean_f.numpy(), rtol=1e-8, atol=1e-8)
                np.testing.assert_allclose(eng[v][l].mean_activation.numpy(), ora[v][l].mean_activation.numpy(), rtol=1e-10)
        gm = gap_net(seed=9)
        a = fq.LocalisationIoU(methods=("fq",)).fit(gm, data).result_
        b = fq.LocalisationIoU(methods=("fq",), scan_fn=autograd_scan, li_fn=autograd_learned_images).fit(gm, data).result_
    np.testing.assert_allclose(a.iou["fq"], b.iou["fq"], rtol=1e-12)

