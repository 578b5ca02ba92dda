"""Receptive-field geometry of the graph's spatial nodes, one :class:`Geometry` per axis.

Neuron ``(c, y, x)`` of a spatial node sees input rows ``[y·J − P, y·J − P + R)`` (clipped to
the image); its learned image is zero outside them, which is what makes the patch
representation of the engine exact (docs/spec.md §1, receptive-field locality).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

__all__ = ["Geometry", "union", "assign_geometry"]


@dataclass(frozen=True)
class Geometry:
    """Receptive field along one axis: neuron at position ``i`` sees ``[i·J − P, i·J − P + R)``.

    Attributes
    ----------
    J : int
        Jump: input positions between neighbouring neurons.
    P : int
        Start offset.
    R : int
        Size.
    """

    J: int
    P: int
    R: int

    def window(self, size_in: int, n_out: int) -> Tuple[int, torch.Tensor]:
        """Stored window size ``min(R, size_in)`` and anchors ``clamp(i·J − P, 0, size_in − Rw)``
        (int64 Tensor [n_out]) of ``n_out`` neurons over an axis of ``size_in`` input positions."""
        rw = min(self.R, size_in)
        i = torch.arange(n_out, dtype=torch.long)
        return rw, (i * self.J - self.P).clamp(0, size_in - rw)


def union(a: Geometry, b: Geometry) -> Geometry:
    """The smallest geometry (same jump) whose windows contain those of ``a`` and ``b``."""
    P = max(a.P, b.P)
    return Geometry(a.J, P, max(a.R - a.P, b.R - b.P) + P)


def _windowed(src: Geometry, kernel: int, stride: int, padding: int, dilation: int) -> Geometry:
    """The geometry after a conv / pool window over ``src``."""
    return Geometry(src.J * stride, src.P + padding * src.J, src.R + (kernel - 1) * dilation * src.J)


def assign_geometry(nodes: Sequence, input_shape: Tuple[int, ...], same_as_input: Tuple[str, ...]) -> None:
    """Set ``gy`` / ``gx`` of every node (None for dense nodes), in graph order.

    Parameters
    ----------
    nodes : sequence of GNode
        The graph's nodes, with their kinds, inputs, attributes and output shapes.
    input_shape : tuple of int
        The model input's shape without the batch dimension; ``[D, H, W]`` inputs are spatial.
    same_as_input : tuple of str
        Node kinds that keep their input's geometry (activations, BN, identity, slices).

    Adaptive pools (and a global mean with ``keepdim``) whose sizes divide are regular pools:
    their ``attrs`` get ``regular=True`` and ``kernel``; the others ``regular=False``.
    """
    spatial_input = len(input_shape) == 3
    for g in nodes:
        if g.kind == "aux":
            continue
        if g.kind == "input":
            if spatial_input:
                g.gy = g.gx = Geometry(1, 0, 1)
            continue
        ins = [nodes[i] for i in g.inputs]
        src = ins[0] if ins else None
        if src is None or not src.spatial or len(g.shape) != 3:
            g.gy = g.gx = None
            continue
        if g.kind in ("conv", "maxpool", "avgpool"):
            a = g.attrs
            dil = a.get("dilation", (1, 1))
            g.gy = _windowed(src.gy, a["kernel"][0], a["stride"][0], a["padding"][0], dil[0])
            g.gx = _windowed(src.gx, a["kernel"][1], a["stride"][1], a["padding"][1], dil[1])
        elif g.kind in same_as_input:
            g.gy, g.gx = src.gy, src.gx
        elif g.kind in ("adaptive_avgpool", "global_mean"):  # the latter here only with keepdim: 1 x 1
            hi, wi = src.shape[1], src.shape[2]
            ho, wo = g.shape[1], g.shape[2]
            if hi % ho == 0 and wi % wo == 0:  # a regular average pool
                ky, kx = hi // ho, wi // wo
                g.attrs.update(regular=True, kernel=(ky, kx))
                g.gy = Geometry(src.gy.J * ky, src.gy.P, src.gy.R + (ky - 1) * src.gy.J)
                g.gx = Geometry(src.gx.J * kx, src.gx.P, src.gx.R + (kx - 1) * src.gx.J)
            else:
                g.attrs.update(regular=False)
                g.gy = g.gx = None
        elif g.kind == "add":
            a, b = ins
            if a.spatial and b.spatial and a.gy.J == b.gy.J and a.gx.J == b.gx.J and a.shape == b.shape:
                g.gy, g.gx = union(a.gy, b.gy), union(a.gx, b.gx)
            else:
                g.gy = g.gx = None
        elif g.kind == "cat":
            # channels side by side: every input placed in the union of their windows
            if all(i.spatial and i.gy.J == src.gy.J and i.gx.J == src.gx.J and i.shape[1:] == g.shape[1:]
                   for i in ins):
                gy, gx = src.gy, src.gx
                for i in ins[1:]:
                    gy, gx = union(gy, i.gy), union(gx, i.gx)
                g.gy, g.gx = gy, gx
            else:
                g.gy = g.gx = None
        else:  # reshape, linear: dense
            g.gy = g.gx = None
