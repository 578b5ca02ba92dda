"""Pure-PyTorch twins of every ``nns_cuda`` op (same signatures as ``torch.ops.nns_cuda.*``).

These are the oracle the C++ / CUDA kernels are tested against and the ``reference`` backend
of the engine. They favour clarity over speed, but are vectorised enough to scan small models.

Patch layout
------------
The learned images of all neurons of a spatial node (conv / pool / BN / ReLU output of shape
``[C, Ho, Wo]``) are stored as ``patches [B, C, Ho, Wo, D, Rh, Rw]``: neuron ``(c, y, x)``'s
image restricted to the window of rows ``[ay[y], ay[y] + Rh)`` and columns
``[ax[x], ax[x] + Rw)`` of the ``D × H × W`` input. ``ay [Ho]`` / ``ax [Wo]`` are int64
*anchors*; the image is zero outside the window (receptive-field locality, docs/spec.md §1).
The engine chooses ``Rh = min(R, H)`` and ``ay[y] = clamp(y·J − P, 0, H − Rh)`` so that the
window of every input neuron of a conv / pool tap lies inside the window of its output neuron
(the ops check this and raise otherwise). Inactive neurons hold zeros.

A dense node (linear output, flattened map) is a patch tensor with a 1×1 grid whose window
is the whole image: ``[B, N, 1, 1, D, H, W]`` with ``ay = ax = [0]``.

Precision: bfloat16 / float16 patches are a storage format. Every twin computes them in
float32 (weights, scales, gates and ``x`` are not rounded) and rounds only its result to the
patch dtype, like the compiled kernels (``at::opmath_type``); ``li_stats`` returns float32
statistics for them. ``conv_li_gemm`` rounds the weights to the patch dtype, as its tensor-core
GEMM does.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from nns_cuda.ops.reference.stats import NUM_STATS

__all__ = [
    "conv_li",
    "conv_li_gemm",
    "conv_li_gather",
    "conv_li_implicit",
    "maxpool_li",
    "place_li",
    "linear_li",
    "li_stats",
    "filter_fold",
]


_LOW = (torch.bfloat16, torch.float16)


def _is_low(t: torch.Tensor) -> bool:
    """A 16-bit float storage dtype (computed in float32 by every op)."""
    return t.dtype in _LOW


def _pair(v: Sequence[int], name: str, op: str) -> List[int]:
    v = list(v)
    if len(v) != 2:
        raise ValueError(f"{op}: {name} must have 2 entries, got {v}")
    return v


def _check_patches(op: str, name: str, p: torch.Tensor) -> None:
    if p.dim() != 7:
        raise ValueError(f"{op}: {name} must be 7-D [B, C, Ho, Wo, D, Rh, Rw], got {list(p.shape)}")


def _offsets(op: str, src_anchor: torch.Tensor, src_idx: torch.Tensor, valid: torch.Tensor,
             dst_anchor: torch.Tensor, r_src: int, r_dst: int) -> torch.Tensor:
    """Offset of the source window inside the destination window, checked to fit."""
    off = src_anchor[src_idx.clamp(0, src_anchor.numel() - 1)] - dst_anchor
    bad = valid & ((off < 0) | (off + r_src > r_dst))
    if bool(bad.any()):
        raise ValueError(
            f"{op}: an input window does not fit inside its output window (offset "
            f"{int(off[bad][0])}, sizes {r_src} -> {r_dst}); anchors must come from the "
            "receptive-field geometry (nns_cuda.graph)")
    return off


def _pad_permute(p: torch.Tensor) -> torch.Tensor:
    """[B, C, Hi, Wi, D, Rhi, Rwi] -> [Hi+1, Wi+1, Rhi+1, Rwi+1, B, C, D] with a zero position
    (index Hi / Wi) and a zero row / column (index Rhi / Rwi) for out-of-range gathers."""
    return F.pad(p, (0, 1, 0, 1, 0, 0, 0, 1, 0, 1)).permute(2, 3, 5, 6, 0, 1, 4)


def _gather_placed(op: str, p: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                   yi: torch.Tensor, xi: torch.Tensor, ay_out: torch.Tensor, ax_out: torch.Tensor,
                   rho: int, rwo: int, q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """For every output position (y, x) take input patch (yi[y], xi[x]) and place it into the
    output window. Invalid positions (yi < 0 or >= Hi) give zeros.

    p: [B, C, Hi, Wi, D, Rhi, Rwi]; yi: [Ho]; xi: [Wo] -> [B, C, Ho, Wo, D, rho, rwo]
    """
    B, C, Hi, Wi, D, Rhi, Rwi = p.shape
    dev = p.device
    vy = (yi >= 0) & (yi < Hi)
    vx = (xi >= 0) & (xi < Wi)
    dy = _offsets(op, ay_in, yi, vy, ay_out, Rhi, rho)
    dx = _offsets(op, ax_in, xi, vx, ax_out, Rwi, rwo)
    if q is None:
        q = _pad_permute(p)
    r = torch.arange(rho, device=dev)
    c = torch.arange(rwo, device=dev)
    rows = r[None, :] - dy[:, None]                      # [Ho, rho]
    cols = c[None, :] - dx[:, None]                      # [Wo, rwo]
    rows = torch.where((rows >= 0) & (rows < Rhi) & vy[:, None], rows, torch.full_like(rows, Rhi))
    cols = torch.where((cols >= 0) & (cols < Rwi) & vx[:, None], cols, torch.full_like(cols, Rwi))
    Y = torch.where(vy, yi, torch.full_like(yi, Hi))
    X = torch.where(vx, xi, torch.full_like(xi, Wi))
    # index [Hi+1, Wi+1, Rhi+1, Rwi+1, B, C, D] with broadcast [Ho, Wo, rho, rwo]
    g = q[Y[:, None, None, None], X[None, :, None, None], rows[:, None, :, None], cols[None, :, None, :]]
    # g: [Ho, Wo, rho, rwo, B, C, D] -> [B, C, Ho, Wo, D, rho, rwo]
    return g.permute(4, 5, 0, 1, 6, 2, 3)


def conv_li(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
            in_active: Optional[torch.Tensor], weight: torch.Tensor,
            scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
            ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
            dilation: Sequence[int], groups: int, rh_out: int, rw_out: int) -> torch.Tensor:
    """Learned-image patches of a conv layer's output neurons (frozen, bias-free).

    ``out[b, o, y, x] = gate[b, o, y, x] · scale[o] · Σ_{i, ky, kx} W[o, i, ky, kx] ·
    place(patches[b, i, y·s + ky·d − p, x·s + kx·d − p])`` where taps falling in the padding
    contribute nothing. ``gate`` (ReLU gate, LeakyReLU slope, or any per-neuron factor such as
    an average-pool divisor) and ``scale`` (a folded BatchNorm ``γ/√(σ²+ε)``) are optional.

    Parameters
    ----------
    patches : [B, Ci, Hi, Wi, D, Rhi, Rwi]
    ay_in, ax_in : int64 [Hi], [Wi] anchors of the input windows
    in_active : bool [B, Ci, Hi, Wi] or None. Where False the input neuron counts as zero: its
        patch is never read (kernels skip it), whatever it holds. The engine passes an inactive
        ReLU's gate here instead of zeroing the patches first.
    weight : [Co, Ci / groups, Kh, Kw]
    scale : [Co] or None
    gate : [B, Co, Ho, Wo] or None
    ay_out, ax_out : int64 [Ho], [Wo] anchors of the output windows
    stride, padding, dilation : 2 ints each
    groups : int
    rh_out, rw_out : output window size

    Returns
    -------
    Tensor [B, Co, Ho, Wo, D, rh_out, rw_out]
    """
    op = "conv_li"
    _check_patches(op, "patches", patches)
    if _is_low(patches):
        return conv_li(patches.float(), ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride,
                       padding, dilation, groups, rh_out, rw_out).to(patches.dtype)
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D [Co, Ci/groups, Kh, Kw], got {list(weight.shape)}")
    s, pd, dl = _pair(stride, "stride", op), _pair(padding, "padding", op), _pair(dilation, "dilation", op)
    B, Ci, Hi, Wi, D, Rhi, Rwi = patches.shape
    Co, Cig, Kh, Kw = weight.shape
    if Ci % groups or Co % groups or Cig != Ci // groups:
        raise ValueError(f"{op}: weight {list(weight.shape)} does not match {Ci} input channels with groups={groups}")
    Ho, Wo = ay_out.numel(), ax_out.numel()
    dev = patches.device
    out = patches.new_zeros(B, Co, Ho, Wo, D, rh_out, rw_out)
    ys = torch.arange(Ho, device=dev)
    xs = torch.arange(Wo, device=dev)
    G = groups
    w = weight.to(patches.dtype).reshape(G, Co // G, Cig, Kh, Kw)
    if in_active is not None:
        if in_active.shape != (B, Ci, Hi, Wi):
            raise ValueError(f"{op}: in_active must be [B, Ci, Hi, Wi] = {[B, Ci, Hi, Wi]}, got {list(in_active.shape)}")
        patches = patches.masked_fill(~in_active.bool().view(B, Ci, Hi, Wi, 1, 1, 1), 0)
    q = _pad_permute(patches)
    for ky in range(Kh):
        yi = ys * s[0] + ky * dl[0] - pd[0]
        for kx in range(Kw):
            xi = xs * s[1] + kx * dl[1] - pd[1]
            g = _gather_placed(op, patches, ay_in, ax_in, yi, xi, ay_out, ax_out, rh_out, rw_out, q)
            g = g.reshape(B, G, Cig, Ho, Wo, D, rh_out, rw_out)
            out += torch.einsum("bgiyxdrc,goi->bgoyxdrc", g, w[:, :, :, ky, kx]).reshape(out.shape)
    if scale is not None:
        out = out * scale.to(out.dtype).view(1, Co, 1, 1, 1, 1, 1)
    if gate is not None:
        out = out * gate.to(out.dtype).view(B, Co, Ho, Wo, 1, 1, 1)
    return out


def _gemm_twin(op: str, patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride, padding,
               dilation, groups, rh_out, rw_out, max_elems) -> torch.Tensor:
    """The twin shared by the GEMM formulations of :func:`conv_li` (``op`` names them in the
    error): :func:`conv_li` itself — so that each is tested against code it does not share —
    with the weights rounded to 16-bit patch dtypes first, as the tensor-core GEMMs do.
    ``max_elems`` (the compiled ops' chunking bound, >= 0) does not change the result."""
    if max_elems < 0:
        raise ValueError(f"{op}: max_elems must be >= 0 (0: default), got {max_elems}")
    if _is_low(patches) and weight.is_floating_point():
        weight = weight.to(patches.dtype)
    return conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride, padding,
                   dilation, groups, rh_out, rw_out)


