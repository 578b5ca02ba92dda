"""Rough edges a user meets first, each checked against an oracle that shares no code with the
engine (plain autograd on the real model, :mod:`nns_cuda.engine.oracle`) or against the
documented contract: empty batches, sizes read from tensors in ``forward``, unsupported
operations after the requested layers, ``max_memory`` strings, the reverse-strategy fallback,
dense results too large to allocate, 3-d inputs, printing results, no-gradient paths.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import nns_cuda as nns
from nns_cuda.engine.graph import UnsupportedModuleError
from nns_cuda.engine.oracle import autograd_learned_images
from nns_cuda.engine.results import LayerResult
from nns_cuda.ops.reference.stats import STAT_NAMES

TOL = 1e-10


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().item()
    assert scale > 0, "the reference is all zero: nothing compared"
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"max |diff| {err:.3e} (scale {scale:.3e})"


def _seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3)), ("relu1", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ("flat", nn.Flatten()), ("fc", nn.Linear(4 * 3 * 3, 5)),
    ])).double().eval()


def _x(b: int = 2, hw: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, hw, hw, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ----------------------------------------------------------------------------- no gradient path
class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)).detach())


def test_reverse_strategy_without_gradient_path_raises():
    """conv2 does not depend on x through autograd (a detach): an error, never all-zero images."""
    torch.manual_seed(0)
    model, x = _Detached().double().eval(), _x()
    with pytest.raises(ValueError, match="no gradient path"):
        nns.learned_images(model, x, "conv2", strategy="reverse")
    with pytest.raises(ValueError, match="no gradient path"):
        nns.Scanner(model, ["conv2"], strategy="reverse", filter_images=True).scan(x)


# ----------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("strategy", ["forward", "reverse"])
def test_empty_batch_gives_empty_results_of_the_right_shape(strategy):
    model, x = _seq(), _x()
    full = nns.Scanner(model, ["relu1", "fc"], strategy=strategy, filter_images=True, keep_images=True).scan(x)
    empty = nns.Scanner(model, ["relu1", "fc"], strategy=strategy, filter_images=True, keep_images=True).scan(x[:0])
    assert empty.strategy == strategy
    for name in ("relu1", "fc"):
        for attr in ("activations", "gates", "stats", "filter_images", "images"):
            a, b = getattr(empty[name], attr), getattr(full[name], attr)
            assert a.shape == (0,) + b.shape[1:] and a.dtype == b.dtype, (name, attr, a.shape, b.shape)
    li = nns.learned_images(model, x[:0], "relu1", strategy=strategy)
    assert li.shape == (0, 4, 6, 6, 3, 8, 8) and li.dtype == x.dtype
    li = nns.learned_images(model, x[:0], "fc", neurons=[(1,), (3,)], strategy=strategy)
    assert li.shape == (0, 2, 3, 8, 8)
    assert nns.filter_images(model, x[:0], "relu1", strategy=strategy).shape == (0, 4, 3, 8, 8)


# ----------------------------------------------------------------------------- sizes read in forward
class _ShapeReads(nn.Module):
    """Sizes read from tensors shape views and reshapes: h.shape[0], h.size(i), len(h), flatten."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        if self.how == "shape":
            h = h.view(h.shape[0], -1)
        elif self.how == "size":
            h = h.reshape(h.size(0), h.size(1) * h.size(2) * h.size(3))
        elif self.how == "size_noarg":
            h = h.view(h.size()[0], -1)
        elif self.how == "len":
            h = h.view(len(h), -1)
        elif self.how == "torch_flatten":
            h = torch.flatten(h, 1)
        else:
            raise AssertionError(self.how)
        return self.out(torch.relu(self.fc(h)))


