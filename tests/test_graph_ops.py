"""Functional operations the scanner linearises besides modules: ``torch.cat`` / ``torch.concat``
along the channels (and of feature vectors), ``F.max_pool2d`` / ``torch.max_pool2d`` /
``F.avg_pool2d``, global means (``x.mean((2, 3))``, ``torch.mean(..., keepdim=True)``), and
repeated operands (``x + x``, ``torch.cat([x, x])``).

What is compared: learned images of every functional node, by the forward strategy with every
backend here (reference, cpu) and conv algorithm, against plain autograd on the real model
(``x ⊙ ∂a/∂x``, hooks on ``nn.Identity`` modules placed after each operation), float64, rel.
1e-10; torchvision's SqueezeNet 1.1, GoogLeNet and DenseNet-121 (random weights), forward
against the reverse strategy on a sample of neurons of their concatenations. Errors: what cannot
be linearised (cat along H, a mean over the channels, ``alpha=`` in an addition, a concatenated
parameter, ``return_indices=True``) raises naming the node and the fix.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nns_cuda as nns
from nns_cuda.engine.graph import UnsupportedModuleError, build_graph

from _oracle import autograd_li, rel_err


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(8, 5, 3, padding=1)
        self.c3 = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(16, 3)
        for name in ("max_f", "max_t", "cat_self", "add_self", "avg", "concat", "gmean", "vcat"):
            setattr(self, name, nn.Identity())

    def forward(self, x):
        a = F.relu(self.c1(x))
        m = self.max_f(F.max_pool2d(a, 3, 2, 1))             # 13 -> 7, padded, overlapping
        m2 = self.max_t(torch.max_pool2d(F.relu(self.c1(x)), 2, ceil_mode=True))  # 13 -> 7
        c = self.cat_self(torch.cat([m, m], 1))              # the same tensor twice
        d = self.add_self(c + c)                             # x + x
        h = F.relu(self.c2(d))
        v = self.avg(F.avg_pool2d(h, 3, 1, 1, count_include_pad=False))
        j = self.concat(torch.concat((self.c3(v), m2), dim=-3))  # negative dim, different windows
        g = self.gmean(torch.mean(j, dim=(2, 3), keepdim=True))   # [B, 8, 1, 1]
        f = self.vcat(torch.cat([g.flatten(1), j.mean((-1, -2))], dim=1))  # feature vectors
        return self.fc(f)


NODES = ["max_f", "max_t", "cat_self", "add_self", "avg", "concat", "gmean"]


def _make():
    torch.manual_seed(0)
    return FunctionalNet().double().eval(), (torch.rand(2, 3, 13, 13, dtype=torch.float64) - 0.3)


def test_graph_reads_the_functional_operations():
    model, x = _make()
    g = build_graph(model, x)
    kinds = {n.name: n.kind for n in g.nodes}
    assert kinds["max_pool2d"] == "maxpool" and kinds["max_pool2d_1"] == "maxpool"
    assert kinds["avg_pool2d"] == "avgpool" and kinds["mean"] == kinds["mean_1"] == "global_mean"
    assert g.resolve("mean").spatial and not g.resolve("mean_1").spatial  # keepdim / not
    cat = g.resolve("cat")
    assert cat.kind == "cat" and len(cat.inputs) == 2 and cat.inputs[0] == cat.inputs[1]
    add = g.resolve("add")
    assert add.kind == "add" and add.inputs[0] == add.inputs[1]
    mp = g.resolve("max_pool2d").attrs
    assert (mp["kernel"], mp["stride"], mp["padding"]) == ((3, 3), (2, 2), (1, 1))
    assert g.resolve("max_pool2d_1").attrs["stride"] == (2, 2) and g.resolve("max_pool2d_1").attrs["ceil_mode"]
    assert not g.resolve("avg_pool2d").attrs["count_include_pad"]


@pytest.mark.parametrize("backend,algo", [("reference", "direct"), ("cpu", "direct"), ("cpu", "gemm"),
                                          ("cpu", "gather")])
def test_functional_operations_equal_autograd(backend, algo):
    model, x = _make()
    res = nns.Scanner(model, NODES + ["vcat", "fc"], backend=backend, strategy="forward", keep_images=True,
                      stats=False, conv_algorithm=algo).scan(x)
    for n in NODES + ["vcat", "fc"]:
        want = autograd_li(model, x, n)
        err = rel_err(res[n].images, want)
        assert err <= 1e-10, f"{n} [{backend}, {algo}]: relative error {err:.3e}"


def test_repeated_operands_count_twice():
    """x + x and cat([x, x]): the images of the sum are twice those of x (a parser that listed x
    once would treat x + x as x plus a constant)."""
    model, x = _make()
    res = nns.Scanner(model, ["max_f", "cat_self", "add_self"], backend="reference", keep_images=True,
                      stats=False).scan(x)
    m = res["max_f"].images
    assert torch.equal(res["cat_self"].images, torch.cat([m, m], 1))
    assert torch.allclose(res["add_self"].images, 2 * torch.cat([m, m], 1), rtol=0, atol=1e-14)


class _Bad(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.p = nn.Parameter(torch.zeros(1, 2, 8, 8))
        self.op = op

    def forward(self, x):
        a = self.conv(x)
        if self.op == "cat_h":
            return torch.cat([a, a], 2)
        if self.op == "cat_batch":
            return torch.cat([a, a], dim=0)
        if self.op == "cat_param":
            return torch.cat([a, self.p], 1)  # built with batch 1
        if self.op == "mean_all":
            return a.mean()
        if self.op == "mean_channels":
            return a.mean(1)
        if self.op == "alpha":
            return torch.add(a, a, alpha=2)
        if self.op == "indices":
            return F.max_pool2d(a, 2, return_indices=True)[0]
        raise AssertionError(self.op)


@pytest.mark.parametrize("op,words", [
    ("cat_h", ["torch.cat", "dim 2", "channels"]),
    ("cat_batch", ["torch.cat", "dim 0"]),
    ("cat_param", ["torch.cat", "constant or parameter"]),
    ("mean_all", ["mean", "dims None", "(2, 3)"]),
    ("mean_channels", ["mean", "dims (1,)", "(2, 3)"]),
    ("alpha", ["alpha=2", "alpha=1"]),
    ("indices", ["return_indices=True"]),
])
def test_what_cannot_be_linearised_raises_naming_it(op, words):
    """Building the graph does not raise (layers before the operation stay scannable); asking for
    a layer computed from it does, naming it."""
    model = _Bad(op).eval()
    g = build_graph(model, torch.rand(1, 3, 8, 8))
    assert g.resolve("conv").kind == "conv"
    with pytest.raises(UnsupportedModuleError) as e:
        g.resolve("")  # the model's output
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("name,ctor,hw", [
    ("squeezenet1_1", lambda M: M.squeezenet1_1(), 40),
    ("googlenet", lambda M: M.googlenet(aux_logits=False, init_weights=True), 40),
    ("densenet121", lambda M: M.densenet121(), 32),
])
def test_torchvision_concat_models_forward_equals_reverse(name, ctor, hw):
    M = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = ctor(M).double().eval()
    for mod in model.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_var.uniform_(0.5, 2.0)
            mod.running_mean.uniform_(-0.2, 0.2)
    x = torch.rand(1, 3, hw, hw, dtype=torch.float64)
    g = build_graph(model, x)
    cats = [n for n in g.nodes if n.kind == "cat"]
    assert cats, name
    for node in (cats[0], cats[-1]):
        shape = node.shape
        gen = torch.Generator().manual_seed(node.idx)
        pick = [tuple(int(torch.randint(s, (1,), generator=gen)) for s in shape) for _ in range(6)]
        fwd = nns.learned_images(model, x, node.name, neurons=pick, strategy="forward", backend="cpu")
        rev = nns.learned_images(model, x, node.name, neurons=pick, strategy="reverse", backend="reference")
        assert rev.abs().sum() > 0 or fwd.abs().sum() == 0
        err = rel_err(fwd, rev) if rev.abs().sum() > 0 else float(fwd.abs().max())
        assert err <= 1e-10, f"{name}/{node.name}: relative error {err:.3e}"


class ClampNet(nn.Module):
    """ReLU6 (module, in place, and functional) and Hardtanh: piecewise linear, gate 1 strictly
    inside (min, max) and 0 outside — native, no ``linearize`` needed."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.r6 = nn.ReLU6(inplace=True)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.ht = nn.Hardtanh(-0.5, 0.4)
        self.c3 = nn.Conv2d(6, 4, 1)
        self.f6 = nn.Identity()
        self.fh = nn.Identity()

    def forward(self, x):
        a = self.ht(self.c2(self.r6(self.c1(x))))
        b = self.f6(F.relu6(self.c3(a)))
        return self.fh(F.hardtanh(b, min_val=0.1, max_val=0.9))


