"""The recorded forward pass of a scan: every node's value, and the gates derived from them."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from nns_cuda.engine.graph import ACTIVATIONS, GNode, ScanGraph, call_out_of_place

__all__ = ["ForwardPass"]


class ForwardPass:
    """The values of the model's nodes on one batch (node by node, never in place), with the
    gates of its activations and the arg-max indices of its max-pools.

    Parameters
    ----------
    graph : ScanGraph
    x : Tensor [B, *input_shape]
    gate_outputs : bool
        Gate the model's output neurons by ``S(z)`` too (docs/spec.md §1).

    Attributes
    ----------
    values : dict
        ``{node index: value}``; max-pools also ``{("indices", node index): int64 arg-max}``.
    """

    def __init__(self, graph: ScanGraph, x: torch.Tensor, gate_outputs: bool):
        try:
            values = graph.run(x)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"input of shape {list(x.shape)} does not fit the model: {e}") from e
        self.graph, self.values, self.gate_outputs = graph, values, gate_outputs

    @classmethod
    def from_values(cls, graph: ScanGraph, values: Dict[Any, Any], gate_outputs: bool) -> "ForwardPass":
        """A forward pass over values already computed (detached here), e.g. with autograd on."""
        fwd = cls.__new__(cls)
        fwd.graph, fwd.gate_outputs = graph, gate_outputs
        fwd.values = {key: (v.detach() if isinstance(v, torch.Tensor) else v) for key, v in values.items()}
        return fwd

    def value(self, node: GNode) -> torch.Tensor:
        """The output of ``node``: Tensor [B, *node.shape]."""
        return self.values[node.idx]

    def act_gate(self, node: GNode) -> torch.Tensor:
        """The gate of activation ``node`` (its local slope at its input): Tensor [B, *node.shape]."""
        z = self.values[node.inputs[0]]
        if node.kind == "relu":
            return (z > 0).to(z.dtype)
        if node.kind == "leaky_relu":
            return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, node.attrs["slope"]))
        if node.kind == "hardtanh":  # ReLU6 / Hardtanh: slope 1 strictly inside (lo, hi), as autograd
            return ((z > node.attrs["lo"]) & (z < node.attrs["hi"])).to(z.dtype)
        if node.kind == "act_grad":
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                y = call_out_of_place(node.module, zz)
                (d,) = torch.autograd.grad(y.sum(), zz)
            return d.detach()
        raise AssertionError(node.kind)

    def neuron_gate(self, node: GNode) -> Optional[torch.Tensor]:
        """``g_n`` of the neurons of ``node`` beyond what its propagated images already hold
        (the gate of the activation that directly follows it, or of the model's output with
        ``gate_outputs``), or None."""
        user = self.graph.gate_user(node)
        if user is not None:
            return self.act_gate(user)
        if self.gate_outputs and node.idx == self.graph.output_idx and node.kind not in ACTIVATIONS:
            z = self.values[node.idx]
            return (z > 0).to(z.dtype)
        return None

    def full_gate(self, node: GNode) -> torch.Tensor:
        """``g_n`` of every neuron of ``node`` (ones where it has none): Tensor [B, *node.shape]."""
        gate = self.neuron_gate(node)
        return torch.ones_like(self.values[node.idx]) if gate is None else gate
