"""Oracle tests of the engine (docs/spec.md §1 identities) on a list of test models.

Oracles share no code with the engine: plain torch.autograd on the real model through module
hooks (tests/_oracle.py), Captum's NeuronGradient, and a hook-built frozen network with biases.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nns_cuda as nns
from nns_cuda.ops.reference.stats import li_stats_dense

from _models import CONCAT_LEAVES, ConcatNet, make, randomize_bn
from _oracle import FrozenRecorder, autograd_li, no_inplace, rel_err

MODELS = ["fcn", "simple_cnn", "lenet5", "small_vgg", "alexnet_like", "small_resnet", "concat_net"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
WORST = {}


def _leaf_layers(model):
    """(name, post) for every leaf module, post = the activation that directly follows it (docs/spec.md §1 g_n)."""
    out = []
    if isinstance(model, nn.Sequential):
        mods = list(model.named_children())
        for i, (n, m) in enumerate(mods):
            post = None
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            if isinstance(nxt, nn.ReLU):
                post = F.relu
            out.append((n, post))
        return out
    if isinstance(model, ConcatNet):
        return [(n, F.relu if p == "relu" else None) for n, p in CONCAT_LEAVES]
    # SmallResNet, written out by hand from its forward()
    lr = lambda o: F.leaky_relu(o, 0.1)  # noqa: E731
    return [("conv1", None), ("bn1", F.relu), ("layer1.conv1", None), ("layer1.bn1", F.relu),
            ("layer1.conv2", None), ("layer1.bn2", None), ("layer2.conv1", None), ("layer2.bn1", F.relu),
            ("layer2.short.0", None), ("layer2.short.1", None), ("layer2.bn2", None),
            ("depthwise", lr), ("lrelu", None), ("pool", None), ("fc", None)]


_ORACLE_CACHE = {}


def _oracle(model, x, name, post):
    m = no_inplace(model)
    return autograd_li(m, x, name, 0, post)


def _oracles(model_name):
    """{layer: autograd learned images} for every leaf layer of a test model (cached)."""
    if model_name not in _ORACLE_CACHE:
        model, x = make(model_name)
        _ORACLE_CACHE[model_name] = {n: _oracle(model, x, n, post) for n, post in _leaf_layers(model)}
    return _ORACLE_CACHE[model_name]


def _record(strategy, name, err):
    WORST[(strategy, name)] = max(WORST.get((strategy, name), 0.0), err)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("strategy", ["forward", "reverse"])
def test_learned_images_equal_autograd(model_name, strategy):
    model, x = make(model_name)
    names = [n for n, _ in _leaf_layers(model)]
    if strategy == "reverse" and model_name in ("lenet5", "alexnet_like", "small_vgg"):
        names = names[-4:]  # all-neuron VJPs are slow on big early layers; the rest is covered below
    res = nns.Scanner(model, names, strategy=strategy, backend="reference", keep_images=True, stats=False).scan(x)
    want_all = _oracles(model_name)
    for name in names:
        got, want = res[name].images, want_all[name]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        err = rel_err(got, want)
        _record(strategy, model_name, err)
        assert err <= 1e-10, f"{model_name}/{name} ({strategy}): relative error {err:.3e}"
        assert res[name].strategy == strategy


@pytest.mark.parametrize("model_name", ["simple_cnn", "small_resnet", "lenet5"])
def test_float32_forward_equals_float64_autograd(model_name):
    model, x = make(model_name)
    m32, x32 = model.float(), x.float()
    names = [n for n, _ in _leaf_layers(model)]
    res = nns.Scanner(m32, names, strategy="forward", backend="reference", keep_images=True, stats=False).scan(x32)
    for name in names:
        got, want = res[name].images, _oracles(model_name)[name]
        err = rel_err(got.double(), want)
        _record("forward-fp32", model_name, err)
        assert err <= 1e-5, f"{model_name}/{name}: float32 relative error {err:.3e}"


@pytest.mark.parametrize("model_name", ["simple_cnn", "small_resnet", "alexnet_like"])
def test_captum_neuron_gradient(model_name):
    captum = pytest.importorskip("captum.attr")
    model, x = make(model_name)
    m = no_inplace(model)
    # modules whose output holds a_n (docs/spec.md §1 identity 1): activations, pools, the final linear layer
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    relus = [n for n, mod in m.named_modules() if isinstance(mod, (nn.ReLU, nn.MaxPool2d))
             and n not in ("relu", "layer1.relu", "layer2.relu")] + linears[-1:]
    g = torch.Generator().manual_seed(1)
    for name in relus:
        mod = dict(m.named_modules())[name]
        a = nns.learned_images(m, x, name, strategy="forward", backend="reference")
        shape = a.shape[1:a.dim() - (x.dim() - 1)]
        for _ in range(3):
            idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in shape)
            sel = idx if len(idx) > 1 else idx[0]
            cg = captum.NeuronGradient(m, mod).attribute(x, neuron_selector=sel) * x
            got = a[(slice(None),) + idx]
            assert rel_err(got, cg) <= 1e-10 or float(cg.abs().max()) == float(got.abs().max()) == 0.0, (name, idx)


@pytest.mark.parametrize("model_name", MODELS)
def test_completeness(model_name):
    """Σ_t LI_n(t) = g_n (z_n − β_n), β from the frozen network with biases on the zero input."""
    model, x = make(model_name)
    m = no_inplace(model)
    fr = FrozenRecorder(m)
    fr.record(x)
    names = [n for n, _ in _leaf_layers(model)]
    res = nns.Scanner(model, names, strategy="forward", backend="auto", keep_images=True, stats=False).scan(x)
    for name, post in _leaf_layers(model):
        li = res[name].images
        z = fr.replay(x, name)
        beta = fr.replay(torch.zeros_like(x), name)
        gate = torch.ones_like(z) if post is None else (post(z) != 0).to(z.dtype) if post is F.relu else \
            torch.where(z > 0, torch.ones_like(z), torch.full_like(z, 0.1))
        s = li.flatten(li.dim() - (x.dim() - 1)).sum(-1)
        want = gate * (z - beta)
        assert rel_err(s, want) <= 1e-10, f"{model_name}/{name}: completeness error {rel_err(s, want):.3e}"


@pytest.mark.parametrize("model_name", ["simple_cnn", "small_resnet", "alexnet_like"])
@pytest.mark.parametrize("strategy", ["forward", "reverse"])
def test_filter_images_are_activation_weighted_sums(model_name, strategy):
    model, x = make(model_name)
    names = [n for n, _ in _leaf_layers(model)]
    res = nns.Scanner(model, names, backend="auto", strategy="forward", keep_images=True, stats=False).scan(x)
    fil = nns.Scanner(model, names, backend="reference", strategy=strategy, filter_images=True, stats=False).scan(x)
    for name in names:
        lr = res[name]
        if lr.activations.dim() != 4:
            continue
        L = fil[name].filter_images
        B, C = lr.activations.shape[:2]
        want = (lr.images * lr.activations.reshape(*lr.activations.shape, 1, 1, 1)).sum((2, 3))
        assert rel_err(L, want) <= 1e-10, f"{model_name}/{name}"
    # layer image = Σ_k L^k
    name = names[3]
    assert rel_err(nns.layer_image(model, x, name, backend="reference", strategy=strategy),
                   fil[name].filter_images.sum(1)) <= 1e-10


@pytest.mark.parametrize("model_name", ["simple_cnn", "small_resnet", "fcn"])
@pytest.mark.parametrize("strategy", ["forward", "reverse"])
def test_stats_equal_dense_statistics(model_name, strategy):
    model, x = make(model_name)
    B = x.shape[0]
    H, W = x.shape[-2:]
    fg = torch.zeros(B, H, W, dtype=torch.bool)
    fg[:, H // 4: 3 * H // 4, W // 3: W - 1] = True
    names = [n for n, _ in _leaf_layers(model)]
    res = nns.Scanner(model, names, backend="reference", strategy=strategy, stats=True).scan(x, fg)
    for n in names:
        dense = _oracles(model_name)[n]
        want = li_stats_dense(dense.reshape(B, -1, *x.shape[1:]), x, fg)
        got = res[n].stats.reshape(B, -1, want.shape[-1])
        assert rel_err(got, want) <= 1e-10, n
        assert res[n].strategy == strategy


def test_selected_neurons_and_dense_agree():
    model, x = make("small_resnet")
    full = nns.learned_images(model, x, "layer2", backend="reference", strategy="forward")
    sel = [(0, 0, 0), (3, 2, 5), (15, 5, 5)]
    for strategy in ("forward", "reverse"):
        part = nns.learned_images(model, x, "layer2", neurons=sel, backend="reference", strategy=strategy)
        for j, idx in enumerate(sel):
            assert rel_err(part[:, j], full[(slice(None),) + idx]) <= 1e-12


def test_block_and_call_addressing():
    """A block's name addresses its output; a reused module needs name:k (docs/spec.md §0)."""
    model, x = make("small_resnet")
    blk = nns.learned_images(model, x, "layer1", backend="reference")
    want = _oracle(model, x, "layer1", None)
    assert rel_err(blk, want) <= 1e-10
    with pytest.raises(KeyError, match=r"called 2 times.*layer1.relu:0"):
        nns.learned_images(model, x, "layer1.relu", backend="reference")
    a = nns.learned_images(model, x, "layer1.relu:1", backend="reference")
    assert rel_err(a, blk) <= 1e-12


