"""The :class:`Scanner`: learned images of every neuron of the requested layers, in one sweep.

Two exact strategies (docs/spec.md §1), chosen per layer (:mod:`nns_cuda.engine.plan`):

* ``"forward"``: forward patch propagation (:mod:`nns_cuda.engine.propagate`). The learned
  images of every node are carried as receptive-field patches (:mod:`nns_cuda.engine.patches`)
  and pushed through the frozen network node by node by the rule of each node's kind
  (:mod:`nns_cuda.engine.rules`). Statistics, filter images and dense images are reduced from
  the patches of the requested layers.
* ``"reverse"``: one vector–Jacobian product per neuron or filter, pushed through the frozen
  network of one recorded forward pass in batched sweeps (:mod:`nns_cuda.engine.backward`); any
  resolution, memory ∝ (chunk × largest map). A sweep may stop at a forward-planned layer that
  lies on every path to its layers (the *cut*) and contract with that layer's patches.

``strategy="auto"`` prices both for every requested layer and runs the cheapest per-layer
assignment within the memory budget (:meth:`Scanner.plan` shows it; ``ScanResult.plan`` records
it); a forward part whose one sample does not fit runs in bands of rows.

Every result records the backend, strategy, precision and conv algorithm that ran
(:class:`~nns_cuda.engine.results.ScanResult`; per convolution ``conv_algorithms``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
from nns_cuda.engine.patches import Patches, dense_images, fold_filter_images
from nns_cuda.engine.plan import Plan, forced_plan, make_plan
from nns_cuda.engine.propagate import PatchPropagator, ops_for_backend, row_tiles
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
        ``"auto"``: a per-layer plan (:mod:`nns_cuda.engine.plan`): each layer forward or
        reverse, whichever the cost model (receptive-field geometry, measured gate activity,
        memory budget) predicts cheaper, the shallower layers forward sharing one propagation;
        a reverse sweep may stop at a forward layer on every path to it (the cut).
        ``"forward"`` / ``"reverse"``: every layer on that strategy.
    max_memory : int, str or None
        Bytes (or a size such as ``"2G"``, ``"512M"``: :func:`~nns_cuda.engine.memory.parse_bytes`)
        the scan may use for its working set (None: on CUDA 60 % of the free GPU memory; on the
        CPU 2 GiB, or 25 % of the RAM if less, for batching, and up to 8 GiB (or 25 % of the
        RAM) for one sample before ``"auto"`` takes the reverse strategy:
        :func:`~nns_cuda.engine.memory.default_budget`). Larger work is chunked over the batch;
        a forward part whose one sample does not fit runs in bands of rows
        (:func:`~nns_cuda.engine.propagate.row_tiles`; more bands than the fewest that fit
        when that brings it within the batching budget for a few percent more work) or, under
        ``"auto"``, moves to the reverse strategy. A reverse sweep on the CPU holds at most
        256 MiB of rows beside the cut's matrix, whatever the budget
        (:func:`~nns_cuda.engine.backward.sweep_budget`: faster there than larger sweeps). The
        results themselves (statistics, filter images, dense images) are not part of the
        working set.
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
        (:data:`~nns_cuda.engine.reverse.PROGRESS_DELAY_S`). When the memory budget alone
        makes ``strategy="auto"`` run every layer reverse although the cost model prefers
        forward for some, a ``UserWarning`` says so once per Scanner (why, and which
        ``max_memory`` the forward strategy would need).

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
        self._plans: Dict[tuple, Plan] = {}  # planned once per batch shape (see scan)

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

    # ------------------------------------------------------------------ planning
    def _setup(self, x: torch.Tensor, graph: ScanGraph, nodes: List[GNode]) -> Dict[str, object]:
        """The resolved options of a scan of ``x``: backend, numerics, budgets."""
        backend = resolve_backend(self.backend, x.device)
        prec, storage, out_dtype = resolve_precision(self.precision, x)
        algo = resolve_conv_algorithm(self.conv_algorithm, x.device, prec, backend)
        budget = self.max_memory or default_budget(x.device)
        fit_budget = self.max_memory or default_budget(x.device, fit=True)
        return dict(backend=backend, prec=prec, storage=storage, out_dtype=out_dtype, algo=algo, budget=budget,
                    fit_budget=fit_budget, reverse_ok=reverse_supports(self.precision, prec, x.dtype))

    def _forward_pass(self, graph: ScanGraph, nodes: List[GNode], x: torch.Tensor) -> ForwardPass:
        """The recorded forward pass of ``x`` up to the deepest requested layer (the nodes
        after it are not run)."""
        upto = max(g.idx for g in nodes)
        if upto + 1 >= len(graph.nodes):
            return ForwardPass(graph, x, self.gate_outputs)
        head = copy.copy(graph)
        head.nodes = graph.nodes[: upto + 1]
        try:
            values = head.run(x)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"input of shape {list(x.shape)} does not fit the model: {e}") from e
        return ForwardPass.from_values(graph, values, self.gate_outputs)

    def _plan(self, graph: ScanGraph, fwd: Optional[ForwardPass], names: List[str], nodes: List[GNode],
              x: torch.Tensor, ctx: Dict[str, object], forward: Optional[Sequence[str]] = None,
              cut: Optional[str] = "auto") -> Plan:
        esize = torch.empty((), dtype=ctx["storage"]).element_size()
        kw = dict(backend=ctx["backend"], esize=esize, budget=ctx["budget"], fit_budget=ctx["fit_budget"],
                  stats=self.stats, filters=self.want_filters, images=self.keep_images, batch=max(1, x.shape[0]),
                  device_type=x.device.type)
        if forward is not None:
            if not ctx["reverse_ok"] and len(set(forward)) < len(set(names)):
                raise ValueError(f"precision={self.precision!r} needs the forward strategy for every layer: the "
                                 f"reverse strategy runs autograd in the input's dtype ({x.dtype})")
            return make_plan(graph, fwd, names, nodes, forward=forward, cut=cut, **kw)
        if self.strategy == "forward":
            return forced_plan(graph, fwd, names, nodes, "forward", **kw)
        if self.strategy == "reverse":
            if not ctx["reverse_ok"]:
                raise ValueError(f"precision={self.precision!r} needs the forward strategy: the reverse strategy "
                                 f"runs autograd in the input's dtype ({x.dtype})")
            return forced_plan(graph, fwd, names, nodes, "reverse", **kw)
        if not ctx["reverse_ok"]:
            try:
                return forced_plan(graph, fwd, names, nodes, "forward", **kw)
            except MemoryError:
                need = forward_bytes_per_sample(graph, max(g.idx for g in nodes), ctx["storage"])
                raise ValueError(
                    f"precision={self.precision!r} needs the forward strategy: the reverse strategy runs autograd "
                    f"in the input's dtype ({x.dtype}) (strategy='auto' chose it: the forward strategy needs about "
                    f"{need / 2**20:.0f} MiB per sample, over max_memory={ctx['fit_budget'] / 2**20:.0f} MiB; raise "
                    "max_memory)") from None
        # A whole forward scan that fits one sample in the budget stays forward (the measured fastest
        # at small resolutions, benchmarks/NOTES.md); the per-layer plan is for inputs where it does not.
        plan = make_plan(graph, fwd, names, nodes, cut=cut, **kw)
        if plan.strategy != "forward" and forward_bytes_per_sample(
                graph, max(g.idx for g in nodes), ctx["storage"]) <= ctx["fit_budget"]:
            try:
                return forced_plan(graph, fwd, names, nodes, "forward", **kw)
            except MemoryError:
                pass
        return plan

    @torch.no_grad()
    def plan(self, x: torch.Tensor, *, forward: Optional[Sequence[str]] = None, cut: Optional[str] = "auto") -> Plan:
        """The per-layer plan a scan of ``x`` would run (:mod:`nns_cuda.engine.plan`).

        ``strategy="auto"`` prices both strategies for every requested layer (receptive-field
        geometry, the activity of a forward pass of up to 8 samples of ``x``, the memory budget)
        and picks the cheapest assignment; ``"forward"`` / ``"reverse"`` price the forced one.
        ``print(plan)`` shows a table: per layer the strategy, rows, predicted seconds of both
        strategies, the predicted time share, memory and activity.

        Parameters
        ----------
        x : Tensor [B, ...]
        forward : sequence of str or None
            Force these layers forward and the others reverse (pass the result to
            :meth:`scan` to run it).
        cut : str, None or "auto"
            The node the reverse sweeps stop at: ``"auto"`` (by cost), None (none) or the
            address of a forward layer that lies on every path to some reverse layer.

        Returns
        -------
        Plan
        """
        check_input(x)
        graph = self.graph(x)
        nodes = self.layer_nodes(graph)
        names = self.layers if self.layers is not None else [g.name for g in nodes]
        ctx = self._setup(x, graph, nodes)
        fwd = self._forward_pass(graph, nodes, x[:8]) if x.shape[0] else None
        return self._plan(graph, fwd, names, nodes, x, ctx, forward, cut)

    @torch.no_grad()
    def scan(self, x: torch.Tensor, fg_mask: Optional[torch.Tensor] = None, *, plan: Optional[Plan] = None) -> ScanResult:
        """Scan a batch.

        Parameters
        ----------
        x : Tensor [B, D, H, W] (or [B, N] for an MLP)
            float32 or float64, finite.
        fg_mask : bool Tensor [B, H, W] or [H, W], or None
            The foreground, for the statistics (None: the whole image).
        plan : Plan or None
            Run this plan (from :meth:`plan`, e.g. with a forced assignment) instead of
            planning here. Without one, the scanner plans on the first batch of each shape
            (its activity measured on up to 8 samples) and reuses that plan for later batches
            of the same shape; :meth:`plan` always plans afresh.

        Returns
        -------
        ScanResult
            Each requested layer name mapped to a :class:`~nns_cuda.engine.results.LayerResult`;
            ``result.plan`` is the plan that ran.
        """
        check_input(x)
        graph = self.graph(x)
        nodes = self.layer_nodes(graph)
        layer_names = self.layers if self.layers is not None else [g.name for g in nodes]
        _, H, W = image_dims(graph.input_shape)
        fg = check_mask(fg_mask, x.shape[0], H, W, x.device)
        ctx = self._setup(x, graph, nodes)
        backend, prec, storage, out_dtype = ctx["backend"], ctx["prec"], ctx["storage"], ctx["out_dtype"]
        budget = ctx["budget"]
        first = None
        if plan is None:
            key = (tuple(x.shape), x.dtype, str(x.device), backend, ctx["budget"], ctx["fit_budget"])
            plan = self._plans.get(key)
            if plan is None:
                first = self._forward_pass(graph, nodes, x[:8]) if x.shape[0] else None
                plan = self._plan(graph, first, layer_names, nodes, x, ctx)
                self._plans[key] = plan
        else:
            if [lp.name for lp in plan.layers] != list(layer_names):
                raise ValueError(f"the plan is of layers {[lp.name for lp in plan.layers]}, this scanner scans "
                                 f"{list(layer_names)}; make it with this scanner's plan()")
            if plan.reverse_layers and not ctx["reverse_ok"]:
                raise ValueError(f"precision={self.precision!r} needs the forward strategy: the reverse strategy "
                                 f"runs autograd in the input's dtype ({x.dtype})")
        if (plan.mode == "auto" and plan.memory_bound and plan.strategy == "reverse" and not self._warned_reverse):
            self._warned_reverse = True
            warnings.warn(reverse_fallback_message(plan.forward_need, plan.fit_budget), UserWarning, stacklevel=3)
        fplan = ScanPlan(prec, storage, out_dtype, ctx["algo"], gemm_max_elems(budget, storage))
        rplan = ScanPlan(prec, x.dtype, x.dtype, "autograd", 0)
        any_forward = bool(plan.forward_layers)
        out_plan = fplan if any_forward else rplan
        if self.keep_images:  # dense images: refuse before allocating what cannot fit
            for name, g in zip(layer_names, nodes):
                check_dense_result((x.shape[0], *g.shape, *graph.input_shape), out_plan.out_dtype, x.device,
                                   f"keep_images=True: the learned images of layer {name!r}")
        chunk = max(1, x.shape[0])
        if any_forward:
            chunk = max(1, budget // max(plan.forward_memory, 1))
        parts: List[Dict[str, LayerResult]] = []
        conv_ops_used: Dict[str, str] = {}
        with matmul_precision(prec if self.precision != "auto" else "auto", x.device):
            for s in range(0, x.shape[0], chunk):
                xb, fb = x[s: s + chunk], fg[s: s + chunk]
                fwd = first if (s == 0 and first is not None and first.value(graph.nodes[0]).shape[0] == xb.shape[0]) \
                    else self._forward_pass(graph, nodes, xb)
                parts.append(self._scan_chunk(graph, nodes, layer_names, xb, fb, backend, fplan, rplan, budget, plan,
                                              fwd, conv_ops_used))
        if x.shape[0] == 0:  # an empty batch: no chunk ran; empty results of the right shapes
            parts.append({n: empty_layer_result(
                n, g.shape, tuple(graph.input_shape), x.dtype,
                (fplan if plan.strategy_of(n) == "forward" else rplan).out_dtype, x.device, stats=self.stats,
                filter_images=self.want_filters, images=self.keep_images,
                backend=backend if plan.strategy_of(n) == "forward" else "autograd", strategy=plan.strategy_of(n),
                precision=prec, conv_algorithm=(fplan if plan.strategy_of(n) == "forward" else rplan).conv_algorithm)
                for n, g in zip(layer_names, nodes)})
        layers = {n: concat_batches([p[n] for p in parts]) for n in layer_names}
        return ScanResult(layers, backend if any_forward else "autograd", plan.strategy, tuple(graph.input_shape),
                          precision=prec, conv_algorithm=out_plan.conv_algorithm, conv_algorithms=conv_ops_used,
                          plan=plan)

    def _scan_chunk(self, graph: ScanGraph, nodes: List[GNode], names: List[str], x: torch.Tensor, fg: torch.Tensor,
                    backend: str, fplan: ScanPlan, rplan: ScanPlan, budget: int, plan: Plan, fwd: ForwardPass,
                    conv_ops_used: Dict[str, str]) -> Dict[str, LayerResult]:
        """One batch chunk: the forward layers by patch propagation (keeping the cut's patches),
        then the reverse layers by VJP sweeps of the same forward pass."""
        f = [(n, g) for n, g in zip(names, nodes) if plan.strategy_of(n) == "forward"]
        r = [(n, g) for n, g in zip(names, nodes) if plan.strategy_of(n) == "reverse"]
        res: Dict[str, LayerResult] = {}
        kept: Dict[int, object] = {}
        keep = [plan.cut_index] if plan.cut_index is not None and r else []
        if f or keep:
            extra = [graph.nodes[i] for i in keep if i not in {g.idx for _, g in f}]
            res.update(self._scan_forward(graph, [g for _, g in f], [n for n, _ in f], x, fg, backend, fplan,
                                          conv_ops_used, fwd=fwd, tiles=plan.tiles, keep=keep, kept=kept,
                                          extra=extra))
        if r:
            cut = plan.cut_index if plan.cut_index in kept else None
            res.update(self._scan_reverse(graph, [g for _, g in r], [n for n, _ in r], x, fg, budget, rplan, backend,
                                          fwd=fwd, cut=cut, cut_patches=kept.pop(cut, None)))
        return {n: res[n] for n in names}

    def _layer_result(self, name: str, node: GNode, fwd: ForwardPass, backend: str, strategy: str,
                      plan: ScanPlan) -> LayerResult:
        """A layer's result with its activations and gates; the rest is filled in by the strategy."""
        return LayerResult(name=name, activations=fwd.value(node).detach(), gates=fwd.full_gate(node).detach(),
                           backend=backend, strategy=strategy, precision=plan.precision,
                           conv_algorithm=plan.conv_algorithm)

    def _scan_forward(self, graph: ScanGraph, nodes: List[GNode], names: List[str], x: torch.Tensor,
                      fg: torch.Tensor, backend: str, plan: ScanPlan, conv_ops_used: Dict[str, str],
                      fwd: Optional[ForwardPass] = None, tiles: int = 1, keep: Sequence[int] = (),
                      kept: Optional[Dict[int, object]] = None, extra: Sequence[GNode] = ()) -> Dict[str, LayerResult]:
        """One batch chunk by forward patch propagation. Each layer's patches are reduced to
        what the scan returns as soon as they are complete (the propagation then drops them),
        in ``tiles`` bands of rows when one sample does not fit untiled
        (:func:`~nns_cuda.engine.propagate.row_tiles`); ``extra`` nodes are propagated without
        results, and the patches of ``keep`` (a cut) are put in ``kept`` (joined over the bands)."""
        fwd = ForwardPass(graph, x, self.gate_outputs) if fwd is None else fwd
        D, H, W = image_dims(graph.input_shape)
        B = x.shape[0]
        prop = PatchPropagator(graph, fwd, x, backend, [g.idx for g in list(nodes) + list(extra)], plan.storage,
                               plan.conv_algorithm, plan.gemm_max_elems)
        ops = prop.ops
        x4 = x.reshape(B, D, H, W)
        fgm = fg.to(x.dtype)
        res: Dict[str, LayerResult] = {}
        by_idx: Dict[int, List[Tuple[str, GNode]]] = {}
        for name, node in zip(names, nodes):
            if name in res:
                continue
            by_idx.setdefault(node.idx, []).append((name, node))
            lr = self._layer_result(name, node, fwd, backend, "forward", plan)
            dev, dt = x.device, plan.out_dtype
            if self.stats:
                lr.stats = torch.zeros(B, *node.shape, NUM_STATS, dtype=dt, device=dev)
            if self.want_filters:
                if len(node.shape) not in (1, 3):
                    raise ValueError(f"filter images need a layer with channels ([C, H, W] or [N]); {node.name!r} "
                                     f"has shape {list(node.shape)}")
                lr.filter_images = torch.zeros(B, node.shape[0], *graph.input_shape, dtype=dt, device=dev)
            if self.keep_images:
                lr.images = torch.zeros(B, *node.shape, *graph.input_shape, dtype=dt, device=dev)
            res[name] = lr

        def reduce(idx: int, p, rows: Tuple[int, int]) -> None:
            for name, node in by_idx.get(idx, ()):
                if plan.storage == torch.float16 and not bool(torch.isfinite(p.data).all()):
                    raise FloatingPointError(
                        f"precision='fp16': the learned images of layer {name!r} overflowed float16 (|value| > 65504, "
                        "or inf / NaN from an earlier overflow); use precision='bf16' (float32's range) or 'fp32'")
                lr = res[name]
                whole = len(node.shape) != 3 or rows == (0, node.shape[1])
                part = node if whole else dataclasses.replace(node, shape=(node.shape[0], rows[1] - rows[0],
                                                                           node.shape[2]))
                sel = (slice(None),) if whole else (slice(None), slice(None), slice(rows[0], rows[1]))
                if self.stats:
                    st = ops.li_stats(p.data, p.ay, p.ax, x4, fgm)
                    lr.stats[sel] = st.reshape(B, *part.shape, NUM_STATS).to(plan.out_dtype)
                if self.want_filters:
                    act = fwd.value(node)[sel]
                    lr.filter_images += fold_filter_images(ops, part, p, act, graph.input_shape).to(plan.out_dtype)
                if self.keep_images:
                    lr.images[sel] = dense_images(ops, p, part.shape, graph.input_shape).to(plan.out_dtype)

        bands = [None] if tiles <= 1 else row_tiles(graph, [g.idx for g in list(nodes) + list(extra)], tiles)
        parts: Dict[int, List[Patches]] = {}
        for band in bands:
            for i, p in prop.run(reduce, keep=keep, tile=band).items():
                parts.setdefault(i, []).append(p)
        if kept is not None:
            for i, ps in parts.items():  # the bands' rows in order: one set of patches
                kept[i] = ps[0] if len(ps) == 1 else Patches(torch.cat([p.data for p in ps], 2),
                                                             torch.cat([p.ay for p in ps]), ps[0].ax)
        conv_ops_used.update(prop.conv_ops_used)
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
