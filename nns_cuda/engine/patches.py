"""The patch representation of the learned images of one node, and its reductions.

The learned images of the ``C × Ho × Wo`` neurons of a spatial node are stored as
receptive-field patches ``[B, C, Ho, Wo, D, Rh, Rw]``: neuron ``(c, y, x)``'s image restricted
to rows ``[ay[y], ay[y] + Rh)`` and columns ``[ax[x], ax[x] + Rw)`` of the ``D × H × W`` input,
zero outside (:mod:`nns_cuda.ops.reference.ops` documents the layout). A dense node (a linear
layer's output, a flattened map) is a ``1 × 1`` grid whose window is the whole image:
``[B, N, 1, 1, D, H, W]`` with ``ay = ax = [0]``.

The reductions here turn the patches of a requested layer into what a scan returns: dense
images (:func:`dense_images`) and filter images (:func:`fold_filter_images`); the statistics
are one op (``li_stats``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from nns_cuda.engine.graph import GNode
from nns_cuda.engine.inputs import image_dims
from nns_cuda.engine.options import LOW_PRECISION_DTYPES

__all__ = ["Patches", "dense_images", "fold_filter_images"]


@dataclass
class Patches:
    """The learned images of one node, as receptive-field patches.

    Attributes
    ----------
    data : Tensor [B, C, Ho, Wo, D, Rh, Rw]
        The patches (storage dtype of the scan). Where ``active`` is False they may hold
        anything when ``pending_scale`` is set, zeros otherwise.
    ay, ax : int64 Tensor [Ho], [Wo]
        Anchors: the first row / column of each window in the image.
    active : bool Tensor [B, C, Ho, Wo] or None
        False: that neuron's image is all-zero (the ops skip it without reading its patch).
        None: every neuron may be non-zero.
    pending_scale : Tensor [C] or None
        A per-channel multiplier not yet applied to ``data``: the images are then
        ``where(active, data · pending_scale[c], 0)``, with ``active`` the gate of a 0/1
        activation (``data`` is not zero where it is False). Only convolutions (which fold it
        into their weights per input channel, inactive inputs never read) and max-pools
        (routing keeps channels) take such patches; the propagation applies it for every other
        node (:meth:`~nns_cuda.engine.propagate.PatchPropagator.settle`). None: ``data`` holds
        the images.
    """

    data: torch.Tensor
    ay: torch.Tensor
    ax: torch.Tensor
    active: Optional[torch.Tensor] = None
    pending_scale: Optional[torch.Tensor] = None

    def is_dense(self, H: int, W: int) -> bool:
        """Whether these are dense images of an ``H × W`` image (a ``1 × 1`` grid, whole-image windows)."""
        return tuple(self.data.shape[2:4]) == (1, 1) and tuple(self.data.shape[5:]) == (H, W)


def dense_images(ops, patches: Patches, shape: Tuple[int, ...], input_shape: Tuple[int, ...]) -> torch.Tensor:
    """The dense learned images of a node's neurons.

    Parameters
    ----------
    ops : module
        The backend's ops (``nns_cuda.ops`` or ``nns_cuda.ops.reference.ops``).
    patches : Patches
        ``data`` [B, C, Ho, Wo, D, Rh, Rw], pending scale applied.
    shape : tuple of int
        The node's output shape without the batch dimension (``C·Ho·Wo`` neurons).
    input_shape : tuple of int
        The model input's shape without the batch dimension (``D·H·W`` entries).

    Returns
    -------
    Tensor [B, *shape, *input_shape]
    """
    _, H, W = image_dims(input_shape)
    t = patches.data
    B, _, Ho, Wo = t.shape[:4]
    if not patches.is_dense(H, W):
        zy = torch.zeros(Ho, dtype=torch.long, device=t.device)
        zx = torch.zeros(Wo, dtype=torch.long, device=t.device)
        t = ops.place_li(t, patches.ay, patches.ax, zy, zx, H, W, None)
    return t.reshape(B, *shape, *input_shape)


def fold_filter_images(ops, node: GNode, patches: Patches, activations: torch.Tensor,
                       input_shape: Tuple[int, ...]) -> torch.Tensor:
    """Filter learned images ``L^k = Σ_{i,j} LI_{k,i,j} · a^k_{i,j}`` of a node (docs/spec.md §1).

    Parameters
    ----------
    ops : module
        The backend's ops.
    node : GNode
        A node with channels: output shape ``[C, Ho, Wo]`` or ``[N]``.
    patches : Patches
        Its learned images, pending scale applied.
    activations : Tensor [B, *node.shape]
        Its output ``a``.
    input_shape : tuple of int
        The model input's shape without the batch dimension.

    Returns
    -------
    Tensor [B, C, *input_shape] (float32 for 16-bit patches: the fold sums in float32)
    """
    if len(node.shape) not in (1, 3):
        raise ValueError(f"filter images need a layer with channels ([C, H, W] or [N]); {node.name!r} has shape "
                         f"{list(node.shape)}")
    D, H, W = image_dims(input_shape)
    t = patches.data
    B, C = t.shape[0], node.shape[0]
    act = activations.to(torch.float32 if t.dtype in LOW_PRECISION_DTYPES else t.dtype)
    if len(node.shape) == 3 and t.shape[2:4] == node.shape[1:3] and t.shape[1] == C:
        folded = ops.filter_fold(t, patches.ay, patches.ax, act, H, W)
    else:  # dense patches [B, N, 1, 1, D, H, W]: fold over the positions of each channel
        dense = t.reshape(B, C, -1, D * H * W)
        folded = (dense * act.reshape(B, C, -1, 1)).sum(2).reshape(B, C, D, H, W)
    return folded.reshape(B, C, *input_shape)
