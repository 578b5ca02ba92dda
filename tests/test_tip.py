"""Tests of nns_cuda.tip (docs/spec.md §4, thesis Chapter 5) and its thesis comparison (thesis.chapter5).

Every quantity is compared with an implementation that shares no code with the one under test:
numpy for the properties, plain autograd for the filter images, python sets for the filter
types, per-weight deep-copied models for SoU, the textbook Spearman formula (eq. 5-12), hand-built
models whose accuracy under masking is known in closed form for AIPC.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from nns_cuda.analysis import tip
from nns_cuda.analysis.thesis import chapter5
from nns_cuda.analysis.masking import mask_filters
from nns_cuda.engine.oracle import autograd_filter_images

BUILTINS = ["mean", "variance", "covariance", "correlation"]


# --------------------------------------------------------------------------------------------
# independent oracles
# --------------------------------------------------------------------------------------------
def np_properties(L, x, mask=None):
    """numpy, per sample and filter, on the selected entries (mask broadcast over D)."""
    L, x = np.asarray(L, dtype=np.float64), np.asarray(x, dtype=np.float64)
    B, C = L.shape[:2]
    out = {n: np.zeros((B, C)) for n in BUILTINS}
    for b in range(B):
        sel = np.ones(x[b].shape, bool) if mask is None else np.broadcast_to(np.asarray(mask[b]), x[b].shape)
        xs = x[b][sel]
        for c in range(C):
            ls = L[b, c][sel]
            out["mean"][b, c] = np.mean(ls)
            out["variance"][b, c] = np.var(ls)
            out["covariance"][b, c] = np.cov(ls, xs, bias=True)[0, 1]
            out["correlation"][b, c] = 0.0 if (np.std(ls) == 0 or np.std(xs) == 0) else np.corrcoef(ls, xs)[0, 1]
    return out


def direct_accuracy(model, data, masked=None, layer=None):
    """Accuracy (%) with mask_filters and a hand loop."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y, *_ in data:
            if masked is not None:
                with mask_filters(model, {layer: list(masked)}):
                    p = model(x).argmax(1)
            else:
                p = model(x).argmax(1)
            correct += int((p == y).sum())
            total += len(y)
    return 100.0 * correct / total


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


def conv_net(seed=0, dtype=torch.float64, classes=3):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes),
    ).to(dtype)
    return m.eval()