def test_max_memory_chunking_gives_same_result():
    model, x = make("simple_cnn")
    x = torch.cat([x, x.flip(0), x * 0.5])
    big = nns.Scanner(model, ["4", "7"], backend="reference", filter_images=True).scan(x)
    small = nns.Scanner(model, ["4", "7"], backend="reference", filter_images=True, max_memory=600_000).scan(x)
    for n in ("4", "7"):
        assert torch.allclose(big[n].stats, small[n].stats, rtol=1e-12, atol=1e-12)
        assert torch.allclose(big[n].filter_images, small[n].filter_images, rtol=1e-12, atol=1e-12)
    # one sample does not fit: auto switches to reverse, forward refuses with a message
    tiny = nns.Scanner(model, ["7"], backend="reference", max_memory=1000).scan(x)
    assert tiny.strategy == "reverse" and rel_err(tiny["7"].stats, big["7"].stats) <= 1e-10
    with pytest.raises(MemoryError, match="strategy='reverse'"):
        nns.Scanner(model, ["7"], backend="reference", strategy="forward", max_memory=1000).scan(x)


def test_gate_outputs_option():
    model, x = make("simple_cnn")
    plain = nns.learned_images(model, x, "11", backend="reference")
    gated = nns.learned_images(model, x, "11", backend="reference", gate_outputs=True)
    z = model(x)
    assert rel_err(gated, plain * (z > 0).to(z.dtype).reshape(*z.shape, 1, 1, 1)) <= 1e-12


