"""Forward patch propagation: the learned images of every node of one batch, node by node.

:class:`PatchPropagator` starts from the input's patches (every input entry its own learned
image), applies the rule of each node's kind (:data:`nns_cuda.engine.rules.RULES`) in graph
order, frees the patches of a node once its last user has run, and returns the patches of the
requested nodes with their neuron gates applied.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Set, Tuple

import torch

from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.graph import GNode, ScanGraph
from nns_cuda.engine.inputs import image_dims
from nns_cuda.engine.memory import gather_fits
from nns_cuda.engine.options import LOW_PRECISION_DTYPES
from nns_cuda.engine.patches import Patches
from nns_cuda.engine.rules import RULES, TAKES_PENDING_SCALE
from nns_cuda.ops.reference import ops as reference_ops

__all__ = ["PatchPropagator", "ops_for_backend"]


def ops_for_backend(backend: str):
    """The op module of a resolved backend: the reference twins, or the compiled ops' wrappers."""
    if backend == "reference":
        return reference_ops
    from nns_cuda import ops

    return ops


class PatchPropagator:
    """Forward patch propagation of one batch with one backend's ops.

    For bfloat16 / float16 storage the per-neuron factors (weights, BN scales, gates, pooling
    divisors) stay float32 (``factor_dtype``): the ops compute in float32 and round their
    results once, and element-wise scalings here multiply in float32 and round once
    (:meth:`scale`).

    Parameters
    ----------
    graph : ScanGraph
    forward : ForwardPass
        The forward pass of the same batch (values, gates, arg-max indices).
    x : Tensor [B, *graph.input_shape]
    backend : str
        A resolved backend (``"reference"``, ``"cpu"``, ``"cuda"``).
    requested : sequence of int
        Indices of the nodes whose patches :meth:`run` returns.
    dtype : torch.dtype
        Storage dtype of the patches.
    conv_algorithm : str
        ``"direct"``, ``"gemm"``, ``"gather"`` or ``"implicit"``.
    gemm_max_elems : int
        Chunk bound of the GEMM conv ops (:func:`nns_cuda.engine.memory.gemm_max_elems`).

    Attributes
    ----------
    ops : module
        The backend's ops.
    conv_ops_used : dict of str to str
        For every convolution that ran, the op it used (``"direct"``, ``"gemm"``, ...).
    fused : dict of int to int
        Nodes that share the patches of an earlier node (a conv or BN fused with what follows).
    gated_by_fusion : set of int
        Convs whose patches already carry the gate of the activation after them.
    """

    def __init__(self, graph: ScanGraph, forward: ForwardPass, x: torch.Tensor, backend: str,
                 requested: Sequence[int], dtype: torch.dtype, conv_algorithm: str = "direct",
                 gemm_max_elems: int = 0):
        self.graph, self.forward, self.x = graph, forward, x
        self.ops = ops_for_backend(backend)
        self.requested = set(requested)
        self.dtype = dtype
        self.low = dtype in LOW_PRECISION_DTYPES
        self.factor_dtype = torch.float32 if self.low else dtype
        self.conv_algorithm = conv_algorithm
        self.gemm_max_elems = gemm_max_elems
        self.conv_ops_used: Dict[str, str] = {}
        self.fused: Dict[int, int] = {}
        self.gated_by_fusion: Set[int] = set()
        self.B = x.shape[0]
        self.D, self.H, self.W = image_dims(graph.input_shape)
        self.device = x.device

    # ------------------------------------------------------------------ helpers of the rules
    def scale(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``t * s`` (``s`` broadcast) in the storage dtype; for 16-bit storage the product is
        taken in float32 and rounded once."""
        if not self.low:
            return t * s.to(self.dtype)
        return torch.mul(t, s.to(self.factor_dtype), out=torch.empty_like(t))

    def settle(self, patches: Patches) -> Patches:
        """``patches`` with its pending scale applied (one pass over the data), or ``patches``."""
        if patches.pending_scale is None:
            return patches
        B, C, Ho, Wo = patches.data.shape[:4]
        mult = patches.pending_scale.view(1, C, 1, 1) * patches.active.to(self.factor_dtype)
        return Patches(self.scale(patches.data, mult.view(B, C, Ho, Wo, 1, 1, 1)), patches.ay, patches.ax,
                       patches.active)

    def apply_gate(self, patches: Patches, gate: torch.Tensor) -> Patches:
        """``patches`` times a per-neuron ``gate`` (any shape with ``B·C·Ho·Wo`` entries)."""
        B, C, Ho, Wo = patches.data.shape[:4]
        g = gate.reshape(B, C, Ho, Wo).to(self.factor_dtype)
        return Patches(self.scale(patches.data, g.view(B, C, Ho, Wo, 1, 1, 1)), patches.ay, patches.ax, g != 0)

    def to_dense(self, patches: Patches) -> Patches:
        """``patches`` as dense images ``[B, C·Ho·Wo, 1, 1, D, H, W]`` (unchanged if they are)."""
        if patches.is_dense(self.H, self.W):
            return patches
        B, C, Ho, Wo = patches.data.shape[:4]
        zy = torch.zeros(Ho, dtype=torch.long, device=self.device)
        zx = torch.zeros(Wo, dtype=torch.long, device=self.device)
        t = self.ops.place_li(patches.data, patches.ay, patches.ax, zy, zx, self.H, self.W, None)
        t = t.reshape(B, C * Ho * Wo, 1, 1, self.D, self.H, self.W)
        active = None if patches.active is None else patches.active.reshape(B, C * Ho * Wo, 1, 1)
        return Patches(t, self._zero_anchor(), self._zero_anchor(), active)

    def window(self, node: GNode, ho: int, wo: int) -> Tuple[int, int, torch.Tensor, torch.Tensor]:
        """``(rh, rw, ay, ax)``: window size and anchors of the ``ho × wo`` neurons of a spatial node."""
        rh, ay = node.gy.window(self.H, ho)
        rw, ax = node.gx.window(self.W, wo)
        return rh, rw, ay.to(self.device), ax.to(self.device)

    def in_window(self, i: int, patches: Patches, node: GNode, rh: int, rw: int) -> bool:
        """Whether the patches of input ``i`` already lie in ``node``'s windows (same
        receptive-field geometry, same window size): then no placement copy is needed."""
        src = self.graph.nodes[i]
        return src.gy == node.gy and src.gx == node.gx and tuple(patches.data.shape[5:]) == (rh, rw)

    def conv(self, node: GNode, patches: Patches, scale: Optional[torch.Tensor],
             gate: Optional[torch.Tensor]) -> Patches:
        """A convolution of ``patches`` with the op of the scan's conv algorithm.

        ``scale`` [Co] and ``gate`` [B, Co, Ho, Wo] (or None) multiply the outputs (a fused BN,
        a fused activation). A pending scale of the input is folded into the weights per input
        channel; its ``active`` mask makes every conv op skip inactive inputs without reading
        them. ``"gemm"`` runs for ``groups == 1``; ``"gather"`` / ``"implicit"`` where the
        placed copy fits (:func:`~nns_cuda.engine.memory.gather_fits`), float64 ``"implicit"``
        as the gather (Triton has no float64 dot); everything else runs ``"direct"``.
        """
        C, Ho, Wo = node.shape
        rh, rw, ay, ax = self.window(node, Ho, Wo)
        a = node.attrs
        groups = int(a["groups"])
        weight = node.module.weight.detach().to(self.factor_dtype)
        if patches.pending_scale is not None:
            Co, Cig = weight.shape[:2]
            s_in = patches.pending_scale.view(groups, 1, Cig).expand(groups, Co // groups, Cig).reshape(Co, Cig, 1, 1)
            weight = weight * s_in
        args = (patches.data, patches.ay, patches.ax, patches.active, weight, scale, gate, ay, ax, list(a["stride"]),
                list(a["padding"]), list(a["dilation"]), groups, rh, rw)
        algo = self.conv_algorithm
        if algo in ("gather", "implicit") and not gather_fits(patches, ay, ax, a, rh, rw, self.gemm_max_elems):
            algo = "direct"
        if algo == "implicit" and self.dtype == torch.float64:
            algo = "gather"
        if algo == "gemm" and groups == 1:
            t = self.ops.conv_li_gemm(*args, self.gemm_max_elems)
        elif algo == "gather":
            t = self.ops.conv_li_gather(*args, self.gemm_max_elems)
        elif algo == "implicit":
            t = self.ops.conv_li_implicit(*args, self.gemm_max_elems)
        else:
            t, algo = self.ops.conv_li(*args), "direct"
        self.conv_ops_used[node.name] = algo
        return Patches(t, ay, ax, None if gate is None else gate != 0)

    def _zero_anchor(self) -> torch.Tensor:
        return torch.zeros(1, dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ propagation
    def input_patches(self) -> Patches:
        """The learned images of the input: every entry its own image (``x_t`` at ``t``)."""
        B, D, H, W = self.B, self.D, self.H, self.W
        xi = self.x.reshape(B, D, H, W).to(self.dtype)
        if self.graph.nodes[0].spatial:
            t = torch.zeros(B, D, H, W, D, 1, 1, dtype=self.dtype, device=self.device)
            idx = torch.arange(D, device=self.device)
            t[:, idx, :, :, idx, 0, 0] = xi.permute(1, 0, 2, 3)
            return Patches(t, torch.arange(H, device=self.device), torch.arange(W, device=self.device))
        P = D * H * W
        t = torch.diag_embed(xi.reshape(B, P)).reshape(B, P, 1, 1, D, H, W)
        return Patches(t, self._zero_anchor(), self._zero_anchor())

    def propagate(self, node: GNode, patches: Dict[int, Patches]) -> Patches:
        """The patches of ``node`` from those of its inputs (its kind's rule)."""
        if node.kind not in TAKES_PENDING_SCALE:
            for i in node.inputs:
                patches[i] = self.settle(patches[i])
        rule = RULES.get(node.kind)
        if rule is None:
            raise AssertionError(f"unhandled node kind {node.kind}")
        return rule(self, node, patches)

    def run(self) -> Dict[int, Patches]:
        """Propagate up to the last requested node.

        Returns
        -------
        dict of int to Patches
            The patches of every requested node, pending scale applied and neuron gate
            (:meth:`ForwardPass.neuron_gate`) applied.
        """
        graph = self.graph
        alive: Dict[int, Patches] = {}
        # only the requested nodes and what they are computed from (other branches are skipped)
        needed = graph.ancestors(self.requested)
        users_left = {g.idx: sum(1 for u in g.users if u in needed) for g in graph.nodes}
        out: Dict[int, Patches] = {}
        self.fused, self.gated_by_fusion = {}, set()
        last_needed = max(self.requested) if self.requested else -1
        for node in graph.nodes:
            if node.idx > last_needed:
                break
            if node.kind == "aux" or node.idx not in needed:
                continue
            if node.idx in self.fused:
                p = alive[node.inputs[0]]  # a fused chain shares one set of patches
            elif node.kind == "input":
                p = self.input_patches()
            else:
                p = self.propagate(node, alive)
            alive[node.idx] = p
            if node.idx in self.requested:
                # a conv fused with the activation that follows it already carries g_n
                gate = None if node.idx in self.gated_by_fusion else self.forward.neuron_gate(node)
                p = self.settle(p)
                out[node.idx] = p if gate is None else self.apply_gate(p, gate)
            for i in node.inputs:
                users_left[i] -= 1
                if users_left[i] == 0 and i in alive:
                    del alive[i]
        return out
