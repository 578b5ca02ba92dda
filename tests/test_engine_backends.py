"""The whole-model oracles re-run for every backend: the C++ (``cpu``) and CUDA
(``cuda``) backends of the forward strategy against plain autograd on the real model, plus
statistics and filter images against the reference backend, float64 and float32 — each with
every conv algorithm (``direct``: the gated kernels, ``gemm``: dense im2col GEMM, ``gather``:
GEMMs over the active pairs), which must each actually run on the models' convolutions."""
from __future__ import annotations

import pytest
import torch

import nns_cuda as nns
from nns_cuda.ops.reference.stats import li_stats_dense

from _models import make
from _oracle import rel_err
from test_engine import MODELS, _leaf_layers, _oracles, _record

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)]
#: "implicit" (the Triton kernel) runs on CUDA only (its CPU checks: tests/test_conv_li_implicit.py)
ALGOS = ["direct", "gemm", "gather", pytest.param("implicit", marks=pytest.mark.needs_cuda)]


def _check_algorithms(res, model, algo, dtype):
    assert res.conv_algorithm == algo
    op = "gather" if (algo, dtype) == ("implicit", torch.float64) else algo  # Triton has no float64 dot
    if any(isinstance(m, torch.nn.Conv2d) and m.groups == 1 for m in model.modules()):
        assert op in res.conv_algorithms.values(), res.conv_algorithms


def _need(backend):
    if not nns.ext_info()[backend]:
        pytest.fail(f"the extension has no {backend} kernels: {nns.ext_info()} (rebuild with make build)")


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_name", MODELS)
def test_backend_equals_autograd(model_name, backend, algo):
    _need(backend)
    if algo == "implicit" and backend != "cuda":
        pytest.skip("conv_algorithm='implicit' is a CUDA kernel")
    model, x = make(model_name)
    names = [n for n, _ in _leaf_layers(model)]
    H, W = x.shape[-2:]
    fg = torch.zeros(x.shape[0], H, W, dtype=torch.bool)
    fg[:, 2: H - 3, 1: W // 2] = True
    m, xd = model.to(backend), x.to(backend)
    res = nns.Scanner(m, names, backend=backend, strategy="forward", keep_images=True, stats=True,
                      filter_images=True, conv_algorithm=algo).scan(xd, fg.to(backend))
    assert res.backend == backend
    _check_algorithms(res, model, algo, x.dtype)
    want_all = _oracles(model_name)
    for n in names:
        got = res[n].images.cpu()
        err = rel_err(got, want_all[n])
        _record(f"forward-{backend}-{algo}", model_name, err)
        assert err <= 1e-10, f"{model_name}/{n} [{backend}, {algo}]: relative error {err:.3e}"
        st = li_stats_dense(want_all[n].reshape(x.shape[0], -1, *x.shape[1:]), x, fg)
        assert rel_err(res[n].stats.cpu().reshape(st.shape), st) <= 1e-10, n
        if res[n].filter_images is not None and res[n].activations.dim() == 4:
            a = res[n].activations.cpu()
            want = (want_all[n] * a.reshape(*a.shape, 1, 1, 1)).sum((2, 3))
            assert rel_err(res[n].filter_images.cpu(), want) <= 1e-10, n
    model.cpu()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_name", ["simple_cnn", "small_resnet", "alexnet_like"])
def test_backend_float32(model_name, backend, algo):
    _need(backend)
    if algo == "implicit" and backend != "cuda":
        pytest.skip("conv_algorithm='implicit' is a CUDA kernel")
    model, x = make(model_name)
    names = [n for n, _ in _leaf_layers(model)]
    m32, x32 = model.float().to(backend), x.float().to(backend)
    res = nns.Scanner(m32, names, backend=backend, strategy="forward", keep_images=True, stats=False,
                      precision="fp32", conv_algorithm=algo).scan(x32)
    _check_algorithms(res, model, algo, torch.float32)
    for n in names:
        err = rel_err(res[n].images.cpu().double(), _oracles(model_name)[n])
        _record(f"forward-{backend}-fp32-{algo}", model_name, err)
        assert err <= 1e-5, f"{model_name}/{n} [{backend}, {algo}] float32: relative error {err:.3e}"


def test_auto_backend_prefers_extension():
    model, x = make("simple_cnn")
    res = nns.Scanner(model, ["4"]).scan(x)
    assert res.backend == ("cpu" if nns.ext_info()["cpu"] else "reference")
    assert res["4"].backend == res.backend and res.strategy == "forward"


def test_gather_falls_back_to_direct_when_its_copy_does_not_fit():
    """conv_algorithm="gather" runs conv_li_gather only where its placed copy of the input fits
    the chunk bound (a quarter of max_memory): alexnet_like's first conv (11x11 windows moving
    with the position: up to 121 placements per input pixel) runs direct at 28 MiB, gather at
    400 MiB; the later convs gather in both. The results equal the direct scan either way."""
    model, x = make("alexnet_like")
    model, x = model.float(), x.float()
    names = [n for n, _ in _leaf_layers(model)]
    want = nns.Scanner(model, names, conv_algorithm="direct", strategy="forward", keep_images=True).scan(x)
    seen = {}
    for mib in (28, 400):
        res = nns.Scanner(model, names, conv_algorithm="gather", strategy="forward", keep_images=True,
                          max_memory=mib << 20).scan(x)
        seen[mib] = res.conv_algorithms
        for n in names:
            assert rel_err(res[n].images.double(), want[n].images.double()) <= 1e-5, (mib, n)
    assert seen[28] == {"0": "direct", "3": "gather", "6": "gather"}, seen
    assert seen[400] == {"0": "gather", "3": "gather", "6": "gather"}, seen


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bn_and_activation_in_one_pass_equal_autograd(backend):
    """Only the convs of a BN network requested: each BN and the ReLU after it are applied in one
    pass (the engine's BN -> activation fusion), and each residual ``+`` reads the operand that
    already lies in its window without placing a copy; the conv images still equal autograd's."""
    _need(backend) if backend != "reference" else None
    model, x = make("small_resnet")
    mods = dict(model.named_modules())
    names = [n for n, _ in _leaf_layers(model) if isinstance(mods.get(n), torch.nn.Conv2d)]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) and len(names) >= 4
    from nns_cuda.engine.propagate import PatchPropagator
    direct = []
    orig = PatchPropagator.in_window

    def spy(self, i, r, g, rh, rw):
        ok = orig(self, i, r, g, rh, rw)
        if g.kind == "add" and ok:
            direct.append((g.name, self.graph.nodes[i].name))
        return ok

    PatchPropagator.in_window = spy
    try:
        res = nns.Scanner(model, names, backend=backend, strategy="forward", keep_images=True, stats=False).scan(x)
    finally:
        PatchPropagator.in_window = orig
    want = _oracles("small_resnet")
    for n in names:
        assert rel_err(res[n].images, want[n]) <= 1e-10, n
    # each residual + reads its main branch (bn2, already in the union window) without a copy
    assert set(direct) == {("add", "layer1.bn2"), ("add_1", "layer2.bn2")}, direct