def make_data(n_batches=3, b=5, d=2, hw=8, seed=1, dtype=torch.float64, classes=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(b, d, hw, hw, generator=g, dtype=dtype)
        y = torch.randint(0, classes, (b,), generator=g)
        m = torch.zeros(b, hw, hw, dtype=torch.bool)
        for i in range(b):  # a random box per sample
            y0, x0 = torch.randint(0, hw // 2, (2,), generator=g).tolist()
            m[i, y0:y0 + hw // 2, x0:x0 + hw // 2] = True
        out.append((x, y, m))
    return out


def rand_inputs(B=3, C=4, D=2, H=5, W=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, C, D, H, W, generator=g, dtype=dtype)
    x = torch.randn(B, D, H, W, generator=g, dtype=dtype)
    mask = torch.rand(B, H, W, generator=g) > 0.5
    mask[:, 0, 0] = True  # never empty
    return L, x, mask


# --------------------------------------------------------------------------------------------
# 1. properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_property_vs_numpy(name, masked):
    L, x, mask = rand_inputs()
    m = mask if masked else None
    got = tip.properties(L, x, [name], m)[name]
    want = np_properties(L.numpy(), x.numpy(), None if m is None else m.numpy())[name]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    # the registered function alone gives the same (not only the fused path)
    np.testing.assert_allclose(tip.get_property(name)(L, x, m).numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_property_float32_offset_data(name):
    """float32 with a large offset: naive E[L²] − E[L]² would lose every digit; two-pass must not."""
    L, x, mask = rand_inputs(seed=3)
    L, x = (L + 1000.0).float(), (x * 0.01 + 50.0).float()
    got = tip.properties(L, x, name, mask)[name].double().numpy()
    want = np_properties(L.double().numpy(), x.double().numpy(), mask.numpy())[name]
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * scale)


def test_correlation_is_zero_when_a_sigma_is_zero():
    L, x, _ = rand_inputs(dtype=torch.float32)
    L[:, 0] = 3.7  # constant filter image
    L[:, 1] = 0.0  # inactive filter
    x[2] = -1.25  # constant input sample
    P = tip.properties(L, x)
    assert torch.all(P["correlation"][:, :2] == 0)
    assert torch.all(P["correlation"][2] == 0)
    assert torch.all(P["variance"][:, :2] <= 1e-10)
    assert torch.all(P["correlation"][:2, 2:].abs() > 0)  # the others are genuine correlations
    assert torch.all(P["correlation"].abs() <= 1)


@pytest.fixture
def user_properties():
    """Two user properties: one in the registry's style, one with a mask-aware max."""

    def l1(L, x, mask):
        w = torch.ones_like(x) if mask is None else mask.unsqueeze(1).expand_as(x).to(L.dtype)
        return (L.abs() * w.unsqueeze(1)).flatten(2).sum(2) / w.flatten(1).sum(1, keepdim=True)

    def peak(L, x, mask):
        if mask is not None:
            L = L.masked_fill(~mask[:, None, None].expand_as(L), -math.inf)
        return L.flatten(2).amax(2)

    tip.register_property("user_l1", l1)
    tip.register_property("user_peak", peak)
    yield ["user_l1", "user_peak"]
    tip.unregister_property("user_l1")
    tip.unregister_property("user_peak")


def check_property_invariants(name, L, x, mask):
    """Shape [B, C], finite, and computing on two halves of the batch equals the whole."""
    B, C = L.shape[:2]
    whole = tip.properties(L, x, name, mask)[name]
    assert whole.shape == (B, C), name
    assert torch.isfinite(whole).all(), name
    h = B // 2
    parts = [tip.properties(L[s], x[s], name, None if mask is None else mask[s])[name]
             for s in (slice(0, h), slice(h, B))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"property {name!r} is not batch-split invariant: {m}")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("name", BUILTINS + ["user_l1", "user_peak"])
def test_every_registered_property_invariants(name, masked, user_properties):
    L, x, mask = rand_inputs(B=6, seed=5)
    assert set(BUILTINS + user_properties) <= set(tip.list_properties())
    check_property_invariants(name, L, x, mask if masked else None)


def test_every_registered_property_is_covered(user_properties):
    """All registered properties (also ones other code registers) pass the invariants."""
    L, x, mask = rand_inputs(B=4, seed=6)
    for name in tip.list_properties():
        check_property_invariants(name, L, x, mask)


def test_invariance_check_catches_batch_dependent_property():
    """The batch-split check can fail: a property using batch statistics is caught."""
    tip.register_property("bad_batchnorm", lambda L, x, m: L.flatten(2).mean(2) - L.mean())
    try:
        L, x, _ = rand_inputs(B=6)
        with pytest.raises(AssertionError, match="bad_batchnorm"):
            check_property_invariants("bad_batchnorm", L, x, None)
    finally:
        tip.unregister_property("bad_batchnorm")


def test_user_property_values_and_names_none(user_properties):
    L, x, mask = rand_inputs()
    P = tip.properties(L, x, None, mask)
    assert list(P) == tip.list_properties()
    w = np.broadcast_to(mask.numpy()[:, None, None], L.shape)
    want = np.where(w, np.abs(L.numpy()), 0).reshape(3, 4, -1).sum(2) / w.reshape(3, 4, -1).sum(2)
    np.testing.assert_allclose(P["user_l1"].numpy(), want, rtol=1e-12)


def test_unknown_property_lists_registered_names():
    with pytest.raises(KeyError) as e:
        tip.get_property("meen")
    for n in BUILTINS:
        assert n in str(e.value)
    L, x, _ = rand_inputs()
    with pytest.raises(KeyError, match="registered"):
        tip.properties(L, x, ["mean", "nope"])
    ip = tip.InterpretableProperties(names="meen")  # the estimator validates in fit
    with pytest.raises(KeyError, match="meen"):
        ip.fit(conv_net(), make_data(n_batches=1), "1", filter_fn=autograd_filter_images)


def test_register_property_rules():
    with pytest.raises(ValueError, match="already registered"):
        tip.register_property("mean", lambda L, x, m: L.mean((2, 3, 4)))
    with pytest.raises(TypeError):
        tip.register_property("", lambda L, x, m: None)
    with pytest.raises(TypeError):
        tip.register_property("notfn", 3)
    # overwrite=True replaces, and the built-in can be put back
    tip.register_property("mean", lambda L, x, m: torch.zeros(L.shape[:2], dtype=L.dtype), overwrite=True)
    try:
        L, x, _ = rand_inputs()
        assert torch.all(tip.properties(L, x, "mean")["mean"] == 0)
    finally:
        tip.register_property("mean", tip.BUILTIN_PROPERTIES["mean"], overwrite=True)
    assert tip.get_property("mean") is tip.BUILTIN_PROPERTIES["mean"]


def test_wrong_shape_and_nonfinite_property_are_named():
    tip.register_property("flat_bad", lambda L, x, m: L.flatten(1).mean(1))
    tip.register_property("nan_bad", lambda L, x, m: torch.full(L.shape[:2], float("nan"), dtype=L.dtype))
    try:
        L, x, _ = rand_inputs()
        with pytest.raises(ValueError, match=r"'flat_bad' returned \[3\], expected \[B, C\] = \[3, 4\]"):
            tip.properties(L, x, ["mean", "flat_bad"])
        with pytest.raises(ValueError, match="'nan_bad'.*NaN"):
            tip.properties(L, x, "nan_bad")
    finally:
        tip.unregister_property("flat_bad")
        tip.unregister_property("nan_bad")


def test_properties_bad_inputs():
    L, x, mask = rand_inputs()
    with pytest.raises(TypeError, match="bool"):
        tip.properties(L, x, "mean", mask.float())
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        tip.properties(L, x, "mean", mask[:, :-1])
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"no entry for sample\(s\) \[1\]"):
        tip.properties(L, x, "mean", empty)
    with pytest.raises(ValueError, match="do not match"):
        tip.properties(L[:, :, :1], x, "mean")
    with pytest.raises(ValueError, match=r"\[B, C, D, H, W\]"):
        tip.properties(L[0], x, "mean")
    bad = L.clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tip.properties(bad, x, "mean")


# --------------------------------------------------------------------------------------------
# 2. T over a data set
# --------------------------------------------------------------------------------------------
def test_fit_streams_T_all_fg_bg_vs_direct():
    model = conv_net()
    data = make_data()
    data[1][2][3] = True  # sample with an empty background: left out of T_b, counted
    with pytest.warns(RuntimeWarning, match="empty background"):
        ip = tip.InterpretableProperties(region=["all", "foreground", "background"]).fit(
            model, data, ["1", "4"], filter_fn=autograd_filter_images)
    X = torch.cat([d[0] for d in data])
    M = torch.cat([d[2] for d in data])
    for layer in ["1", "4"]:
        L = autograd_filter_images(model, X, layer).numpy()
        keep_b = (~M).flatten(1).any(1).numpy()
        want = {
            "all": {n: v.mean(0) for n, v in np_properties(L, X.numpy()).items()},
            "foreground": {n: v.mean(0) for n, v in np_properties(L, X.numpy(), M.numpy()).items()},
            "background": {n: v.mean(0) for n, v in np_properties(L[keep_b], X.numpy()[keep_b],
                                                                   (~M).numpy()[keep_b]).items()},
        }
        for r in want:
            for n in BUILTINS:
                np.testing.assert_allclose(ip.T(layer, n, r).numpy(), want[r][n], rtol=1e-9, atol=1e-12,
                                           err_msg=f"{layer} {r} {n}")
        assert ip.n_samples_[layer] == {"all": 15, "foreground": 15, "background": 14}
        assert ip.n_empty_[layer]["background"] == 1
    json.dumps(ip.to_dict(), allow_nan=False)


def test_fit_default_uses_engine_filter_images():
    model = conv_net(dtype=torch.float32)
    data = make_data(n_batches=2, dtype=torch.float32)
    a = tip.InterpretableProperties().fit(model, data, "4")
    b = tip.InterpretableProperties().fit(model, data, "4", filter_fn=autograd_filter_images)
    for n in BUILTINS:
        torch.testing.assert_close(a.T("4", n), b.T("4", n), rtol=1e-4, atol=1e-6)


def test_fit_bad_input():
    model = conv_net()
    data = make_data(n_batches=1)
    with pytest.raises(ValueError, match="fg_mask"):
        tip.InterpretableProperties(region="foreground").fit(model, [d[:2] for d in data], "1",
                                                             filter_fn=autograd_filter_images)
    with pytest.raises(ValueError, match="unknown region"):
        tip.InterpretableProperties(region="middle").fit(model, data, "1", filter_fn=autograd_filter_images)
    with pytest.raises(KeyError, match="unknown layer name"):
        tip.InterpretableProperties().fit(model, data, "features.99", filter_fn=autograd_filter_images)
    with pytest.raises(ValueError, match="no channels"):
        tip.InterpretableProperties().fit(model, data, "7", filter_fn=autograd_filter_images)


def test_interpretable_properties_estimator_contract():
    """__init__ stores its parameters unchanged; fit validates, sets trailing-underscore results, returns self."""
    names, region = ("mean", "variance"), ["foreground", "all"]
    ip = tip.InterpretableProperties(names, region, filter_fn=autograd_filter_images)
    assert ip.names is names and ip.region is region and ip.filter_fn is autograd_filter_images
    assert not [k for k in vars(ip) if k.endswith("_")]
    tip.InterpretableProperties(names="nope", region="nowhere")  # nothing is validated before fit
    with pytest.raises(RuntimeError, match="fit"):
        tip.InterpretableProperties().to_dict()
    model, data = conv_net(), make_data(n_batches=1)
    assert ip.fit(model, data, "1") is ip
    assert ip.names is names and ip.region is region
    assert ip.names_ == ["mean", "variance"] and ip.regions_ == ["foreground", "all"]
    assert ip.channels_ == {"1": 4}
    torch.testing.assert_close(ip.T("1", "mean"), ip.T("1", "mean", "foreground"))  # first fitted region
    d = ip.to_dict()
    assert d["names"] == ["mean", "variance"] and d["regions"] == ["foreground", "all"]
    json.dumps(d, allow_nan=False)


# --------------------------------------------------------------------------------------------
# 3. AIPC
# --------------------------------------------------------------------------------------------
def two_filter_model(K=10, important=(2, 5)):
    """Logits = [mean a_i0, mean a_i1, 0.5]: only filters i0, i1 of the ReLU output matter."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, K, 1)
    lin = nn.Linear(K, 3)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.zero_()
        conv.weight[important[0]] = torch.tensor([1.0, 0.0]).view(2, 1, 1)
        conv.weight[important[1]] = torch.tensor([0.0, 1.0]).view(2, 1, 1)
        lin.weight.zero_()
        lin.weight[0, important[0]] = 1.0
        lin.weight[1, important[1]] = 1.0
        lin.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin).eval()


def two_filter_data(n=4):
    x = torch.zeros(3 * n, 2, 4, 4)
    x[:n, 0] = 1.0  # class 0: only filter i0 responds
    x[n:2 * n, 1] = 1.0  # class 1: only filter i1
    y = torch.arange(3).repeat_interleave(n)  # class 2: all-zero input
    perm = torch.randperm(3 * n, generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def ceil_frac(r, K):
    return math.ceil(Fraction(str(r)) * K)


@pytest.mark.parametrize("vectorize", [True, False])
def test_aipc_drops_exactly_when_the_known_filters_are_masked(vectorize):
    K = 10
    model, data = two_filter_model(K), two_filter_data()
    assert direct_accuracy(model, data) == 100.0
    # ranking: filter 5 is 4th, filter 2 is 7th
    order = [0, 1, 3, 5, 4, 6, 2, 7, 8, 9]
    scores = torch.empty(K)
    scores[order] = torch.arange(K, 0, -1, dtype=torch.float32)
    before = copy.deepcopy(model.state_dict())
    res = tip.aipc(model, data, "1", scores, vectorize=vectorize)  # default ratios 0, 1, …, 100 %
    assert res.ratios == pytest.approx([i / 100 for i in range(101)])
    assert res.order == order
    n = [ceil_frac(i / 100, K) for i in range(101)]
    assert res.n_masked == n
    want = [0.0 if k < 4 else (100 / 3 if k < 7 else 200 / 3) for k in n]
    np.testing.assert_allclose(res.drop, want, atol=1e-9)
    rp = np.arange(101.0)
    np.testing.assert_allclose(res.area, np.trapezoid(want, rp), rtol=1e-12)
    assert res.area_top10 == 0.0  # ⌈0.1·10⌉ = 1 filter: nothing important masked yet
    np.testing.assert_allclose(res.area_up_to(0.35), np.trapezoid(want[:36], rp[:36]), rtol=1e-12)
    assert no_hooks(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    json.dumps(res.to_dict(), allow_nan=False)


def test_aipc_area_interpolates_at_r_max():
    """Area on [0, 10 %] with ratios that skip 10 %: y is interpolated linearly at r = 10 %."""
    K = 10
    model, data = two_filter_model(K, important=(0, 1)), two_filter_data()
    scores = -torch.arange(K, dtype=torch.float32)  # order 0, 1, 2, …
    res = tip.aipc(model, data, "1", scores, ratios=[0.0, 0.05, 0.2, 1.0])
    assert res.n_masked == [0, 1, 2, 10]
    np.testing.assert_allclose(res.drop, [0, 100 / 3, 200 / 3, 200 / 3], atol=1e-9)
    y10 = 100 / 3 + (200 / 3 - 100 / 3) * (10 - 5) / (20 - 5)
    np.testing.assert_allclose(res.area_top10, 0.5 * 5 * 100 / 3 + 0.5 * (100 / 3 + y10) * 5, rtol=1e-12)


def test_aipc_ceil_without_float_artefacts():
    K = 100
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, K, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(K, 2)).eval()
    data = [(torch.randn(4, 1, 3, 3), torch.randint(0, 2, (4,)))]
    ratios = [0.07, 0.14, 0.29, 0.57, 0.58, 0.999]
    scores = torch.randint(0, 5, (K,), generator=torch.Generator().manual_seed(1)).float()  # many ties
    res = tip.aipc(model, data, "1", scores, ratios)
    assert res.n_masked == [ceil_frac(r, K) for r in ratios] == [7, 14, 29, 57, 58, 100]
    assert res.order == sorted(range(K), key=lambda i: (-float(scores[i]), i))  # ties: lower index first


def residual_model():
    """The masked layer sits inside a skip connection: a replicated batch cannot be added to x."""

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.relu = nn.ReLU()
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))

        def forward(self, x):
            return self.head(self.relu(self.conv(x)) + x)

    torch.manual_seed(2)
    return Res().eval()


@pytest.mark.parametrize("kind", ["sequential", "residual"])
def test_aipc_matches_mask_filters_loop(kind):
    if kind == "sequential":
        model, layer = conv_net(classes=4), "1"
        data = [(x, y % 4) for x, y, _ in make_data(n_batches=2, b=12, classes=4)]
        K = 4
    else:
        model, layer, K = residual_model(), "relu", 3
        g = torch.Generator().manual_seed(3)
        data = [(torch.randn(7, 3, 6, 6, generator=g), torch.randint(0, 4, (7,), generator=g)) for _ in range(2)]
    scores = torch.randn(K, generator=torch.Generator().manual_seed(4))
    ratios = [0.0, 0.3, 0.6, 1.0]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = tip.aipc(model, data, layer, scores, ratios)
    fell_back = any("replicated batch" in str(m.message) for m in w)
    assert fell_back == (kind == "residual")
    order = sorted(range(K), key=lambda i: (-float(scores[i]), i))
    base = direct_accuracy(model, data)
    for r, d in zip(ratios, res.drop):
        top = order[:ceil_frac(r, K)]
        assert d == pytest.approx(base - direct_accuracy(model, data, top, layer), abs=1e-9)
    assert no_hooks(model)


def test_aipc_curves_share_evaluations_and_agree_with_aipc():
    model, data = conv_net(classes=3), make_data(n_batches=1, b=10)
    rk = {"a": torch.tensor([3.0, 2, 1, 0, -1, -2]), "b": torch.tensor([0.0, 1, 2, 3, 4, 5])}
    cur = tip.aipc_curves(model, data, "4", rk, [0, 0.5, 1])
    for n, sc in rk.items():
        one = tip.aipc(model, data, "4", sc, [0, 0.5, 1])
        assert cur[n].drop == pytest.approx(one.drop)
    assert cur["a"].drop[-1] == cur["b"].drop[-1]  # all masked: the same


@pytest.mark.parametrize("bad", [[-0.1, 0.5], [0.0, 1.5], [50.0], [float("nan")], []])
def test_aipc_rejects_ratios_outside_unit_interval(bad):
    model, data = two_filter_model(), two_filter_data()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tip.aipc(model, data, "1", torch.arange(10.0), bad)


def test_aipc_bad_input():
    model, data = two_filter_model(), two_filter_data()
    with pytest.raises(ValueError, match="0.5"):  # percent given: hint
        tip.aipc(model, data, "1", torch.arange(10.0), [0, 50])
    with pytest.raises(ValueError, match="no channels"):
        tip.aipc(model, data, "3", torch.arange(10.0), [0, 1])  # Flatten output [B, K]
    with pytest.raises(ValueError, match="no channels"):
        tip.aipc(model, data, "4", torch.arange(3.0), [0, 1])  # Linear output [B, 3]
    with pytest.raises(KeyError, match="unknown layer"):
        tip.aipc(model, data, "conv9", torch.arange(10.0), [0, 1])
    with pytest.raises(ValueError, match="has 3 scores but layer '1' has 10 filters"):
        tip.aipc(model, data, "1", torch.arange(3.0), [0, 1])
    with pytest.raises(TypeError, match="one-shot"):
        tip.aipc(model, iter(data), "1", torch.arange(10.0), [0, 1])
    assert no_hooks(model)


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))

    def forward(self, x):
        return self.head(self.relu(self.conv2(self.relu(self.conv1(x)))))


def test_module_called_twice_is_addressed_per_call():
    model = SharedReLU().double().eval()
    data = [(x, y) for x, y, _ in make_data(n_batches=2, b=10)]
    with pytest.raises(ValueError, match=r"\['relu:0', 'relu:1'\]"):
        tip.avou(model, data, "relu")
    got = tip.avou(model, data, "relu:1")
    with torch.no_grad():
        a = torch.cat([F.relu(model.conv2(F.relu(model.conv1(x)))) for x, _ in data])
    torch.testing.assert_close(got, a.mean((0, 2, 3)), rtol=1e-12, atol=1e-14)
    scores = torch.tensor([0.5, 3.0, -1.0, 2.0, 1.0])
    res = tip.aipc(model, data, "relu:1", scores, [0, 0.2, 0.6, 1])
    order = [1, 3, 4, 0, 2]
    base = direct_accuracy(model, data)
    for r, d in zip(res.ratios, res.drop):
        top = order[:ceil_frac(r, 5)]
        assert d == pytest.approx(base - direct_accuracy(model, data, top, "relu:1"), abs=1e-9)
    torch.testing.assert_close(tip.sou(model, data, "relu:1", "exact", chunk_size=64),
                               tip.sou(model, data, "conv2", "exact", chunk_size=64))


# --------------------------------------------------------------------------------------------
# 4. saliency
# --------------------------------------------------------------------------------------------
def tiny_sou_model(K=3, seed=0, reflect=False):
    torch.manual_seed(seed)
    conv = nn.Conv2d(1, K, 3, padding=1, padding_mode="reflect") if reflect else nn.Conv2d(1, K, 3)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(K * (25 if reflect else 9), 3)).double().eval()


def tiny_sou_data(seed=1, n=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g))
            for b in n]


def brute_force_sou(model, data, conv_idx=0):
    """Eq. 5-9/5-10 literally: a deep copy of the model per zeroed weight."""
    W = model[conv_idx].weight
    K, per = W.shape[0], W[0].numel()
    X = torch.cat([d[0] for d in data])
    Y = torch.cat([d[1] for d in data])
    with torch.no_grad():
        base = F.cross_entropy(model(X), Y, reduction="none")
        out = torch.zeros(K, dtype=torch.float64)
        for k in range(K):
            for j in range(per):
                m2 = copy.deepcopy(model)
                m2[conv_idx].weight[k].view(-1)[j] = 0.0
                out[k] += (F.cross_entropy(m2(X), Y, reduction="none") - base).abs().mean()
    return out / per


def brute_force_taylor(model, data, conv_idx=0):
    """mean over samples and weights of |w · ∂loss_i/∂w|, one backward per sample."""
    W = model[conv_idx].weight
    K = W.shape[0]
    acc, S = torch.zeros(K, dtype=torch.float64), 0
    for x, y in data:
        for i in range(len(y)):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            acc += (W * W.grad).abs().detach().flatten(1).mean(1)
            S += 1
    model.zero_grad()
    return acc / S


@pytest.mark.parametrize("layer,weight_layer", [("1", None), ("0", None), ("1", "0")])
def test_sou_exact_vs_brute_force(layer, weight_layer):
    model, data = tiny_sou_model(), tiny_sou_data()
    want = brute_force_sou(model, data)
    got = tip.sou(model, data, layer, "exact", weight_layer=weight_layer, chunk_size=4)  # chunks straddle filters
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


class _ItemNet(nn.Sequential):
    """A forward with .item(): torch.func.vmap cannot run it, so exact SoU takes its loop path."""

    def forward(self, x):
        h = self[0](x)  # depends on the perturbed (vmapped) weight
        if h.abs().sum().item() < 0:  # never true
            h = -h
        for m in list(self)[1:]:
            h = m(h)
        return h


def test_sou_exact_without_vmap_vs_brute_force():
    torch.manual_seed(0)
    model = _ItemNet(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).double().eval()
    data = tiny_sou_data(n=(3,))
    torch.testing.assert_close(tip.sou(model, data, "1", "exact", chunk_size=5), brute_force_sou(model, data),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reflect", [False, True])  # unfold path / torch.func.vmap(grad) path
def test_sou_taylor_vs_per_sample_autograd(reflect):
    model, data = tiny_sou_model(reflect=reflect), tiny_sou_data()
    want = brute_force_taylor(model, data)
    got = tip.sou(model, data, "1", chunk_size=3)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not got.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_per_sample_linear_weight_grads_vs_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    from nns_cuda.analysis.saliency import _ce, _per_sample_weight_grads
    got = _per_sample_weight_grads(model, model[0], x, y, _ce)
    for i in range(6):
        (g,) = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), model[0].weight)
        torch.testing.assert_close(got[i], g, rtol=1e-10, atol=1e-12)


def test_sou_taylor_ranks_like_exact():
    model = tiny_sou_model(K=12, seed=3)
    data = tiny_sou_data(seed=4, n=(8, 8))
    ex = tip.sou(model, data, "1", "exact", chunk_size=64).numpy()
    ta = tip.sou(model, data, "1", "taylor").numpy()
    rho = float(np.corrcoef(np.argsort(np.argsort(ex)), np.argsort(np.argsort(ta)))[0, 1])
    assert rho > 0.8, f"Spearman rho(taylor, exact) = {rho:.3f} over {len(ex)} filters"


def test_sou_bad_input():
    model, data = tiny_sou_model(), tiny_sou_data()
    with pytest.raises(ValueError, match="method"):
        tip.sou(model, data, "1", "second-order")
    with pytest.raises(ValueError, match="weight_layer"):
        tip.sou(model, data, "1", weight_layer="1")  # a ReLU has no weight[k]
    with pytest.raises(ValueError, match="no channels"):
        tip.sou(model, data, "2")


def test_avou_vs_direct():
    model, data = conv_net(), make_data()
    got = tip.avou(model, data, "4")
    with torch.no_grad():
        a = torch.cat([model[:5](x) for x, _, _ in data])
    torch.testing.assert_close(got, a.mean((0, 2, 3)), rtol=1e-12, atol=1e-14)
    assert no_hooks(model)


def eq_5_12(a, b):
    """ρ = 1 − 6 Σ d² / (K (K² − 1)) for untied data."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    K = len(a)
    return 1 - 6 * np.sum((ra - rb) ** 2) / (K * (K * K - 1))


def test_spearman_table_vs_eq_5_12():
    g = np.random.default_rng(0)
    sal = {"AVoU": g.normal(size=20), "SoU": g.normal(size=20)}
    props = {"mean": g.normal(size=20), "variance": torch.tensor(g.normal(size=20))}
    tab = tip.spearman_table(sal, props)
    for s in sal:
        for p in props:
            assert tab[s][p] == pytest.approx(eq_5_12(sal[s], np.asarray(props[p])), abs=1e-12)
    assert tip.spearman_table({"a": np.ones(5)}, {"m": np.arange(5.0)})["a"]["m"] is None
    with pytest.raises(ValueError, match="filters"):
        tip.spearman_table({"a": np.ones(5)}, {"m": np.arange(4.0)})


def test_saliency_result_json_and_consistency():
    model, data = conv_net(), make_data()
    T = {n: torch.randn(6, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(BUILTINS)}
    res = tip.saliency(model, data, "4", T)
    assert res.spearman["AVoU"]["mean"] == pytest.approx(eq_5_12(np.array(res.avou), T["mean"].numpy()))
    json.dumps(res.to_dict(), allow_nan=False)


# --------------------------------------------------------------------------------------------
# 5. foreground / background types
# --------------------------------------------------------------------------------------------
def direct_types(f, b, per):
    K = len(f)
    n = math.ceil(Fraction(str(per)) * K / 100)
    desc = lambda t: sorted(range(K), key=lambda i: (-t[i], i))[:n]  # noqa: E731
    asc = lambda t: sorted(range(K), key=lambda i: (t[i], i))[:n]  # noqa: E731
    hf, hb, lf, lb = set(desc(f)), set(desc(b)), set(asc(f)), set(asc(b))
    return {"H-H": hf & hb, "H-noH": hf - hb, "noH-H": hb - hf, "L-L": lf & lb, "L-noL": lf - lb, "noL-L": lb - lf}


@pytest.mark.parametrize("K,per,ties", [(7, 30, False), (10, 30, False), (23, 10, False), (40, 50, True),
                                        (16, 25, True), (5, 100, False)])
def test_filter_types_vs_python_sets(K, per, ties):
    g = np.random.default_rng(K + per)
    f = g.integers(0, 4, K).astype(float) if ties else g.normal(size=K)
    b = g.integers(0, 4, K).astype(float) if ties else 0.5 * f + g.normal(size=K)
    got = tip.filter_types(torch.tensor(f), b.tolist(), per)
    want = direct_types(f.tolist(), b.tolist(), per)
    assert list(got) == list(tip.FILTER_TYPES)
    for t in tip.FILTER_TYPES:
        assert set(got[t]) == want[t], t
        assert got[t] == sorted(got[t])


def test_filter_types_bad_input():
    with pytest.raises(ValueError, match="per"):
        tip.filter_types([1.0, 2.0], [1.0, 2.0], 0)
    with pytest.raises(ValueError, match="same K"):
        tip.filter_types([1.0, 2.0], [1.0], 30)


def test_fg_bg_types_over_checkpoints(tmp_path):
    model = conv_net(seed=0)
    data = make_data(n_batches=2, b=8)
    original = copy.deepcopy(model.state_dict())
    ck1 = conv_net(seed=11).state_dict()
    path = tmp_path / "phase2.pt"
    torch.save({"state_dict": conv_net(seed=12).state_dict()}, path)
    model.train()
    res = tip.fg_bg_types(model, data, "4", {"phase1": ck1, "phase2": str(path)}, property="variance",
                          per=30, filter_fn=autograd_filter_images)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert no_hooks(model)
    assert res.checkpoints == ["phase1", "phase2"]
    X, M = torch.cat([d[0] for d in data]), torch.cat([d[2] for d in data])
    for i, sd in enumerate([ck1, torch.load(path)["state_dict"]]):
        ref = conv_net()
        ref.load_state_dict(sd)
        L = autograd_filter_images(ref, X, "4").numpy()
        tf = np_properties(L, X.numpy(), M.numpy())["variance"].mean(0)
        tb = np_properties(L, X.numpy(), (~M).numpy())["variance"].mean(0)
        np.testing.assert_allclose(res.T_f[i], tf, rtol=1e-9)
        np.testing.assert_allclose(res.T_b[i], tb, rtol=1e-9)
        want = direct_types(tf.tolist(), tb.tolist(), 30)
        base = direct_accuracy(ref, data)
        assert res.base_accuracy[i] == pytest.approx(base)
        for t in tip.FILTER_TYPES:
            assert set(res.types[i][t]) == want[t]
            assert res.share[i][t] == pytest.approx(len(want[t]) / 6)
            acc = direct_accuracy(ref, data, sorted(want[t]), "4") if want[t] else base
            assert res.accuracy_drop[i][t] == pytest.approx(base - acc, abs=1e-9)
    json.dumps(res.to_dict(), allow_nan=False)


def test_mismatched_checkpoints_name_the_key(tmp_path):
    model, data = conv_net(), make_data(n_batches=1)
    sd = conv_net(seed=5).state_dict()
    missing = {k: v for k, v in sd.items() if k != "3.bias"}
    extra = dict(sd, **{"9.weight": torch.zeros(1)})
    shape = dict(sd, **{"0.weight": torch.zeros(5, 2, 3, 3, dtype=torch.float64)})
    for bad, pat in [(missing, "'3.bias' is missing"), (extra, "unexpected key '9.weight'"),
                     (shape, r"'0.weight' has shape \[5, 2, 3, 3\]")]:
        with pytest.raises(ValueError, match=pat):
            tip.fg_bg_types(model, data, "4", [sd, bad], filter_fn=autograd_filter_images)
    p = tmp_path / "other.pt"
    torch.save(tiny_sou_model().state_dict(), p)
    with pytest.raises(ValueError, match="other.pt does not match the model: key '0.weight'"):
        tip.load_checkpoint(model, p)
    with pytest.raises(FileNotFoundError):
        tip.load_checkpoint(model, tmp_path / "nope.pt")


# --------------------------------------------------------------------------------------------
# 6. model unchanged, hooks removed
# --------------------------------------------------------------------------------------------
def test_analyses_leave_model_unchanged_even_on_error():
    model, data = conv_net(), make_data(n_batches=2)
    model.train()
    flags = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    tip.InterpretableProperties().fit(model, data, "4", filter_fn=autograd_filter_images)
    tip.aipc(model, data, "4", torch.arange(6.0), [0, 0.5, 1])
    tip.aipc(model, data, "4", torch.arange(6.0), [0, 0.5, 1], vectorize=False)
    tip.avou(model, data, "4")
    tip.sou(model, data, "4", "exact", chunk_size=200)
    tip.sou(model, data, "4")
    tip.fg_bg_types(model, data, "4", [conv_net(seed=9).state_dict()], filter_fn=autograd_filter_images)
    bad = data + [(torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long))]  # wrong D
    for fn in (lambda: tip.aipc(model, bad, "4", torch.arange(6.0), [0, 1]),
               lambda: tip.aipc(model, bad, "4", torch.arange(6.0), [0, 1], vectorize=False),
               lambda: tip.avou(model, bad, "4")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError):
                fn()
    assert no_hooks(model)
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------
# 7. findings (thesis Chapter 5)
# --------------------------------------------------------------------------------------------
def test_findings_measured_next_to_thesis():
    model, data = conv_net(), make_data(n_batches=2)
    out = chapter5.findings(model, data, "4", filter_fn=autograd_filter_images)
    json.dumps(out, allow_nan=False)
    X = torch.cat([d[0] for d in data])
    L = autograd_filter_images(model, X, "4").numpy()
    tm = np_properties(L, X.numpy())["mean"].mean(0)
    with torch.no_grad():
        av = model[:5](X).mean((0, 2, 3)).numpy()
    assert out["measured"]["spearman_AVoU_T_m"] == pytest.approx(eq_5_12(av, tm), abs=1e-12)
    assert out["thesis"]["spearman_AVoU_T_m"]["VGG-16"] == [0.98, 0.98, 0.97]
    assert out["thesis"]["table_5_3_accuracy_change"]["H-H"] == [17.4, 22.0, 26.0]
    hh = out["measured"]["accuracy_drop_masking_HH_vs_LL"][0]
    assert set(hh) >= {"H-H", "L-L", "share_H-H", "share_L-L", "checkpoint"}

