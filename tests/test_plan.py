"""The per-layer plan (``nns_cuda.engine.plan``): the cost model's choices from the graph
geometry and the recorded activity; mixed plans (forward and reverse layers, with and without a
cut) and forward propagation in bands of rows equal to autograd in float64; the plan recorded in
the result; the forward working set within ``max_memory`` (peak RSS of a fresh process)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import nns_cuda as nns
from nns_cuda.engine.plan import FIT_GAIN, Plan
from nns_cuda.ops.reference.stats import li_stats_dense

from _models import SmallResNet, make, randomize_bn
from _oracle import autograd_filter_images, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-10

# layers whose learned images carry no gate of a following activation (so that autograd's
# x ⊙ ∂a/∂x is the oracle), at inputs where the reverse sweep runs its channels-last paths (maps
# of 14 × 14 and more) and its max-pool scatter
CASES = {
    "small_resnet": (["relu", "layer1", "layer2", "lrelu", "fc"], 16),
    "concat_net": (["stem_relu", "mixed", "pool", "dense", "head_relu", "fc"], 41),
}


_CASES = {}


def _case(name, batch=1):
    if (name, batch) not in _CASES:
        _CASES[name, batch] = _make_case(name, batch)
    return _CASES[name, batch]


def _make_case(name, batch):
    if name == "small_resnet":  # narrow, so that a row per neuron stays cheap
        torch.manual_seed(0)
        model = randomize_bn(SmallResNet(w=4)).double().eval()
    else:
        model, _ = make(name)
    layers, hw = CASES[name]
    x = torch.rand(batch, 3, hw, hw, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.3
    return model, x, layers


_ORACLE = {}


class _Stop(Exception):
    def __init__(self, out):
        self.out = out


def _output_of(model, x, layer):
    """The output of ``layer`` (``name`` or ``name:k``) on ``x``, the forward pass stopped there
    (a hook raises with it), so that the layers after it do not run."""
    base, _, call = layer.partition(":")
    want, seen = int(call or 0), [0]

    def hook(m, i, o):
        if seen[0] == want:
            raise _Stop(o)
        seen[0] += 1
    h = dict(model.named_modules())[base].register_forward_hook(hook)
    try:
        model(x)
    except _Stop as s:
        return s.out
    finally:
        h.remove()
    raise AssertionError(f"{layer} did not run")


def _dense_oracle(model, x, layer, chunk=512):
    """``x ⊙ ∂a_n/∂x`` of every neuron by plain autograd on the real model: one backward pass per
    chunk of stacked copies of each sample (a copy per neuron, one-hot cotangent); cached per
    (model, input, layer)."""
    key = (id(model), x.data_ptr(), tuple(x.shape), layer)
    if key in _ORACLE:
        return _ORACLE[key]
    outs = []
    for b in range(x.shape[0]):
        xb = x[b: b + 1]
        with torch.no_grad():
            shape = _output_of(model, xb, layer).shape[1:]
        n = int(math.prod(shape))
        rows = []
        for s in range(0, n, chunk):
            k = min(chunk, n - s)
            xr = xb.repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)
            with torch.enable_grad():
                a = _output_of(model, xr, layer).reshape(k, -1)
                cot = torch.zeros_like(a)
                cot[torch.arange(k), torch.arange(s, s + k)] = 1
                (g,) = torch.autograd.grad(a, xr, cot)
            rows.append((g * xb).detach())
        outs.append(torch.cat(rows).reshape(*shape, *x.shape[1:]))
    _ORACLE[key] = torch.stack(outs)
    return _ORACLE[key]


def _check_against_autograd(model, x, res, layers, fg=None):
    for n in layers:
        lr = res[n]
        li = _dense_oracle(model, x, n) if lr.images is not None or lr.stats is not None else None
        if lr.images is not None:
            assert rel_err(lr.images, li) <= TOL, (n, lr.strategy)
        if lr.filter_images is not None:
            assert rel_err(lr.filter_images, autograd_filter_images(model, x, n)) <= TOL, (n, lr.strategy)
        if lr.stats is not None:
            B = x.shape[0]
            want = li_stats_dense(li.reshape(B, -1, *x.shape[1:]), x, fg).reshape(lr.stats.shape)
            assert rel_err(lr.stats, want) <= TOL, (n, lr.strategy)


# ----------------------------------------------------------------------------- the cost model
def test_cost_model_forward_for_a_3x3_receptive_field_and_reverse_for_resnet18_layer4_at_224():
    """Planned from the graph geometry and one forward pass (no scan runs): a ReLU after one 3 × 3
    conv at 224 × 224 (receptive field 3 × 3: a 27-entry patch per neuron) is cheaper forward;
    ResNet-18's layer4 at 224 (receptive field wider than the image: a 150,528-entry patch for
    each of 25,088 neurons, over any memory budget) runs reverse."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = torch.rand(1, 3, 224, 224)
    small = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()).eval()
    plan = nns.Scanner(small, ["1"], stats=False, filter_images=True).plan(x)
    lp = plan["1"]
    assert isinstance(plan, Plan) and plan.mode == "auto"
    assert lp.strategy == "forward" and lp.forward_s < lp.reverse_s, str(plan)
    assert plan.tiles == 1 and plan.forward_memory <= plan.fit_budget

    resnet = tv.models.resnet18().eval()
    plan = nns.Scanner(resnet, ["relu", "layer4"], stats=False, filter_images=True, max_memory="2G").plan(x)
    lp = plan["layer4"]
    assert lp.strategy == "reverse" and lp.rows == 512, str(plan)
    assert lp.reverse_s < lp.forward_s  # forward is over the budget (inf) at this size
    # below the max-pool the sweep would run a 7 x 7 transposed conv back to RGB on 112 x 112
    # maps: contracting with the max-pool's patches (11 x 11 windows) is predicted cheaper
    assert plan.cut == "maxpool" and lp.cut == "maxpool", str(plan)
    text = str(plan)
    for part in ("layer4", "relu", "reverse", "share", "memory"):
        assert part in text, text