def _bn_vgg():
    torch.manual_seed(1)
    nn = torch.nn
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),              # 0 1 2
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),  # 3 4 5 6
        nn.Conv2d(6, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),    # 7 8 9
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),   # 10 11 12
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),                         # 13 14 15
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    from _models import randomize_bn
    return randomize_bn(m).double().eval(), torch.rand(2, 3, 10, 10, dtype=torch.float64) - 0.3


@pytest.mark.parametrize("algo", ["direct", "gemm", "gather"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("extra", [[], ["6"]])
def test_bn_scale_and_gate_folded_into_the_next_conv(backend, algo, extra, monkeypatch):
    """Only convs (and a max-pool) requested on a BN network: a BN -> ReLU / ReLU6 read only by
    convs and max-pools is never applied to the patches; its scale goes into the next conv's
    weights (per input channel, groups 1, 2 and depthwise) and its gate becomes the inactive-input
    mask, carried through the max-pool. The images still equal autograd's, and the fold ran
    (convs 3, 7, 10, 13 received a pending input; 0, whose input is the image, did not)."""
    _need(backend) if backend != "reference" else None
    from nns_cuda.engine.propagate import PatchPropagator
    from _oracle import autograd_li, no_inplace

    model, x = _bn_vgg()
    seen = {}
    orig = PatchPropagator.conv

    def spy(self, g, r, scale, gate):
        seen[g.name] = r.pending_scale is not None
        return orig(self, g, r, scale, gate)

    monkeypatch.setattr(PatchPropagator, "conv", spy)
    names = ["0", "3", "7", "10", "13"] + extra
    res = nns.Scanner(model, names, backend=backend, strategy="forward", keep_images=True, stats=False,
                      conv_algorithm=algo).scan(x)
    assert seen == {"0": False, "3": True, "7": True, "10": True, "13": True}, seen
    m = no_inplace(model)
    for n in names:
        err = rel_err(res[n].images, autograd_li(m, x, n))
        assert err <= 1e-10, f"{n} [{backend}, {algo}]: relative error {err:.3e}"
