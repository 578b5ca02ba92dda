"""The :class:`Scanner`: learned images of every neuron of the requested layers, in one sweep.

Two exact strategies (docs/spec.md §1):

* ``"forward"``: forward patch propagation (:mod:`nns_cuda.engine.propagate`). The learned
  images of every node are carried as receptive-field patches (:mod:`nns_cuda.engine.patches`)
  and pushed through the frozen network node by node by the rule of each node's kind
  (:mod:`nns_cuda.engine.rules`). Statistics, filter images and dense images are reduced from
  the patches of the requested layers.
* ``"reverse"``: one vector–Jacobian product per neuron or filter, batched with stacked copies
  of the batch (:mod:`nns_cuda.engine.reverse`); any resolution, memory ∝ (chunk × image).

Every result records the backend, strategy, precision and conv algorithm that ran
(:class:`~nns_cuda.engine.results.ScanResult`; per convolution ``conv_algorithms``).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from nns_cuda.engine.backward import ReverseRequest, reverse_scan
from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.graph import GNode, ScanGraph, build_graph
from nns_cuda.engine.inputs import check_input, check_mask, image_dims
from nns_cuda.engine.memory import (check_dense_result, default_budget, forward_bytes_per_sample, gemm_max_elems,
                                    parse_bytes, reverse_fallback_message)
from nns_cuda.engine.options import (ScanPlan, check_options, matmul_precision, resolve_backend,
                                     resolve_conv_algorithm, resolve_precision, reverse_supports)
from nns_cuda.engine.patches import dense_images, fold_filter_images
from nns_cuda.engine.propagate import PatchPropagator, ops_for_backend
from nns_cuda.engine.results import LayerResult, ScanResult, concat_batches, empty_layer_result
from nns_cuda.engine.reverse import _progress_bar
from nns_cuda.ops.reference.stats import NUM_STATS

__all__ = ["Scanner"]


class Scanner:
    """Scan chosen layers of a model: activations, gates, learned images, statistics, filter images.

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    layers : list of str or None
        Layer names (``model.named_modules()`` names, ``name:k`` calls, fx op names); None:
        every scannable node.
    backend : {"auto", "reference", "cpu", "cuda"}
        See :func:`~nns_cuda.engine.options.resolve_backend`.
    strategy : {"auto", "forward", "reverse"}
        ``"auto"``: forward when one sample fits ``max_memory``, else reverse.
    max_memory : int, str or None
        Bytes (or a size such as ``"2G"``, ``"512M"``: :func:`~nns_cuda.engine.memory.parse_bytes`)
        the scan may use for its working set (None: 60 % of free GPU memory; on the CPU
        2 GiB, or 25 % of RAM if less). Larger work is chunked over the batch; when one sample
        does not fit the forward strategy, ``"auto"`` switches to ``"reverse"``.
    stats : bool
        Reduce the fused per-neuron statistics (docs/spec.md §2–§3) over the foreground mask
        given to :meth:`scan` (the whole image without one).
    filter_images : bool
        Compute ``L^k`` for every channel of each layer.
    keep_images : bool
        Keep the dense learned images of every neuron (memory heavy; small inputs).
    gate_outputs : bool
        Gate the model's output neurons by ``S(z)`` too (docs/spec.md §1).
    linearize : None or "gradient"
        ``"gradient"``: non-ReLU activations by their local derivative.
    precision : {"auto", "fp32", "fp64", "tf32", "bf16", "fp16"}
        See *Precision* in the notes.
    conv_algorithm : {"auto", "direct", "gemm", "gather", "implicit"}
        See *Conv algorithms* in the notes.
    progress : bool or None
        Progress bar (stderr) of the reverse strategy's per-neuron loop: True always, False
        never, None (default) only for a loop that runs longer than 2 s
        (:data:`~nns_cuda.engine.reverse.PROGRESS_DELAY_S`). When ``strategy="auto"`` falls
        back to the reverse strategy, a ``UserWarning`` says so once per Scanner (why, and
        which ``max_memory`` the forward strategy would need).

    Notes
    -----
    **Precision** (docs/spec.md §6: float32 by default, reduced precision only on request).

    - ``"auto"`` (default): everything in the input's dtype (float32 or float64); torch's TF32
      switches are left as they are.
    - ``"fp32"`` / ``"fp64"``: learned images stored and computed in that dtype (results in it
      too); on CUDA ``"fp32"`` also turns TF32 off for cuBLAS and cuDNN during the scan.
    - ``"bf16"`` / ``"fp16"``: learned-image patches *stored* in bfloat16 / float16 (half the
      memory and traffic); every product and sum is taken in float32 and rounded once per
      layer (the ``"gemm"`` algorithm multiplies 16-bit operands, weights rounded too, with
      float32 accumulation). Statistics, filter images and images are returned in float32.
      The model's forward pass (activations, gates) is unchanged. float16's range ends at
      65504: a layer whose learned images overflow raises ``FloatingPointError`` (use
      ``"bf16"``). The count statistics (``nz_fg``, ``nz_bg``, ``fg_xnz_sum``,
      ``fg_xnz_sq_sum``) depend on which entries are exactly zero and are fragile in 16 bits:
      use ``"fp32"`` for count-based measures. Measured errors: ``benchmarks/NOTES.md``.
    - ``"tf32"``: float32 storage, convolutions as GEMMs (``"gather"`` or ``"gemm"``) with
      cuBLAS TF32 on (linear layers too); layers the gather does not take run the direct
      float32 kernel. CUDA only: on the CPU it raises ``ValueError``.

    The reverse strategy runs autograd in the input's dtype; a precision other than ``"auto"``
    or the input's own dtype needs the forward strategy (``ValueError`` otherwise).

    **Conv algorithms.** ``"direct"``: the gated kernels (``ops.conv_li``), which skip gated-off
    outputs and inactive inputs. ``"gemm"``: ``ops.conv_li_gemm``, one dense GEMM per image
    (tensor cores on CUDA; no sparsity skipping), for convolutions with ``groups == 1``.
    ``"gather"``: ``ops.conv_li_gather``, per output position a GEMM over the active (input
    neuron, tap) pairs only (inactive inputs cost nothing; cuBLAS on CUDA), for ``groups == 1``.
    Its rows are copied from a placed copy of the input, which has the input's size where every
    input position sits at one offset in the output windows that read it (always so once the
    receptive field covers the image, where most of the work is) and up to ``Kh·Kw`` times more
    where the windows move with the position: a layer runs direct when that copy of one image
    exceeds the chunk bound (a quarter of ``max_memory``). ``"implicit"``: the gather's
    arithmetic as one Triton kernel on CUDA (``ops.conv_li_implicit``), which loads the pairs'
    rows itself instead of copying them; same layers as ``"gather"``, float64 runs the gather;
    needs CUDA and Triton (``ValueError`` otherwise). Grouped / depthwise convolutions and
    average pools always run direct. ``ScanResult.conv_algorithms`` says which ran for each
    convolution. ``"auto"``: ``"direct"`` on the CPU, ``"gather"`` on CUDA (see
    :func:`~nns_cuda.engine.options.resolve_conv_algorithm`; ``"implicit"`` is opt-in).
    """

    def __init__(self, model: nn.Module, layers: Optional[Sequence[str]] = None, *, backend: str = "auto",
                 strategy: str = "auto", max_memory: Union[None, int, str] = None, stats: bool = True,
                 filter_images: bool = False, keep_images: bool = False, gate_outputs: bool = False,
                 linearize: Optional[str] = None, precision: str = "auto", conv_algorithm: str = "auto",
                 progress: Optional[bool] = None):
        check_options(backend, strategy, precision, conv_algorithm)
        max_memory = parse_bytes(max_memory)
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
        self.progress = progress
        self._warned_reverse = False

    def graph(self, x: torch.Tensor) -> ScanGraph:
        """The :class:`~nns_cuda.engine.graph.ScanGraph` of the model for inputs shaped like ``x`` [B, ...]."""
        return build_graph(self.model, x, self.linearize)

    def layer_nodes(self, graph: ScanGraph) -> List[GNode]:
        """The graph nodes of the requested layers (in the order given; all scannable nodes in
        graph order when ``layers`` is None)."""
        if self.layers is None:
            seen, nodes = set(), []
            for name in graph.layer_names():
                node = graph.resolve(name)
                if node.idx not in seen:
                    seen.add(node.idx)
                    nodes.append(node)
            return sorted(nodes, key=lambda g: g.idx)
        return [graph.resolve(n) for n in self.layers]

    @torch.no_grad()
    def scan(self, x: torch.Tensor, fg_mask: Optional[torch.Tensor] = None) -> ScanResult:
        """Scan a batch.

        Parameters
        ----------
        x : Tensor [B, D, H, W] (or [B, N] for an MLP)
            float32 or float64, finite.
        fg_mask : bool Tensor [B, H, W] or [H, W], or None
            The foreground, for the statistics (None: the whole image).

        Returns
        -------
        ScanResult
            Each requested layer name mapped to a :class:`~nns_cuda.engine.results.LayerResult`.
        """
        check_input(x)
        graph = self.graph(x)
        nodes = self.layer_nodes(graph)
        layer_names = self.layers if self.layers is not None else [g.name for g in nodes]
        _, H, W = image_dims(graph.input_shape)
        fg = check_mask(fg_mask, x.shape[0], H, W, x.device)
        backend = resolve_backend(self.backend, x.device)
        prec, storage, out_dtype = resolve_precision(self.precision, x)
        algo = resolve_conv_algorithm(self.conv_algorithm, x.device, prec, backend)
        budget = self.max_memory or default_budget(x.device)
        fit_budget = self.max_memory or default_budget(x.device, fit=True)
        per_sample = forward_bytes_per_sample(graph, max(g.idx for g in nodes), storage)
        strategy = self.strategy
        if strategy == "auto":
            strategy = "forward" if per_sample <= fit_budget else "reverse"
            if strategy == "reverse" and not self._warned_reverse and reverse_supports(self.precision, prec, x.dtype):
                self._warned_reverse = True
                warnings.warn(reverse_fallback_message(per_sample, fit_budget), UserWarning, stacklevel=3)
        if strategy == "reverse":
            if not reverse_supports(self.precision, prec, x.dtype):
                why = "" if self.strategy == "reverse" else (
                    f" (strategy='auto' chose it: the forward strategy needs about {per_sample / 2**20:.0f} MiB per "
                    f"sample, over max_memory={fit_budget / 2**20:.0f} MiB; raise max_memory)")
                raise ValueError(f"precision={self.precision!r} needs the forward strategy: the reverse strategy runs "
                                 f"autograd in the input's dtype ({x.dtype}){why}")
            plan = ScanPlan(prec, x.dtype, x.dtype, "autograd", 0)
            chunk = max(1, x.shape[0])
        else:
            if per_sample > fit_budget:
                raise MemoryError(
                    f"the forward strategy needs about {per_sample / 2**20:.0f} MiB per sample for these layers, over "
                    f"max_memory={fit_budget / 2**20:.0f} MiB; raise max_memory or use strategy='reverse'")
            plan = ScanPlan(prec, storage, out_dtype, algo, gemm_max_elems(budget, storage))
            chunk = max(1, budget // max(per_sample, 1))
        if self.keep_images:  # dense images: refuse before allocating what cannot fit
            for name, g in zip(layer_names, nodes):
                check_dense_result((x.shape[0], *g.shape, *graph.input_shape), plan.out_dtype, x.device,
                                   f"keep_images=True: the learned images of layer {name!r}")
        parts: List[Dict[str, LayerResult]] = []
        conv_ops_used: Dict[str, str] = {}
        with matmul_precision(prec if self.precision != "auto" else "auto", x.device):
            for s in range(0, x.shape[0], chunk):
                xb, fb = x[s: s + chunk], fg[s: s + chunk]
                if strategy == "forward":
                    parts.append(self._scan_forward(graph, nodes, layer_names, xb, fb, backend, plan, conv_ops_used))
                else:
                    parts.append(self._scan_reverse(graph, nodes, layer_names, xb, fb, budget, plan, backend))
        if x.shape[0] == 0:  # an empty batch: no chunk ran; empty results of the right shapes
            parts.append({n: empty_layer_result(
                n, g.shape, tuple(graph.input_shape), x.dtype, plan.out_dtype, x.device, stats=self.stats,
                filter_images=self.want_filters, images=self.keep_images,
                backend=backend if strategy == "forward" else "autograd", strategy=strategy,
                precision=plan.precision, conv_algorithm=plan.conv_algorithm) for n, g in zip(layer_names, nodes)})
        layers = {n: concat_batches([p[n] for p in parts]) for n in layer_names}
        return ScanResult(layers, backend if strategy == "forward" else "autograd", strategy, tuple(graph.input_shape),
                          precision=plan.precision, conv_algorithm=plan.conv_algorithm, conv_algorithms=conv_ops_used)

    def _layer_result(self, name: str, node: GNode, fwd: ForwardPass, backend: str, strategy: str,
                      plan: ScanPlan) -> LayerResult:
        """A layer's result with its activations and gates; the rest is filled in by the strategy."""
        return LayerResult(name=name, activations=fwd.value(node).detach(), gates=fwd.full_gate(node).detach(),
                           backend=backend, strategy=strategy, precision=plan.precision,
                           conv_algorithm=plan.conv_algorithm)

    def _scan_forward(self, graph: ScanGraph, nodes: List[GNode], names: List[str], x: torch.Tensor,
                      fg: torch.Tensor, backend: str, plan: ScanPlan,
                      conv_ops_used: Dict[str, str]) -> Dict[str, LayerResult]:
        """One batch chunk by forward patch propagation."""
        fwd = ForwardPass(graph, x, self.gate_outputs)
        D, H, W = image_dims(graph.input_shape)
        B = x.shape[0]
        prop = PatchPropagator(graph, fwd, x, backend, [g.idx for g in nodes], plan.storage, plan.conv_algorithm,
                               plan.gemm_max_elems)
        patches = prop.run()
        conv_ops_used.update(prop.conv_ops_used)
        ops = prop.ops
        x4 = x.reshape(B, D, H, W)
        res: Dict[str, LayerResult] = {}
        for name, node in zip(names, nodes):
            p = patches[node.idx]
            if plan.storage == torch.float16 and not bool(torch.isfinite(p.data).all()):
                raise FloatingPointError(
                    f"precision='fp16': the learned images of layer {name!r} overflowed float16 (|value| > 65504, "
                    "or inf / NaN from an earlier overflow); use precision='bf16' (float32's range) or 'fp32'")
            lr = self._layer_result(name, node, fwd, backend, "forward", plan)
            if self.stats:
                st = ops.li_stats(p.data, p.ay, p.ax, x4, fg.to(x.dtype))
                lr.stats = st.reshape(B, *node.shape, NUM_STATS).to(plan.out_dtype)
            if self.want_filters:
                lr.filter_images = fold_filter_images(ops, node, p, fwd.value(node), graph.input_shape) \
                    .to(plan.out_dtype)
            if self.keep_images:
                lr.images = dense_images(ops, p, node.shape, graph.input_shape).to(plan.out_dtype)
            res[name] = lr
        return res

    def _scan_reverse(self, graph: ScanGraph, nodes: List[GNode], names: List[str], x: torch.Tensor,
                      fg: torch.Tensor, budget: int, plan: ScanPlan, backend: str = "reference",
                      fwd: Optional[ForwardPass] = None, cut: Optional[int] = None,
                      cut_patches=None) -> Dict[str, LayerResult]:
        """One batch chunk by batched VJPs of one forward pass: every layer's rows in shared
        sweeps (:func:`~nns_cuda.engine.backward.reverse_scan`), statistics reduced per sweep."""
        fwd = ForwardPass(graph, x, self.gate_outputs) if fwd is None else fwd
        B = x.shape[0]
        D, H, W = image_dims(graph.input_shape)
        requests, seen = [], set()
        for name, node in zip(names, nodes):
            if name not in seen:
                seen.add(name)
                requests.append(ReverseRequest(name, node, filters=self.want_filters, stats=self.stats,
                                               images=self.keep_images))
        rows = sum((q.node.shape[0] if q.filters and q.node.shape else 0)
                   + (int(math.prod(q.node.shape)) if q.stats or q.images else 0) for q in requests)
        ops = ops_for_backend(backend)
        zero = torch.zeros(1, dtype=torch.long, device=x.device)

        def stats_fn(li: torch.Tensor, x4: torch.Tensor, fgm: torch.Tensor) -> torch.Tensor:
            n = li.shape[1]
            return ops.li_stats(li.reshape(B, n, 1, 1, D, H, W), zero, zero, x4, fgm.to(li.dtype)).reshape(B, n, -1)

        bar = _progress_bar(rows, "reverse " + ", ".join(q.name for q in requests), "row", self.progress)
        try:
            out = reverse_scan(graph, fwd, x, fg, requests, budget, stats_fn, cut=cut, cut_patches=cut_patches,
                               on_rows=bar.update)
        finally:
            bar.close()
        res: Dict[str, LayerResult] = {}
        for name, node in zip(names, nodes):
            lr = self._layer_result(name, node, fwd, "autograd", "reverse", plan)
            o = out[name]
            if self.stats:
                lr.stats = o["stats"].reshape(B, *node.shape, NUM_STATS)
            if self.want_filters:
                lr.filter_images = o["filter_images"]
            if self.keep_images:
                lr.images = o["images"].reshape(B, *node.shape, *graph.input_shape)
            res[name] = lr
        return res
