"""Property-based oracle tests: random architectures from the supported set (hypothesis).

Every example builds a random model (conv with stride / padding / dilation / depthwise groups,
BatchNorm with random statistics, ReLU / LeakyReLU, max / average pools with padding and
ceil_mode, residual blocks, adaptive average pools, flatten, linear) and checks the forward patch
strategy against plain autograd on the real model. ≥ 200 examples in CI; `-m slow` runs 2,000.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nns_cuda as nns

from _oracle import autograd_li, rel_err


class Res(nn.Module):
    def __init__(self, c, with_bn, proj):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c) if with_bn else nn.Identity()
        self.relu = nn.ReLU()
        self.proj = nn.Conv2d(c, c, 1) if proj else nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + self.proj(x)


def _out(n, k, s, p, d=1, ceil=False):
    num = n + 2 * p - d * (k - 1) - 1
    if ceil:
        o = -(-num // s) + 1
        if (o - 1) * s >= n + p:
            o -= 1
        return o
    return num // s + 1


def _build(layers, seed):
    torch.manual_seed(seed)
    m = nn.Sequential(*layers).double()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    return m.eval()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.data())
def test_random_architectures_match_autograd(data):
    _property(data)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_architectures_match_autograd_slow(data):
    _property(data)


def _property(data):
    c = data.draw(st.integers(1, 3), label="channels")
    h = data.draw(st.integers(5, 11), label="H")
    w = data.draw(st.integers(5, 11), label="W")
    layers = []
    shapes = (c, h, w)
    for _ in range(data.draw(st.integers(1, 4), label="depth")):
        cc, hh, ww = shapes
        kind = data.draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool", "res"]))
        if kind == "conv":
            k = data.draw(st.sampled_from([1, 2, 3, 5]))
            s = data.draw(st.sampled_from([1, 2]))
            d = data.draw(st.sampled_from([1, 1, 2]))
            p = data.draw(st.integers(0, 2))
            depthwise = data.draw(st.booleans()) and cc > 1
            co = cc if depthwise else data.draw(st.integers(1, 4))
            ho, wo = _out(hh, k, s, p, d), _out(ww, k, s, p, d)
            if ho < 1 or wo < 1:
                continue
            layers.append(nn.Conv2d(cc, co, k, s, p, d, groups=cc if depthwise else 1, bias=data.draw(st.booleans())))
            if data.draw(st.booleans()):
                layers.append(nn.BatchNorm2d(co))
            act = data.draw(st.sampled_from(["relu", "relu", "leaky", "none"]))
            if act == "relu":
                layers.append(nn.ReLU())
            elif act == "leaky":
                layers.append(nn.LeakyReLU(data.draw(st.sampled_from([0.01, 0.2]))))
            shapes = (co, ho, wo)
        elif kind in ("maxpool", "avgpool"):
            k = data.draw(st.sampled_from([2, 3]))
            s = data.draw(st.sampled_from([1, 2, k]))
            p = data.draw(st.integers(0, k // 2))
            ceil = data.draw(st.booleans())
            ho, wo = _out(hh, k, s, p, 1, ceil), _out(ww, k, s, p, 1, ceil)
            if ho < 1 or wo < 1:
                continue
            if kind == "maxpool":
                layers.append(nn.MaxPool2d(k, s, p, ceil_mode=ceil))
            else:
                layers.append(nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=data.draw(st.booleans())))
            shapes = (cc, ho, wo)
        else:
            layers.append(Res(cc, data.draw(st.booleans()), data.draw(st.booleans())))
    cc, hh, ww = shapes
    head = data.draw(st.sampled_from(["linear", "gap", "adaptive"]))
    if head == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        feat = cc
    elif head == "adaptive":
        o = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
        layers += [nn.AdaptiveAvgPool2d(o), nn.Flatten()]
        feat = cc * o[0] * o[1]
    else:
        layers += [nn.Flatten()]
        feat = cc * hh * ww
    if data.draw(st.booleans()):
        layers += [nn.Linear(feat, 5), nn.ReLU()]
        feat = 5
    layers.append(nn.Linear(feat, 3))
    seed = data.draw(st.integers(0, 2**16), label="seed")
    batch = data.draw(st.integers(1, 2), label="batch")
    m = _build(layers, seed)
    torch.manual_seed(seed + 1)
    x = torch.rand(batch, c, h, w, dtype=torch.float64) - 0.3
    names = [n for n, _ in m.named_children()]
    pick = data.draw(st.sampled_from(names), label="layer")
    targets = sorted({pick, names[-1]})
    res = nns.Scanner(m, targets, backend="reference", strategy="forward", keep_images=True, stats=False).scan(x)
    for name in targets:
        i = names.index(name)
        nxt = m[i + 1] if i + 1 < len(m) else None
        post = None
        if isinstance(nxt, nn.ReLU):
            post = F.relu
        elif isinstance(nxt, nn.LeakyReLU):
            slope = nxt.negative_slope
            post = lambda o, s=slope: F.leaky_relu(o, s)  # noqa: E731
        want = autograd_li(m, x, name, 0, post)
        err = rel_err(res[name].images, want)
        assert err <= 1e-10, f"layer {name} of {m} on input {list(x.shape)}: relative error {err:.3e}"