def conv_li_gemm(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                 in_active: Optional[torch.Tensor], weight: torch.Tensor,
                 scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
                 ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, rh_out: int, rw_out: int,
                 max_elems: int = 0) -> torch.Tensor:
    """Twin of the compiled ``conv_li_gemm`` (the dense-GEMM formulation of :func:`conv_li`):
    :func:`conv_li` with 16-bit weights rounded (:func:`_gemm_twin`)."""
    return _gemm_twin("conv_li_gemm", patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride,
                      padding, dilation, groups, rh_out, rw_out, max_elems)


def conv_li_gather(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                   in_active: Optional[torch.Tensor], weight: torch.Tensor,
                   scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
                   ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int, rh_out: int, rw_out: int,
                   max_elems: int = 0) -> torch.Tensor:
    """Twin of the compiled ``conv_li_gather`` (the active-pair GEMM formulation of
    :func:`conv_li`): :func:`conv_li` with 16-bit weights rounded (:func:`_gemm_twin`)."""
    return _gemm_twin("conv_li_gather", patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride,
                      padding, dilation, groups, rh_out, rw_out, max_elems)


def conv_li_implicit(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                     in_active: Optional[torch.Tensor], weight: torch.Tensor,
                     scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
                     ax_out: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], groups: int, rh_out: int, rw_out: int,
                     max_elems: int = 0) -> torch.Tensor:
    """Twin of the Triton ``conv_li_implicit`` (``nns_cuda/ops/_triton_conv.py``): :func:`conv_li`
    with 16-bit weights rounded (:func:`_gemm_twin`)."""
    return _gemm_twin("conv_li_implicit", patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride,
                      padding, dilation, groups, rh_out, rw_out, max_elems)