def test_plan_is_recorded_and_each_layer_names_its_strategy():
    model, x, layers = _case("small_resnet")
    sc = nns.Scanner(model, layers, backend="reference", stats=False, filter_images=True)
    plan = sc.plan(x, forward=["relu", "layer1"])
    assert plan.forward_layers == ["relu", "layer1"] and plan.reverse_layers == ["layer2", "lrelu", "fc"]
    res = sc.scan(x, plan=plan)
    assert res.plan is plan and res.strategy == "mixed"
    for n in layers:
        assert res[n].strategy == plan.strategy_of(n)
        assert res[n].backend == ("autograd" if plan.strategy_of(n) == "reverse" else "reference")
    d = plan.to_dict()
    json.dumps(d)
    assert [lay["strategy"] for lay in d["layers"]] == [plan.strategy_of(n) for n in layers]
    assert abs(sum(lp.share for lp in plan.layers) - 1.0) < 1e-9
    auto = sc.scan(x)
    # one sample's forward scan fits the budget here: "auto" keeps every layer forward
    assert isinstance(auto.plan, Plan) and auto.strategy == "forward"
    assert all(auto[n].strategy == "forward" for n in layers)
    forced = nns.Scanner(model, layers, backend="reference", strategy="reverse", stats=False,
                         filter_images=True).scan(x)
    assert forced.plan.mode == "reverse" and forced.strategy == "reverse"
    with pytest.raises(ValueError, match="the plan is of layers"):
        nns.Scanner(model, layers[:2], backend="reference").scan(x, plan=plan)