def test_relu6_and_hardtanh_equal_autograd_without_linearize():
    torch.manual_seed(0)
    model = ClampNet().double().eval()
    with torch.no_grad():
        model.c1.weight.mul_(25.0)  # push some z over 6 so that the upper bound gates
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    g = build_graph(model, x)
    assert [n.kind for n in g.nodes if n.name in ("r6", "ht", "relu6", "hardtanh")] == ["hardtanh"] * 4
    z1 = model.c1(x)
    assert bool((z1 > 6).any()) and bool(((z1 > 0) & (z1 < 6)).any())
    # a neuron followed directly by an activation carries its gate (docs/spec.md §1): f6 feeds F.hardtanh
    posts = {"c1": F.relu6, "r6": None, "c2": lambda z: F.hardtanh(z, -0.5, 0.4), "ht": None,
             "f6": lambda z: F.hardtanh(z, 0.1, 0.9), "fh": None}
    for backend in ("reference", "cpu"):
        res = nns.Scanner(model, list(posts), backend=backend, keep_images=True, stats=False).scan(x)
        for n, post in posts.items():
            err = rel_err(res[n].images, autograd_li(model, x, n, post=post))
            assert err <= 1e-10, f"{n} [{backend}]: relative error {err:.3e}"


def test_inplace_gradient_activation_keeps_its_input():
    """linearize='gradient' with SiLU(inplace=True): the gate is read from the unmodified input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(inplace=True), nn.Conv2d(4, 3, 3, padding=1),
                          nn.SiLU(inplace=True)).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    res = nns.Scanner(model, ["0", "2"], linearize="gradient", backend="reference", keep_images=True,
                      stats=False).scan(x)
    ref = nn.Sequential(*[nn.SiLU() if isinstance(m, nn.SiLU) else m for m in model]).eval()
    for n in ("0", "2"):
        err = rel_err(res[n].images, autograd_li(ref, x, n, post=F.silu))
        assert err <= 1e-10, f"{n}: relative error {err:.3e}"


ZOO = [("alexnet", lambda M: M.alexnet(), 64), ("vgg11_bn", lambda M: M.vgg11_bn(), 32),
       ("resnet18", lambda M: M.resnet18(), 32), ("resnext50_32x4d", lambda M: M.resnext50_32x4d(), 32),
       ("squeezenet1_1", lambda M: M.squeezenet1_1(), 40),
       ("googlenet", lambda M: M.googlenet(aux_logits=False, init_weights=True), 32),
       ("inception_v3", lambda M: M.inception_v3(aux_logits=False, init_weights=True), 75),  # its minimum size
       ("densenet121", lambda M: M.densenet121(), 32), ("mobilenet_v2", lambda M: M.mobilenet_v2(), 32),
       ("mnasnet0_5", lambda M: M.mnasnet0_5(), 32), ("regnet_x_400mf", lambda M: M.regnet_x_400mf(), 32)]


@pytest.mark.slow
@pytest.mark.parametrize("name,ctor,hw", ZOO, ids=[z[0] for z in ZOO])
def test_torchvision_zoo_forward_equals_reverse(name, ctor, hw):
    """The README's list of torchvision models: each traces with no ``linearize``, and the
    forward sweep equals the reverse strategy (autograd) on 4 random neurons of an early node,
    a middle node and the logits (random weights, float64). ``make test-slow`` runs it."""
    M = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = ctor(M).double().eval()
    x = torch.rand(1, 3, hw, hw, dtype=torch.float64)
    g = build_graph(model, x)
    nodes = [n for n in g.nodes if n.kind not in ("aux", "input")]
    for nd in (nodes[len(nodes) // 4], nodes[len(nodes) // 2], nodes[-1]):
        gen = torch.Generator().manual_seed(nd.idx)
        pick = [tuple(int(torch.randint(s, (1,), generator=gen)) for s in nd.shape) for _ in range(4)]
        # Inception v3's middle layers need ~6 GiB per 75x75 sample in the forward sweep
        fwd = nns.learned_images(model, x, nd.name, neurons=pick, strategy="forward", backend="cpu",
                                 max_memory=12 * 2 ** 30)
        rev = nns.learned_images(model, x, nd.name, neurons=pick, strategy="reverse", backend="reference")
        err = rel_err(fwd, rev) if rev.abs().sum() > 0 else float(fwd.abs().max())
        assert err <= 1e-10, f"{name}/{nd.name}: relative error {err:.3e}"


class SliceNet(nn.Module):
    """Channel ranges: ``chunk`` / ``split`` (method and function), ``x[:, a:b]`` of maps and of
    feature vectors, pieces recombined with ``torch.cat`` (Res2Net / CSP style)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(8, 4, 1)
        self.c4 = nn.Conv2d(3, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(6, 3)
        for name in ("p_id", "w_id", "s_id", "join", "f_id"):
            setattr(self, name, nn.Identity())

    def forward(self, x):
        a = self.r1(self.bn1(self.c1(x)))
        p, q = a.chunk(2, dim=1)
        u, v, w = torch.split(a, [3, 2, 3], 1)
        h = self.c2(self.p_id(p))
        k = self.c3(torch.cat([q, h], 1))
        s = self.s_id(a[:, 1:6])
        y = self.join(torch.cat([self.c4(u), self.w_id(w), s[:, 2:], k], 1))   # 2 + 3 + 3 + 4 = 12
        f = torch.flatten(self.pool(y), 1)                                      # 48 features
        return self.fc(self.f_id(f[:, 3:9]))


def test_channel_slices_equal_autograd():
    torch.manual_seed(0)
    from _models import randomize_bn
    model = randomize_bn(SliceNet()).double().eval()
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64) - 0.3
    g = build_graph(model, x)
    kinds = [n.kind for n in g.nodes]
    assert kinds.count("slice") >= 7, kinds
    assert (g.resolve("s_id").shape, g.resolve("f_id").shape) == ((5, 9, 9), (6,))
    names = ["p_id", "w_id", "s_id", "c2", "c3", "c4", "join", "f_id", "fc"]
    posts = {}
    for backend in ("reference", "cpu"):
        res = nns.Scanner(model, names, backend=backend, keep_images=True, stats=False).scan(x)
        for n in names:
            err = rel_err(res[n].images, autograd_li(model, x, n, post=posts.get(n)))
            assert err <= 1e-10, f"{n} [{backend}]: relative error {err:.3e}"
    # only the convs requested: BN -> ReLU is then read by slices (not foldable) and still exact
    res = nns.Scanner(model, ["c2", "c3", "c4"], backend="cpu", keep_images=True, stats=False).scan(x)
    for n in ("c2", "c3", "c4"):
        assert rel_err(res[n].images, autograd_li(model, x, n)) <= 1e-10, n


class _BadSlice(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.op = op

    def forward(self, x):
        a = self.conv(x)
        if self.op == "spatial":
            return a[:, :, 1:]
        if self.op == "step":
            return a[:, ::2]
        if self.op == "int":
            return a[:, 1]
        if self.op == "split_h":
            return torch.split(a, 4, dim=2)[0]
        if self.op == "chunk_w":
            return a.chunk(2, -1)[1]
        raise AssertionError(self.op)


@pytest.mark.parametrize("op,words", [
    ("spatial", ["indexing", "x[:, a:b]"]),
    ("step", ["indexing", "step 1"]),
    ("int", ["indexing", "x[:, a:b]"]),
    ("split_h", ["split", "dim 2", "dim 1"]),
    ("chunk_w", ["chunk", "dim -1", "dim 1"]),
])
def test_unsupported_slicing_raises_naming_it(op, words):
    g = build_graph(_BadSlice(op).eval(), torch.rand(1, 3, 8, 8))
    assert g.resolve("conv").kind == "conv"  # the layer before the slicing stays scannable
    with pytest.raises(UnsupportedModuleError) as e:
        g.resolve("")  # the model's output, computed from the slicing
    for w in words:
        assert w in str(e.value), (w, str(e.value))
