"""The Captum drop-in equals Captum itself (docs/spec.md §1, identity 1):

    NeuronLearnedImage(model, layer).attribute(x, sel) == NeuronGradient(model, layer).attribute(x, sel) * x

for int, tuple, sliced-tuple and callable selectors, on ReLU, MaxPool and the final Linear layer of
a small CNN, in float64 to 1e-10; and LayerLearnedImages equals Captum neuron by neuron.
"""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

captum_attr = pytest.importorskip("captum.attr", reason="captum is a test dependency (pip install captum)")
NeuronGradient = captum_attr.NeuronGradient

from nns_cuda.analysis.captum import LayerLearnedImages, NeuronLearnedImage  # noqa: E402

TOL = 1e-10
pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(4, 5, 3)), ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()), ("fc1", nn.Linear(5 * 2 * 2, 12)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(12, 7)),
    ]))
    with torch.no_grad():  # non-zero biases, so that dropping them in the frozen network matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.double().eval()


@pytest.fixture(scope="module")
def net():
    return _net()


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 10, 10, generator=g, dtype=torch.float64)


def _captum(model, layer, x, sel, to_input=False):
    return NeuronGradient(model, layer).attribute(x, neuron_selector=sel, attribute_to_neuron_input=to_input) * x


def _close(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= TOL * max(1.0, b.abs().max().item()), f"max |diff| = {err:.3e}"


@pytest.mark.parametrize("layer,sel", [
    ("relu1", (1, 3, 4)),
    ("relu1", (2, 0, 7)),
    ("pool1", (0, 2, 1)),
    ("pool1", (3, 3, 3)),
    ("relu2", (4, 1, 0)),
    ("relu3", 5),
    ("fc2", 0),
    ("fc2", 6),
    ("fc2", (3,)),
])
def test_int_and_tuple_selectors_equal_captum(net, x, layer, sel):
    mod = getattr(net, layer)
    ours = NeuronLearnedImage(net, mod).attribute(x, neuron_selector=sel)
    ref = _captum(net, mod, x, sel)
    _close(ours, ref)
    by_name = NeuronLearnedImage(net, layer).attribute(x, neuron_selector=sel)
    _close(by_name, ref)


def test_selected_neurons_are_nontrivial(net, x):
    """The comparisons above must compare something: some selected neurons are active (non-zero
    images) and the relu1 layer has inactive neurons whose image must be exactly zero."""
    li = NeuronLearnedImage(net, net.fc2).attribute(x, neuron_selector=0)
    assert li.abs().max() > 1e-3
    with torch.no_grad():
        a = net.relu1(net.conv1(x))
    assert (a[0] == 0).any() and (a[0] > 0).any()
    c, yy, xx = (a[0] == 0).nonzero()[0].tolist()
    li0 = NeuronLearnedImage(net, net.relu1).attribute(x, neuron_selector=(c, yy, xx))
    assert li0[0].abs().max() == 0
    _close(li0, _captum(net, net.relu1, x, (c, yy, xx)))


@pytest.mark.parametrize("layer,sel", [
    ("pool1", (1, slice(0, 2), slice(1, 4))),
    ("relu2", (slice(None), 1, 1)),
    ("fc2", (slice(2, 5),)),
])
def test_slice_selectors_sum_like_captum(net, x, layer, sel):
    mod = getattr(net, layer)
    _close(NeuronLearnedImage(net, mod).attribute(x, neuron_selector=sel), _captum(net, mod, x, sel))


@pytest.mark.parametrize("layer,fn", [
    ("relu2", lambda out: out[:, 2, 1, 0] * 2.0 - out[:, 0, 0, 1]),
    ("pool1", lambda out: out[:, :, 1:3, 1:3].sum((1, 2, 3))),
    ("fc2", lambda out: out[:, 4]),
])
def test_callable_selector_equals_captum(net, x, layer, fn):
    mod = getattr(net, layer)
    _close(NeuronLearnedImage(net, mod).attribute(x, neuron_selector=fn), _captum(net, mod, x, fn))


@pytest.mark.parametrize("layer,sel", [
    ("pool1", (2, 5, 6)),   # input of pool1 = relu1's output
    ("fc2", 9),              # input of fc2 = relu3's output (12 neurons)
    ("conv2", (3, 1, 2)),    # input of conv2 = pool1's output
])
def test_attribute_to_neuron_input_equals_captum(net, x, layer, sel):
    mod = getattr(net, layer)
    ours = NeuronLearnedImage(net, mod).attribute(x, neuron_selector=sel, attribute_to_neuron_input=True)
    _close(ours, _captum(net, mod, x, sel, to_input=True))


def test_tuple_inputs_and_plain_function(net, x):
    ref = _captum(net, net.relu2, x, (1, 0, 1))
    out = NeuronLearnedImage(net, net.relu2).attribute((x,), neuron_selector=(1, 0, 1))
    assert isinstance(out, tuple) and len(out) == 1
    _close(out[0], ref)
    # a plain function as forward_func: autograd path, still equal to Captum
    f = lambda inp: net(inp)  # noqa: E731
    _close(NeuronLearnedImage(f, net.relu2).attribute(x, neuron_selector=(1, 0, 1)), ref)


@pytest.mark.parametrize("layer", ["pool1", "relu2", "fc2"])
def test_layer_learned_images_equal_captum_per_neuron(net, x, layer):
    mod = getattr(net, layer)
    allli = LayerLearnedImages(net, mod).attribute(x)
    with torch.no_grad():
        shape = tuple(_capture_shape(net, mod, x))
    assert tuple(allli.shape) == (x.shape[0],) + shape + tuple(x.shape[1:])
    ng = NeuronGradient(net, mod)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
        sel = tuple(idx) if len(idx) > 1 else idx[0]
        ref = ng.attribute(x, neuron_selector=sel) * x
        _close(allli[(slice(None),) + tuple(idx)], ref)


def test_layer_filter_images_fold(net, x):
    """filter_images = Σ_{i,j} LI_{k,i,j} · a^k_{i,j}, from the per-neuron images."""
    lli = LayerLearnedImages(net, "relu2")
    allli = lli.attribute(x)                                # [B, C, H', W', D, H, W]
    a = _capture(net, net.relu2, x)                          # [B, C, H', W']
    expect = (allli * a[..., None, None, None]).sum((2, 3))
    _close(lli.filter_images(x), expect)


def test_errors_name_the_problem(net, x):
    with pytest.raises(ValueError, match="tuple like"):
        NeuronLearnedImage(net, net.relu1).attribute(x, neuron_selector=2)     # int on a [C, H, W] layer
    with pytest.raises(IndexError, match="out of range"):
        NeuronLearnedImage(net, net.fc2).attribute(x, neuron_selector=7)
    with pytest.raises(KeyError, match="unknown layer"):
        NeuronLearnedImage(net, "nope").attribute(x, neuron_selector=0)
    with pytest.raises(ValueError, match="not a sub-module"):
        NeuronLearnedImage(net, nn.ReLU())
    with pytest.raises(ValueError, match="one scalar per example"):
        NeuronLearnedImage(net, net.relu2).attribute(x, neuron_selector=lambda o: o[:, 0])


def _capture(model, mod, x):
    out = {}
    h = mod.register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return out["o"]


def _capture_shape(model, mod, x):
    return _capture(model, mod, x).shape[1:]