def test_forced_cut_must_be_forward_ungated_and_on_every_path():
    model, x, layers = _case("small_resnet")
    sc = nns.Scanner(model, layers, backend="reference", stats=False, filter_images=True)
    with pytest.raises(ValueError, match="planned reverse"):
        sc.plan(x, forward=["relu"], cut="layer1")
    with pytest.raises(ValueError, match="neuron gate"):
        sc.plan(x, forward=["relu"], cut="layer1.bn1")  # a ReLU follows it
    with pytest.raises(ValueError, match="does not lie on every path"):
        sc.plan(x, forward=["relu", "layer1", "layer2", "lrelu", "fc"], cut="layer1")


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("forward,cut", [
    (["relu", "layer1"], None),          # mixed, sweeps down to the input
    (["relu", "layer1"], "layer1"),      # mixed, sweeps of layer2 / lrelu / fc stop at layer1
    (["relu"], "relu"),                  # a cut right after the stem
    ([], None),                          # all reverse
])
def test_mixed_plans_equal_autograd(forward, cut):
    model, x, layers = _case("small_resnet")
    fg = torch.zeros(1, 16, 16, dtype=torch.bool)
    fg[:, 2:10, 3:15] = True
    sc = nns.Scanner(model, layers, backend="reference", stats=True, filter_images=True, keep_images=True)
    plan = sc.plan(x, forward=forward, cut=cut)
    assert plan.cut == cut
    res = sc.scan(x, fg, plan=plan)
    for n in layers:
        assert res[n].strategy == ("forward" if n in forward else "reverse")
        if cut is not None and n not in forward:
            assert plan[n].cut == cut
    _check_against_autograd(model, x, res, layers, fg)


@pytest.mark.parametrize("cut,per_sweep", [(None, 3), ("relu", 8)])
def test_cpu_sweeps_stay_within_the_sweep_cap_whatever_the_budget(monkeypatch, cut, per_sweep):
    """On the CPU a sweep plans its rows within ``CPU_SWEEP_BYTES`` (plus the cut's matrix) even
    under a large ``max_memory``: more, smaller sweeps, the same exact results; the plan prices
    the same rows."""
    from nns_cuda.engine import backward as bw

    model, x, layers = _case("small_resnet")
    sc = nns.Scanner(model, layers, backend="reference", stats=True, filter_images=True, max_memory="4G")
    graph = sc.graph(x)
    nodes = [graph.resolve(n) for n in layers[1:]]
    stop = None if cut is None else graph.resolve(cut).idx
    per_row = bw.sweep_bytes_per_row(graph, nodes, stop, 1, x.element_size())
    sizes = []
    run = bw.BackwardSweep.run

    def counted(self, blocks, stop_at_cut=False):
        sizes.append(sum(b.rows for b in blocks))
        return run(self, blocks, stop_at_cut)

    monkeypatch.setattr(bw.BackwardSweep, "run", counted)
    wide = sc.scan(x, plan=sc.plan(x, forward=["relu"], cut=cut))
    assert len(sizes) == 1  # every row fits one sweep
    rows = sum(sizes)
    cap = per_sweep * per_row  # with a cut its contraction's temporaries take part of it
    monkeypatch.setattr(bw, "CPU_SWEEP_BYTES", cap)
    sizes.clear()
    plan = sc.plan(x, forward=["relu"], cut=cut)
    res = sc.scan(x, plan=plan)
    assert sum(sizes) == rows and len(sizes) > 2 and max(sizes) <= per_sweep
    if cut is None:  # without a cut the plan prices exactly these sweeps
        assert max(sizes) == per_sweep and plan.reverse_memory == cap
    for n in layers:
        for key in ("filter_images", "stats"):
            assert torch.equal(getattr(res[n], key), getattr(wide[n], key)) or \
                rel_err(getattr(res[n], key), getattr(wide[n], key)) <= TOL, (n, key)
    _check_against_autograd(model, x, res, layers)



def _one_channel_net():
    """Convs the row-by-row transposed conv takes (3 × 3 padded and valid, dilated, 1 × 1) and
    ones it leaves to the dense conv (stride 2, grouped, padding beyond the kernel's reach)."""
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),                # 1
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),      # 3: strided
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),    # 5: dilated
        nn.Conv2d(8, 8, 3, groups=2, padding=1), nn.ReLU(),      # 7: grouped
        nn.Conv2d(8, 6, 1, padding=1), nn.ReLU(),                # 9: padding beyond a 1 x 1 kernel
        nn.Conv2d(6, 5, 3), nn.ReLU(),                           # 11: valid
        nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),        # 14: BN scale folded into a 1 x 1
    ).double().eval()


