"""Geometric transforms applied identically to an image and its foreground boxes.

The analyses of docs/spec.md §3–§5 need a foreground mask that stays aligned with the image through
every resize / crop / up-scaling. Rather than resampling a binary mask (whose edges move by
up to a pixel depending on the interpolation), the boxes themselves are carried through the
transform in continuous pixel coordinates and rasterised at the output resolution.

Conventions
-----------
* A box is ``(x0, y0, x1, y1)`` in *continuous* pixel coordinates of the image it belongs to:
  pixel ``(row i, column j)`` covers ``[j, j+1) × [i, i+1)``; the whole image is
  ``(0, 0, W, H)``. An integer box ``(x0, y0, x1, y1)`` therefore covers exactly columns
  ``x0 … x1-1`` and rows ``y0 … y1-1``.
* Rasterisation: a pixel belongs to the foreground when its centre ``(j+0.5, i+0.5)`` lies in
  ``[x0, x1) × [y0, y1)`` of at least one box.
* Resizing maps the continuous coordinate ``u`` to ``u · W_out / W_in`` (the convention of
  ``align_corners=False`` interpolation); a centre crop subtracts its offset and clips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["PairTransform", "boxes_to_mask", "resized_size", "center_crop_offsets"]

Size = Union[int, Tuple[int, int]]


def boxes_to_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Rasterise boxes into a boolean foreground mask (pixel-centre rule).

    Parameters
    ----------
    boxes : Tensor, shape [K, 4]
        ``(x0, y0, x1, y1)`` in continuous pixel coordinates; ``K`` may be 0.
    height, width : int
        Output mask size.

    Returns
    -------
    Tensor, shape [height, width], bool
        True where a pixel centre lies inside at least one box.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    cy = torch.arange(height, dtype=torch.float64) + 0.5
    cx = torch.arange(width, dtype=torch.float64) + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes.tolist():
        rows = (cy >= y0) & (cy < y1)
        cols = (cx >= x0) & (cx < x1)
        mask |= rows[:, None] & cols[None, :]
    return mask


def resized_size(size: Size, height: int, width: int) -> Tuple[int, int]:
    """Output ``(h, w)`` of a resize, with torchvision's semantics.

    Parameters
    ----------
    size : int or (int, int)
        An int resizes the *shorter* side to ``size`` keeping the aspect ratio (the longer side
        is ``int(size * long / short)``, as ``torchvision.transforms.v2.Resize``); a pair is
        the exact ``(h, w)``.
    height, width : int
        Input size.
    """
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"resize: size must be positive, got {size}")
        if height <= width:
            return size, int(size * width / height)
        return int(size * height / width), size
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"resize: size must be positive, got {tuple(size)}")
    return h, w


def center_crop_offsets(size: Size, height: int, width: int) -> Tuple[int, int, int, int]:
    """Top/left offset and size of a centre crop (torchvision's rounding).

    Returns
    -------
    (top, left, crop_h, crop_w) : tuple of int

    Raises
    ------
    ValueError
        When the crop is larger than the image (torchvision would pad; we refuse, because
        padding would invent background pixels).
    """
    ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if ch > height or cw > width:
        raise ValueError(
            f"center_crop: crop {ch}x{cw} is larger than the image {height}x{width}; "
            "resize first (resize=...) or use a smaller crop")
    top = int(round((height - ch) / 2.0))
    left = int(round((width - cw) / 2.0))
    return top, left, ch, cw


def _as_size(size: Optional[Size], name: str) -> Optional[Size]:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    if isinstance(size, Sequence) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    raise ValueError(f"{name}: expected an int or a pair (h, w), got {size!r}")


@dataclass(frozen=True)
class PairTransform:
    """Resize → centre crop → bicubic up-scaling → (optional) normalisation.

    Every step is applied to the image and, in continuous coordinates, to its boxes, so the
    rasterised mask of the output is exactly the transformed box.

    Parameters
    ----------
    resize : int or (h, w), optional
        First step (see :func:`resized_size`); interpolation ``resize_mode`` with
        anti-aliasing, as ``torchvision.transforms.v2.Resize(antialias=True)``.
    center_crop : int or (h, w), optional
        Second step (torchvision's rounding of the offsets).
    upscale_to : int or (h, w), optional
        Last geometric step: bicubic interpolation to this exact size, clamped to ``[0, 1]``
        (thesis §6.3.1: small 32×32 images are up-scaled bicubically to 224×224 for AlexNet,
        ResNet-18 and VGG-16). An int means a square.
    resize_mode : {"bilinear", "bicubic", "nearest"}
        Interpolation of the ``resize`` step.
    normalize : ((float, ...), (float, ...)), optional
        Per-channel ``(mean, std)`` applied after the geometric steps. The scanner's learned
        images are defined on the model's input, so leave this ``None`` unless the model expects
        normalised inputs.
    """

    resize: Optional[Size] = None
    center_crop: Optional[Size] = None
    upscale_to: Optional[Size] = None
    resize_mode: str = "bilinear"
    normalize: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", _as_size(self.resize, "resize"))
        object.__setattr__(self, "center_crop", _as_size(self.center_crop, "center_crop"))
        object.__setattr__(self, "upscale_to", _as_size(self.upscale_to, "upscale_to"))
        if self.resize_mode not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"resize_mode must be 'bilinear', 'bicubic' or 'nearest', "
                             f"got {self.resize_mode!r}")

    # -- geometry -----------------------------------------------------------------------
    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Output ``(h, w)`` for an input of ``height × width``."""
        h, w = height, width
        if self.resize is not None:
            h, w = resized_size(self.resize, h, w)
        if self.center_crop is not None:
            _, _, h, w = center_crop_offsets(self.center_crop, h, w)
        if self.upscale_to is not None:
            h, w = ((self.upscale_to, self.upscale_to) if isinstance(self.upscale_to, int)
                    else self.upscale_to)
        return h, w

    def transform_boxes(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Apply the geometric steps to boxes.

        Parameters
        ----------
        boxes : Tensor, shape [K, 4]
            ``(x0, y0, x1, y1)``, continuous coordinates of the ``height × width`` input.

        Returns
        -------
        Tensor, shape [K, 4], float64
            Boxes in output coordinates, clipped to the output image (a box cropped away
            entirely becomes empty, ``x0 == x1`` or ``y0 == y1``).
        """
        b = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).clone()
        h, w = height, width
        if self.resize is not None:
            nh, nw = resized_size(self.resize, h, w)
            b[:, 0::2] *= nw / w
            b[:, 1::2] *= nh / h
            h, w = nh, nw
        if self.center_crop is not None:
            top, left, ch, cw = center_crop_offsets(self.center_crop, h, w)
            b[:, 0::2] = (b[:, 0::2] - left).clamp(0, cw)
            b[:, 1::2] = (b[:, 1::2] - top).clamp(0, ch)
            h, w = ch, cw
        if self.upscale_to is not None:
            nh, nw = ((self.upscale_to, self.upscale_to) if isinstance(self.upscale_to, int)
                      else self.upscale_to)
            b[:, 0::2] *= nw / w
            b[:, 1::2] *= nh / h
        return b

    def transform_image(self, image: torch.Tensor) -> torch.Tensor:
        """Apply the steps to an image.

        Parameters
        ----------
        image : Tensor, shape [C, H, W], float in [0, 1]

        Returns
        -------
        Tensor, shape [C, h, w], float32
        """
        x = image.to(torch.float32)[None]
        h, w = x.shape[-2:]
        if self.resize is not None:
            nh, nw = resized_size(self.resize, h, w)
            if (nh, nw) != (h, w):
                if self.resize_mode == "nearest":
                    x = F.interpolate(x, size=(nh, nw), mode="nearest-exact")
                else:
                    x = F.interpolate(x, size=(nh, nw), mode=self.resize_mode,
                                      align_corners=False, antialias=True)
                    if self.resize_mode == "bicubic":
                        x = x.clamp(0.0, 1.0)
            h, w = nh, nw
        if self.center_crop is not None:
            top, left, ch, cw = center_crop_offsets(self.center_crop, h, w)
            x = x[..., top:top + ch, left:left + cw]
            h, w = ch, cw
        if self.upscale_to is not None:
            nh, nw = ((self.upscale_to, self.upscale_to) if isinstance(self.upscale_to, int)
                      else self.upscale_to)
            if (nh, nw) != (h, w):
                shrink = nh < h or nw < w
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                                  antialias=shrink).clamp(0.0, 1.0)
        if self.normalize is not None:
            mean, std = self.normalize
            c = x.shape[1]
            m = torch.as_tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
            s = torch.as_tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
            if m.shape[1] not in (1, c) or s.shape[1] not in (1, c):
                raise ValueError(f"normalize: mean/std need 1 or {c} values, "
                                 f"got {len(mean)} and {len(std)}")
            x = (x - m) / s
        return x[0].contiguous()

    def __call__(self, image: torch.Tensor, boxes: torch.Tensor) -> Tuple[torch.Tensor,
                                                                         torch.Tensor]:
        """Transform an image and rasterise its transformed boxes.

        Parameters
        ----------
        image : Tensor, shape [C, H, W]
        boxes : Tensor, shape [K, 4]
            Continuous ``(x0, y0, x1, y1)`` in the input's coordinates.

        Returns
        -------
        image : Tensor, shape [C, h, w], float32
        fg_mask : Tensor, shape [h, w], bool
        """
        h, w = image.shape[-2:]
        out = self.transform_image(image)
        tb = self.transform_boxes(boxes, h, w)
        return out, boxes_to_mask(tb, out.shape[-2], out.shape[-1])

    @property
    def is_identity(self) -> bool:
        return (self.resize is None and self.center_crop is None and self.upscale_to is None
                and self.normalize is None)