def test_torchvision_resnet18_32():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(tv.models.resnet18(num_classes=10)).double().eval()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64) - 0.3
    layers = ["layer1.0.conv1", "layer1.0", "layer2.0.downsample.1", "layer3.1", "layer4.1", "avgpool", "fc"]
    posts = {"layer1.0.conv1": None, "layer1.0": None, "layer2.0.downsample.1": None, "layer3.1": None,
             "layer4.1": None, "avgpool": None, "fc": None}
    res = nns.Scanner(model, layers, backend="reference", keep_images=True, stats=False).scan(x)
    for n in layers:
        want = _oracle(model, x, n, posts[n])
        err = rel_err(res[n].images, want)
        _record("forward", "tv_resnet18@32", err)
        assert err <= 1e-10, n


def test_torchvision_resnet18_64_float32_selected_neurons():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(tv.models.resnet18(num_classes=10)).eval()
    x = torch.rand(1, 3, 64, 64) - 0.3
    m = no_inplace(model)  # (not bn2: torchvision's `out += identity` rewrites its output in place)
    for n, idx in [("layer2.1", [(5, 3, 4), (100, 7, 0)]), ("layer4.0.conv2", [(7, 1, 1), (300, 0, 1)])]:
        got = nns.learned_images(model, x, n, neurons=idx, backend="auto", strategy="forward")
        mod = dict(m.named_modules())[n]
        for j, i in enumerate(idx):
            xx = x.clone().requires_grad_(True)
            box = []
            h = mod.register_forward_hook(lambda mm, a, o: box.append(o))
            m(xx)
            h.remove()
            (gr,) = torch.autograd.grad(box[0][(0,) + i], xx)
            err = rel_err(got[:, j], gr * x)
            _record("forward-fp32", "tv_resnet18@64", err)
            assert err <= 1e-5, (n, i, err)


# ---------------------------------------------------------------------------- bad input
def test_errors_name_the_problem():
    model, x = make("simple_cnn")
    with pytest.raises(KeyError, match="unknown layer name 'featurs'|Did you mean"):
        nns.learned_images(model, x, "featurs")
    with pytest.raises(KeyError, match="Did you mean"):
        nns.learned_images(model, x, "10 ")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        nns.learned_images(model, bad, "1")
    with pytest.raises(ValueError, match="does not fit the model"):
        nns.learned_images(model, x[:, :2], "1")
    with pytest.raises(ValueError, match="batch dimension"):
        nns.learned_images(model, x[0, 0, 0], "1")
    with pytest.raises(IndexError, match="out of range"):
        nns.learned_images(model, x, "1", neurons=[(10, 0, 0)])
    with pytest.raises(TypeError, match="float32 or float64"):
        nns.learned_images(model, x.to(torch.float16), "1")
    model.train()
    with pytest.raises(RuntimeError, match="model.eval()"):
        nns.learned_images(model, x, "1")
    model.eval()
    with pytest.raises(ValueError, match="backend must be one of"):
        nns.learned_images(model, x, "1", backend="gpu")
    with pytest.raises(ValueError, match="fg_mask must be"):
        nns.Scanner(model, ["1"], backend="reference").scan(x, torch.ones(3, 3, dtype=torch.bool))


def test_unsupported_modules_are_named():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)).double().eval()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(nns.UnsupportedModuleError, match="Sigmoid.*linearize='gradient'"):
        nns.learned_images(m, x, "3")  # a layer after the Sigmoid
    # the conv before it is scanned (an unsupported module blocks only what is computed from it)
    assert rel_err(nns.learned_images(m, x, "0", strategy="forward"), autograd_li(m, x, "0")) <= 1e-10
    # opt-in: local derivative as gate == autograd
    got = nns.learned_images(m, x, "3", linearize="gradient", backend="reference", strategy="forward")
    assert rel_err(got, autograd_li(m, x, "3")) <= 1e-10
    m2 = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)).eval()
    with pytest.raises(nns.UnsupportedModuleError, match="Upsample.*Supported"):
        nns.learned_images(m2, torch.rand(1, 3, 8, 8), "1")


def test_worst_errors_report(capsys):
    """Prints the worst relative error per strategy seen by the tests above (for the closing note)."""
    for k, v in sorted(WORST.items()):
        print(f"worst relative error {k}: {v:.3e}")