@pytest.mark.parametrize("case", ["small_resnet", "small_resnet_b2", "one_channel_net"])
def test_one_channel_rows_take_the_row_by_row_transposed_conv_with_the_same_results(monkeypatch, case):
    """A layer's own cotangent rows are non-zero in one channel each (filter rows, and one-hot
    neuron rows): through gates, BN scales and residual sums to the first transposed conv, which
    then runs as one small GEMM per row. With and without it the reverse scans agree and equal
    autograd."""
    from nns_cuda.engine import backward as bw

    if case == "one_channel_net":
        model = randomize_bn(_one_channel_net())
        x = torch.rand(2, 3, 13, 13, generator=torch.Generator().manual_seed(4), dtype=torch.float64) - 0.3
        layers = ["1", "3", "5", "7", "9", "11", "14"]
    else:
        model, x, layers = _case("small_resnet", 2 if case.endswith("b2") else 1)
    taken = []
    conv = bw.BackwardSweep._conv

    def counted(self, node, g, owned):
        taken.append(self._chan is not None and bw.one_channel_ok(node))
        return conv(self, node, g, owned)

    monkeypatch.setattr(bw.BackwardSweep, "_conv", counted)
    # one layer per scan: the convs that took the row-by-row path are the ones the plan prices so
    from nns_cuda.engine.plan import RATES, _Costs
    sc = nns.Scanner(model, layers, backend="reference", stats=False, filter_images=True, strategy="reverse")
    graph = sc.graph(x)
    seen = []
    one = bw.BackwardSweep._conv_one_channel
    monkeypatch.setattr(bw.BackwardSweep, "_conv_one_channel",
                        lambda self, node, g, chan: seen.append(node.idx) or one(self, node, g, chan))
    for n in layers:
        node = graph.resolve(n)
        seen.clear()
        nns.Scanner(model, [n], backend="reference", stats=False, filter_images=True, strategy="reverse").scan(x)
        costs = _Costs(graph, None, [node], RATES["cpu"], 8, False, True, False)
        assert costs.one_channel_convs(node, costs.swept([node], None)) == set(seen), n
    monkeypatch.setattr(bw.BackwardSweep, "_conv_one_channel", one)
    out = {}
    for on in (True, False):
        if not on:
            monkeypatch.setattr(bw, "one_channel_ok", lambda node: False)
        taken.clear()
        sc = nns.Scanner(model, layers, backend="reference", stats=True, filter_images=True, strategy="reverse")
        out[on] = sc.scan(x)
        assert any(taken) == on and not all(taken)
    for n in layers:
        for key in ("filter_images", "stats"):
            assert rel_err(getattr(out[True][n], key), getattr(out[False][n], key)) <= TOL, (n, key)
    _check_against_autograd(model, x, out[True], layers)


@pytest.mark.parametrize("cut", ["mixed", "pool"])
def test_mixed_plan_with_a_cut_through_concatenations_equals_autograd(cut):
    """A cut at a forward layer (``mixed``, a concatenation) or at a node that is no requested
    layer (the max-pool after it: propagated forward for the cut alone)."""
    model, x, layers = _case("concat_net", batch=2)
    layers = [n for n in layers if n != "pool"]
    sc = nns.Scanner(model, layers, backend="reference", stats=False, filter_images=True)
    plan = sc.plan(x, forward=["stem_relu", "mixed"], cut=cut)
    assert plan.cut == cut and all(plan[n].cut == cut for n in plan.reverse_layers)
    res = sc.scan(x, plan=plan)
    assert [res[n].strategy for n in layers] == ["forward"] * 2 + ["reverse"] * 3
    _check_against_autograd(model, x, res, layers)


def test_cut_assembled_from_row_bands_equals_autograd():
    """The forward part runs in bands of rows and the cut's patches are joined from them."""
    model, _, layers = _case("small_resnet")
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64) - 0.3
    whole = nns.Scanner(model, layers, backend="reference", stats=False, filter_images=True).plan(
        x, forward=["relu", "layer1"], cut="layer1")
    assert whole.tiles == 1
    sc = nns.Scanner(model, layers, backend="reference", stats=False, filter_images=True,
                     max_memory=int(whole.forward_memory * 0.8))
    plan = sc.plan(x, forward=["relu", "layer1"], cut="layer1")
    assert plan.tiles > 1 and plan.cut == "layer1", str(plan)
    res = sc.scan(x, plan=plan)
    _check_against_autograd(model, x, res, layers)


