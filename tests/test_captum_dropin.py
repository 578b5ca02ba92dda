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


# ----------------------------------------------------------------------------- Captum's numbers on torchvision models
# NeuronLearnedImage returns Captum's NeuronGradient x input for every layer, also where the
# thesis's learned image is gated (a layer feeding a ReLU, the input of a ReLU); gated=True is
# the learned image. Random weights, non-trivial BN statistics, selected neurons include inactive
# ones (pre-activation < 0), whose gated image is zero and whose Captum image is not.
torchvision = pytest.importorskip("torchvision")

TV_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}


def _tv_model(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.to(dtype).eval()


_TV = {}


def _tv(name: str, dtype: torch.dtype):
    key = (name, dtype)
    if key not in _TV:
        g = torch.Generator().manual_seed(3)
        _TV[key] = (_tv_model(name, dtype), torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64).to(dtype))
    return _TV[key]


def _module(model: nn.Module, path: str) -> nn.Module:
    return dict(model.named_modules())[path]


def _seen(model, mod, x, to_input):
    """A clone of what Captum selects from: the module's (last call's) input or output."""
    seen = {}
    if to_input:
        h = mod.register_forward_pre_hook(lambda m, i: seen.__setitem__("v", i[0].detach().clone()))
    else:
        h = mod.register_forward_hook(lambda m, i, o: seen.__setitem__("v", o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen["v"]


def _selectors(v: torch.Tensor):
    """An int tuple at an inactive (negative, else zero) neuron, one at the most active neuron, a
    slice tuple and a callable, for a layer value ``v`` [1, ...]."""
    a = v[0]
    neg = (a < 0).nonzero()
    low = neg[0] if len(neg) else (a == a.min()).nonzero()[0]
    high = (a == a.max()).nonzero()[0]
    as_sel = (lambda t: tuple(int(i) for i in t) if a.dim() > 1 else (int(t[0]),))
    if a.dim() == 3:
        sl = (slice(1, 5), slice(None), slice(None, None, 2))
        fn = (lambda o: o[:, 0].sum((1, 2)) * 2.0 - o[:, 1, :4, :4].sum((1, 2)))
    else:
        sl = (slice(2, 9),)
        fn = (lambda o: o[:, 3] * 2.0 - o[:, 5])
    return [as_sel(low), as_sel(high), sl, fn]


TV_CASES = [
    ("vgg11_bn", "features.0", False),    # conv before BN
    ("vgg11_bn", "features.1", False),    # BN before ReLU: gated in the thesis
    ("vgg11_bn", "features.2", False),    # ReLU output
    ("vgg11_bn", "features.2", True),     # ReLU input (BN output)
    ("vgg11_bn", "features.4", True),     # conv after ReLU + pool
    ("vgg11_bn", "classifier.0", False),  # Linear before ReLU
    ("vgg11_bn", "classifier.1", True),   # ReLU input (classifier.0's output)
    ("vgg11_bn", "classifier.3", True),   # Linear whose input is a ReLU (through Dropout)
    ("resnet18", "bn1", False),           # BN before ReLU
    ("resnet18", "relu", True),           # ReLU input
    ("resnet18", "layer1.0.bn1", False),  # BN before the block's ReLU (called twice)
    ("resnet18", "layer1.0.relu", False),  # the block's ReLU, last call (as Captum)
    ("resnet18", "layer1.0.relu", True),   # its input at the last call: bn2 + identity
    ("resnet18", "layer1.0.conv2", True),  # conv after ReLU
    ("resnet18", "fc", False),             # logits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,path,to_input", TV_CASES)
def test_torchvision_equals_captum(name, path, to_input, dtype):
    model, x = _tv(name, dtype)
    mod = _module(model, path)
    v = _seen(model, mod, x, to_input)
    ng = NeuronGradient(model, mod)
    ours_cls = NeuronLearnedImage(model, mod)
    nonzero = 0
    for sel in _selectors(v):
        ref = ng.attribute(x, neuron_selector=sel, attribute_to_neuron_input=to_input) * x
        ours = ours_cls.attribute(x, neuron_selector=sel, attribute_to_neuron_input=to_input)
        assert ours.dtype == x.dtype and ours.shape == x.shape
        scale = ref.abs().max().item()  # 0 for an inactive neuron after a ReLU: then ours must be 0 too
        nonzero += scale > 0
        err = (ours - ref).abs().max().item()
        assert err <= TV_TOL[dtype] * scale, f"{path} {sel} to_input={to_input}: max |diff| {err:.3e} (scale {scale:.3e})"
    assert nonzero >= 3, "most selections must have non-zero images, or nothing was compared"


@pytest.mark.parametrize("name,path,to_input,act_path", [
    ("vgg11_bn", "features.1", False, "features.2"),
    ("vgg11_bn", "classifier.0", False, "classifier.1"),
    ("vgg11_bn", "features.2", True, "features.2"),
    ("resnet18", "bn1", False, "relu"),
])
def test_gated_is_captum_times_the_relu_gate(name, path, to_input, act_path):
    """gated=True: the thesis's learned image = Captum's image times the gate S(z_n) of the ReLU
    the neuron feeds (zero for an inactive neuron, Captum's image for an active one)."""
    model, x = _tv(name, torch.float64)
    mod = _module(model, path)
    z = _seen(model, _module(model, act_path), x, True)  # the ReLU's input: z_n
    v = _seen(model, mod, x, to_input)
    assert torch.equal(v, z)
    ng = NeuronGradient(model, mod)
    gated = NeuronLearnedImage(model, mod, gated=True)
    low, high = _selectors(v)[:2]
    for sel in (low, high):
        ref = ng.attribute(x, neuron_selector=sel, attribute_to_neuron_input=to_input) * x
        gate = float(z[(0,) + sel] > 0)
        ours = gated.attribute(x, neuron_selector=sel, attribute_to_neuron_input=to_input)
        assert ref.abs().max() > 0
        assert (ours - gate * ref).abs().max() <= 1e-10 * ref.abs().max(), (path, sel, gate)
    assert float(z[(0,) + low] > 0) == 0.0 and float(z[(0,) + high] > 0) == 1.0  # both cases were compared


def test_gated_option_errors(net, x):
    with pytest.raises(ValueError, match="gated=True"):
        NeuronLearnedImage(net, net.relu1, gate_outputs=True)
    with pytest.raises(ValueError, match="callable selector"):
        NeuronLearnedImage(net, net.relu1, gated=True).attribute(x, neuron_selector=lambda o: o[:, 0, 0, 0])
    with pytest.raises(ValueError, match="nn.Module"):
        NeuronLearnedImage(lambda t: net(t), net.relu1, gated=True).attribute(x, neuron_selector=(0, 0, 0))
    with pytest.raises(ValueError, match="max_memory"):
        NeuronLearnedImage(net, net.relu1, max_memory=-5)


# ----------------------------------------------------------------------------- threads, no-gradient paths
@pytest.mark.parametrize("sel", [
    lambda o: o[:, 2, 1, 0] * 2.0 - o[:, 0, 0, 1],
    (0, 1, 0),
    (slice(None), 1, slice(0, 2)),
], ids=["callable", "int_tuple", "slice_tuple"])
def test_threads_give_the_sequential_result(net, x, sel):
    """8 threads x 20 calls on the same module: each call captures its own layer output."""
    import threading

    nli = NeuronLearnedImage(net, net.relu2)
    want = nli.attribute(x, neuron_selector=sel)
    assert want.abs().max() > 0
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(nli.attribute(x, neuron_selector=sel))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(results) == 160
    bad = sum(not torch.allclose(r, want, rtol=0, atol=1e-12 * want.abs().max().item()) for r in results)
    assert bad == 0, f"{bad} of 160 threaded results differ from the sequential one"


def test_no_gradient_path_raises_instead_of_zeros(net, x):
    """A selected value that does not depend on the input has no gradient: an error, not zeros."""
    with pytest.raises(ValueError, match="no gradient path"):
        NeuronLearnedImage(net, net.relu2).attribute(x, neuron_selector=lambda o: o[:, 0, 0, 0].detach() * net.fc2.bias[0])
    with pytest.raises(ValueError, match="no gradient path"):
        NeuronLearnedImage(net, net.relu2).attribute(x, neuron_selector=lambda o: o[:, 0, 0, 0].detach())
