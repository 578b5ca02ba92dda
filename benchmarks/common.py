"""Shared benchmark machinery: environment header, precision switches, timing and peak memory,
measured machine peaks, the workloads, the gated FLOP / byte floor (``benchmarks/NOTES.md``, "Floors"), statistics
comparison, JSON and markdown output.

Nothing here asserts a speed goal: figures are measured and reported.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch  # before nns_cuda: its extension links against torch's libraries
import torch.nn.functional as F
from torch import nn

import nns_cuda
from nns_cuda.engine.graph import ACTIVATIONS, GNode, ScanGraph, build_graph
from nns_cuda.ops.reference.stats import NUM_STATS, STAT_INDEX, li_stats_dense

from .bench_summary import method_label  # torch-free, so that the summary works without torch

__all__ = [
    "PRECISIONS", "precision", "env_info", "git_commit", "sync", "PeakMemory", "time_runs",
    "measure_peaks", "Workload", "WORKLOADS", "QUICK_WORKLOADS", "FULL_WORKLOADS",
    "build_model", "make_inputs", "conv_layer_names", "NEURON_SETS", "FloorCount", "NodeCount", "count_floor",
    "reverse_flops", "stats_rel_err", "stats_errors", "neuron_gates", "TinyNet", "write_json", "markdown_table",
    "method_label", "fmt",
]

PRECISIONS = ("fp32", "tf32")
#: fp32 results must match the reference within this relative error (per statistic column).
FP32_TOL = 1e-4
#: tf32 errors are measured and reported; above this they are flagged in the table, never fatal.
TF32_FLAG = 5e-2


# ----------------------------------------------------------------------------- precision
@contextlib.contextmanager
def precision(p: str) -> Iterator[None]:
    """Set float32 matmul / convolution precision for the block: ``"fp32"`` (true fp32: TF32
    off for cuBLAS *and* cuDNN, whose default is on) or ``"tf32"`` (TF32 tensor cores on)."""
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {p!r}")
    on = p == "tf32"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
               torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        torch.set_float32_matmul_precision("high" if on else "highest")
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[0], old[1]
            torch.set_float32_matmul_precision(old[2])


# ----------------------------------------------------------------------------- environment
def git_commit() -> str:
    """The checkout's commit (read-only ``git rev-parse``; ``NNS_COMMIT`` overrides), with
    ``+dirty`` when tracked files differ from it; ``"unknown"`` without git."""
    env = os.environ.get("NNS_COMMIT")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        c = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        if c.returncode != 0:
            return "unknown"
        commit = c.stdout.strip()
        d = subprocess.run(["git", "--no-optional-locks", "-C", root, "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True, timeout=20)
        return commit + ("+dirty" if d.returncode == 0 and d.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info(device: str) -> Dict[str, Any]:
    """Machine, versions, commit and date for the JSON header."""
    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nns_cuda": nns_cuda.__version__,
        "extension": nns_cuda.ext_info(),
        "commit": git_commit(),
        "device": device,
        "gpu": None,
    }
    try:
        import captum

        info["captum"] = captum.__version__
    except ImportError:
        info["captum"] = None
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                       "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                       "driver_cuda": _driver_version()}
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> Optional[str]:
    try:
        c = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return c.stdout.strip().splitlines()[0] if c.returncode == 0 and c.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ----------------------------------------------------------------------------- timing, memory
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_bytes() -> int:
    """Current resident set size in bytes (``/proc/self/statm``; the peak where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory of a block above what was allocated when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
    CPU: resident set size sampled every 2 ms by a thread (``/proc/self/statm``), minus the RSS
    at entry — an estimate of the working set that also counts allocator caching."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = rss_bytes()
            self._max = self.base
            self._stop = threading.Event()
            self._t = threading.Thread(target=self._sample, daemon=True)
            self._t.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = max(0, torch.cuda.max_memory_allocated() - self.base)
        else:
            self._stop.set()
            self._t.join()
            self._max = max(self._max, rss_bytes())
            self.peak = max(0, self._max - self.base)


def time_runs(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1,
              max_seconds: Optional[float] = None) -> Tuple[List[float], Any, int]:
    """Run ``fn`` ``warmup`` times, then up to ``repeats`` timed times (at least one; stop early
    once ``max_seconds`` of timed runs have passed). CUDA: ``torch.cuda.Event`` pairs with a
    synchronize; CPU: ``time.perf_counter``. Returns (seconds per run, last output, peak bytes
    over the timed runs)."""
    out = None
    for _ in range(max(0, warmup)):
        out = fn()
        sync(device)
    out = None
    times: List[float] = []
    with PeakMemory(device) as pm:
        for i in range(max(1, repeats)):
            if device == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                out = fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            if max_seconds is not None and sum(times) >= max_seconds:
                break
    return times, out, pm.peak


def measure_peaks(device: str, quick: bool = False) -> Dict[str, Any]:
    """Peak matmul throughput (fp32, tf32, bf16 on CUDA; fp32 on CPU) and copy bandwidth
    (bytes read + written per second), measured in this run (for the floors)."""
    res: Dict[str, Any] = {"device": device}
    if device == "cuda":
        n, reps = (4096, 3) if quick else (8192, 5)
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        for p in ("fp32", "tf32"):
            with precision(p):
                ts, _, _ = time_runs(lambda: a @ b, "cuda", reps, warmup=2)
            res[f"{p}_flops"] = 2 * n**3 / statistics.median(ts)
        ah, bh = a.bfloat16(), b.bfloat16()
        ts, _, _ = time_runs(lambda: ah @ bh, "cuda", reps, warmup=2)
        res["bf16_flops"] = 2 * n**3 / statistics.median(ts)
        del a, b, ah, bh
        nbytes = (256 << 20) if quick else (2 << 30)
        src = torch.empty(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        ts, _, _ = time_runs(lambda: dst.copy_(src), "cuda", reps, warmup=2)
        res["copy_bytes_per_s"] = 2 * nbytes / statistics.median(ts)
        res["matmul_n"], res["copy_bytes"] = n, nbytes
        del src, dst
        torch.cuda.empty_cache()
    else:
        n, reps = (1024, 3) if quick else (2048, 5)
        a, b = torch.randn(n, n), torch.randn(n, n)
        ts, _, _ = time_runs(lambda: a @ b, "cpu", reps, warmup=1)
        res["fp32_flops"] = 2 * n**3 / statistics.median(ts)
        res["tf32_flops"] = None  # TF32 is a CUDA tensor-core mode
        nbytes = (64 << 20) if quick else (512 << 20)
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        ts, _, _ = time_runs(lambda: dst.copy_(src), "cpu", reps, warmup=1)
        res["copy_bytes_per_s"] = 2 * nbytes / statistics.median(ts)
        res["matmul_n"], res["copy_bytes"] = n, nbytes
    return res


# ----------------------------------------------------------------------------- workloads
@dataclass(frozen=True)
class Workload:
    """One benchmark configuration.

    task ``"stats"``: every conv neuron's learned image reduced to the fused statistics
    (STAT_NAMES) with a box foreground mask; ``"filters"``: the filter images of every filter
    of every conv layer. ``conv_layers``: only the first n conv layers (quick runs)."""

    name: str
    model: str                 # nns_cuda.models zoo name, or "tiny" (TinyNet below)
    size: int                  # input side (square)
    task: str = "stats"
    conv_layers: Optional[int] = None
    batch_cuda: int = 32
    batch_cpu: int = 1
    cuda_only: bool = False
    build_kwargs: Tuple[Tuple[str, Any], ...] = ()
    description: str = ""


WORKLOADS: Dict[str, Workload] = {w.name: w for w in [
    Workload("vgg16_32", "vgg16_cifar", 32, batch_cuda=64, description="VGG-16 (CIFAR, BN) @32, all conv neurons"),
    Workload("resnet18_32", "resnet18_cifar", 32, batch_cuda=64,
             description="ResNet-18 (CIFAR) @32, all conv neurons incl. the 3 shortcut 1x1 convs"),
    Workload("vgg16_64", "vgg16_cifar", 64, batch_cuda=16, description="VGG-16 (CIFAR, BN) @64, all conv neurons"),
    Workload("alexnet_64", "alexnet_cifar", 64, batch_cuda=64, build_kwargs=(("input_size", 64),),
             description="AlexNet (CIFAR variant) @64, all conv neurons"),
    Workload("resnet18_224_filters", "tv:resnet18", 224, task="filters", batch_cuda=2, cuda_only=True,
             description="torchvision ResNet-18 @224, filter images of every conv filter"),
    Workload("vgg16_224_filters", "tv:vgg16", 224, task="filters", batch_cuda=1, cuda_only=True,
             description="torchvision VGG-16 @224, filter images of every conv filter"),
    # quick (CPU, CI-sized) and test workloads
    Workload("vgg16_32_head4", "vgg16_cifar", 32, conv_layers=4, batch_cuda=64,
             description="VGG-16 (CIFAR, BN) @32, the first 4 conv layers (quick mode)"),
    Workload("tiny", "tiny", 12, batch_cuda=4, batch_cpu=2,
             description="TinyNet @12 (conv/BN/ReLU/max-pool/avg-pool/residual), all conv neurons (tests)"),
    Workload("tiny_filters", "tiny", 12, task="filters", batch_cuda=4, batch_cpu=2,
             description="TinyNet @12, filter images of every conv filter (tests)"),
]}
#: In priority order (a suite time limit skips the tail).
FULL_WORKLOADS = ("vgg16_32", "resnet18_32", "resnet18_224_filters", "vgg16_64", "alexnet_64",
                  "vgg16_224_filters")
QUICK_WORKLOADS = ("vgg16_32_head4", "tiny_filters")


class TinyNet(nn.Module):
    """A small CNN with every construct of the scanner: conv (stride, padding), BN, ReLU,
    max-pool, average pool, a residual block with a 1×1 shortcut, adaptive pool, linear."""

    def __init__(self, c: int = 3, width: int = 6, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 3, padding=1, bias=True)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.short = nn.Conv2d(2 * width, 2 * width, 1, stride=2, bias=False)
        self.relu3 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2, stride=1)
        self.conv4 = nn.Conv2d(2 * width, width, 2, padding=0, bias=True)
        self.relu4 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)) + self.short(x))
        x = self.relu4(self.conv4(self.pool2(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Random eval-mode BN statistics (a freshly built net has mean 0 / var 1: BN would be an
    identity up to eps, hiding bugs in the scale)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def build_model(wl: Workload, device: str, seed: int = 0) -> nn.Module:
    """The workload's model: random weights (seeded), eval mode, float32, ReLUs made
    non-inplace (the baselines capture conv outputs that an in-place ReLU would overwrite)."""
    if wl.model == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TinyNet()
    else:
        from nns_cuda import models

        model = models.build(wl.model, seed=seed, **dict(wl.build_kwargs))
    gen = torch.Generator().manual_seed(seed + 1)
    _randomize_bn(model, gen)
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)) and getattr(m, "inplace", False):
            m.inplace = False
    return model.eval().float().to(device)


def make_inputs(wl: Workload, batch: int, device: str, seed: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard-normal inputs ``[B, 3, S, S]`` and a box foreground mask ``[B, S, S]`` (the
    central half of each side, shifted by one pixel per sample)."""
    gen = torch.Generator().manual_seed(seed)
    S = wl.size
    x = torch.randn(batch, 3, S, S, generator=gen)
    fg = torch.zeros(batch, S, S, dtype=torch.bool)
    for b in range(batch):
        o = b % max(1, S // 8)
        fg[b, S // 4 + o: 3 * S // 4 + o, S // 4: 3 * S // 4] = True
    return x.to(device), fg.to(device)


NEURON_SETS = ("conv", "act")


def conv_layer_names(model: nn.Module, x: torch.Tensor, first: Optional[int] = None,
                     neurons: str = "conv") -> List[str]:
    """Scan addresses (docs/spec.md §0) of the model's conv nodes in forward order (``neurons="conv"``),
    or of the activations that follow them (``"act"``: the first ReLU reached from each conv
    through BN / ``+`` / identity nodes with a single user, each once; a conv with no such
    ReLU stays). ``first``: only the first n conv layers."""
    if neurons not in NEURON_SETS:
        raise ValueError(f"neurons must be one of {NEURON_SETS}, got {neurons!r}")
    graph = build_graph(model, x[:1])
    convs = [g for g in graph.nodes if g.kind == "conv"]
    convs = convs if first is None else convs[:first]
    if neurons == "conv":
        return [g.name for g in convs]
    out: List[str] = []
    for g in convs:
        u = g
        piecewise = ("relu", "leaky_relu", "hardtanh")
        while u.kind not in piecewise and len(u.users) == 1 \
                and graph.nodes[u.users[0]].kind in ("bn", "add", "identity") + piecewise:
            u = graph.nodes[u.users[0]]
        name = u.name if u.kind in piecewise else g.name
        if name not in out:
            out.append(name)
    return out


# ----------------------------------------------------------------------------- floors
@dataclass
class NodeCount:
    name: str
    kind: str
    flops: int
    bytes_read: int
    bytes_written: int
    active_out: int          # neurons whose learned image may be non-zero (summed over the batch)
    n_out: int               # all neurons (summed over the batch)
    window_in: int           # D·Rh·Rw of an input patch (0: none)
    window_out: int


@dataclass
class FloorCount:
    """Useful work of the forward patch strategy (``benchmarks/NOTES.md``, "Floors") for one batch."""

    batch: int
    flops: int
    bytes: int
    neurons: int             # requested neurons × batch
    active: int              # requested neurons with a possibly non-zero image × batch
    nodes: List[NodeCount] = field(default_factory=list)

    def time(self, peak_flops: Optional[float], bandwidth: Optional[float]) -> Optional[float]:
        """``max(FLOPs / peak, bytes / bandwidth)`` in seconds (None without peaks)."""
        if not peak_flops or not bandwidth:
            return None
        return max(self.flops / peak_flops, self.bytes / bandwidth)

    def summary(self) -> Dict[str, Any]:
        return {"batch": self.batch, "flops": self.flops, "bytes": self.bytes, "neurons": self.neurons,
                "active": self.active}


def _neuron_gate_active(graph: ScanGraph, g: GNode, values: Dict[Any, Any]) -> Optional[torch.Tensor]:
    """Where ``g_n != 0`` for the neurons of ``g`` (docs/spec.md §1): the gate of the activation that
    follows directly, else None (g_n = 1)."""
    u = graph.gate_user(g)
    if u is None:
        return None
    return _act_gate_nonzero(u, values[u.inputs[0]], u)


def _act_gate_nonzero(u: GNode, z: torch.Tensor, _node: GNode) -> torch.Tensor:
    if u.kind == "relu":
        return z > 0
    if u.kind == "leaky_relu":
        return torch.ones_like(z, dtype=torch.bool) if u.attrs["slope"] != 0 else z > 0
    if u.kind == "hardtanh":
        return (z > u.attrs["lo"]) & (z < u.attrs["hi"])
    # act_grad (opt-in gradient linearisation): local derivative, assumed non-zero
    return torch.ones_like(z, dtype=torch.bool)


def _window_elems(g: GNode, D: int, H: int, W: int) -> int:
    if g.kind == "input":
        return D
    rh, _ = g.gy.window(H, g.shape[1])
    rw, _ = g.gx.window(W, g.shape[2])
    return D * rh * rw


@torch.no_grad()
def count_floor(model: nn.Module, x: torch.Tensor, layers: Sequence[str], elem_bytes: int = 4,
                stats: bool = True, filters: bool = False) -> FloorCount:
    """Gated FLOPs and bytes of the forward patch strategy for the learned images of ``layers``
    on the batch ``x`` (``benchmarks/NOTES.md``, "Floors").

    A neuron is *active* when its learned image can be non-zero: input entries ``x != 0``; conv /
    pool outputs with at least one active input (neuron, tap) pair and ``g_n != 0`` for a conv
    directly followed by its activation; a ReLU output where its input is active and ``z > 0``;
    BN / identity keep the activity (a BN channel with zero scale is inactive); max-pool takes
    the arg-max input's; a residual ``+`` is active where either operand is.

    A conv followed by BN and its activation, with neither the conv's nor the BN's images
    requested, only needs the gated images (the engine fuses that chain): its outputs are then
    gated by the activation too.

    * FLOPs = Σ over active conv / pool outputs and their active input (neuron, tap) pairs of
      ``2·D·|input window|`` (window = the stored receptive-field window, clipped to the image);
      linear layers ``2·D·H·W`` per active (output, input) pair. ReLU / BN / max-pool / ``+`` /
      the statistics are free (fused or pure data movement).
    * bytes = ``elem_bytes`` × (every active input patch read once by each conv / pool / ``+``
      node + every active output patch written once) + the statistics written
      (``NUM_STATS`` values per requested neuron) or the filter images (``C·D·H·W`` per
      requested layer and sample).
    """
    graph = build_graph(model, x[:1])
    req = [graph.resolve(n) for n in layers]
    req_idx = {g.idx for g in req}
    upto = max(g.idx for g in req)
    if len(graph.input_shape) != 3:
        raise ValueError("count_floor needs image inputs [B, D, H, W]")
    D, H, W = graph.input_shape
    P = D * H * W
    B = x.shape[0]
    values = graph.run(x)
    act: Dict[int, torch.Tensor] = {}
    win: Dict[int, int] = {}
    nodes: List[NodeCount] = []

    def record(g, flops=0, rd=0, wr=0):
        a = act[g.idx]
        nodes.append(NodeCount(g.name, g.kind, int(flops), int(rd), int(wr), int(a.sum()), a.numel(),
                               win[g.inputs[0]] if g.inputs else 0, win[g.idx]))

    def window_sum(idx: int) -> int:
        return int(act[idx].sum()) * win[idx] * elem_bytes

    for g in graph.nodes[: upto + 1]:
        k = g.kind
        if k == "aux":
            continue
        if k == "input":
            act[g.idx] = values[g.idx] != 0
            win[g.idx] = D
            continue
        src = g.inputs[0] if g.inputs else None
        if k in ("conv", "avgpool") or (k == "adaptive_avgpool" and g.attrs.get("regular")):
            if not graph.nodes[src].spatial or not g.spatial:
                raise NotImplementedError(f"count_floor: {g.name} is not spatial")
            a_in = act[src].to(torch.float64)
            Ci = a_in.shape[1]
            Co = g.shape[0]
            if k == "conv":
                a = g.attrs
                groups, kern, stride, pad, dil = a["groups"], a["kernel"], a["stride"], a["padding"], a["dilation"]
            elif k == "avgpool":
                a = g.attrs
                groups, kern, stride, pad, dil = Ci, a["kernel"], a["stride"], a["padding"], (1, 1)
                if a["ceil_mode"]:
                    raise NotImplementedError("count_floor: avg-pool with ceil_mode")
            else:
                groups, kern, dil, pad = Ci, g.attrs["kernel"], (1, 1), (0, 0)
                stride = kern
            ones = torch.ones(groups, Ci // groups, kern[0], kern[1], dtype=torch.float64, device=x.device)
            pairs = F.conv2d(a_in, ones, None, stride, pad, dil, groups)           # [B, G, Ho, Wo]
            pairs = pairs.repeat_interleave(Co // groups, dim=1).round().to(torch.int64)
            active = pairs > 0
            if k == "conv":
                gate = _neuron_gate_active(graph, g, values)
                if gate is None and g.idx not in req_idx and len(g.users) == 1 \
                        and graph.nodes[g.users[0]].kind == "bn" and g.users[0] not in req_idx:
                    # conv -> BN -> activation with neither image requested: only the gated
                    # images are needed (the engine fuses this chain)
                    bn = graph.nodes[g.users[0]]
                    u = graph.gate_user(bn)
                    if u is not None:
                        gate = _act_gate_nonzero(u, values[u.inputs[0]], u)
                if gate is not None:
                    active = active & gate
            act[g.idx] = active
            win[g.idx] = _window_elems(g, D, H, W)
            flops = 2 * win[src] * int((pairs * active).sum())
            record(g, flops, window_sum(src), window_sum(g.idx))
        elif k in ACTIVATIONS:
            act[g.idx] = act[src] & _act_gate_nonzero(g, values[src], g)
            win[g.idx] = win[src]
        elif k == "bn":
            m = g.module
            s = 1.0 / torch.sqrt(m.running_var + m.eps)
            if m.weight is not None:
                s = s * m.weight
            a = act[src]
            shape = [1, -1] + [1] * (a.dim() - 2)
            act[g.idx] = a & (s != 0).to(a.device).view(shape) if a.shape[1] == s.numel() else a
            win[g.idx] = win[src]
        elif k == "identity":
            act[g.idx] = act[src]
            win[g.idx] = win[src]
        elif k == "maxpool":
            ind = values[("indices", g.idx)]
            a_in = act[src]
            act[g.idx] = torch.gather(a_in.flatten(2), 2, ind.flatten(2)).view_as(ind)
            win[g.idx] = _window_elems(g, D, H, W)
            rd = int(act[g.idx].sum()) * win[src] * elem_bytes
            record(g, 0, rd, window_sum(g.idx))
        elif k == "add":
            a0, a1 = g.inputs
            s0, s1 = act[a0], act[a1]
            if not g.spatial:
                s0, s1 = s0.reshape(B, -1), s1.reshape(B, -1)
            act[g.idx] = s0 | s1
            win[g.idx] = _window_elems(g, D, H, W) if g.spatial else P
            record(g, 0, window_sum(a0) + window_sum(a1), window_sum(g.idx))
        elif k == "reshape":
            act[g.idx] = act[src].reshape(B, -1)
            win[g.idx] = P
            if graph.nodes[src].spatial:  # densify: place every window into the whole image
                record(g, 0, window_sum(src), window_sum(g.idx))
        elif k == "linear":
            a_in = act[src].reshape(B, -1)
            gate = _neuron_gate_active(graph, g, values)
            any_in = a_in.any(1, keepdim=True)
            active = any_in.expand(B, g.shape[0]).clone()
            if gate is not None:
                active &= gate.reshape(B, -1)
            act[g.idx] = active
            win[g.idx] = P
            flops = 2 * P * int((active.sum(1) * a_in.sum(1)).sum())
            record(g, flops, window_sum(src), window_sum(g.idx))
        else:
            raise NotImplementedError(f"count_floor: node kind {k!r} ({g.name})")
    out_bytes = 0
    n_req = sum(int(math.prod(g.shape)) for g in req) * B
    if stats:
        out_bytes += n_req * NUM_STATS * elem_bytes
    if filters:
        out_bytes += sum(g.shape[0] for g in req) * B * P * elem_bytes
    total_bytes = sum(n.bytes_read + n.bytes_written for n in nodes) + out_bytes
    active = sum(int(act[g.idx].sum()) for g in req)
    return FloorCount(B, sum(n.flops for n in nodes), total_bytes, n_req, active, nodes)


def reverse_flops(model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> int:
    """Dense (ungated) FLOPs of the reverse strategy for filter images: one input-gradient pass
    per filter of each requested layer, i.e. Σ_l C_l · Σ_{conv/linear j before l} 2·MACs_j
    (the input gradient of a conv costs what its forward costs). A rough lower bound for
    comparing strategies, not the gated floor."""
    graph = build_graph(model, x[:1])
    fw: Dict[int, int] = {}
    acc = 0
    for g in graph.nodes:
        if g.kind == "conv":
            Co, Ho, Wo = g.shape
            Cig = g.module.weight.shape[1]
            kh, kw = g.attrs["kernel"]
            acc += 2 * Co * Cig * kh * kw * Ho * Wo
        elif g.kind == "linear":
            acc += 2 * g.module.weight.numel()
        fw[g.idx] = acc
    return x.shape[0] * sum(graph.resolve(n).shape[0] * fw[graph.resolve(n).idx] for n in layers)


# ----------------------------------------------------------------------------- statistics
def neuron_gates(graph: ScanGraph, names: Sequence[str], values: Dict[Any, Any]) -> Dict[str, torch.Tensor]:
    """``g_n`` (docs/spec.md §1) of every neuron of each named node from forward ``values``: the slope of
    the activation that follows directly (ReLU: ``1[z > 0]``), else ones. ``{name: [B, *shape]}``."""
    out = {}
    for n in names:
        g = graph.resolve(n)
        z = values[g.idx]
        u = graph.gate_user(g)
        if u is None:
            out[n] = torch.ones_like(z)
        elif u.kind == "relu":
            out[n] = (z > 0).to(z.dtype)
        elif u.kind == "leaky_relu":
            out[n] = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, u.attrs["slope"]))
        elif u.kind == "hardtanh":
            out[n] = _act_gate_nonzero(u, z, u).to(z.dtype)
        else:
            raise NotImplementedError(f"gate of {u.kind}")
    return out


#: statistics that count exactly non-zero entries (nz(t) = [LI(t) != 0]) and are discontinuous
#: in the values: an entry at the rounding level can be exactly 0 in one correct computation and
#: not in another (measured: VGG-16@32 conv6, float32 vs float64, 1 entry of 28.3 M, 2.1e-9 in
#: float64 against a per-neuron image maximum of ~6e-4, exactly 0 in float32 — one flip moves
#: ``fg_xnz_sum`` of that neuron by x(t) = 0.84, 1.7e-2 of the column's maximum).
_COUNTS = (STAT_INDEX["nz_fg"], STAT_INDEX["nz_bg"])
_SUPPORT = (STAT_INDEX["fg_xnz_sum"], STAT_INDEX["fg_xnz_sq_sum"])
_VALUES = tuple(i for i in range(NUM_STATS) if i not in _COUNTS + _SUPPORT)


def stats_errors(got: torch.Tensor, want: torch.Tensor) -> Dict[str, float]:
    """Agreement of two statistic tensors ``[..., NUM_STATS]`` (float64 arithmetic):

    * ``values``: for each value column (sums, squares, dot products),
      ``max |got − want| / max |want|`` over all neurons; the max over columns;
    * ``flip_frac``: entries whose support changed, ``Σ|Δ nz_fg| + Σ|Δ nz_bg|``, as a fraction
      of the non-zero entries of ``want`` (the count columns are discontinuous, see ``_COUNTS``);
    * ``support``: the columns ``fg_xnz_sum`` / ``fg_xnz_sq_sum`` like ``values``, over the
      neurons whose two counts agree exactly (a neuron with a flipped entry is counted in
      ``flip_frac`` instead; elsewhere these columns must agree like any value);
    * ``rel_err``: the max of the three (what the benchmark compares with its tolerance).

    NaN / inf anywhere in ``got`` gives ``inf`` everywhere."""
    g = got.detach().to("cpu", torch.float64).reshape(-1, NUM_STATS)
    w = want.detach().to("cpu", torch.float64).reshape(-1, NUM_STATS)
    if g.shape != w.shape:
        raise ValueError(f"stats_rel_err: shapes differ {tuple(got.shape)} vs {tuple(want.shape)}")
    if g.numel() == 0:
        return {"values": 0.0, "support": 0.0, "flip_frac": 0.0, "rel_err": 0.0}
    if not bool(torch.isfinite(g).all()):
        return {"values": math.inf, "support": math.inf, "flip_frac": math.inf, "rel_err": math.inf}

    def col_err(gg: torch.Tensor, ww: torch.Tensor) -> float:
        if gg.numel() == 0:
            return 0.0
        return float(((gg - ww).abs().amax(0) / ww.abs().amax(0).clamp_min(1e-30)).max())

    vals = list(_VALUES)
    values = col_err(g[:, vals], w[:, vals])
    cnt = list(_COUNTS)
    dn = (g[:, cnt] - w[:, cnt]).abs()
    flip_frac = float(dn.sum() / w[:, cnt].abs().sum().clamp_min(1.0))
    same = (dn == 0).all(1)
    sup = list(_SUPPORT)
    support = col_err(g[same][:, sup], w[same][:, sup])
    return {"values": values, "support": support, "flip_frac": flip_frac,
            "rel_err": max(values, support, flip_frac)}


def stats_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """One number for the agreement of two statistic tensors: ``stats_errors(...)["rel_err"]``
    — per value column ``max |got − want| / max |want|``, the count columns as the fraction of
    entries whose support flipped (see :func:`stats_errors`)."""
    return stats_errors(got, want)["rel_err"]


def dense_stats(li: torch.Tensor, x: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """Statistics of dense learned images ``li [B, n, D, H, W]`` (docs/spec.md §2–§3 definitions in
    ``nns_cuda.ops.reference.stats``): ``[B, n, NUM_STATS]``."""
    return li_stats_dense(li, x, fg)


# ----------------------------------------------------------------------------- output
def write_json(path: str, obj: Any) -> None:
    """Write atomically (a killed run leaves the previous complete file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def fmt(v: Any, kind: str = "g") -> str:
    """Compact number formatting for the table ("–" for missing)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, str):
        return v
    if kind == "s":
        if v >= 100:
            return f"{v:,.0f}"
        if v >= 1:
            return f"{v:.2f}"
        if v >= 1e-3:
            return f"{v * 1e3:.2f} ms"
        return f"{v * 1e6:.1f} µs"
    if kind == "x":
        return f"{v:,.0f}×" if v >= 100 else f"{v:.2f}×" if v < 10 else f"{v:.1f}×"
    if kind == "pct":
        return f"{100 * v:.3g} %"
    if kind == "mib":
        return f"{v / 2**20:,.0f}" if v >= 2**20 else f"{v / 2**20:.2f}"
    if kind == "e":
        return f"{v:.1e}"
    if abs(v) >= 1e5:
        return f"{v:.3g}"
    return f"{v:,.3g}"


_COLUMNS = [
    ("workload", "workload", None), ("method", "method", None), ("prec", "precision", None),
    ("B", "batch", None), ("s/image", "s_per_image", "s"), ("neurons/s", "neurons_per_s", "g"),
    ("GFLOP/s", "gflops", "g"), ("floor eff.", "floor_fraction", "pct"), ("time/floor", "time_over_floor", "x"),
    ("peak MiB", "peak_bytes", "mib"), ("rel. err", "rel_err", "e"), ("ok", "verified", None),
    ("vs dense", "speedup_vs_dense", "x"), ("vs captum", "speedup_vs_captum", "x"), ("notes", "notes", None),
]


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The results table: one line per (workload, method, precision, conv algorithm); the
    method cell names the conv algorithm of engine rows (:func:`method_label`)."""
    head = "| " + " | ".join(c[0] for c in _COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in _COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for _title, key, kind in _COLUMNS:
            v = r.get(key)
            if key == "verified":
                v = "–" if v is None else ("yes" if v else "NO")
            elif key == "method":
                v = method_label(r)
            elif key == "notes":
                v = "; ".join(r.get("notes") or []) + (f" ERROR: {r['error']}" if r.get("error") else "")
                v = v.replace("|", "/")
            elif kind is not None:
                v = fmt(v, kind)
            cells.append(str(v) if v is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