def test_auto_plan_on_the_cpu_backend_equals_autograd():
    model, x, layers = _case("concat_net", batch=2)
    sc = nns.Scanner(model, layers, stats=False, filter_images=True)
    res = sc.scan(x)  # one sample's forward scan fits: every layer forward
    assert res.strategy == "forward"
    _check_against_autograd(model, x, res, layers)
    mixed = sc.plan(x, forward=layers[:1])  # the cost model's pricing with the first layer forward
    res = sc.scan(x, plan=mixed)
    assert res.strategy == "mixed"
    _check_against_autograd(model, x, res, layers)


# ----------------------------------------------------------------------------- bands of rows
@pytest.mark.parametrize("name,hw", [("small_resnet", 32), ("concat_net", 41)])
def test_forward_in_row_bands_equals_autograd_within_the_budget(name, hw):
    model, _, layers = _case(name)
    x = torch.rand(1, 3, hw, hw, generator=torch.Generator().manual_seed(4), dtype=torch.float64) - 0.3
    layers = [n for n in layers if n != "fc"]  # bands need spatial maps: the linear head stays out
    full = nns.Scanner(model, layers, strategy="forward", stats=True, filter_images=True).plan(x)
    assert full.tiles == 1
    budget = int(full.forward_memory * 0.5)
    sc = nns.Scanner(model, layers, strategy="forward", stats=True, filter_images=True, max_memory=budget)
    plan = sc.plan(x)
    assert plan.tiles > 1 and plan.forward_memory <= budget, str(plan)
    res = sc.scan(x)
    for n in layers:  # filter images: sums over every band's part of the layer
        assert rel_err(res[n].filter_images, autograd_filter_images(model, x, n)) <= TOL, n
    # the statistics are the very numbers of the untiled scan (each neuron reduced once, in one band)
    ref = nns.Scanner(model, layers, strategy="forward", stats=True).scan(x)
    for n in layers:
        assert torch.equal(res[n].stats, ref[n].stats), n


def test_auto_never_plans_forward_over_the_budget():
    model, x, layers = _case("small_resnet")
    big = nns.Scanner(model, layers, stats=True, filter_images=True).plan(x)
    need = max(lp.memory for lp in big.layers if lp.strategy == "forward")
    for frac in (0.5, 0.05, 1e-4):
        budget = max(1, int(need * frac))
        plan = nns.Scanner(model, layers, stats=True, filter_images=True, max_memory=budget).plan(x)
        for lp in plan.layers:
            if lp.strategy == "forward":
                assert plan.forward_memory <= budget, str(plan)
    # forced forward with a budget that no band fits: a MemoryError that says what to do
    with pytest.raises(MemoryError, match="strategy='reverse'"):
        nns.Scanner(model, layers, strategy="forward", max_memory=1000).plan(x)



def test_auto_plan_stays_within_the_batching_budget_when_a_plan_fits_there(monkeypatch):
    """Left to the cost model, a plan holds one sample within the batching budget when some plan
    fits there, even if one over it (within the per-sample bound) is predicted cheaper; it uses
    the per-sample bound only when nothing fits the batching budget. VGG-16 at 224 × 224 with
    the CPU defaults of a 24 GB machine (2 GiB batching, 6 GiB per sample): the cheapest plan
    within 6 GiB cuts at ``features.9`` with a matrix over 2 GiB."""
    tv = pytest.importorskip("torchvision")
    import nns_cuda.engine.scanner as scanner_mod

    torch.manual_seed(0)
    model = tv.models.vgg16().eval()
    x = torch.rand(1, 3, 224, 224)
    layers = [f"features.{k}" for k in (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)]
    gib = 1 << 30
    monkeypatch.setattr(scanner_mod, "default_budget", lambda device, fit=False: 6 * gib if fit else 2 * gib)
    plan = nns.Scanner(model, layers, stats=False, filter_images=True).plan(x)
    assert plan.fit_budget == 2 * gib and plan.budget == 2 * gib, str(plan)
    assert max(plan.forward_memory, plan.reverse_memory) <= 2 * gib, str(plan)
    assert plan.forward_layers and plan.reverse_layers, str(plan)

    wide = nns.Scanner(model, layers, stats=False, filter_images=True, max_memory=6 * gib).plan(x)
    assert max(wide.forward_memory, wide.reverse_memory) > 2 * gib, str(wide)
    assert wide.predicted_s < plan.predicted_s

    # statistics of every neuron at 32 x 32 (per-neuron reverse sweeps): forward patches over a
    # 64 KiB batching budget are predicted far more than FIT_GAIN times faster, so one sample's
    # bound decides
    small, xs, names = _case("small_resnet")
    tiny = 64 << 10
    monkeypatch.setattr(scanner_mod, "default_budget", lambda device, fit=False: 6 * gib if fit else tiny)
    wide = nns.Scanner(small, names, stats=True, filter_images=False).plan(xs)
    assert wide.fit_budget == 6 * gib and wide.budget == tiny, str(wide)
    assert wide.forward_layers and wide.forward_memory > tiny, str(wide)
    narrow = nns.Scanner(small, names, stats=True, filter_images=False, max_memory=tiny).plan(xs)
    assert narrow.predicted_s > FIT_GAIN * wide.predicted_s, (str(narrow), str(wide))

