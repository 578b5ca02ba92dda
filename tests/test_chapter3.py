"""Tests of nns_cuda.chapter3 (docs/spec.md §2): every measure against a direct numpy implementation
written here, on learned images from plain per-neuron autograd (docs/spec.md §1, identity 1; the
oracle ``dense_li`` shared with test_fq.py), plus bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nns_cuda.analysis import chapter3 as c3
from nns_cuda.engine.oracle import autograd_filter_images, autograd_learned_images, autograd_scan
from test_fq import batches
from test_fq import dense_li as dense_li_t
from test_fq import gap_net as net


# --------------------------------------------------------------------------------------------
# fixtures and oracles
# --------------------------------------------------------------------------------------------
def make_data(n=7, seed=0, zero=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    x[x < 0.2] = 0
    for i in zero:
        x[i] = 0
    y = torch.randint(0, 5, (n,), generator=g)
    mask = torch.zeros(n, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 2:6] = True
    return x, y, mask


def dense_li(model, x, layer):
    """Per-neuron autograd: LI_n = x * d(a_n)/dx -> ([B, *shape, D, H, W], a [B, *shape]) as numpy."""
    li, a = dense_li_t(model, x, layer)
    return li.numpy(), a.numpy()


def np_bilinear(a, H, W):
    """Bilinear up-sampling with half-pixel centres (align_corners=False), a: [K, h, w]."""
    K, h, w = a.shape

    def coords(out, inp):
        src = np.maximum((np.arange(out) + 0.5) * (inp / out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), inp - 1)
        i1 = np.minimum(i0 + 1, inp - 1)
        return i0, i1, src - i0

    r0, r1, lr = coords(H, h)
    q0, q1, lq = coords(W, w)
    top = a[:, r0][:, :, q0] * (1 - lq) + a[:, r0][:, :, q1] * lq
    bot = a[:, r1][:, :, q0] * (1 - lq) + a[:, r1][:, :, q1] * lq
    return top * (1 - lr)[:, None] + bot * lr[:, None]


# --------------------------------------------------------------------------------------------
# knowledge quantity
# --------------------------------------------------------------------------------------------
def test_knowledge_quantity_matches_numpy():
    model = net()
    x, y, mask = make_data(6, seed=1, zero=(3,))
    with pytest.warns(c3.ZeroInputWarning, match="left out"):
        res = c3.KnowledgeQuantity(scan_fn=autograd_scan).fit(model, batches(x, y, mask, (2, 4)), ["1", "2", "4", "7"]).result_
    xs = x.numpy()
    for layer in ["1", "2", "4", "7"]:
        li, _ = dense_li(model, x, layer)
        rc, rs, rca, rsa = [], [], [], []
        for b in range(6):
            cx, sx = np.count_nonzero(xs[b]), np.abs(xs[b]).sum()
            if cx == 0:
                continue
            v = li[b].reshape(-1, xs[b].size)
            cnt = np.count_nonzero(v, axis=1)
            st = np.abs(v).sum(1)
            rc.append(cnt.mean() / cx)
            rs.append(st.mean() / sx)
            act = cnt > 0
            if act.any():
                rca.append(cnt[act].mean() / cx)
                rsa.append(st[act].mean() / sx)
        r = res[layer]
        assert r.n_samples == 5
        for got, want in ((r.count_ratio, rc), (r.strength_ratio, rs), (r.count_ratio_active, rca), (r.strength_ratio_active, rsa)):
            assert math.isclose(got, float(np.mean(want)), rel_tol=1e-10)
        assert r.count_ratio_active >= r.count_ratio
    assert res.n_skipped_zero_input == 1
    assert 0 < res["1"].active_fraction < 1
    json.dumps(res.to_dict())


# --------------------------------------------------------------------------------------------
# distances
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_reference,sizes", [(50, (3, 4)), (3, (2, 2, 3))])
def test_input_distances_match_numpy(n_reference, sizes):
    model = net(seed=2)
    x, y, mask = make_data(7, seed=2)
    res = c3.InputDistance(scan_fn=autograd_scan, li_fn=autograd_learned_images, n_reference=n_reference,
                           max_neurons=40, chunk=16).fit(model, batches(x, y, mask, sizes), ["4", "7"]).result_
    xs = x.numpy().reshape(7, -1)
    pool = list(range(min(n_reference, 7)))
    for layer in ["4", "7"]:
        li, _ = dense_li(model, x, layer)
        v = li.reshape(7, -1, xs.shape[1])                                 # [B, n, E]
        own = np.linalg.norm(v - xs[:, None, :], axis=2)                   # eq. 3-15
        r = res[layer]
        np.testing.assert_allclose(r.own_per_neuron.numpy().ravel(), own.mean(0), rtol=1e-9, atol=1e-9)
        assert math.isclose(r.own, own.mean(), rel_tol=1e-10)
        sub = r.neurons.numpy()
        assert len(sub) == min(40, v.shape[1]) and len(set(sub.tolist())) == len(sub)
        unrel = np.array([[np.mean([np.linalg.norm(v[b, n] - xs[j]) for j in pool if j != b]) for n in sub] for b in range(7)])
        assert math.isclose(r.unrelated, unrel.mean(), rel_tol=1e-9)
        assert math.isclose(r.own_subset, own[:, sub].mean(), rel_tol=1e-10)
        assert r.n_reference == len(pool)
    json.dumps(res.to_dict(arrays=True))


def test_distance_from_stats_is_the_norm():
    from nns_cuda.ops.reference.stats import li_stats_dense

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 5, generator=g, dtype=torch.float64)
    li = torch.randn(2, 4, 3, 5, 5, generator=g, dtype=torch.float64)
    d = c3.distance_from_stats(li_stats_dense(li, x, None), x)
    ref = np.linalg.norm((li - x[:, None]).reshape(2, 4, -1).numpy(), axis=2)
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# winner neurons
# --------------------------------------------------------------------------------------------
def test_winner_matrix_matches_numpy():
    model = net(seed=3)
    x, y, mask = make_data(9, seed=3)
    y = torch.tensor([0, 1, 1, 2, 0, 4, 4, 4, 1])  # class 3 absent
    res = c3.WinnerDistance(scan_fn=autograd_scan).fit(model, batches(x, y, mask, (4, 5))).result_
    li, _ = dense_li(model, x, "7")
    xs = x.numpy().reshape(9, -1)
    v = li.reshape(9, 5, -1)
    dist = np.linalg.norm(v - xs[:, None], axis=2)  # [B, o]
    assert res.output_layer == "7"
    for c in range(5):
        sel = y.numpy() == c
        if not sel.any():
            assert torch.isnan(res.dist[c]).all() and res.n_per_class[c] == 0
            continue
        np.testing.assert_allclose(res.dist[c].numpy(), dist[sel].mean(0), rtol=1e-10)
        cr = np.mean([np.count_nonzero(v[b, c]) / np.count_nonzero(xs[b]) for b in np.nonzero(sel)[0]])
        sr = np.mean([np.abs(v[b, c]).sum() / np.abs(xs[b]).sum() for b in np.nonzero(sel)[0]])
        assert math.isclose(float(res.count_ratio[c]), cr, rel_tol=1e-10)
        assert math.isclose(float(res.strength_ratio[c]), sr, rel_tol=1e-10)
    assert res.n_per_class.tolist() == [2, 3, 1, 0, 3]
    assert math.isclose(res.winner_distance, float(np.mean(dist[np.arange(9), y.numpy()])), rel_tol=1e-10)
    d = res.to_dict()
    assert d["dist"][3] == [None] * 5 and d["winner_is_closest"][3] is None
    json.dumps(d)


def test_winner_needs_labels_and_valid_ones():
    model = net()
    x, y, mask = make_data(3)
    with pytest.raises(ValueError, match="needs class labels"):
        c3.WinnerDistance(scan_fn=autograd_scan).fit(model, [(x,)])
    with pytest.raises(ValueError, match="needs class labels"):
        c3.WinnerDistance(scan_fn=autograd_scan).fit(model, [(x, None, mask)])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        c3.WinnerDistance(scan_fn=autograd_scan).fit(model, [(x, torch.tensor([0, 7, 1]), mask)])
    with pytest.raises(TypeError, match="integer class indices"):
        c3.WinnerDistance(scan_fn=autograd_scan).fit(model, [(x, torch.tensor([0.0, 1.0, 1.0]), mask)])
    with pytest.raises(ValueError, match="must have C neurons"):
        c3.WinnerDistance(scan_fn=autograd_scan, output_layer="4").fit(model, [(x, y, mask)])


# --------------------------------------------------------------------------------------------
# feature-map <-> learned-image correlation
# --------------------------------------------------------------------------------------------
def test_feature_map_correlation_matches_numpy():
    model = net(seed=4)
    x, y, mask = make_data(5, seed=4)
    layers = ["1", "2", "4"]
    res = c3.FeatureMapCorrelation(filter_fn=autograd_filter_images).fit(model, batches(x, y, mask, (2, 3)), layers).result_
    for layer in layers:
        li, a = dense_li(model, x, layer)              # [B, K, h, w, D, H, W], [B, K, h, w]
        per_sample, fs, fc = [], np.zeros(a.shape[1]), np.zeros(a.shape[1])
        for b in range(5):
            L = np.einsum("khwdHW,khw->kdHW", li[b], a[b])      # filter learned images (eq. 5-2)
            A = np.abs(L).sum(1) != 0
            S = np_bilinear(a[b], 8, 8) > 0
            ck = []
            for k in range(a.shape[1]):
                if A[k].sum() > 0:
                    v = (S[k] & A[k]).sum() / A[k].sum()          # eq. 3-17
                    ck.append(v)
                    fs[k] += v
                    fc[k] += 1
            if ck:
                per_sample.append(np.mean(ck))                    # eq. 3-18
        r = res[layer]
        assert math.isclose(r.value, float(np.mean(per_sample)), rel_tol=1e-10)
        np.testing.assert_allclose(r.per_filter.numpy(), np.where(fc > 0, fs / np.maximum(fc, 1), np.nan), rtol=1e-10)
        assert 0 < r.value <= 1
    json.dumps(res.to_dict(arrays=True))


# --------------------------------------------------------------------------------------------
# top-2 IoU
# --------------------------------------------------------------------------------------------
def test_top2_iou_matches_numpy():
    model = net(seed=5)
    x, y, mask = make_data(4, seed=5)
    x[0] = 0.5  # constant image: interior activations tie exactly -> tie rule (lower flat index first)
    layers = ["1", "4"]
    res = c3.Top2IoU(li_fn=autograd_learned_images).fit(model, batches(x, y, mask, (1, 3)), layers).result_
    for layer in layers:
        li, a = dense_li(model, x, layer)
        B, K, h, w = a.shape
        per_sample = []
        for b in range(B):
            vals = []
            for k in range(K):
                v = a[b, k].ravel()
                p1, p2 = np.argsort(-v, kind="stable")[:2]
                if v[p2] <= 0:
                    continue
                s1 = np.abs(li[b, k].reshape(h * w, 3, 8, 8)[p1]).sum(0) != 0
                s2 = np.abs(li[b, k].reshape(h * w, 3, 8, 8)[p2]).sum(0) != 0
                u = (s1 | s2).sum()
                if u:
                    vals.append((s1 & s2).sum() / u)               # eq. 3-19
            if vals:
                per_sample.append(np.mean(vals))                   # eq. 3-20
        assert math.isclose(res[layer].value, float(np.mean(per_sample)), rel_tol=1e-10)
        assert 0 < res[layer].value <= 1
    json.dumps(res.to_dict(arrays=True))
    # grouping samples into learned-image calls does not change the result
    for cap in (1, 9, 10_000):
        g = c3.Top2IoU(li_fn=autograd_learned_images, max_neurons_per_call=cap).fit(model, batches(x, y, mask, (4,)), layers).result_
        for layer in layers:
            assert math.isclose(g[layer].value, res[layer].value, rel_tol=1e-12)
            np.testing.assert_allclose(g[layer].per_filter.numpy(), res[layer].per_filter.numpy(), rtol=1e-12)
    # the constant image's top-2 first-layer neurons are adjacent (ties) and overlap
    one = c3.Top2IoU(li_fn=autograd_learned_images).fit(model, [(x[:1], y[:1], mask[:1])], ["1"]).result_
    assert one["1"].value > 0


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_chapter3_bad_inputs():
    model = net()
    x, y, mask = make_data(3)
    with pytest.raises(KeyError, match="unknown layer name 'conv9'"):
        c3.KnowledgeQuantity(scan_fn=autograd_scan).fit(model, [(x, y, mask)], ["conv9"])
    with pytest.raises(ValueError, match="2-D feature map"):
        c3.FeatureMapCorrelation(filter_fn=autograd_filter_images).fit(model, [(x, y, mask)], ["7"])
    with pytest.raises(ValueError, match="2-D feature map"):
        c3.Top2IoU(li_fn=autograd_learned_images).fit(model, [(x, y, mask)], ["7"])
    xn = x.clone()
    xn[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        c3.KnowledgeQuantity(scan_fn=autograd_scan).fit(model, [(xn, y, mask)], ["1"])
    with pytest.raises(TypeError, match="torch.bool"):
        c3.KnowledgeQuantity(scan_fn=autograd_scan).fit(model, [(x, y, mask.long())], ["1"])
    with pytest.raises(ValueError, match="n_reference"):
        c3.InputDistance(n_reference=1).fit(model, [(x, y, mask)], ["7"])
    with pytest.raises(ValueError, match="max_neurons_per_call"):
        c3.Top2IoU(li_fn=autograd_learned_images, max_neurons_per_call=0).fit(model, [(x, y, mask)], ["1"])
    with pytest.raises(ValueError, match="at least 2 samples"):
        c3.InputDistance(scan_fn=autograd_scan, li_fn=autograd_learned_images).fit(model, [(x[:1], y[:1], mask[:1])], ["7"])
    with pytest.raises(TypeError, match="data must yield batches"):
        c3.KnowledgeQuantity(scan_fn=autograd_scan).fit(model, [(x, y, mask, mask)], ["1"])


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    import copy

    model = net(seed=6)
    x, y, mask = make_data(5, seed=6)
    data = batches(x, y, mask, (2, 3))
    gm = copy.deepcopy(model).cuda()
    gdata = [(a.cuda(), b.cuda(), c.cuda()) for a, b, c in data]
    for d in (data, gdata):
        pairs = [
            (c3.KnowledgeQuantity(scan_fn=autograd_scan).fit(model, data, ["1", "4"]).result_["4"].count_ratio,
             c3.KnowledgeQuantity(scan_fn=autograd_scan).fit(gm, d, ["1", "4"]).result_["4"].count_ratio),
            (c3.InputDistance(scan_fn=autograd_scan, li_fn=autograd_learned_images, n_reference=3).fit(model, data, ["4"]).result_["4"].unrelated,
             c3.InputDistance(scan_fn=autograd_scan, li_fn=autograd_learned_images, n_reference=3).fit(gm, d, ["4"]).result_["4"].unrelated),
            (c3.WinnerDistance(scan_fn=autograd_scan).fit(model, data).result_.winner_distance,
             c3.WinnerDistance(scan_fn=autograd_scan).fit(gm, d).result_.winner_distance),
            (c3.FeatureMapCorrelation(filter_fn=autograd_filter_images).fit(model, data, ["2"]).result_["2"].value,
             c3.FeatureMapCorrelation(filter_fn=autograd_filter_images).fit(gm, d, ["2"]).result_["2"].value),
            (c3.Top2IoU(li_fn=autograd_learned_images).fit(model, data, ["4"]).result_["4"].value,
             c3.Top2IoU(li_fn=autograd_learned_images).fit(gm, d, ["4"]).result_["4"].value),
        ]
        for a, b in pairs:
            assert math.isclose(a, b, rel_tol=1e-9), (a, b)


def test_engine_default_path_equals_autograd_oracle():
    pytest.importorskip("nns_cuda.engine")
    model = net(seed=7)
    x, y, mask = make_data(5, seed=7)
    data = batches(x, y, mask, (2, 3))
    eng_oracle = [
        (c3.KnowledgeQuantity(), c3.KnowledgeQuantity(scan_fn=autograd_scan), ["1", "2", "4", "7"],
         lambda r: [r[l].strength_ratio_active for l in ("1", "2", "4", "7")]),
        (c3.InputDistance(n_reference=3, max_neurons=30), c3.InputDistance(n_reference=3, max_neurons=30, scan_fn=autograd_scan,
                                                                           li_fn=autograd_learned_images), ["4", "7"],
         lambda r: [r["4"].own, r["4"].unrelated, r["7"].unrelated]),
        (c3.FeatureMapCorrelation(), c3.FeatureMapCorrelation(filter_fn=autograd_filter_images), ["1", "2", "4"],
         lambda r: [r[l].value for l in ("1", "2", "4")]),
        (c3.Top2IoU(), c3.Top2IoU(li_fn=autograd_learned_images), ["1", "4"], lambda r: [r[l].value for l in ("1", "4")]),
    ]
    for eng, ora, layers, get in eng_oracle:
        np.testing.assert_allclose(get(eng.fit(model, data, layers).result_), get(ora.fit(model, data, layers).result_), rtol=1e-9)
    a = c3.WinnerDistance().fit(model, data).result_
    b = c3.WinnerDistance(scan_fn=autograd_scan).fit(model, data).result_
    np.testing.assert_allclose(a.dist.numpy(), b.dist.numpy(), rtol=1e-10)