@pytest.mark.parametrize("how", ["shape", "size", "size_noarg", "len", "torch_flatten"])
def test_shape_reads_in_forward_equal_autograd(how):
    torch.manual_seed(0)
    model, x = _ShapeReads(how).double().eval(), _x()
    for strategy in ("forward", "reverse"):
        for layer in ("relu", "out"):
            _close(nns.learned_images(model, x, layer, strategy=strategy), autograd_learned_images(model, x, layer))
    res = nns.Scanner(model, ["out"], filter_images=True).scan(x)
    assert res["out"].filter_images.shape == (2, 3, 3, 8, 8)


# ----------------------------------------------------------------------------- unsupported operations
class Sq(nn.Module):
    def forward(self, x):
        return x * x


class _Branchy(nn.Module):
    """An unsupported module (``sq``: x * x) on one branch, before the other branch in graph order."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.sq = Sq()
        self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        a = self.relu1(self.conv1(x))
        s = self.sq(a)
        b = self.relu2(self.conv2(a))
        return self.fc(torch.flatten(b + self.conv3(s), 1))


def test_unsupported_operation_blocks_only_the_layers_after_it():
    torch.manual_seed(0)
    model, x = _Branchy().double().eval(), _x()
    for strategy in ("forward", "reverse"):
        res = nns.Scanner(model, ["relu1", "relu2"], strategy=strategy, keep_images=True).scan(x)
        for layer in ("relu1", "relu2"):
            _close(res[layer].images, autograd_learned_images(model, x, layer))
    for layer in ("conv3", "fc"):
        with pytest.raises(UnsupportedModuleError) as e:
            nns.learned_images(model, x, layer)
        msg = str(e.value)
        assert "'sq'" in msg and "Sq" in msg and repr(layer) in msg, msg
    every = nns.Scanner(model).scan(x)  # layers=None: every layer that can be scanned
    assert {"conv1", "relu1", "conv2", "relu2"} <= set(every.layers) and "fc" not in every.layers


# ----------------------------------------------------------------------------- max_memory
def test_max_memory_accepts_sizes_and_rejects_bad_values():
    from nns_cuda.app.demo import parse_bytes as demo_parse
    from nns_cuda.captum import LayerLearnedImages, NeuronLearnedImage
    from nns_cuda.engine.memory import parse_bytes

    assert demo_parse is parse_bytes  # one parser for the command line and the Python API
    assert [parse_bytes(v) for v in ("2G", "512M", "64k", "1.5GiB", "2 gb", 4096, 1e6)] == \
        [2 << 30, 512 << 20, 64 << 10, 3 << 29, 2 << 30, 4096, 1000000]
    model, x = _seq(), _x()
    a = nns.Scanner(model, ["relu1"], max_memory="2G").scan(x)
    b = nns.Scanner(model, ["relu1"], max_memory=2 << 30).scan(x)
    assert torch.equal(a["relu1"].stats, b["relu1"].stats)
    assert nns.learned_images(model, x, "relu1", max_memory="1G").shape == (2, 4, 6, 6, 3, 8, 8)
    for bad in (-5, 0, "-5", "0", "abc", "2X", "", float("nan")):
        for call in (lambda: nns.Scanner(model, ["relu1"], max_memory=bad),
                     lambda: nns.learned_images(model, x, "relu1", max_memory=bad),
                     lambda: nns.filter_images(model, x, "relu1", max_memory=bad),
                     lambda: NeuronLearnedImage(model, "relu1", max_memory=bad),
                     lambda: LayerLearnedImages(model, "relu1", max_memory=bad)):
            with pytest.raises(ValueError, match="max_memory") as e:
                call()
            assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="max_memory"):
        nns.learned_images(model, x, "relu1", max_memory=True)


# ----------------------------------------------------------------------------- reverse fallback
def test_auto_fallback_to_reverse_warns_once_and_is_exact():
    model, x = _seq(), _x()
    sc = nns.Scanner(model, ["fc"], max_memory="4k", keep_images=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r1 = sc.scan(x)
        sc.scan(x)
    msgs = [str(m.message) for m in w if issubclass(m.category, UserWarning)]
    assert len(msgs) == 1, msgs
    assert "reverse" in msgs[0] and "raise max_memory" in msgs[0].lower() and "per sample" in msgs[0]
    assert r1.strategy == "reverse"
    _close(r1["fc"].images, autograd_learned_images(model, x, "fc"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        nns.learned_images(model, x, "fc", max_memory="4k")
        nns.learned_images(model, x, "fc", neurons=[(0,)])  # a few neurons: reverse by choice, no warning
        nns.Scanner(model, ["fc"], strategy="reverse").scan(x)  # asked for: no warning
    assert len([m for m in w if "fell back" in str(m.message)]) == 1


def test_reverse_progress_bar(capsys):
    model, x = _seq(), _x()
    nns.Scanner(model, ["relu1"], strategy="reverse", progress=True).scan(x)
    err = capsys.readouterr().err
    assert "reverse relu1" in err and "/144" in err, err
    nns.Scanner(model, ["relu1"], strategy="reverse", progress=False).scan(x)
    nns.Scanner(model, ["relu1"], strategy="reverse").scan(x)  # default: a short loop stays silent
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- too large, 3-d inputs
def test_dense_result_too_large_says_how_large_and_what_to_do():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()).eval()
    x = torch.rand(1, 3, 512, 512)   # all learned images of layer "1": 64·512² neurons × 3·512² pixels ≈ 48 TiB
    for call in (lambda: nns.learned_images(model, x, "1", strategy="reverse"),
                 lambda: nns.Scanner(model, ["1"], strategy="reverse", keep_images=True).scan(x)):
        with pytest.raises(MemoryError) as e:
            call()
        msg = str(e.value)
        assert "48 TiB" in msg and "filter_images" in msg and "stats" in msg and "neurons=" in msg, msg


def test_three_d_input_names_the_expected_shape():
    model = _seq()
    x3 = _x()[0]
    for call in (lambda: nns.learned_images(model, x3, "relu1"),
                 lambda: nns.Scanner(model, ["relu1"]).scan(x3),
                 lambda: nns.filter_images(model, x3, "relu1")):
        with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\], got \[3, 8, 8\]"):
            call()


# ----------------------------------------------------------------------------- printing results, statistics
def test_scan_result_repr_is_short_and_stats_are_labelled():
    model, x = _seq(), _x(b=4)
    res = nns.Scanner(model, ["relu1", "fc"], keep_images=True, filter_images=True).scan(x)
    text = repr(res)
    assert len(text) < 1000, len(text)
    assert len(str(res["relu1"].images)) > 10 * len(text)  # what print(res) showed before
    for part in ("'relu1'", "'fc'", "[4, 4, 6, 6]", "strategy='forward'", "backend="):
        assert part in text, (part, text)
    lr = repr(res["relu1"])
    assert len(lr) < 400 and "shape=[4, 6, 6]" in lr and "stats=[4, 4, 6, 6, 11]" in lr, lr
    # .stat(name) against statistics of the autograd oracle's images
    li = autograd_learned_images(model, x, "fc")                        # [4, 5, 3, 8, 8]
    flat = li.flatten(2)
    xs = x.flatten(1).unsqueeze(1)
    want = {"abs_sum": flat.abs().sum(-1), "sum": flat.sum(-1), "sq_sum": (flat ** 2).sum(-1),
            "x_dot": (xs * flat).sum(-1), "nz_fg": (flat != 0).sum(-1).to(x.dtype)}
    for name, w in want.items():
        _close(res["fc"].stat(name), w)
    doc = LayerResult.stat.__doc__
    readme = open(__file__.replace("tests/test_user_edges.py", "README.md")).read()
    for name in STAT_NAMES:
        assert f'"{name}"' in doc, name
        assert f"`{name}`" in readme, name
    with pytest.raises(KeyError, match="known"):
        res["fc"].stat("mean")
