"""The records of a per-layer plan: the machine rates of the cost model (:data:`RATES`), one
layer's choice (:class:`LayerPlan`) and the whole plan (:class:`Plan`), with their table and JSON
forms. The planning itself is :mod:`nns_cuda.engine.plan`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from nns_cuda.engine.memory import format_bytes

__all__ = ["Rates", "RATES", "LayerPlan", "Plan"]

@dataclass(frozen=True)
class Rates:
    """Machine constants of the cost model: seconds = FLOPs / rate + elements × seconds per element.

    Attributes
    ----------
    forward_flops : float
        FLOP/s of the forward patch convolutions (``2·D·|window|`` per active pair).
    forward_elem_s : float
        Seconds per patch element a forward node writes (or a reduction reads).
    reverse_flops : float
        FLOP/s of the transposed convolutions and GEMMs of a reverse sweep.
    reverse_thin_flops : float
        The same for a transposed convolution that writes at most 4 channels (a first conv
        back to RGB), which vectorises poorly.
    reverse_elem_s : float
        Seconds per map element an element-wise VJP (gate, scatter, sum) touches.
    cut_flops : float
        FLOP/s of the cut's contraction (a batched GEMM over the cut node's positions).
    cut_build_s : float
        Seconds per element of the contraction's overlap-add of windows (and of laying the
        cut's patches out for it).
    node_s : float
        Overhead of one node of one propagation or sweep (Python and op launch).
    reverse_fixed_s : float
        Fixed cost of a reverse part per sample (its sweep set-up, cotangent and result
        tensors), which keeps tiny scans on the forward strategy.
    measured : str
        Where the constants come from.
    """

    forward_flops: float
    forward_elem_s: float
    reverse_flops: float
    reverse_thin_flops: float
    reverse_elem_s: float
    cut_flops: float
    cut_build_s: float
    node_s: float
    reverse_fixed_s: float
    measured: str


#: per resolved backend; see :class:`Rates`
RATES: Dict[str, Rates] = {
    "cpu": Rates(forward_flops=55e9, forward_elem_s=1.0e-9, reverse_flops=230e9, reverse_thin_flops=55e9,
                 reverse_elem_s=0.3e-9, cut_flops=110e9, cut_build_s=1.0e-9, node_s=1e-4,
                 reverse_fixed_s=2e-3, measured="measured on the 2-core development VM (benchmarks/NOTES.md, 'Per-layer plan')"),
    "reference": Rates(forward_flops=5e9, forward_elem_s=10e-9, reverse_flops=230e9, reverse_thin_flops=55e9,
                       reverse_elem_s=0.3e-9, cut_flops=110e9, cut_build_s=1.0e-9, node_s=3e-4,
                       reverse_fixed_s=2e-3, measured="the cpu constants with the pure-PyTorch forward ops 10x slower (an estimate)"),
    "cuda": Rates(forward_flops=3e12, forward_elem_s=0.01e-9, reverse_flops=20e12, reverse_thin_flops=5e12,
                  reverse_elem_s=0.005e-9, cut_flops=10e12, cut_build_s=0.01e-9, node_s=3e-5,
                  reverse_fixed_s=1e-3, measured="predicted from H100-class peaks, not measured"),
}


# ----------------------------------------------------------------------------- plan records
@dataclass
class LayerPlan:
    """The plan of one requested layer.

    Attributes
    ----------
    name : str
        The layer's address.
    index : int
        Its graph node.
    strategy : str
        ``"forward"`` or ``"reverse"``.
    rows : int
        Cotangent rows per sample if it ran reverse (filters, plus neurons for statistics or
        images).
    forward_s, reverse_s : float
        Predicted seconds per sample of this layer's own share under each strategy (``inf``
        where it cannot run: over the memory budget, or a precision the reverse strategy does
        not honour). Forward: the nodes first needed by this layer (the shallower forward
        layers pay for the rest) and its reductions; reverse: its rows' sweeps.
    predicted_s : float
        Of the chosen strategy (with the plan's cut).
    share : float
        ``predicted_s`` over the plan's total.
    memory : int
        Predicted working-set bytes per sample of the part of the scan that computes it.
    cut : str or None
        Reverse layers: the node their sweep stops at.
    """

    name: str
    index: int
    strategy: str
    rows: int
    forward_s: float
    reverse_s: float
    predicted_s: float = 0.0
    share: float = 0.0
    memory: int = 0
    cut: Optional[str] = None


@dataclass
class Plan:
    """Which strategy computes each requested layer, and why (:func:`make_plan`).

    Attributes
    ----------
    layers : list of LayerPlan
        In the order the layers were requested.
    cut : str or None
        The node the reverse sweeps stop at (its forward patches contracted), or None.
    tiles : int
        Bands of rows the forward propagation runs in (1: untiled).
    forward_memory, reverse_memory : int
        Predicted working-set bytes per sample of the forward part (the peak over its bands)
        and of one reverse sweep chunk.
    budget, fit_budget : int
        The batching budget and the per-sample bound the plan respected (bytes).
    predicted_s : float
        Predicted seconds per sample of the whole plan.
    all_forward_s, all_reverse_s : float
        Predicted seconds per sample of the two single-strategy scans (``inf`` if impossible).
    backend : str
        The resolved backend whose :class:`Rates` priced it.
    mode : str
        ``"auto"`` (chosen by cost), ``"forward"`` / ``"reverse"`` (forced by ``strategy``),
        ``"given"`` (passed to :meth:`Scanner.scan`).
    memory_bound : bool
        Whether the memory budget kept a layer from the strategy the cost alone would give it.
    forward_need : int
        Bytes per sample the cost-preferred forward part needs untiled (for messages).
    activity : dict of str to float
        Fraction of active neurons of each requested layer on the batch the plan measured.
    """

    layers: List[LayerPlan]
    cut: Optional[str] = None
    tiles: int = 1
    forward_memory: int = 0
    reverse_memory: int = 0
    budget: int = 0
    fit_budget: int = 0
    predicted_s: float = 0.0
    all_forward_s: float = math.inf
    all_reverse_s: float = math.inf
    backend: str = ""
    mode: str = "auto"
    memory_bound: bool = False
    forward_need: int = 0
    activity: Dict[str, float] = field(default_factory=dict)
    cut_index: Optional[int] = None

    def __getitem__(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"layer {name!r} is not in the plan; planned: {[lp.name for lp in self.layers]}")

    def strategy_of(self, name: str) -> str:
        """``"forward"`` or ``"reverse"`` for a planned layer."""
        return self[name].strategy

    @property
    def forward_layers(self) -> List[str]:
        return [lp.name for lp in self.layers if lp.strategy == "forward"]

    @property
    def reverse_layers(self) -> List[str]:
        return [lp.name for lp in self.layers if lp.strategy == "reverse"]

    @property
    def strategy(self) -> str:
        """``"forward"``, ``"reverse"`` or ``"mixed"``."""
        kinds = {lp.strategy for lp in self.layers}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "forward")

    def to_dict(self) -> Dict[str, object]:
        """The plan as plain data (JSON)."""
        return {"strategy": self.strategy, "mode": self.mode, "cut": self.cut, "tiles": self.tiles,
                "forward_memory": self.forward_memory, "reverse_memory": self.reverse_memory,
                "budget": self.budget, "fit_budget": self.fit_budget, "predicted_s": self.predicted_s,
                "all_forward_s": _finite(self.all_forward_s), "all_reverse_s": _finite(self.all_reverse_s),
                "backend": self.backend, "memory_bound": self.memory_bound,
                "layers": [{"name": lp.name, "strategy": lp.strategy, "rows": lp.rows,
                            "forward_s": _finite(lp.forward_s), "reverse_s": _finite(lp.reverse_s),
                            "predicted_s": lp.predicted_s, "share": lp.share, "memory": lp.memory,
                            "cut": lp.cut, "activity": self.activity.get(lp.name)} for lp in self.layers]}

    def __str__(self) -> str:
        head = (f"scan plan ({self.mode}, {self.backend} rates): {self.strategy}, predicted "
                f"{_secs(self.predicted_s)} per sample (all forward {_secs(self.all_forward_s)}, all reverse "
                f"{_secs(self.all_reverse_s)}); budget {format_bytes(self.budget)}, per sample "
                f"{format_bytes(self.fit_budget)}")
        extra = []
        if self.tiles > 1:
            extra.append(f"forward in {self.tiles} bands of rows")
        if self.cut:
            extra.append(f"reverse sweeps stop at {self.cut!r} (cut)")
        if self.memory_bound:
            extra.append("memory-bound: the budget moved layers to reverse")
        rows = [("layer", "strategy", "rows", "forward", "reverse", "share", "memory", "active")]
        for lp in self.layers:
            act = self.activity.get(lp.name)
            rows.append((lp.name, lp.strategy + (f" (cut {lp.cut})" if lp.cut else ""), str(lp.rows),
                         _secs(lp.forward_s), _secs(lp.reverse_s), f"{100 * lp.share:.1f} %",
                         format_bytes(lp.memory), "–" if act is None else f"{100 * act:.0f} %"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + (["  " + "; ".join(extra)] if extra else [])
        for j, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Plan({self.strategy!r}, forward={self.forward_layers}, reverse={self.reverse_layers}, "
                f"cut={self.cut!r}, tiles={self.tiles}, predicted_s={self.predicted_s:.3g})")


def _finite(v: float):
    return v if math.isfinite(v) else None


def _secs(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    if v >= 1:
        return f"{v:.3g} s"
    return f"{v * 1e3:.3g} ms"
