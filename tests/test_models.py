"""Tests of the model zoo: shapes, supported layers, architectures, weights loading."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from nns_cuda import models
from nns_cuda.models import UnknownModelError, WeightsMismatchError

#: Zoo models run for real on the CPU; the others (large / 224×224) are shape-checked on the
#: meta device, which runs the same forward code without allocating or computing.
REAL = {"fcn", "fcn_res", "simple_cnn", "cnn_32_64_64", "lenet5", "alexnet_cifar",
        "vgg11_cifar", "resnet10_cifar"}


def _build(name: str, device: str, **kw) -> nn.Module:
    with torch.device(device):
        return models.build(name, **kw).eval()


@pytest.mark.parametrize("name", models.available())
def test_every_zoo_model_maps_documented_input_to_classes_with_supported_layers(name):
    device = "cpu" if name in REAL else "meta"
    m = _build(name, device, num_classes=7)
    shape = models.input_shape(name)
    assert shape == ((3, 224, 224) if name == "alexnet" or name.startswith("tv:") else (3, 32, 32))
    with torch.no_grad(), torch.device(device):
        out = m(torch.rand(2, *shape) if device == "cpu" else torch.empty(2, *shape))
    assert tuple(out.shape) == (2, 7)
    if device == "cpu":
        assert torch.isfinite(out).all()
    assert models.unsupported_modules(m) == []
    leaf_types = {type(x) for x in m.modules() if next(x.children(), None) is None}
    assert leaf_types <= set(models.SUPPORTED_LEAF_TYPES)
    assert not m.training


@pytest.mark.parametrize("name", ["fcn", "simple_cnn", "lenet5", "resnet18_cifar",
                                  "vgg16_cifar", "alexnet_cifar", "tv:resnet18", "alexnet"])
def test_in_channels_and_input_size_are_configurable(name):
    # VGG's five 2x2 pools need at least 32 px
    size = {"tv:resnet18": 224, "alexnet": 224, "vgg16_cifar": 32}.get(name, 28)
    m = _build(name, "meta", in_channels=1, input_size=size)
    with torch.device("meta"):
        out = m(torch.empty(3, 1, size, size))
    assert tuple(out.shape) == (3, 10)
    first = next(x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear)))
    assert (first.in_channels if isinstance(first, nn.Conv2d) else first.in_features) == \
        (1 if isinstance(first, nn.Conv2d) else size * size)


def test_thesis_architectures():
    # FCN of chapter 3: 784-500-500-10 for 1x28x28 inputs
    fcn = models.build("fcn", in_channels=1, input_size=28)
    lin = [m for m in fcn.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(784, 500), (500, 500), (500, 10)]
    assert [(m.in_features, m.out_features) for m in models.build("fcn").modules()
            if isinstance(m, nn.Linear)][0] == (3072, 500)
    # simple CNN: 3 conv x 10 filters, 2 max-pools, FC 64, 10 outputs
    cnn = models.build("simple_cnn")
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [10, 10, 10]
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn.modules()) == 2
    lin = [m for m in cnn.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in lin] == [64, 10]
    assert [c.out_channels for c in models.build("cnn_32_64_64").modules()
            if isinstance(c, nn.Conv2d)] == [32, 64, 64]
    # LeNet-5 uses average pools only
    le = models.build("lenet5")
    assert sum(isinstance(m, nn.AvgPool2d) for m in le.modules()) == 2
    assert not any(isinstance(m, nn.MaxPool2d) for m in le.modules())
    assert [m.out_features for m in le.modules() if isinstance(m, nn.Linear)] == [120, 84, 10]
    # VGG-11 / 16: 8 / 13 conv layers with BN
    for name, n in (("vgg11_cifar", 8), ("vgg16_cifar", 13)):
        with torch.device("meta"):
            v = models.build(name)
        assert sum(isinstance(m, nn.Conv2d) for m in v.modules()) == n
        assert sum(isinstance(m, nn.BatchNorm2d) for m in v.modules()) == n
    # ResNet-10 / 18: 3x3 stride-1 stem, 4 / 8 basic blocks, 1x1 stride-2 shortcuts, GAP
    for name, blocks in (("resnet10_cifar", 4), ("resnet18_cifar", 8)):
        with torch.device("meta"):
            r = models.build(name)
        assert (r.conv1.kernel_size, r.conv1.stride) == ((3, 3), (1, 1))
        bb = [m for m in r.modules() if isinstance(m, models.BasicBlock)]
        assert len(bb) == blocks
        sc = [b.shortcut.conv for b in bb if not isinstance(b.shortcut, nn.Identity)]
        assert len(sc) == 3 and all(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in sc)
        assert isinstance(r.avgpool, nn.AdaptiveAvgPool2d)
        # every ReLU module is used once (distinct objects)
        relus = [m for m in r.modules() if isinstance(m, nn.ReLU)]
        assert len(relus) == len({id(m) for m in relus}) == 1 + 2 * blocks


def test_residual_blocks_add_their_branches():
    torch.manual_seed(0)
    block = models.BasicBlock(8, 16, stride=2).eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        # independent computation with functional ops
        bn = lambda b, t: torch.nn.functional.batch_norm(  # noqa: E731
            t, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)
        h = torch.relu(bn(block.bn1, torch.nn.functional.conv2d(x, block.conv1.weight, stride=2,
                                                                 padding=1)))
        h = bn(block.bn2, torch.nn.functional.conv2d(h, block.conv2.weight, padding=1))
        s = bn(block.shortcut.bn, torch.nn.functional.conv2d(x, block.shortcut.conv.weight,
                                                              stride=2))
        torch.testing.assert_close(block(x), torch.relu(h + s))
    fr = models.build("fcn_res", seed=0).eval()
    z = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        a1 = fr.relu1(fr.fc1(fr.flatten(z)))
        inner = fr.block.body.fc2(torch.relu(fr.block.body.fc1(a1)))
        torch.testing.assert_close(fr(z), fr.fc2(torch.relu(inner + a1)))


def test_unknown_name_lists_known_models():
    with pytest.raises(UnknownModelError) as e:
        models.build("resnet18_cifr")
    msg = str(e.value)
    assert "'resnet18_cifr'" in msg and "Did you mean 'resnet18_cifar'" in msg
    for known in ("simple_cnn", "lenet5", "vgg16_cifar", "resnet18_cifar", "fcn",
                  "alexnet_cifar", "tv:vgg16", "tv:resnet18"):
        assert known in msg
    with pytest.raises(UnknownModelError):
        models.load_model("no_such_model")
    with pytest.raises(ValueError, match="num_classes"):
        models.build("fcn", num_classes=0)


def test_build_seed_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = models.build("lenet5", seed=5).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    b = models.build("lenet5", seed=5).state_dict()
    c = models.build("lenet5", seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.conv1.weight"], c["features.conv1.weight"])


def test_torchvision_models_never_download(monkeypatch):
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    for name in ("tv:resnet18", "tv:vgg11", "alexnet"):
        with torch.device("meta"):
            models.build(name)


def test_load_model_roundtrip_and_formats(tmp_path):
    src = models.build("simple_cnn", seed=1).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = src(x)
    p = tmp_path / "w.pt"
    torch.save(src.state_dict(), p)
    m = models.load_model("simple_cnn", weights=p)
    assert not m.training
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    # DataParallel prefix and {"state_dict": ...} wrappers
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, p)
    with torch.no_grad():
        torch.testing.assert_close(models.load_model("simple_cnn", weights=p)(x), ref)
    # an in-memory state dict
    with torch.no_grad():
        torch.testing.assert_close(models.load_model("simple_cnn", src.state_dict())(x), ref)


def test_load_model_names_first_mismatching_key(tmp_path):
    sd = models.build("simple_cnn", seed=0).state_dict()
    p = tmp_path / "w.pt"
    missing = dict(sd)
    del missing["features.conv2.bias"]
    torch.save(missing, p)
    with pytest.raises(WeightsMismatchError, match=r"missing key 'features\.conv2\.bias'"):
        models.load_model("simple_cnn", weights=p)
    extra = dict(sd, **{"features.conv9.weight": torch.zeros(1)})
    torch.save(extra, p)
    with pytest.raises(WeightsMismatchError, match=r"unexpected key 'features\.conv9\.weight'"):
        models.load_model("simple_cnn", weights=p)
    torch.save(models.build("simple_cnn", num_classes=5).state_dict(), p)
    with pytest.raises(WeightsMismatchError) as e:
        models.load_model("simple_cnn", weights=p)
    assert "classifier.fc2.weight" in str(e.value) and "[5, 64]" in str(e.value)
    assert str(p) in str(e.value)
    torch.save(sd, p)
    # the first difference in the model's order is the first conv's shape
    with pytest.raises(WeightsMismatchError,
                       match=r"shape mismatch for key 'features\.conv1\.weight': \[10, 3, 3, 3\] "
                             r"in the file, \[6, 3, 5, 5\] in the model"):
        models.load_model("lenet5", weights=p)
    p.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="cannot read weights file .*w.pt"):
        models.load_model("simple_cnn", weights=p)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        models.load_model("simple_cnn", weights=tmp_path / "nope.pt")


def test_check_supported_names_offending_modules():
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Tanh())
    assert models.unsupported_modules(bad) == [("1", "Sigmoid"), ("3", "Tanh")]
    with pytest.raises(models.UnsupportedModuleError, match=r"1 \(Sigmoid\)"):
        models.check_supported(bad)
    models.check_supported(models.build("resnet10_cifar"))


# ----------------------------------------------------------------------------- from_spec
_FACTORY_MODULE = '''
import torch
from torch import nn

class TinyNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 5))

def make():
    torch.manual_seed(0)
    return TinyNet()

def not_a_model():
    return {"conv.weight": torch.zeros(1)}

INSTANCE = TinyNet()
'''


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """An importable user module ``user_nets_<id>`` with a factory, a class and an instance."""
    name = f"user_nets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(_FACTORY_MODULE)
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _same_outputs(a: nn.Module, b: nn.Module, shape=(2, 3, 32, 32)) -> None:
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b.eval()(x), rtol=0, atol=0)


def test_from_spec_zoo_name_with_and_without_weights(tmp_path):
    m, desc = models.from_spec("lenet5", num_classes=7, in_channels=1, input_size=28)
    assert isinstance(m, models.LeNet5) and not m.training
    assert desc == "zoo model lenet5 (random weights)"
    with torch.no_grad():
        assert tuple(m(torch.rand(2, 1, 28, 28)).shape) == (2, 7)
    src = models.build("simple_cnn", seed=3)
    p = tmp_path / "w.pt"
    torch.save(src.state_dict(), p)
    for w in (p, str(p)):
        m, desc = models.from_spec("simple_cnn", w)
        assert desc == f"zoo model simple_cnn with weights {p}" and not m.training
        _same_outputs(m, src)
    m, desc = models.from_spec("simple_cnn", src.state_dict())
    assert desc == "zoo model simple_cnn with weights a state dict"
    _same_outputs(m, src)
    # a training checkpoint's {"model": state dict} wrapper
    torch.save({"model": src.state_dict(), "epoch": 3}, p)
    _same_outputs(models.from_spec("simple_cnn", p)[0], src)


def test_from_spec_factory_class_and_instance(factory_module):
    import importlib

    mod = importlib.import_module(factory_module)
    m, desc = models.from_spec(f"{factory_module}:make")
    assert isinstance(m, mod.TinyNet) and not m.training
    assert desc == f"factory {factory_module}:make"
    torch.manual_seed(0)
    _same_outputs(m, mod.TinyNet())                      # the factory ran with no arguments
    assert isinstance(models.from_spec(f"{factory_module}:TinyNet")[0], mod.TinyNet)
    inst, _ = models.from_spec(f"{factory_module}:INSTANCE")
    assert inst is mod.INSTANCE and not inst.training


def test_from_spec_saved_model_file_and_weights(tmp_path, factory_module):
    import importlib

    mod = importlib.import_module(factory_module)
    src = mod.TinyNet()
    path = tmp_path / "whole.pt"
    torch.save(src, path)
    m, desc = models.from_spec(str(path))
    assert desc == f"model file {path}" and not m.training and m is not src
    _same_outputs(m, src)
    # weights given beside a model file or a factory replace its parameters
    other = mod.TinyNet()
    wpath = tmp_path / "w.pt"
    torch.save(other.state_dict(), wpath)
    m, desc = models.from_spec(path, wpath)
    assert desc == f"model file {path} with weights {wpath}"
    _same_outputs(m, other)
    m, desc = models.from_spec(f"{factory_module}:make", wpath)
    assert desc == f"factory {factory_module}:make with weights {wpath}"
    _same_outputs(m, other)


def _one_line_error(match: str, *args, **kw) -> str:
    with pytest.raises(models.ModelSpecError, match=match) as e:
        models.from_spec(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


def test_from_spec_unknown_name_suggests_and_says_where_the_names_are():
    msg = _one_line_error(r"unknown model 'simple_cn'", "simple_cn")
    assert "Did you mean simple_cnn" in msg and "nns_cuda.models.available()" in msg
    assert "not 'package.module:factory', not a file" in msg
    assert "Did you mean" not in _one_line_error("unknown model", "qqqqqqqqqqqq")
    _one_line_error("no model given", "")


def test_from_spec_file_that_is_not_a_model(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(models.build("simple_cnn").state_dict(), p)
    msg = _one_line_error(r"sd\.pt holds an object of type OrderedDict, not a model", str(p))
    assert "as its weights" in msg
    p.write_bytes(b"garbage, not a model")
    _one_line_error(r"cannot read model file .*sd\.pt: not a file written by torch\.save", str(p))


def test_from_spec_factory_errors(factory_module):
    _one_line_error(r"cannot load 'pkg_that_does_not_exist:make': No module named "
                    r"'pkg_that_does_not_exist'", "pkg_that_does_not_exist:make")
    _one_line_error(rf"cannot load '{factory_module}:nope': .*nope", f"{factory_module}:nope")
    _one_line_error(rf"importing {factory_module}_broken raised RuntimeError: boom at import",
                    f"{factory_module}_broken:make")
    _one_line_error(rf"{factory_module}:not_a_model returned an object of type dict, "
                    r"not an nn.Module",
                    f"{factory_module}:not_a_model")
    _one_line_error("expected 'package.module:factory'", f"{factory_module}:")


def test_from_spec_bad_weights_are_one_line_of_ours(tmp_path, factory_module):
    p = tmp_path / "w.pt"
    p.write_bytes(b"garbage, not a checkpoint")
    for spec in ("simple_cnn", f"{factory_module}:make"):
        msg = _one_line_error(r"cannot read weights file .*w\.pt: not a file written by "
                              r"torch\.save, or it is damaged", spec, p)
        assert "weights_only" not in msg and "PyTorch 2.6" not in msg
    # a whole pickled model given as weights: torch refuses it with weights_only=True
    torch.save(models.build("simple_cnn"), p)
    msg = _one_line_error(r"cannot read weights file .*w\.pt: it holds Python objects",
                          "simple_cnn", p)
    assert "give it as the model" in msg and "weights_only" not in msg
    _one_line_error(r"weights file not found: .*nope\.pt", "simple_cnn", tmp_path / "nope.pt")
    torch.save(models.build("simple_cnn", num_classes=5).state_dict(), p)
    _one_line_error(r"do not match model 'simple_cnn': shape mismatch for key "
                    r"'classifier\.fc2\.weight': \[5, 64\] in the file, \[10, 64\] in the model",
                    "simple_cnn", p)
    torch.save(models.build("simple_cnn").state_dict(), p)
    _one_line_error(rf"do not match factory {factory_module}:make: missing key '0\.weight'",
                    f"{factory_module}:make", p)
    # load_model shares the reader: the same one line, as a WeightsMismatchError
    p.write_bytes(b"garbage")
    with pytest.raises(WeightsMismatchError) as e:
        models.load_model("simple_cnn", weights=p)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
