"""The scan's inputs: the image shape of an input, and the checks of inputs and masks."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["image_dims", "check_input", "check_mask"]


def image_dims(input_shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """The ``(D, H, W)`` of the image for inputs of non-batch shape ``input_shape`` (docs/spec.md §0).

    Parameters
    ----------
    input_shape : tuple of int
        ``(D, H, W)``, ``(H, W)`` (then ``D = 1``) or ``(N,)`` (an MLP: ``D = H = 1``, ``W = N``).

    Returns
    -------
    (D, H, W)
    """
    if len(input_shape) == 3:
        return tuple(input_shape)  # type: ignore[return-value]
    if len(input_shape) == 2:
        return (1, input_shape[0], input_shape[1])
    if len(input_shape) == 1:
        return (1, 1, input_shape[0])
    raise ValueError(f"inputs must be [B, D, H, W], [B, H, W] or [B, N]; got non-batch shape {list(input_shape)}")


def check_input(x: torch.Tensor) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``x`` is a finite float32 / float64 batch ``[B, ...]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension: [B, D, H, W] (or [B, N] for an MLP), got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}; convert with x.float()")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"x contains {bad} NaN/Inf entries; learned images need finite inputs (clean or drop those samples)")


def check_mask(fg_mask: Optional[torch.Tensor], B: int, H: int, W: int, device: torch.device) -> torch.Tensor:
    """The foreground mask of a batch as a bool Tensor ``[B, H, W]`` on ``device``.

    Parameters
    ----------
    fg_mask : bool (or 0/1) Tensor [B, H, W] or [H, W] (shared by the batch), or None
        None: the whole image is foreground.
    B, H, W : int
        Batch size and image size.
    device : torch.device

    Returns
    -------
    bool Tensor [B, H, W]
    """
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
