"""The NNS engine: learned images of all neurons of all layers (SPEC §1, DESIGN §2).

Two exact strategies:

* ``"forward"`` — forward patch propagation. The learned images of every node are carried as
  receptive-field patches ``[B, C, Ho, Wo, D, Rh, Rw]`` (``nns_cuda.reference.ops`` documents the
  layout) and pushed through the frozen network node by node: conv taps place each input
  neuron's patch into its output neuron's window, ReLU gates zero inactive neurons (their
  images are all-zero and cost nothing in the kernels), max-pool routes the arg-max patch,
  average pools average, BatchNorm scales, linear layers are dense GEMMs over full-image
  patches, residual ``+`` re-windows and sums. Statistics and filter images are reduced from
  the patches of the requested layers.
* ``"reverse"`` — one vector–Jacobian product per neuron or filter, batched with
  stacked copies of the batch; any resolution, memory ∝ (chunk × image). Also an oracle.

Backends of the forward strategy: ``"reference"`` (pure PyTorch), ``"cpu"`` (C++ ops),
``"cuda"`` (CUDA ops); ``"auto"`` prefers CUDA for GPU inputs, then the C++ ops, then the
reference. Precisions (``precision=``, see :class:`Scanner`): the input's dtype by default,
float32 / float64 on request, TF32 / bfloat16 / float16 on request (CUDA tensor cores).
Conv algorithms of the forward strategy (``conv_algorithm=``): the direct gated kernels
(``conv_li``), one dense GEMM per image (``conv_li_gemm``), batched GEMMs over the active
(input, tap) pairs of each output position (``conv_li_gather``), or the same as one Triton
kernel that gathers the pairs' rows itself (``conv_li_implicit``, CUDA). Every result records the
backend, strategy, precision and conv algorithm that ran (per convolution:
``ScanResult.conv_algorithms``).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nns_cuda.engine.graph import ACTIVATIONS, GNode, ScanGraph, build_graph, call_out_of_place
from nns_cuda import _extension
from nns_cuda.ops.reference import ops as ref_ops
from nns_cuda.ops.reference.stats import NUM_STATS, STAT_NAMES, li_stats_dense

__all__ = [
    "learned_images",
    "filter_images",
    "layer_image",
    "Scanner",
    "ScanResult",
    "LayerResult",
    "resolve_backend",
    "resolve_precision",
    "resolve_conv_algorithm",
]

BACKENDS = ("auto", "reference", "cpu", "cuda")
STRATEGIES = ("auto", "forward", "reverse")
PRECISIONS = ("auto", "fp32", "fp64", "tf32", "bf16", "fp16")
CONV_ALGORITHMS = ("auto", "direct", "gemm", "gather", "implicit")
#: storage dtype of the learned-image patches for each explicit precision
_STORAGE = {"fp32": torch.float32, "fp64": torch.float64, "tf32": torch.float32, "bf16": torch.bfloat16,
            "fp16": torch.float16}
_LOW_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- helpers
def _image_dims(input_shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """(D, H, W) of the 'image' for an input of non-batch shape ``input_shape`` (SPEC §0)."""
    if len(input_shape) == 3:
        return tuple(input_shape)  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, input_shape[0], input_shape[1])
    if len(input_shape) == 1:
        return (1, 1, input_shape[0])
    raise ValueError(f"inputs must be [B, D, H, W], [B, H, W] or [B, N]; got non-batch shape {list(input_shape)}")


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension: [B, D, H, W] (or [B, N] for an MLP), got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}; convert with x.float()")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x contains {bad} NaN/Inf entries; learned images need finite inputs (clean or drop those samples)")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to the fastest available backend for ``device``; validate explicit ones."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _extension.has_kernel("cuda"):
            return "cuda"
        if device.type == "cpu" and _extension.has_kernel("cpu"):
            return "cpu"
        return "reference"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} needs inputs on {backend}, got {device}; move x with .to('{backend}') "
                             "or use backend='auto'")
        if not _extension.has_kernel(backend):
            raise RuntimeError(f"backend={backend!r} needs the compiled extension nns_cuda._C with {backend.upper()} "
                               f"kernels, which is not available ({_extension.load_error() or 'built without them'}). Rebuild with "
                               "`pip install --no-build-isolation -e .` (FORCE_CUDA=1 for CUDA) or use backend='reference'.")
    return backend


def _check_choice(option: str, value, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{option} must be one of {allowed}, got {value!r}")


def resolve_precision(precision: str, x: torch.Tensor) -> Tuple[str, torch.dtype, torch.dtype]:
    """``(name, storage dtype, result dtype)`` of a ``precision`` option for input ``x``.

    ``"auto"`` is the input's dtype (``"fp32"`` or ``"fp64"``). ``"tf32"`` exists only on CUDA:
    on any other device it raises ``ValueError`` (it never falls back silently). Results
    (statistics, filter images, images) are float32 for ``"tf32"``, ``"bf16"``, ``"fp16"``."""
    _check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        name = "fp64" if x.dtype == torch.float64 else "fp32"
        return name, x.dtype, x.dtype
    if precision == "tf32" and x.device.type != "cuda":
        raise ValueError(f"precision='tf32' exists only on CUDA (TensorFloat-32 is an NVIDIA tensor-core "
                         f"format), but the input is on {x.device}; use precision='fp32' (or 'bf16') here, or "
                         "move the model and the input to a GPU")
    storage = _STORAGE[precision]
    return precision, storage, (torch.float32 if storage in _LOW_DTYPES or precision == "tf32" else storage)


def resolve_conv_algorithm(conv_algorithm: str, device: torch.device, precision: str,
                           backend: Optional[str] = None) -> str:
    """``"direct"``, ``"gemm"`` or ``"gather"`` for a ``conv_algorithm`` option (``precision``
    resolved).

    ``"auto"``: ``"direct"`` on the CPU — measured fastest there (``benchmarks/NOTES.md``: on a
    deep VGG layer the direct kernel runs at ~90 % of the 2-core machine's FMA peak, and the
    gather's row copies cost more than its GEMM gains) — and ``"gather"`` on CUDA, for every
    precision: cuBLAS GEMMs (tensor cores for tf32 / bf16 / fp16) over the active pairs only.
    The CUDA choice is a prediction from the arithmetic (DESIGN §2 floors), not yet measured:
    ``benchmarks/device_check.sh`` times every algorithm side by side on a GPU."""
    _check_choice("conv_algorithm", conv_algorithm, CONV_ALGORITHMS)
    if conv_algorithm == "auto":
        return "gather" if device.type == "cuda" else "direct"
    if conv_algorithm == "implicit" and backend != "reference":  # the reference runs its twin
        from nns_cuda.ops import _triton_conv

        why = _triton_conv.available(device)
        if why:
            raise ValueError(f"conv_algorithm='implicit' cannot run here: {why}")
    if precision == "tf32" and conv_algorithm == "direct":
        raise ValueError("precision='tf32' runs the convolutions as TF32 GEMMs: it needs conv_algorithm='gemm', "
                         "'gather' or 'auto', got 'direct'")
    return conv_algorithm


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device):
    """On CUDA: ``"tf32"`` turns cuBLAS TF32 on for the block; ``"fp32"`` turns TF32 off for
    cuBLAS and cuDNN (whose default is on), so that an explicit fp32 is IEEE float32 throughout.
    Other precisions, and the CPU, leave torch's switches alone. Restored afterwards."""
    if device.type != "cuda" or precision not in ("tf32", "fp32"):
        yield
        return
    on = precision == "tf32"
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = (mm.allow_tf32, cudnn.allow_tf32)
        mm.allow_tf32 = on
        if not on:
            cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mm.allow_tf32, cudnn.allow_tf32 = old


def _gemm_max_elems(budget: int, dtype: torch.dtype) -> int:
    """Chunk bound of ``conv_li_gemm``'s temporaries (gathered operand, GEMM result, index
    table): a quarter of the working-set budget, in elements of ``dtype``."""
    esize = torch.empty((), dtype=dtype).element_size()
    return int(max(1 << 20, budget // (4 * esize)))


def _ops(backend: str):
    if backend == "reference":
        return ref_ops
    from nns_cuda import ops as ext_ops

    return ext_ops


def _default_budget(device: torch.device, fit: bool = False) -> int:
    """Default working-set budget. ``fit=True``: the bound for deciding whether one sample may
    use the forward strategy at all (larger on the CPU than the batching budget)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 8 << 30
    # On the CPU a larger batch does not make the per-position GEMMs faster, so the working set
    # stays small by default (2 GiB, or a quarter of the RAM if that is less).
    return int(min(total * 0.25, (8 << 30) if fit else (2 << 30)))


@dataclass
class _Rep:
    """Learned images of one node: patches [B, C, Ho, Wo, D, Rh, Rw] + anchors; a dense node is
    a 1×1 grid whose window is the whole image."""

    t: torch.Tensor
    ay: torch.Tensor
    ax: torch.Tensor
    active: Optional[torch.Tensor] = None  # bool [B, C, Ho, Wo]: False -> all-zero (see pending)
    #: a per-channel multiplier [C] (pdtype) not yet applied to ``t``: the images are then
    #: ``where(active, t · pending[c], 0)`` (``active`` is then the gate of a 0/1 activation and
    #: ``t`` is not zero where it is False). Only convs (weights scaled per input channel, inactive
    #: inputs never read) and max-pools (routing) take such a rep; :meth:`_PatchEngine._settle`
    #: applies it for everything else. None: ``t`` holds the images.
    pending: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------- results
@dataclass
class LayerResult:
    """What a scan produced for one layer.

    Attributes
    ----------
    name : str
    activations : Tensor [B, *shape] — the layer's output values.
    gates : Tensor [B, *shape] — ``g_n`` (SPEC §1): ReLU gate / LeakyReLU slope, or 1.
    stats : Tensor [B, *shape, NUM_STATS] or None — fused per-neuron statistics (STAT_NAMES).
    filter_images : Tensor [B, C, *image] or None — ``L^k`` (SPEC §1), spatial / channel layers.
    images : Tensor [B, *shape, *image] or None — dense learned images (``keep_images=True``).
    backend, strategy, precision, conv_algorithm : what ran (see :class:`ScanResult`).
    """

    name: str
    activations: torch.Tensor
    gates: torch.Tensor
    stats: Optional[torch.Tensor] = None
    filter_images: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None
    backend: str = ""
    strategy: str = ""
    precision: str = ""
    conv_algorithm: str = ""

    def stat(self, name: str) -> torch.Tensor:
        """One statistic by name (see ``nns_cuda.reference.stats.STAT_NAMES``)."""
        if self.stats is None:
            raise ValueError(f"layer {self.name!r} was scanned without stats; pass stats=True to Scanner")
        if name not in STAT_NAMES:
            raise KeyError(f"unknown statistic {name!r}; known: {list(STAT_NAMES)}")
        return self.stats[..., STAT_NAMES.index(name)]


@dataclass
class ScanResult:
    """Per-layer results of :meth:`Scanner.scan` (mapping-like: ``result[layer]``).

    ``backend`` / ``strategy``: what ran (``"autograd"`` / ``"reverse"`` for the reverse
    strategy). ``precision``: the resolved precision (``"fp32"``, ``"fp64"``, ``"tf32"``,
    ``"bf16"``, ``"fp16"``; ``"auto"`` resolves to the input's dtype). ``conv_algorithm``:
    ``"direct"``, ``"gemm"`` or ``"gather"`` (the resolved option; see :class:`Scanner`),
    ``"autograd"`` for the reverse strategy. ``conv_algorithms``: for every convolution the
    forward strategy ran, the op it used (``"direct"``, ``"gemm"``, ``"gather"``)."""

    layers: Dict[str, LayerResult]
    backend: str
    strategy: str
    input_shape: Tuple[int, ...] = ()
    logits: Optional[torch.Tensor] = None
    precision: str = ""
    conv_algorithm: str = ""
    conv_algorithms: Dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerResult:
        if name not in self.layers:
            raise KeyError(f"layer {name!r} was not scanned; scanned: {list(self.layers)}")
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __iter__(self):
        return iter(self.layers)

    def items(self):
        return self.layers.items()


# ----------------------------------------------------------------------------- engine core
class _Forward:
    """Forward values of the model (node by node, non-inplace) with gates and arg-max indices."""

    def __init__(self, graph: ScanGraph, x: torch.Tensor, gate_outputs: bool):
        self.graph = graph
        try:
            self.values = graph.run(x)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"input of shape {list(x.shape)} does not fit the model: {e}") from e
        self.gate_outputs = gate_outputs

    def value(self, g: GNode) -> torch.Tensor:
        return self.values[g.idx]

    def act_gate(self, g: GNode) -> torch.Tensor:
        """Gate of activation node ``g`` (its local slope at its input)."""
        z = self.values[g.inputs[0]]
        if g.kind == "relu":
            return (z > 0).to(z.dtype)
        if g.kind == "leaky_relu":
            return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, g.attrs["slope"]))
        if g.kind == "hardtanh":  # ReLU6 / Hardtanh: slope 1 strictly inside (lo, hi), as autograd
            return ((z > g.attrs["lo"]) & (z < g.attrs["hi"])).to(z.dtype)
        if g.kind == "act_grad":
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                y = call_out_of_place(g.module, zz)
                (d,) = torch.autograd.grad(y.sum(), zz)
            return d.detach()
        raise AssertionError(g.kind)

    def neuron_gate(self, g: GNode) -> Optional[torch.Tensor]:
        """``g_n`` of the neurons of ``g`` beyond what is already in its propagated images, or None."""
        u = self.graph.gate_user(g)
        if u is not None:
            return self.act_gate(u)
        if self.gate_outputs and g.idx == self.graph.output_idx and g.kind not in ACTIVATIONS:
            z = self.values[g.idx]
            return (z > 0).to(z.dtype)
        return None

    def full_gate(self, g: GNode) -> torch.Tensor:
        ng = self.neuron_gate(g)
        z = self.values[g.idx]
        return torch.ones_like(z) if ng is None else ng


def _bn_scale(mod: nn.Module, dtype) -> torch.Tensor:
    s = 1.0 / torch.sqrt(mod.running_var.to(dtype) + mod.eps)
    if mod.weight is not None:
        s = s * mod.weight.to(dtype)
    return s


class _PatchEngine:
    """Forward patch propagation of one batch with one backend's ops.

    ``dtype`` is the storage dtype of the patches. For bfloat16 / float16 storage the
    per-neuron factors (weights, BN scales, gates, pooling divisors) stay float32 (``pdtype``):
    the ops compute in float32 and round their results once, and element-wise scalings here
    multiply in float32 and round once (:meth:`_scale`)."""

    def __init__(self, graph: ScanGraph, fwd: _Forward, x: torch.Tensor, backend: str, requested: Sequence[int],
                 dtype: torch.dtype, conv_algorithm: str = "direct", gemm_max_elems: int = 0):
        self.graph, self.fwd, self.x = graph, fwd, x
        self.O = _ops(backend)
        self.requested = set(requested)
        self.dtype = dtype
        self.low = dtype in _LOW_DTYPES
        self.pdtype = torch.float32 if self.low else dtype
        self.conv_algorithm = conv_algorithm
        self.gemm_max_elems = gemm_max_elems
        self.used: Dict[str, str] = {}  # conv node name -> the op that ran
        self.B = x.shape[0]
        self.D, self.H, self.W = _image_dims(graph.input_shape)
        self.dev = x.device

    def _scale(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``t * s`` (``s`` broadcast) in the storage dtype; for 16-bit storage the product is
        taken in float32 and rounded once."""
        if not self.low:
            return t * s.to(self.dtype)
        return torch.mul(t, s.to(self.pdtype), out=torch.empty_like(t))

    def _settle(self, r: _Rep) -> _Rep:
        """``r`` with its pending multiplier applied (one pass over the patches), or ``r``."""
        if r.pending is None:
            return r
        B, C, Ho, Wo = r.t.shape[:4]
        mult = r.pending.view(1, C, 1, 1) * r.active.to(self.pdtype)
        return _Rep(self._scale(r.t, mult.view(B, C, Ho, Wo, 1, 1, 1)), r.ay, r.ax, r.active)

    # --- representation helpers
    def _dense(self, r: _Rep) -> _Rep:
        if r.t.shape[2] == 1 and r.t.shape[3] == 1 and r.t.shape[5] == self.H and r.t.shape[6] == self.W:
            return r
        B, C, Ho, Wo = r.t.shape[:4]
        z = torch.zeros(Ho, dtype=torch.long, device=self.dev)
        zx = torch.zeros(Wo, dtype=torch.long, device=self.dev)
        t = self.O.place_li(r.t, r.ay, r.ax, z, zx, self.H, self.W, None)
        t = t.reshape(B, C * Ho * Wo, 1, 1, self.D, self.H, self.W)
        act = None if r.active is None else r.active.reshape(B, C * Ho * Wo, 1, 1)
        return _Rep(t, self._zero1(), self._zero1(), act)

    def _zero1(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.long, device=self.dev)

    def _window(self, g: GNode, ho: int, wo: int) -> Tuple[int, int, torch.Tensor, torch.Tensor]:
        rh, ay = g.gy.window(self.H, ho)
        rw, ax = g.gx.window(self.W, wo)
        return rh, rw, ay.to(self.dev), ax.to(self.dev)

    def input_rep(self) -> _Rep:
        B, D, H, W = self.B, self.D, self.H, self.W
        xi = self.x.reshape(B, D, H, W).to(self.dtype)
        g0 = self.graph.nodes[0]
        if g0.spatial:
            t = torch.zeros(B, D, H, W, D, 1, 1, dtype=self.dtype, device=self.dev)
            idx = torch.arange(D, device=self.dev)
            t[:, idx, :, :, idx, 0, 0] = xi.permute(1, 0, 2, 3)
            ay = torch.arange(H, device=self.dev)
            ax = torch.arange(W, device=self.dev)
            return _Rep(t, ay, ax)
        P = D * H * W
        t = torch.diag_embed(xi.reshape(B, P)).reshape(B, P, 1, 1, D, H, W)
        return _Rep(t, self._zero1(), self._zero1())

    # --- node propagation
    def conv(self, g: GNode, r: _Rep, scale: Optional[torch.Tensor], gate: Optional[torch.Tensor]) -> _Rep:
        C, Ho, Wo = g.shape
        rh, rw, ay, ax = self._window(g, Ho, Wo)
        a = g.attrs
        w = g.module.weight.detach().to(self.pdtype)
        if r.pending is not None:
            # the input's BN scale folded into the weights (per input channel); its activation gate
            # is r.active, and every conv op treats inactive inputs as zero without reading them
            G = int(a["groups"])
            Co, Cig = w.shape[:2]
            s_in = r.pending.view(G, 1, Cig).expand(G, Co // G, Cig).reshape(Co, Cig, 1, 1)
            w = w * s_in
        args = (r.t, r.ay, r.ax, r.active, w, scale, gate, ay, ax, list(a["stride"]), list(a["padding"]),
                list(a["dilation"]), int(a["groups"]), rh, rw)
        if self.conv_algorithm == "gemm" and int(a["groups"]) == 1:
            t, used = self.O.conv_li_gemm(*args, self.gemm_max_elems), "gemm"
        elif self.conv_algorithm == "gather" and _gather_fits(r, ay, ax, a, rh, rw, self.gemm_max_elems):
            t, used = self.O.conv_li_gather(*args, self.gemm_max_elems), "gather"
        elif self.conv_algorithm == "implicit" and _gather_fits(r, ay, ax, a, rh, rw, self.gemm_max_elems):
            if self.dtype == torch.float64:  # Triton has no float64 dot: the cuBLAS gather
                t, used = self.O.conv_li_gather(*args, self.gemm_max_elems), "gather"
            else:
                t, used = self.O.conv_li_implicit(*args, self.gemm_max_elems), "implicit"
        else:
            t, used = self.O.conv_li(*args), "direct"
        self.used[g.name] = used
        return _Rep(t, ay, ax, None if gate is None else gate != 0)

    def pool_avg(self, g: GNode, r: _Rep, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> _Rep:
        C, Ho, Wo = g.shape
        Hi, Wi = r.t.shape[2], r.t.shape[3]
        if (Hi, Wi) != tuple(self.graph.nodes[g.inputs[0]].shape[1:3]):
            raise AssertionError("pool input must be spatial")
        ones = torch.ones(1, 1, Hi, Wi, dtype=self.pdtype, device=self.dev)
        avg = F.avg_pool2d(ones, kernel, stride, padding, ceil_mode, count_include_pad, divisor)
        cnt = F.avg_pool2d(ones, kernel, stride, padding, ceil_mode, True, 1)
        mult = torch.where(cnt > 0, avg / cnt.clamp_min(1), torch.zeros_like(avg))[0, 0]  # [Ho, Wo]
        gate = mult.view(1, 1, Ho, Wo).expand(self.B, C, Ho, Wo).contiguous()
        w = torch.ones(C, 1, kernel[0], kernel[1], dtype=self.pdtype, device=self.dev)
        rh, rw, ay, ax = self._window(g, Ho, Wo)
        t = self.O.conv_li(r.t, r.ay, r.ax, r.active, w, None, gate, ay, ax, list(stride), list(padding), [1, 1], C, rh, rw)
        return _Rep(t, ay, ax, None)

    def run(self, keep: Dict[int, Any]) -> Dict[int, _Rep]:
        """Propagate; returns the reps of the requested nodes (with their neuron gates applied)."""
        graph, fwd = self.graph, self.fwd
        reps: Dict[int, _Rep] = {}
        remaining = {g.idx: len(g.users) for g in graph.nodes}
        out: Dict[int, _Rep] = {}
        fused: Dict[int, int] = {}  # node idx -> idx of the node whose rep it shares
        self.gated_by_fusion = set()
        last_needed = max(self.requested) if self.requested else -1
        for g in graph.nodes:
            if g.idx > last_needed:
                break
            if g.kind == "aux":
                continue
            if g.idx in fused:
                r = reps[g.inputs[0]]  # a fused chain shares one rep
            elif g.kind == "input":
                r = self.input_rep()
            else:
                r = self._propagate(g, reps, fused)
            reps[g.idx] = r
            if g.idx in self.requested:
                # a conv fused with the activation that follows it already carries g_n
                ng = None if g.idx in self.gated_by_fusion else fwd.neuron_gate(g)
                r = self._settle(r)
                out[g.idx] = r if ng is None else self._apply_gate(r, ng)
            for i in g.inputs:
                remaining[i] -= 1
                if remaining[i] == 0 and i in reps:
                    del reps[i]
        return out

    def _apply_gate(self, r: _Rep, gate: torch.Tensor) -> _Rep:
        B, C, Ho, Wo = r.t.shape[:4]
        gt = gate.reshape(B, C, Ho, Wo).to(self.pdtype)
        return _Rep(self._scale(r.t, gt.view(B, C, Ho, Wo, 1, 1, 1)), r.ay, r.ax, gt != 0)

    def _propagate(self, g: GNode, reps: Dict[int, _Rep], fused: Dict[int, int]) -> _Rep:
        graph, fwd = self.graph, self.fwd
        k = g.kind
        if k not in ("conv", "maxpool"):  # only these take a rep with a pending multiplier
            for i in g.inputs:
                if reps[i].pending is not None:
                    reps[i] = self._settle(reps[i])
        r = reps[g.inputs[0]] if g.inputs else None
        if k == "conv":
            if not r.t.shape[2:4] == graph.nodes[g.inputs[0]].shape[1:3] or graph.nodes[g.inputs[0]].gy is None:
                raise AssertionError("conv input must be spatial")
            scale, gate = None, None
            # fuse conv [-> bn] [-> relu] when the intermediate nodes' own images are not requested
            nxt = graph.gate_user(g)
            chain: List[GNode] = []
            if nxt is not None:
                chain = [nxt]
                gate = fwd.act_gate(nxt)
            elif len(g.users) == 1 and graph.nodes[g.users[0]].kind == "bn" and g.idx not in self.requested:
                bn = graph.nodes[g.users[0]]
                scale = _bn_scale(bn.module, self.pdtype)
                chain = [bn]
                act = graph.gate_user(bn)
                if act is not None and bn.idx not in self.requested:
                    gate = fwd.act_gate(act)
                    chain.append(act)
            rep = self.conv(g, r, scale, gate)
            for c in chain:
                fused[c.idx] = g.idx
            if nxt is not None:
                self.gated_by_fusion.add(g.idx)
            return rep
        if k in ACTIVATIONS:
            return self._apply_gate(r, fwd.act_gate(g))
        if k == "bn":
            s = _bn_scale(g.module, self.pdtype)
            B = r.t.shape[0]
            if r.t.shape[2] == 1 and r.t.shape[3] == 1 and len(g.shape) != 3:
                # dense features [B, N]; BN1d over N features (or [B, C, L]: channel-major)
                N = r.t.shape[1]
                reps_per = N // s.numel()
                sv = s.repeat_interleave(reps_per).view(1, N, 1, 1, 1, 1, 1)
                return _Rep(self._scale(r.t, sv), r.ay, r.ax, r.active)
            act = graph.gate_user(g)
            if act is not None and g.idx not in self.requested and act.idx not in self.requested \
                    and act.kind in ("relu", "hardtanh") and act.users \
                    and all(graph.nodes[u].kind in ("conv", "maxpool") for u in act.users):
                # BN -> 0/1 activation read only by convs / max-pools, neither requested: no pass
                # at all. The scale stays pending (folded into the next conv's weights), the gate
                # becomes the inactive-input mask (the activation shares this rep).
                fused[act.idx] = g.idx
                gt = fwd.act_gate(act) != 0
                act_in = gt if r.active is None else gt & r.active
                return _Rep(r.t, r.ay, r.ax, act_in, s)
            if act is not None and g.idx not in self.requested:
                # BN followed by its activation, the BN's own images not requested: one pass with
                # the product of the BN scale and the activation gate (the activation shares it)
                gt = fwd.act_gate(act).to(self.pdtype)
                mult = gt * s.view(1, -1, *([1] * (gt.dim() - 2)))
                fused[act.idx] = g.idx
                Bm, C, Ho, Wo = r.t.shape[:4]
                return _Rep(self._scale(r.t, mult.reshape(Bm, C, Ho, Wo, 1, 1, 1)), r.ay, r.ax, mult != 0)
            return _Rep(self._scale(r.t, s.view(1, -1, 1, 1, 1, 1, 1)), r.ay, r.ax, r.active)
        if k == "identity":
            return r
        if k == "maxpool":
            C, Ho, Wo = g.shape
            rh, rw, ay, ax = self._window(g, Ho, Wo)
            ind = fwd.values[("indices", g.idx)]
            t = self.O.maxpool_li(r.t, r.ay, r.ax, ind, ay, ax, rh, rw)
            act = None if r.active is None else torch.gather(r.active.flatten(2), 2, ind.flatten(2)).view_as(ind)
            return _Rep(t, ay, ax, act, r.pending)  # routing keeps channels: the multiplier stays pending
        if k == "avgpool":
            a = g.attrs
            return self.pool_avg(g, r, a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                                 a["divisor_override"])
        if k in ("adaptive_avgpool", "global_mean"):
            if g.attrs.get("regular"):  # a mean with keepdim is the regular pool over the whole map
                kk = g.attrs["kernel"]
                return self.pool_avg(g, r, kk, kk, (0, 0), False, True, None)
            Ho, Wo = g.shape[1:] if len(g.shape) == 3 else (1, 1)  # a mean without keepdim: [C]
            return self._adaptive_dense(g, r, Ho, Wo)
        if k == "slice":  # a channel range: a view of the input's patches
            a0, a1 = g.attrs["start"], g.attrs["stop"]
            src = graph.nodes[g.inputs[0]]
            if src.spatial or len(src.shape) == 1:
                return _Rep(r.t[:, a0:a1], r.ay, r.ax, None if r.active is None else r.active[:, a0:a1])
            d = self._dense(r)  # [B, C·rest, 1, 1, ...]: channel-major
            B, C = d.t.shape[0], src.shape[0]
            t = d.t.reshape(B, C, -1, *d.t.shape[2:])[:, a0:a1].reshape(B, -1, *d.t.shape[2:])
            return _Rep(t, d.ay, d.ax, None)
        if k == "cat":
            ins = [reps[i] for i in g.inputs]
            if g.spatial:
                # every input placed in the union window (no copy where it already is), channels joined
                C, Ho, Wo = g.shape
                rh, rw, ay, ax = self._window(g, Ho, Wo)
                parts = []
                for i, ri in zip(g.inputs, ins):
                    if self._in_window(i, ri, g, rh, rw):
                        parts.append(ri.t)
                    else:
                        parts.append(self.O.place_li(ri.t, ri.ay, ri.ax, ay, ax, rh, rw, None))
                act = None
                if any(ri.active is not None for ri in ins):
                    act = torch.cat([ri.active if ri.active is not None else
                                     torch.ones(ri.t.shape[:4], dtype=torch.bool, device=self.dev) for ri in ins], 1)
                return _Rep(torch.cat(parts, 1), ay, ax, act)
            ds = [self._dense(ri) for ri in ins]
            return _Rep(torch.cat([d.t for d in ds], 1), ds[0].ay, ds[0].ax, None)
        if k == "reshape":
            return self._dense(r)
        if k == "linear":
            d = self._dense(r)
            B, N = d.t.shape[:2]
            w = g.module.weight.detach().to(self.pdtype)
            if w.shape[1] != N:
                raise ValueError(f"linear layer {g.name!r} expects {w.shape[1]} features, its input has {N}")
            t = self.O.linear_li(d.t.reshape(B, N, -1), w, None)
            return _Rep(t.reshape(B, w.shape[0], 1, 1, self.D, self.H, self.W), d.ay, d.ax, None)
        if k == "add":
            a, b = reps[g.inputs[0]], reps[g.inputs[1]]
            if g.spatial:
                C, Ho, Wo = g.shape
                rh, rw, ay, ax = self._window(g, Ho, Wo)
                ia, ib = g.inputs
                if self._in_window(ib, b, g, rh, rw) and not self._in_window(ia, a, g, rh, rw):
                    a, b, ia, ib = b, a, ib, ia
                if self._in_window(ia, a, g, rh, rw):
                    ta = a.t  # already laid out in the output window: read as it is (place_li does not write it)
                else:
                    ta = self.O.place_li(a.t, a.ay, a.ax, ay, ax, rh, rw, None)
                t = self.O.place_li(b.t, b.ay, b.ax, ay, ax, rh, rw, ta)
                return _Rep(t, ay, ax, None)
            da, db = self._dense(a), self._dense(b)
            if da.t.shape != db.t.shape:
                raise ValueError(f"residual add {g.name!r}: operands have different shapes")
            return _Rep(da.t + db.t, da.ay, da.ax, None)
        raise AssertionError(f"unhandled node kind {k}")

    def _in_window(self, i: int, r: _Rep, g: GNode, rh: int, rw: int) -> bool:
        """Whether the patches of input ``i`` (rep ``r``) already lie in ``g``'s windows (same
        receptive-field geometry, same window size): then no placement copy is needed."""
        nd = self.graph.nodes[i]
        return nd.gy == g.gy and nd.gx == g.gx and tuple(r.t.shape[5:]) == (rh, rw)

    def _adaptive_dense(self, g: GNode, r: _Rep, Ho: int, Wo: int) -> _Rep:
        """Adaptive average pooling to ``Ho × Wo`` as a dense linear map of the pooled map."""
        d_in = self.graph.nodes[g.inputs[0]]
        C, Hi, Wi = d_in.shape

        def mat(n_in, n_out):
            A = torch.zeros(n_out, n_in, dtype=self.pdtype, device=self.dev)
            for i in range(n_out):
                s = (i * n_in) // n_out
                e = -((-(i + 1) * n_in) // n_out)
                A[i, s:e] = 1.0 / (e - s)
            return A

        A = torch.kron(mat(Hi, Ho), mat(Wi, Wo))  # [Ho*Wo, Hi*Wi]
        d = self._dense(r)
        B = d.t.shape[0]
        t = self.O.linear_li(d.t.reshape(B * C, Hi * Wi, -1), A, None)
        return _Rep(t.reshape(B, C * Ho * Wo, 1, 1, self.D, self.H, self.W), d.ay, d.ax, None)


# ----------------------------------------------------------------------------- estimates
def _virtual_axis(a_in: torch.Tensor, a_out: torch.Tensor, n_in: int, K: int, stride: int, pad: int, dil: int,
                  fit: Optional[Tuple[int, int, str]] = None) -> Tuple[List[int], List[int], torch.Tensor, torch.Tensor]:
    """Along one axis of a conv: the virtual positions, i.e. the distinct (input position, offset
    ``a_in[i] - a_out[y]``) pairs that the output positions ``y`` and taps use (sorted; returned
    as two lists, input positions and offsets), and for every (output position, tap) its virtual
    and its input position ([n_out, K] tensors, -1 for padding). The placed input copy of
    ``conv_li_gather`` / ``conv_li_implicit`` has one row per virtual position (the C++ op
    builds the same axis in ``csrc/conv_gather.cpp``). ``fit = (r_in, r_out, op)``: also check
    that every input window fits its output window (``ValueError`` naming ``op``)."""
    a_in, a_out = a_in.detach().cpu().tolist(), a_out.detach().cpu().tolist()
    n_out = len(a_out)
    offs: Dict[int, List[int]] = {}
    taps = []
    for y in range(n_out):
        for k in range(K):
            yi = y * stride + k * dil - pad
            if 0 <= yi < n_in:
                o = a_in[yi] - a_out[y]
                if fit is not None and not (0 <= o and o + fit[0] <= fit[1]):
                    raise ValueError(f"{fit[2]}: an input window does not fit inside its output window (offset {o}, "
                                     f"sizes {fit[0]} -> {fit[1]}); anchors must come from the receptive-field "
                                     "geometry (nns_cuda.graph)")
                offs.setdefault(yi, [])
                if o not in offs[yi]:
                    offs[yi].append(o)
                taps.append((y, k, yi, o))
            else:
                taps.append((y, k, -1, 0))
    src, off, first = [], [], {}
    for yi in sorted(offs):
        first[yi] = len(src)
        for o in sorted(offs[yi]):
            src.append(yi)
            off.append(o)
    vpos = torch.full((n_out, K), -1, dtype=torch.long)
    ipos = torch.full((n_out, K), -1, dtype=torch.long)
    for y, k, yi, o in taps:
        if yi >= 0:
            vpos[y, k] = first[yi] + sorted(offs[yi]).index(o)
            ipos[y, k] = yi
    return src, off, vpos, ipos


def _gather_fits(r: "_Rep", ay: torch.Tensor, ax: torch.Tensor, a: Dict[str, Any], rh: int, rw: int,
                 max_elems: int) -> bool:
    """Whether this conv runs ``conv_li_gather`` under ``conv_algorithm="gather"``: ``groups ==
    1``, and the op's placed copy of one image's input (``Ci × placements_y × placements_x ×
    D·rh·rw`` elements; up to ``Kh·Kw`` placements per input position where the windows move
    with the position, one once the receptive field covers the image) fits the op's chunk
    bound ``max_elems`` — or is no copy at all (input windows already are the output window)."""
    if int(a["groups"]) != 1:
        return False
    B, Ci, Hi, Wi, D, Rhi, Rwi = r.t.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = a["kernel"], a["stride"], a["padding"], a["dilation"]
    hq = len(_virtual_axis(r.ay, ay, Hi, kh, sh, ph, dh)[0])
    wq = len(_virtual_axis(r.ax, ax, Wi, kw, sw, pw, dw)[0])
    if hq == Hi and wq == Wi and (Rhi, Rwi) == (rh, rw):
        return True  # every window is its output window (offsets 0): the op reads the input itself
    return Ci * hq * wq * D * rh * rw <= max_elems


def _node_patch_elems(graph: ScanGraph, g: GNode) -> int:
    D, H, W = _image_dims(graph.input_shape)
    if g.kind == "input":
        return (D * H * W * D) if g.spatial else (D * H * W) ** 2
    if g.spatial:
        C, Ho, Wo = g.shape
        return C * Ho * Wo * D * min(g.gy.R, H) * min(g.gx.R, W)
    return int(math.prod(g.shape)) * D * H * W


def forward_bytes_per_sample(graph: ScanGraph, upto: int, dtype: torch.dtype) -> int:
    """Rough peak memory (bytes) of the forward strategy per sample up to node ``upto``."""
    esize = torch.empty((), dtype=dtype).element_size()
    peak = 0
    for g in graph.nodes[: upto + 1]:
        if g.kind == "aux":
            continue
        e = _node_patch_elems(graph, g) + sum(_node_patch_elems(graph, graph.nodes[i]) for i in g.inputs)
        if g.kind == "conv":  # the reference gathers one tap of input patches into output windows
            e += _node_patch_elems(graph, g) // max(1, g.shape[0]) * graph.nodes[g.inputs[0]].shape[0]
        peak = max(peak, e)
    return int(peak * esize * 1.5)


# ----------------------------------------------------------------------------- Scanner
class Scanner:
    """Scan chosen layers of a model: activations, gates, learned images, statistics, filter images.

    Parameters
    ----------
    model : nn.Module (eval mode)
    layers : list of layer names (``model.named_modules()`` names, ``name:k`` calls, fx op names);
        None: every scannable node.
    backend : "auto" | "reference" | "cpu" | "cuda"
    strategy : "auto" | "forward" | "reverse"
    max_memory : bytes the scan may use for its working set (None: 60 % of free GPU memory,
        25 % of RAM up to 2 GiB on the CPU). Larger work is chunked over the batch; when one
        sample does not fit the forward strategy, "auto" switches to "reverse".
    stats : reduce the fused per-neuron statistics (SPEC §2–§3) — needs ``fg_mask`` or uses the
        whole image as foreground.
    filter_images : compute ``L^k`` for every channel of each layer.
    keep_images : keep dense learned images of every neuron (memory heavy; small inputs).
    gate_outputs : gate the model's output neurons by ``S(z)`` too (SPEC §1 [decision]).
    linearize : None or "gradient" (non-ReLU activations by their local derivative).
    precision : "auto" | "fp32" | "fp64" | "tf32" | "bf16" | "fp16" — see *Precision* below.
    conv_algorithm : "auto" | "direct" | "gemm" — see *Conv algorithms* below.

    Precision
    ---------
    SPEC §6: float32 by default, reduced precision only on request.

    - ``"auto"`` (default): everything in the input's dtype (float32 or float64), exactly as
      before these options existed; torch's TF32 switches are left as they are.
    - ``"fp32"`` / ``"fp64"``: learned images stored and computed in that dtype (results in it
      too); on CUDA ``"fp32"`` also turns TF32 off for cuBLAS and cuDNN during the scan.
    - ``"bf16"`` / ``"fp16"``: learned-image patches *stored* in bfloat16 / float16 (half the
      memory and traffic); every product and sum is taken in float32 and rounded once per
      layer (the ``"gemm"`` algorithm multiplies 16-bit operands, weights rounded too, with
      float32 accumulation).
      Statistics, filter images and images are returned in float32. The model's forward pass
      (activations, gates) is unchanged. float16's range ends at 65504: a layer whose
      learned images overflow raises ``FloatingPointError`` (use ``"bf16"``).
    - ``"tf32"``: float32 storage, convolutions as GEMMs (``"gather"`` or ``"gemm"``) with cuBLAS
      TF32 on (linear layers too); layers the gather does not take run the direct float32
      kernel. CUDA only: on the CPU it raises ``ValueError``.

    The reverse strategy runs autograd in the input's dtype; a precision other than ``"auto"``
    or the input's own dtype needs the forward strategy (``ValueError`` otherwise).

    Measured error against float32 / float64 (CPU, 2026-11-26, 2-core AMD EPYC development
    machine, torch 2.14.1; batch 1, random weights seed 0, standard-normal 32×32 input, box
    foreground mask; every ReLU after a conv: 13 layers of VGG-16, 3 of the thesis's simple
    CNN). ``fp64`` is ``precision="fp64"`` on the same float32 model (same gates). Images and
    filter images: relative Frobenius error ``‖LI − LI_ref‖/‖LI_ref‖``, the largest over
    layers (it grows with depth: VGG-16 bf16 direct 2.3e-3 at layer 1 to 6.2e-3 at layer 13).
    Statistics: per column ``max|s − s_ref| / max|s_ref|`` over all neurons, the largest over
    columns and layers, for the sums and for the counts (``nz_fg``, ``nz_bg``, ``fg_xnz_sum``,
    ``fg_xnz_sq_sum``, which depend on which entries are exactly zero)::

                                     images            sums            counts      filter images
      model        precision algo   vs fp32 vs fp64  vs fp32 vs fp64  vs fp32 vs fp64  vs fp64
      VGG-16 @32   fp32      direct    –    8.3e-07     –    1.1e-06     –    4.3e-04  8.2e-07
      VGG-16 @32   fp32      gemm   9.9e-07 5.9e-07  1.4e-06 8.8e-07  5.2e-04 5.2e-04  5.9e-07
      VGG-16 @32   bf16      direct 6.2e-03 6.2e-03  6.9e-03 6.9e-03  4.3e-04 4.3e-04  6.3e-03
      VGG-16 @32   bf16      gemm   8.6e-03 8.6e-03  1.1e-02 1.1e-02  2.1e-03 2.1e-03  8.7e-03
      VGG-16 @32   fp16      direct 7.7e-04 7.7e-04  1.0e-03 1.0e-03  7.8e-02 7.8e-02  8.4e-04
      VGG-16 @32   fp16      gemm   7.7e-04 7.7e-04  9.4e-04 9.4e-04  7.8e-02 7.8e-02  8.4e-04
      simple CNN   fp32      direct    –    1.1e-07     –    3.3e-07     –    2.4e-07  1.1e-07
      simple CNN   fp32      gemm   1.3e-07 1.1e-07  2.9e-07 3.0e-07  0.0e+00 2.4e-07  1.2e-07
      simple CNN   bf16      direct 3.2e-03 3.2e-03  3.6e-03 3.6e-03  0.0e+00 2.4e-07  3.5e-03
      simple CNN   bf16      gemm   4.3e-03 4.3e-03  6.5e-03 6.5e-03  0.0e+00 2.4e-07  4.2e-03
      simple CNN   fp16      direct 4.1e-04 4.1e-04  8.6e-04 8.6e-04  1.3e-03 1.3e-03  4.5e-04
      simple CNN   fp16      gemm   4.1e-04 4.1e-04  8.6e-04 8.6e-04  1.3e-03 1.3e-03  4.5e-04

    measured with (VGG-16 in two runs to stay within the development machine's time limit)::

      python -m benchmarks.bench_precision --device cpu --models vgg16_32 \\
          --configs fp64:direct,fp32:direct,fp32:gemm,bf16:direct
      python -m benchmarks.bench_precision --device cpu --models vgg16_32 \\
          --configs bf16:gemm,fp16:direct,fp16:gemm
      python -m benchmarks.bench_precision --device cpu --models simple_cnn_32

    Reading: bfloat16 costs about 2^-8 relative per layer (≈ 6e-3 after 13 layers), float16
    about 2^-11 (≈ 8e-4), on the images and on the summed statistics alike. "gemm" with 16-bit
    patches also rounds the weights (bf16: 1.4× the error of "direct"); on the CPU "fp16 gemm"
    multiplies in float32 (ATen's CPU float16 GEMM is very slow), hence equal to "direct".
    The *count* statistics are fragile: float16 flushes values below ~6e-8 to zero (VGG-16:
    counts off by up to 7.8 %), and a sum that cancels exactly in 16 bits but not in float32
    becomes a zero (bf16 on the test models of ``tests/test_precision.py``: up to 4.4 %; even
    float32 moved a VGG-16 count by 4.3e-4 against float64). Use ``"fp32"`` for count-based
    measures (active pixels, knowledge quantity counts, FQ's ``N^e`` / ``N^n``).
    TF32 (``"tf32"``) and the GPU's bf16 / fp16 tensor-core GEMMs are measured by
    ``benchmarks/device_check.sh`` on a GPU (``precision.json``): not yet measured.

    Conv algorithms
    ---------------
    ``"direct"``: the gated kernels (``ops.conv_li``), which skip gated-off outputs and
    inactive inputs. ``"gemm"``: ``ops.conv_li_gemm``, one dense GEMM per image (tensor cores on
    CUDA; no sparsity skipping), for convolutions with ``groups == 1``. ``"gather"``:
    ``ops.conv_li_gather``, per output position a GEMM over the active (input neuron, tap)
    pairs only (inactive inputs cost nothing; cuBLAS on CUDA), for ``groups == 1``
    convolutions. Its rows are copied from a placed copy of the input, which has the input's
    size where every input position sits at one offset in the output windows that read it
    (always so once the receptive field covers the image, where most of the work is: VGG-16
    @32, 93 % of the gated FLOPs; ResNet-18 @32, 79 %) and up to ``Kh·Kw`` times more where
    the windows move with the position: a layer runs direct when that copy of one image
    exceeds the chunk bound (a quarter of ``max_memory``). ``"implicit"``: the gather's
    arithmetic as one Triton kernel on CUDA (``ops.conv_li_implicit``), which loads the pairs'
    rows itself instead of copying them (no gathered operand in memory, no padding of the pair
    lists); same layers as ``"gather"``, float64 runs the gather; needs CUDA and Triton
    (``ValueError`` otherwise). Grouped / depthwise convolutions and average pools always run
    direct.
    ``ScanResult.conv_algorithms`` says which ran for each convolution. ``"auto"``:
    ``"direct"`` on the CPU (measured fastest there), ``"gather"`` on CUDA (a prediction,
    see :func:`resolve_conv_algorithm`; ``"implicit"`` stays opt-in until measured).
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]] = None, *, backend: str = "auto",
                 strategy: str = "auto", max_memory: Optional[int] = None, stats: bool = True,
                 filter_images: bool = False, keep_images: bool = False, gate_outputs: bool = False,
                 linearize: Optional[str] = None, precision: str = "auto", conv_algorithm: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        _check_choice("precision", precision, PRECISIONS)
        _check_choice("conv_algorithm", conv_algorithm, CONV_ALGORITHMS)
        if precision == "tf32" and conv_algorithm == "direct":
            raise ValueError("precision='tf32' runs the convolutions as TF32 GEMMs: it needs conv_algorithm='gemm', "
                             "'gather' or 'auto', got 'direct'")
        if max_memory is not None and max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}")
        if isinstance(layers, str):
            layers = [layers]
        self.model = model
        self.layers = None if layers is None else list(layers)
        self.backend = backend
        self.strategy = strategy
        self.max_memory = max_memory
        self.stats = stats
        self.want_filters = filter_images
        self.keep_images = keep_images
        self.gate_outputs = gate_outputs
        self.linearize = linearize
        self.precision = precision
        self.conv_algorithm = conv_algorithm

    def graph(self, x: torch.Tensor) -> ScanGraph:
        return build_graph(self.model, x[:1], self.linearize)

    def _nodes(self, graph: ScanGraph) -> List[GNode]:
        if self.layers is None:
            names = graph.layer_names()
            seen, nodes = set(), []
            for n in names:
                g = graph.resolve(n)
                if g.idx not in seen:
                    seen.add(g.idx)
                    nodes.append(g)
            return sorted(nodes, key=lambda g: g.idx)
        return [graph.resolve(n) for n in self.layers]

    @torch.no_grad()
    def scan(self, x: torch.Tensor, fg_mask: Optional[torch.Tensor] = None) -> ScanResult:
        """Scan a batch.

        Parameters
        ----------
        x : Tensor [B, D, H, W] (or [B, N] for an MLP)
        fg_mask : bool Tensor [B, H, W] or [H, W] (foreground; for the statistics) or None

        Returns
        -------
        ScanResult mapping each requested layer name to a :class:`LayerResult`.
        """
        _check_input(x)
        graph = self.graph(x)
        names = self.layers if self.layers is not None else None
        nodes = self._nodes(graph)
        layer_names = names if names is not None else [g.name for g in nodes]
        D, H, W = _image_dims(graph.input_shape)
        fg = _check_mask(fg_mask, x.shape[0], H, W, x.device)
        backend = resolve_backend(self.backend, x.device)
        prec, storage, out_dtype = resolve_precision(self.precision, x)
        algo = resolve_conv_algorithm(self.conv_algorithm, x.device, prec, backend)
        budget = self.max_memory or _default_budget(x.device)
        fit_budget = self.max_memory or _default_budget(x.device, fit=True)
        strategy = self.strategy
        upto = max(g.idx for g in nodes)
        per_sample = forward_bytes_per_sample(graph, upto, storage)
        if strategy == "auto":
            strategy = "forward" if per_sample <= fit_budget else "reverse"
        if strategy == "reverse" and not _reverse_supports(self.precision, prec, x.dtype):
            why = "" if self.strategy == "reverse" else (
                f" (strategy='auto' chose it: the forward strategy needs about {per_sample / 2**20:.0f} MiB per "
                f"sample, over max_memory={fit_budget / 2**20:.0f} MiB; raise max_memory)")
            raise ValueError(f"precision={self.precision!r} needs the forward strategy: the reverse strategy runs "
                             f"autograd in the input's dtype ({x.dtype}){why}")
        plan = _Plan(prec, storage, out_dtype, algo, _gemm_max_elems(budget, storage))
        if strategy == "forward":
            chunk = max(1, budget // max(per_sample, 1))
            if per_sample > fit_budget:
                raise MemoryError(
                    f"the forward strategy needs about {per_sample / 2**20:.0f} MiB per sample for these layers, over "
                    f"max_memory={fit_budget / 2**20:.0f} MiB; raise max_memory or use strategy='reverse'")
        else:
            chunk = x.shape[0]
        if strategy == "reverse":
            plan = _Plan(prec, x.dtype, x.dtype, "autograd", 0)
        parts: List[Dict[str, LayerResult]] = []
        used: Dict[str, str] = {}
        with _matmul_precision(prec if self.precision != "auto" else "auto", x.device):
            for s in range(0, x.shape[0], chunk):
                xb = x[s: s + chunk]
                fb = fg[s: s + chunk]
                parts.append(self._scan_batch(graph, nodes, layer_names, xb, fb, backend, strategy, budget, plan, used))
        layers = {n: _cat_layer([p[n] for p in parts]) for n in layer_names}
        return ScanResult(layers, backend if strategy == "forward" else "autograd", strategy, tuple(graph.input_shape),
                          precision=plan.precision, conv_algorithm=plan.conv_algorithm, conv_algorithms=used)

    def _scan_batch(self, graph, nodes, names, x, fg, backend, strategy, budget, plan: "_Plan",
                    used: Dict[str, str]) -> Dict[str, LayerResult]:
        fwd = _Forward(graph, x, self.gate_outputs)
        D, H, W = _image_dims(graph.input_shape)
        B = x.shape[0]
        res: Dict[str, LayerResult] = {}
        if strategy == "forward":
            eng = _PatchEngine(graph, fwd, x, backend, [g.idx for g in nodes], plan.storage, plan.conv_algorithm,
                               plan.gemm_max_elems)
            reps = eng.run({})
            used.update(eng.used)
            O = eng.O
            x4 = x.reshape(B, D, H, W)
            out = plan.out_dtype
            for name, g in zip(names, nodes):
                r = reps[g.idx]
                if plan.storage == torch.float16 and not bool(torch.isfinite(r.t).all()):
                    raise FloatingPointError(
                        f"precision='fp16': the learned images of layer {name!r} overflowed float16 (|value| > 65504, "
                        "or inf / NaN from an earlier overflow); use precision='bf16' (float32's range) or 'fp32'")
                lr = self._base(name, g, fwd, backend, strategy, plan)
                if self.stats:
                    st = O.li_stats(r.t, r.ay, r.ax, x4, fg.to(x.dtype))
                    lr.stats = st.reshape(B, *g.shape, NUM_STATS).to(out)
                if self.want_filters:
                    lr.filter_images = self._fold(O, g, r, fwd, B, D, H, W, graph).to(out)
                if self.keep_images:
                    lr.images = _rep_dense(O, r, g, B, D, H, W, graph.input_shape).to(out)
                res[name] = lr
            return res
        # reverse strategy
        for name, g in zip(names, nodes):
            lr = self._base(name, g, fwd, "autograd", strategy, plan)
            need_dense = self.stats or self.keep_images
            if need_dense:
                imgs = _reverse_neurons(graph, x, g, None, self.gate_outputs, budget)
                if self.stats:
                    lr.stats = li_stats_dense(imgs.reshape(B, -1, D, H, W), x.reshape(B, D, H, W), fg) \
                        .reshape(B, *g.shape, NUM_STATS)
                if self.keep_images:
                    lr.images = imgs
                del imgs
            if self.want_filters:
                lr.filter_images = _reverse_filters(graph, x, g, self.gate_outputs, budget)
            res[name] = lr
        return res

    def _base(self, name, g, fwd: _Forward, backend, strategy, plan: "_Plan") -> LayerResult:
        return LayerResult(name=name, activations=fwd.value(g).detach(), gates=fwd.full_gate(g).detach(),
                           backend=backend, strategy=strategy, precision=plan.precision,
                           conv_algorithm=plan.conv_algorithm)

    def _fold(self, O, g: GNode, r: _Rep, fwd: _Forward, B, D, H, W, graph) -> torch.Tensor:
        if len(g.shape) not in (1, 3):
            raise ValueError(f"filter images need a layer with channels ([C, H, W] or [N]); {g.name!r} has shape {list(g.shape)}")
        # 16-bit patches: the activations stay float32 (the fold sums in float32)
        act = fwd.value(g).to(torch.float32 if r.t.dtype in _LOW_DTYPES else r.t.dtype)
        if len(g.shape) == 3 and r.t.shape[2:4] == g.shape[1:3] and r.t.shape[1] == g.shape[0]:
            L = O.filter_fold(r.t, r.ay, r.ax, act, H, W)
        else:  # dense rep: [B, N, 1, 1, D, H, W]; fold over positions of each channel
            C = g.shape[0]
            t = r.t.reshape(B, C, -1, D * H * W)
            L = (t * act.reshape(B, C, -1, 1)).sum(2).reshape(B, C, D, H, W)
        return L.reshape(B, g.shape[0], *graph.input_shape)


@dataclass(frozen=True)
class _Plan:
    """Resolved numerics of one scan: precision name, patch storage dtype, result dtype, conv
    algorithm ("direct" / "gemm" / "gather", "autograd" for the reverse strategy), chunk bound
    of conv_li_gemm / conv_li_gather."""

    precision: str
    storage: torch.dtype
    out_dtype: torch.dtype
    conv_algorithm: str
    gemm_max_elems: int


def _reverse_supports(option: str, precision: str, dtype: torch.dtype) -> bool:
    """The reverse strategy (autograd in the input's dtype) honours ``precision`` only if it is
    "auto" or names the input's own dtype."""
    return option == "auto" or (precision != "tf32" and _STORAGE[precision] == dtype)


def _cat_layer(parts: List[LayerResult]) -> LayerResult:
    if len(parts) == 1:
        return parts[0]
    p0 = parts[0]
    cat = lambda attr: None if getattr(p0, attr) is None else torch.cat([getattr(p, attr) for p in parts])  # noqa: E731
    return LayerResult(p0.name, cat("activations"), cat("gates"), cat("stats"), cat("filter_images"), cat("images"),
                       p0.backend, p0.strategy, p0.precision, p0.conv_algorithm)


def _check_mask(fg_mask, B, H, W, device) -> torch.Tensor:
    if fg_mask is None:
        return torch.ones(B, H, W, dtype=torch.bool, device=device)
    if not isinstance(fg_mask, torch.Tensor):
        raise TypeError(f"fg_mask must be a bool Tensor [B, H, W], got {type(fg_mask).__name__}")
    if fg_mask.dtype != torch.bool:
        if fg_mask.dtype.is_floating_point or fg_mask.dtype in (torch.uint8, torch.int64, torch.int32):
            vals = torch.unique(fg_mask)
            if not bool(((vals == 0) | (vals == 1)).all()):
                raise ValueError("fg_mask must be boolean (or 0/1); got other values. Threshold it first, e.g. mask > 0.5")
            fg_mask = fg_mask.bool()
        else:
            raise TypeError(f"fg_mask must be bool, got {fg_mask.dtype}")
    if fg_mask.dim() == 2:
        fg_mask = fg_mask.unsqueeze(0).expand(B, -1, -1)
    if tuple(fg_mask.shape) != (B, H, W):
        raise ValueError(f"fg_mask must be [B, H, W] = {[B, H, W]} (or [H, W]), got {list(fg_mask.shape)}")
    return fg_mask.to(device)


def _rep_dense(O, r: _Rep, g: GNode, B, D, H, W, input_shape) -> torch.Tensor:
    Ho, Wo = r.t.shape[2:4]
    if not (Ho == 1 and Wo == 1 and r.t.shape[5] == H and r.t.shape[6] == W):
        z = torch.zeros(Ho, dtype=torch.long, device=r.t.device)
        zx = torch.zeros(Wo, dtype=torch.long, device=r.t.device)
        t = O.place_li(r.t, r.ay, r.ax, z, zx, H, W, None)
    else:
        t = r.t
    return t.reshape(B, *g.shape, *input_shape)


# ----------------------------------------------------------------------------- reverse strategy
def _reverse_forward(graph: ScanGraph, x: torch.Tensor, k: int, gate_outputs: bool):
    """Run the model on ``k`` stacked copies of the batch with autograd on (samples are
    independent in eval mode, so one backward pass over the stack gives ``k`` VJPs per sample)."""
    xr = x.detach().repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)
    with torch.enable_grad():
        vals = graph.run(xr)
    fwd = _Forward.__new__(_Forward)
    fwd.graph, fwd.gate_outputs = graph, gate_outputs
    fwd.values = {key: (v.detach() if isinstance(v, torch.Tensor) else v) for key, v in vals.items()}
    return xr, vals, fwd


def _reverse_chunk(graph: ScanGraph, g: GNode, x: torch.Tensor, n: int, budget: int) -> int:
    """How many VJPs per sample one stacked backward pass may carry within ``budget``."""
    per_copy = sum(int(math.prod(nd.shape)) for nd in graph.nodes[: g.idx + 1] if nd.kind != "aux")
    per_copy = (per_copy * 3 + int(math.prod(graph.input_shape)) * 2) * x.element_size() * x.shape[0]
    return int(max(1, min(n, budget // max(1, per_copy), 512)))


def _reverse_neurons(graph: ScanGraph, x: torch.Tensor, g: GNode, neurons: Optional[torch.Tensor],
                     gate_outputs: bool, budget: int) -> torch.Tensor:
    """Dense learned images by batched VJPs: [B, *shape, *input] or [B, n, *input] for ``neurons``."""
    B = x.shape[0]
    N = int(math.prod(g.shape))
    sel = torch.arange(N, device=x.device) if neurons is None else neurons
    n = sel.numel()
    P = int(math.prod(graph.input_shape))
    out = torch.zeros(B, n, P, dtype=x.dtype, device=x.device)
    chunk = _reverse_chunk(graph, g, x, n, budget)
    gate = None
    for s in range(0, n, chunk):
        idx = sel[s: s + chunk]
        k = idx.numel()
        xr, vals, fwd = _reverse_forward(graph, x, k, gate_outputs)
        if gate is None:
            gate = fwd.full_gate(g)[:B].reshape(B, N)
        go = torch.zeros(k, B, N, dtype=x.dtype, device=x.device)
        go[torch.arange(k, device=x.device), :, idx] = 1
        with torch.enable_grad():
            zf = vals[g.idx].reshape(k, B, N)
            (gr,) = torch.autograd.grad(zf, xr, grad_outputs=go, allow_unused=True)
        if gr is None:
            continue
        li = gr.reshape(k, B, P) * x.reshape(1, B, P) * gate[:, idx].t().unsqueeze(-1)
        out[:, s: s + k] = li.permute(1, 0, 2)
    shape = g.shape if neurons is None else (n,)
    return out.reshape(B, *shape, *graph.input_shape).detach()


def _reverse_filters(graph: ScanGraph, x: torch.Tensor, g: GNode, gate_outputs: bool, budget: int) -> torch.Tensor:
    """Filter images L^k = x ⊙ VJP(cotangent = g ⊙ a restricted to channel k): [B, C, *input]."""
    if len(g.shape) not in (1, 3):
        raise ValueError(f"filter images need a layer with channels ([C, H, W] or [N]); {g.name!r} has shape {list(g.shape)}")
    B = x.shape[0]
    C = g.shape[0]
    P = int(math.prod(graph.input_shape))
    out = torch.zeros(B, C, P, dtype=x.dtype, device=x.device)
    chunk = _reverse_chunk(graph, g, x, C, budget)
    cot = None
    for s in range(0, C, chunk):
        k = min(chunk, C - s)
        xr, vals, fwd = _reverse_forward(graph, x, k, gate_outputs)
        if cot is None:
            cot = (fwd.full_gate(g)[:B] * fwd.values[g.idx][:B]).reshape(B, C, -1)
        go = torch.zeros(k, B, C, cot.shape[-1], dtype=x.dtype, device=x.device)
        ar = torch.arange(k, device=x.device)
        go[ar, :, s + ar] = cot[:, s: s + k].permute(1, 0, 2)
        with torch.enable_grad():
            zf = vals[g.idx].reshape(k, B, C, -1)
            (gr,) = torch.autograd.grad(zf, xr, grad_outputs=go, allow_unused=True)
        if gr is None:
            continue
        out[:, s: s + k] = (gr.reshape(k, B, P) * x.reshape(1, B, P)).permute(1, 0, 2)
    return out.reshape(B, C, *graph.input_shape).detach()


# ----------------------------------------------------------------------------- functional API
def _neuron_index(neurons, shape: Tuple[int, ...], device) -> torch.Tensor:
    flat = []
    for nrn in neurons:
        t = (nrn,) if isinstance(nrn, int) else tuple(nrn)
        if len(t) != len(shape):
            raise ValueError(f"neuron index {t} has {len(t)} entries; the layer's neurons are indexed by {len(shape)} "
                             f"(layer output shape {list(shape)})")
        for v, n in zip(t, shape):
            if not (0 <= int(v) < n):
                raise IndexError(f"neuron index {t} out of range for layer output shape {list(shape)}")
        f = 0
        for v, n in zip(t, shape):
            f = f * n + int(v)
        flat.append(f)
    return torch.tensor(flat, dtype=torch.long, device=device)


def learned_images(model: nn.Module, x: torch.Tensor, layer: str, *, neurons: Optional[Sequence] = None,
                   backend: str = "auto", strategy: str = "auto", gate_outputs: bool = False,
                   linearize: Optional[str] = None, max_memory: Optional[int] = None, precision: str = "auto",
                   conv_algorithm: str = "auto") -> torch.Tensor:
    """Learned images of the neurons of one layer (SPEC §1).

    Parameters
    ----------
    model : nn.Module in eval mode
    x : Tensor [B, D, H, W] (or [B, N])
    layer : qualified module name (``model.named_modules()``), ``name:k`` for the k-th call of a
        reused module, or a container's name for its output
    neurons : None (all neurons) or a list of index tuples into the layer's output shape
    backend, strategy, gate_outputs, linearize, max_memory, precision, conv_algorithm :
        see :class:`Scanner` (a reduced precision makes ``strategy="auto"`` use the forward
        strategy, which alone implements it)

    Returns
    -------
    Tensor [B, *layer_output_shape, *x.shape[1:]] (neurons=None) or [B, n, *x.shape[1:]]
    (float32 for the tf32 / bf16 / fp16 precisions)
    """
    _check_input(x)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    prec, storage, _ = resolve_precision(precision, x)
    resolve_conv_algorithm(conv_algorithm, x.device, prec, resolve_backend(backend, x.device))
    graph = build_graph(model, x[:1], linearize)
    g = graph.resolve(layer)
    sel = None if neurons is None else _neuron_index(neurons, g.shape, x.device)
    budget = max_memory or _default_budget(x.device)
    if strategy == "auto":
        few = sel is not None and sel.numel() <= 64 and _reverse_supports(precision, prec, x.dtype)
        fit = max_memory or _default_budget(x.device, fit=True)
        strategy = "reverse" if few or forward_bytes_per_sample(graph, g.idx, storage) > fit else "forward"
    if strategy == "reverse":
        resolve_backend(backend, x.device)
        if not _reverse_supports(precision, prec, x.dtype):
            raise ValueError(f"precision={precision!r} needs the forward strategy: the reverse strategy runs "
                             f"autograd in the input's dtype ({x.dtype})")
        with _matmul_precision(prec if precision != "auto" else "auto", x.device):
            return _reverse_neurons(graph, x, g, sel, gate_outputs, budget)
    res = Scanner(model, [layer], backend=backend, strategy="forward", max_memory=max_memory, stats=False,
                  keep_images=True, gate_outputs=gate_outputs, linearize=linearize, precision=precision,
                  conv_algorithm=conv_algorithm).scan(x)
    imgs = res[layer].images
    if sel is None:
        return imgs
    B = x.shape[0]
    return imgs.reshape(B, -1, *graph.input_shape)[:, sel]


def filter_images(model: nn.Module, x: torch.Tensor, layer: str, *, backend: str = "auto", strategy: str = "auto",
                  max_memory: Optional[int] = None, gate_outputs: bool = False,
                  linearize: Optional[str] = None, precision: str = "auto",
                  conv_algorithm: str = "auto") -> torch.Tensor:
    """Filter learned images ``L^k = Σ_{i,j} LI_{k,i,j} · a^k_{i,j}`` (SPEC §1, eqs. 5-2 / 6-2).

    ``a^k`` is the layer's own output map (for a layer followed by ReLU its gated images make
    ``Σ LI·z = Σ LI·ReLU(z)``). Options as :class:`Scanner` (``precision``, ``conv_algorithm``
    included).

    Returns
    -------
    Tensor [B, C, *x.shape[1:]] (float32 for the tf32 / bf16 / fp16 precisions)
    """
    res = Scanner(model, [layer], backend=backend, strategy=strategy, max_memory=max_memory, stats=False,
                  filter_images=True, gate_outputs=gate_outputs, linearize=linearize, precision=precision,
                  conv_algorithm=conv_algorithm).scan(x)
    return res[layer].filter_images


def layer_image(model: nn.Module, x: torch.Tensor, layer: str, *, backend: str = "auto", strategy: str = "auto",
                max_memory: Optional[int] = None, precision: str = "auto",
                conv_algorithm: str = "auto") -> torch.Tensor:
    """Layer learned image ``Σ_k L^k`` (SPEC §1, §3.4.1 of the thesis): Tensor [B, *x.shape[1:]].
    ``precision`` / ``conv_algorithm``: see :class:`Scanner`."""
    return filter_images(model, x, layer, backend=backend, strategy=strategy, max_memory=max_memory,
                         precision=precision, conv_algorithm=conv_algorithm).sum(1)