def maxpool_li(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor, indices: torch.Tensor,
               ay_out: torch.Tensor, ax_out: torch.Tensor, rh_out: int, rw_out: int) -> torch.Tensor:
    """Max-pool routing: each output neuron's image is its arg-max input neuron's image.

    Parameters
    ----------
    patches : [B, C, Hi, Wi, D, Rhi, Rwi]
    indices : int64 [B, C, Ho, Wo], flat ``hi * Wi + wi`` arg-max positions as returned by
        ``F.max_pool2d(..., return_indices=True)``
    ay_out, ax_out : [Ho], [Wo]

    Returns
    -------
    Tensor [B, C, Ho, Wo, D, rh_out, rw_out]
    """
    op = "maxpool_li"
    _check_patches(op, "patches", patches)
    B, C, Hi, Wi, D, Rhi, Rwi = patches.shape
    Ho, Wo = ay_out.numel(), ax_out.numel()
    if tuple(indices.shape) != (B, C, Ho, Wo):
        raise ValueError(f"{op}: indices must be [B, C, Ho, Wo] = {[B, C, Ho, Wo]}, got {list(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= Hi * Wi):
        raise ValueError(f"{op}: indices out of range [0, {Hi * Wi})")
    yi = indices // Wi
    xi = indices % Wi
    dy = ay_in[yi] - ay_out.view(1, 1, Ho, 1)
    dx = ax_in[xi] - ax_out.view(1, 1, 1, Wo)
    if bool(((dy < 0) | (dy + Rhi > rh_out) | (dx < 0) | (dx + Rwi > rw_out)).any()):
        raise ValueError(f"{op}: an input window does not fit inside its output window")
    src = patches.reshape(B, C, Hi * Wi, D, Rhi, Rwi)
    sel = torch.gather(src, 2, indices.reshape(B, C, Ho * Wo, 1, 1, 1).expand(B, C, Ho * Wo, D, Rhi, Rwi))
    sel = sel.reshape(B, C, Ho, Wo, D, Rhi, Rwi)
    out = patches.new_zeros(B, C, Ho, Wo, D, rh_out, rw_out)
    # place with per-neuron offsets: build row / col index maps
    r = torch.arange(rh_out, device=patches.device)
    c = torch.arange(rw_out, device=patches.device)
    rows = r.view(1, 1, 1, 1, -1) - dy.unsqueeze(-1)              # [B, C, Ho, Wo, rh_out]
    cols = c.view(1, 1, 1, 1, -1) - dx.unsqueeze(-1)              # [B, C, Ho, Wo, rw_out]
    vr = (rows >= 0) & (rows < Rhi)
    vc = (cols >= 0) & (cols < Rwi)
    rows = rows.clamp(0, Rhi - 1)
    cols = cols.clamp(0, Rwi - 1)
    t = torch.gather(sel, 5, rows.view(B, C, Ho, Wo, 1, rh_out, 1).expand(B, C, Ho, Wo, D, rh_out, Rwi))
    t = torch.gather(t, 6, cols.view(B, C, Ho, Wo, 1, 1, rw_out).expand(B, C, Ho, Wo, D, rh_out, rw_out))
    mask = (vr.view(B, C, Ho, Wo, 1, rh_out, 1) & vc.view(B, C, Ho, Wo, 1, 1, rw_out))
    out = torch.where(mask, t, out)
    return out


def place_li(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor, ay_out: torch.Tensor,
             ax_out: torch.Tensor, rh_out: int, rw_out: int,
             accumulate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Re-window patches: place every neuron's window into a larger window of the same grid.

    Used for residual additions of patches with different windows (``place_li(b, …,
    accumulate=place_li(a, …))``) and for densifying (``ay_out = ax_out = 0``, window = image).

    Parameters
    ----------
    patches : [B, C, Ho, Wo, D, Rhi, Rwi]
    ay_in, ax_in, ay_out, ax_out : int64 [Ho], [Wo]
    accumulate : optional [B, C, Ho, Wo, D, rh_out, rw_out] added to the result

    Returns
    -------
    Tensor [B, C, Ho, Wo, D, rh_out, rw_out]
    """
    op = "place_li"
    _check_patches(op, "patches", patches)
    B, C, Ho, Wo, D, Rhi, Rwi = patches.shape
    if ay_in.numel() != Ho or ay_out.numel() != Ho or ax_in.numel() != Wo or ax_out.numel() != Wo:
        raise ValueError(f"{op}: anchors must have {Ho} rows / {Wo} columns")
    yi = torch.arange(Ho, device=patches.device)
    xi = torch.arange(Wo, device=patches.device)
    # reuse the tap gather with identity positions, one 'tap': treat C as part of batch
    g = _gather_placed(op, patches, ay_in, ax_in, yi, xi, ay_out, ax_out, rh_out, rw_out)
    if accumulate is not None:
        if tuple(accumulate.shape) != tuple(g.shape):
            raise ValueError(f"{op}: accumulate must be {list(g.shape)}, got {list(accumulate.shape)}")
        g = g + accumulate
    return g.contiguous()


def linear_li(dense: torch.Tensor, weight: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """Linear layer on dense images: ``out[b, o] = gate[b, o] · Σ_i W[o, i] · dense[b, i]``.

    Parameters
    ----------
    dense : [B, Nin, P]   (P = D·H·W)
    weight : [Nout, Nin]
    gate : [B, Nout] or None

    Returns
    -------
    Tensor [B, Nout, P]
    """
    op = "linear_li"
    if dense.dim() != 3:
        raise ValueError(f"{op}: dense must be 3-D [B, Nin, P], got {list(dense.shape)}")
    if _is_low(dense):
        return linear_li(dense.float(), weight, gate).to(dense.dtype)
    if weight.dim() != 2 or weight.shape[1] != dense.shape[1]:
        raise ValueError(f"{op}: weight must be [Nout, {dense.shape[1]}], got {list(weight.shape)}")
    out = torch.matmul(weight.to(dense.dtype), dense)
    if gate is not None:
        out = out * gate.to(out.dtype).unsqueeze(-1)
    return out


def _window_gather(op: str, img: torch.Tensor, ay: torch.Tensor, ax: torch.Tensor, rh: int, rw: int) -> torch.Tensor:
    """img [B, K, H, W] -> windows [B, K, Ho, Wo, rh, rw]."""
    H, W = img.shape[-2:]
    if bool((ay < 0).any() or (ay + rh > H).any() or (ax < 0).any() or (ax + rw > W).any()):
        raise ValueError(f"{op}: windows exceed the image ({H}×{W})")
    rows = ay.view(-1, 1) + torch.arange(rh, device=img.device).view(1, -1)   # [Ho, rh]
    cols = ax.view(-1, 1) + torch.arange(rw, device=img.device).view(1, -1)   # [Wo, rw]
    return img[:, :, rows[:, None, :, None], cols[None, :, None, :]]          # [B, K, Ho, Wo, rh, rw]


def li_stats(patches: torch.Tensor, ay: torch.Tensor, ax: torch.Tensor, x: torch.Tensor,
             fg: torch.Tensor) -> torch.Tensor:
    """Fused per-neuron statistics (``nns_cuda.ops.reference.stats.STAT_NAMES`` order).

    Parameters
    ----------
    patches : [B, C, Ho, Wo, D, Rh, Rw]
    ay, ax : int64 [Ho], [Wo]
    x : [B, D, H, W] input
    fg : [B, H, W] foreground mask as 0/1 in the dtype of ``patches``

    Returns
    -------
    Tensor [B, C, Ho, Wo, NUM_STATS] (float32 for bfloat16 / float16 patches)
    """
    op = "li_stats"
    _check_patches(op, "patches", patches)
    if _is_low(patches):
        return li_stats(patches.float(), ay, ax, x, fg)
    B, C, Ho, Wo, D, Rh, Rw = patches.shape
    if x.dim() != 4 or x.shape[0] != B or x.shape[1] != D:
        raise ValueError(f"{op}: x must be [B={B}, D={D}, H, W], got {list(x.shape)}")
    if fg.dim() != 3 or tuple(fg.shape) != (B, x.shape[2], x.shape[3]):
        raise ValueError(f"{op}: fg must be [B, H, W] = {[B, x.shape[2], x.shape[3]]}, got {list(fg.shape)}")
    xw = _window_gather(op, x.to(patches.dtype), ay, ax, Rh, Rw)          # [B, D, Ho, Wo, Rh, Rw]
    fw = _window_gather(op, fg.to(patches.dtype).unsqueeze(1), ay, ax, Rh, Rw)  # [B, 1, Ho, Wo, Rh, Rw]
    xw = xw.permute(0, 2, 3, 1, 4, 5).unsqueeze(1)                         # [B, 1, Ho, Wo, D, Rh, Rw]
    fw = fw.permute(0, 2, 3, 1, 4, 5).unsqueeze(1)                         # [B, 1, Ho, Wo, 1, Rh, Rw]
    li = patches
    nz = (li != 0).to(li.dtype)
    dims = (-3, -2, -1)
    xnz = xw * nz
    out = [
        (nz * fw).sum(dims),
        (nz * (1 - fw)).sum(dims),
        li.abs().sum(dims),
        li.sum(dims),
        (li * li).sum(dims),
        (xw * li).sum(dims),
        (li * fw).sum(dims),
        (li * li * fw).sum(dims),
        (xnz * fw).sum(dims),
        (xnz * xnz * fw).sum(dims),
        (xw * li * fw).sum(dims),
    ]
    res = torch.stack(out, dim=-1)
    assert res.shape[-1] == NUM_STATS
    return res


def filter_fold(patches: torch.Tensor, ay: torch.Tensor, ax: torch.Tensor, act: torch.Tensor,
                h: int, w: int) -> torch.Tensor:
    """Filter learned images ``L^k = Σ_{y,x} act[b,k,y,x] · LI_{k,y,x}`` (docs/spec.md §1, eq. 5-2).

    Parameters
    ----------
    patches : [B, C, Ho, Wo, D, Rh, Rw]
    ay, ax : int64 [Ho], [Wo]
    act : [B, C, Ho, Wo] activation map
    h, w : image size

    Returns
    -------
    Tensor [B, C, D, h, w]
    """
    op = "filter_fold"
    _check_patches(op, "patches", patches)
    if _is_low(patches):
        return filter_fold(patches.float(), ay, ax, act, h, w).to(patches.dtype)
    B, C, Ho, Wo, D, Rh, Rw = patches.shape
    if tuple(act.shape) != (B, C, Ho, Wo):
        raise ValueError(f"{op}: act must be [B, C, Ho, Wo] = {[B, C, Ho, Wo]}, got {list(act.shape)}")
    if bool((ay < 0).any() or (ay + Rh > h).any() or (ax < 0).any() or (ax + Rw > w).any()):
        raise ValueError(f"{op}: windows exceed the image ({h}×{w})")
    weighted = patches * act.to(patches.dtype).view(B, C, Ho, Wo, 1, 1, 1)
    out = patches.new_zeros(B, C, D, h * w)
    rows = ay.view(-1, 1) + torch.arange(Rh, device=patches.device).view(1, -1)   # [Ho, Rh]
    cols = ax.view(-1, 1) + torch.arange(Rw, device=patches.device).view(1, -1)   # [Wo, Rw]
    flat = (rows[:, None, :, None] * w + cols[None, :, None, :])                 # [Ho, Wo, Rh, Rw]
    src = weighted.permute(0, 1, 4, 2, 3, 5, 6).reshape(B, C, D, -1)
    idx = flat.reshape(1, 1, 1, -1).expand(B, C, D, -1)
    out.scatter_add_(3, idx, src)
    return out.view(B, C, D, h, w)