# ----------------------------------------------------------------------------- measured memory
_MEMORY_SCRIPT = r"""
import json, resource, sys
import torch
from torch import nn
import nns_cuda as nns

torch.manual_seed(0)
torch.set_num_threads(1)
model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(24, 24, 3, padding=1), nn.ReLU()).eval()
layers = ["1", "3", "6", "8"]
x = torch.rand(1, 3, 80, 80)
budget = int(sys.argv[1])
untiled = sys.argv[2] == "untiled"
nns.Scanner(model, layers, strategy="forward", filter_images=True).scan(x[:, :, :12, :12])  # load the kernels


def status(key):
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) * 1024


def reset_peak():
    # the high-water mark of this process's own memory: ru_maxrss alone would keep the peak of
    # the parent that forked it (Linux carries it across exec), so reset the mark (clear_refs 5)
    # and read VmHWM; where that is not allowed, ru_maxrss
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


sc = nns.Scanner(model, layers, strategy="forward", stats=True, filter_images=True,
                 max_memory=None if untiled else budget)
plan = sc.plan(x)
exact = reset_peak()
before = status("VmRSS")
res = sc.scan(x)
peak = status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = sum(t.numel() * t.element_size() for n in layers for t in (res[n].stats, res[n].filter_images,
                                                                   res[n].activations, res[n].gates))
print(json.dumps({"before": before, "peak": peak, "tiles": plan.tiles, "predicted": plan.forward_memory,
                  "results": out, "abs_sum": [float(res[n].stat("abs_sum").sum()) for n in layers]}))
"""


def _measure(tmp_path, budget, mode):
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script), str(budget), mode], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forward_scan_peak_memory_stays_within_max_memory(tmp_path):
    """A forward scan whose one sample needs ~6x the planted max_memory untiled: the plan runs
    it in bands of rows, and the peak RSS of a fresh interpreter (its own high-water mark, reset
    before the scan; ``ru_maxrss`` where that cannot be reset) grows by
    no more than the budget (the working set) plus the results it returns (statistics, filter
    images, activations) plus 8 MiB for the allocator; the same scan untiled grows by far more.
    Both give the same statistics."""
    budget = 24 << 20
    tiled = _measure(tmp_path, budget, "tiled")
    full = _measure(tmp_path, budget, "untiled")
    assert tiled["tiles"] > 1 and full["tiles"] == 1
    assert tiled["predicted"] <= budget < 5 * budget < full["predicted"], (tiled, full)
    grew_tiled = tiled["peak"] - tiled["before"]
    grew_full = full["peak"] - full["before"]
    assert grew_tiled <= budget + tiled["results"] + (8 << 20), (grew_tiled / 2**20, tiled, full)
    assert grew_full > 3 * budget + full["results"], (grew_full / 2**20, full)
    for a, b in zip(tiled["abs_sum"], full["abs_sum"]):
        assert math.isclose(a, b, rel_tol=1e-5), (tiled["abs_sum"], full["abs_sum"])
