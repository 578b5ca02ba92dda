"""Geometry of a convolution over learned-image patches, along one axis.

Shared by the Triton op (:mod:`nns_cuda.ops._triton_conv`), which builds its placed input copy
from it, and by the engine, which uses it to decide whether that copy fits its memory bound.
The C++ op ``conv_li_gather`` builds the same axis in ``csrc/conv_li_gather.cpp``. A leaf: it
imports only torch.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["virtual_axis"]


def virtual_axis(a_in: torch.Tensor, a_out: torch.Tensor, n_in: int, K: int, stride: int, pad: int, dil: int,
                 fit: Optional[Tuple[int, int, str]] = None) -> Tuple[List[int], List[int], torch.Tensor, torch.Tensor]:
    """The virtual positions of one axis of a convolution.

    A virtual position is a distinct pair (input position ``i``, offset ``a_in[i] - a_out[y]``)
    that some output position ``y`` and tap use. The placed input copy of ``conv_li_gather`` /
    ``conv_li_implicit`` has one row per virtual position.

    Parameters
    ----------
    a_in : int64 Tensor [n_in]
        Anchors of the input windows along the axis.
    a_out : int64 Tensor [n_out]
        Anchors of the output windows.
    n_in : int
        Number of input positions.
    K, stride, pad, dil : int
        Kernel size, stride, padding and dilation of the convolution along the axis.
    fit : (r_in, r_out, op) or None
        Also check that every input window (size ``r_in``) fits its output window (size
        ``r_out``); ``ValueError`` naming ``op`` otherwise.

    Returns
    -------
    src : list of int [n_virtual]
        The input position of every virtual position (sorted by input position, then offset).
    off : list of int [n_virtual]
        Its offset.
    vpos : int64 Tensor [n_out, K]
        For every (output position, tap) its virtual position, -1 for padding.
    ipos : int64 Tensor [n_out, K]
        For every (output position, tap) its input position, -1 for padding.
    """
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
