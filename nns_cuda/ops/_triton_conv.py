"""``conv_li_implicit``: :func:`nns_cuda.ops.conv_li` as an implicit-gather GEMM in Triton (CUDA).

The same arithmetic as ``conv_li_gather`` (``csrc/conv_li_gather.cpp``) — for every output position
``p`` of image ``b`` and group, ``out[b, :, p] = (W[:, J] · gate · scale) @ A`` over the active
(input neuron, tap) pairs ``J`` — without materialising anything of size ``|A|``:

* the pairs are listed once per chunk, ragged (``nonzero`` of the validity table: no padding to
  the longest list); each list entry holds the pair's weight column and the row of the placed
  input copy ``Q`` (built as in ``conv_li_gather``: the input itself where every window is the
  output window, else each input neuron placed once per distinct offset, with ``place_li``);
* one Triton program per ``(b, p, group)`` and output tile loads the weight columns and the
  ``Q`` rows of its list straight into registers / shared memory (``tl.load`` through the row
  indices: the "implicit gather") and accumulates ``tl.dot`` in float32;
* gate · scale multiply the accumulator; gated-off outputs are written as exact zeros; the tile
  is stored straight into the ``[B, Co, Ho, Wo, D, rh, rw]`` output.

Precision: float32 patches use ``input_precision="ieee"`` (FMA, float32 products) unless
torch's cuBLAS TF32 switch (``torch.backends.cuda.matmul.allow_tf32``) is on, then ``"tf32"``
(tensor cores), like the cuBLAS algorithms; bfloat16 / float16 patches round the weights to the
patch dtype and run on the tensor cores with float32 accumulation. float64 is not supported
(the engine uses ``conv_li_gather`` for float64).

Runs on CUDA tensors. On CPU tensors it runs only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before this module is imported), which is how the CPU test suite
checks the kernel (``tests/test_conv_li_implicit.py``); otherwise it raises ``ValueError``.

A leaf of ``nns_cuda.ops``: it imports torch, Triton, the extension state and the ops' leaf
helpers (argument checks, axis geometry, the reference twins), never ``nns_cuda.ops`` itself.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from nns_cuda import _extension
from nns_cuda.ops._checks import check_conv_li
from nns_cuda.ops._geometry import virtual_axis
from nns_cuda.ops.reference import ops as _ref

try:  # triton ships with the CUDA builds of torch; the CPU-only build may lack it
    import triton
    import triton.language as tl
except Exception as _e:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    TRITON_ERROR: Optional[str] = f"{type(_e).__name__}: {_e}"
else:
    TRITON_ERROR = None

__all__ = ["conv_li_implicit", "available", "INTERPRET"]

OP = "conv_li_implicit"
#: Triton's CPU interpreter is on (read when this module is imported, as triton.jit does)
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DEFAULT_MAX_ELEMS = 1 << 26
#: (BM, BN, BK, num_warps, num_stages) forced for every launch — for ``benchmarks/tune_implicit.py``;
#: None: the heuristic of :func:`_launch_config`
CONFIG_OVERRIDE: Optional[Tuple[int, int, int, int, int]] = None


def available(device: torch.device) -> Optional[str]:
    """None when ``conv_li_implicit`` can run on ``device``, else the reason it cannot."""
    if triton is None:
        return f"Triton is not installed ({TRITON_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    return (f"{OP} is a Triton kernel for CUDA tensors (got {device.type}); on the CPU it runs only under "
            "TRITON_INTERPRET=1 (for tests) — use conv_li or conv_li_gather there")


if triton is not None:
    @triton.jit
    def _implicit_kernel(WT, Q, SEL, ROWS, OFF, CNT, WBASE, OBASE, MBASE, MUL, OUT,
                         M, N, ROW_STRIDE, MUL_STRIDE,
                         HAS_MUL: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # program: (pair list j, output-channel tile, window-element tile)
        j = tl.program_id(0)
        om = (tl.program_id(1) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: offsets may pass 2^31
        on = (tl.program_id(2) * BN + tl.arange(0, BN)).to(tl.int64)
        m_ok = om < M
        n_ok = on < N
        off = tl.load(OFF + j)
        cnt = tl.load(CNT + j)
        wb = tl.load(WBASE + j)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, cnt, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < cnt
            s = tl.load(SEL + off + ks, mask=k_ok, other=0)
            r = tl.load(ROWS + off + ks, mask=k_ok, other=0)
            # weights of the pairs: WT is [groups, CK, M], so a pair's column is contiguous in m
            a = tl.load(WT + wb + s[None, :] * M + om[:, None], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            # the pairs' rows of the placed input: contiguous in n (the implicit gather)
            b = tl.load(Q + r[:, None] * N + on[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if LOWP:
                a = a.to(b.dtype)
            acc += tl.dot(a, b, input_precision=PREC)
        if HAS_MUL:
            mul = tl.load(MUL + tl.load(MBASE + j) + om * MUL_STRIDE, mask=m_ok, other=0.0)
            acc = acc * mul[:, None]
            acc = tl.where(mul[:, None] == 0.0, 0.0, acc)  # gated off: exact zeros whatever Q holds
        dst = OUT + tl.load(OBASE + j) + om[:, None] * ROW_STRIDE + on[None, :]
        tl.store(dst, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _block(n: int, cap: int) -> int:
    b = 16
    while b < n and b < cap:
        b *= 2
    return b


def _launch_config(M: int, N: int, fma: bool = False) -> Tuple[int, int, int, int, int]:
    """(BM, BN, BK, num_warps, num_stages): the smallest power-of-two tiles (>= 16, tl.dot's
    minimum) covering the output channels up to 64 and the window elements up to 128, BK 32,
    3 stages; 4 warps, except 8 for the float32 FMA path (``fma``: IEEE products) on tiles of
    8,192 elements or more. Measured by ptxas for sm_90 (``python -m benchmarks.triton_aot``,
    ``benchmarks/NOTES.md``): the 64 × 128 FMA tile on 4 warps needs 255 registers and spills
    428 B per thread; on 8 warps 177 registers, no spill. The tensor-core variants do not spill on
    4 warps (at most 240 registers). Times not yet measured (``benchmarks/tune_implicit.py``)."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    BM, BN = _block(M, 64), _block(N, 128)
    warps = 8 if fma and BM * BN >= 8192 else 4
    return BM, BN, 32, warps, 3


@torch.library.custom_op("nns_cuda::conv_li_implicit", mutates_args=())
def conv_li_implicit(patches: torch.Tensor, ay_in: torch.Tensor, ax_in: torch.Tensor,
                     in_active: Optional[torch.Tensor], weight: torch.Tensor,
                     scale: Optional[torch.Tensor], gate: Optional[torch.Tensor], ay_out: torch.Tensor,
                     ax_out: torch.Tensor, stride: List[int], padding: List[int],
                     dilation: List[int], groups: int, rh_out: int, rw_out: int,
                     max_elems: int = 0) -> torch.Tensor:
    """The op ``torch.ops.nns_cuda.conv_li_implicit`` (see the module docstring); arguments and
    result as :func:`nns_cuda.ops.conv_li_gather` (``max_elems`` bounds the placed input copy of
    an image chunk plus the pair lists, in elements of the patch dtype; 0: 2**26)."""
    with torch.no_grad():
        return _conv_li_implicit(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride,
                                 padding, dilation, groups, rh_out, rw_out, max_elems)


@conv_li_implicit.register_fake
def _conv_li_implicit_fake(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride, padding,
                           dilation, groups, rh_out, rw_out, max_elems=0):
    B, Co, Ho, Wo, D = check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                                     stride, padding, dilation, groups, rh_out, rw_out, op=OP)
    torch._check_value(max_elems >= 0, lambda: f"{OP}: max_elems must be >= 0 (0: default), got {max_elems}")
    return patches.new_empty((B, Co, Ho, Wo, D, rh_out, rw_out))


def _place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out) -> torch.Tensor:
    """``place_li``: the compiled op where the extension registers it, else its reference twin."""
    if _extension.has_op("place_li"):
        return torch.ops.nns_cuda.place_li(patches, ay_in, ax_in, ay_out, ax_out, int(rh_out), int(rw_out), None)
    return _ref.place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out)


def _conv_li_implicit(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out, stride, padding,
                      dilation, groups, rh_out, rw_out, max_elems) -> torch.Tensor:
    B, Co, Ho, Wo, D = check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
                                     stride, padding, dilation, groups, rh_out, rw_out, op=OP)
    if max_elems < 0:
        raise ValueError(f"{OP}: max_elems must be >= 0 (0: default), got {max_elems}")
    why = available(patches.device)
    if why:
        raise ValueError(why)
    if patches.dtype == torch.float64:
        raise ValueError(f"{OP}: float64 patches are not supported (Triton's float64 dot); use conv_li_gather")
    dev, dt = patches.device, patches.dtype
    _, Ci, Hi, Wi, _, Rhi, Rwi = patches.shape
    G = int(groups)
    Cog, Cig, Kh, Kw = Co // G, weight.shape[1], weight.shape[2], weight.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    sy, oy, VY, IY = virtual_axis(ay_in, ay_out, Hi, Kh, sh, ph, dh, (Rhi, rh_out, OP))
    sx, ox, VX, IX = virtual_axis(ax_in, ax_out, Wi, Kw, sw, pw, dw, (Rwi, rw_out, OP))
    out = torch.empty(B, Co, Ho, Wo, D, rh_out, rw_out, dtype=dt, device=dev)
    if out.numel() == 0:
        return out
    CK = Cig * Kh * Kw
    if CK == 0:
        return out.zero_()
    Hq, Wq, P, pe = len(sy), len(sx), Ho * Wo, D * rh_out * rw_out
    identity = sy == list(range(Hi)) and sx == list(range(Wi))
    copy_free = identity and not any(oy) and not any(ox) and (Rhi, Rwi) == (rh_out, rw_out)

    # pair tables [G, P, CK] (chunk-independent): tap not padding; row of Q (per image); input neuron
    # (built on the device from the small per-axis tables)
    vy, vx = VY.to(dev).view(Ho, 1, 1, Kh, 1), VX.to(dev).view(1, Wo, 1, 1, Kw)
    iy, ix = IY.to(dev).view(Ho, 1, 1, Kh, 1), IX.to(dev).view(1, Wo, 1, 1, Kw)
    ch = (torch.arange(G, device=dev).view(G, 1, 1, 1, 1, 1) * Cig
          + torch.arange(Cig, device=dev).view(1, 1, 1, Cig, 1, 1))
    tap_ok = ((vy >= 0) & (vx >= 0)).unsqueeze(0).expand(G, Ho, Wo, Cig, Kh, Kw).reshape(G, P, CK)
    qrow = (ch * (Hq * Wq) + vy.clamp_min(0) * Wq + vx.clamp_min(0)).reshape(G, P, CK)
    nidx = (ch * (Hi * Wi) + iy.clamp_min(0) * Wi + ix.clamp_min(0)).reshape(G, P, CK)

    # weights [G, CK, Cog] (a pair's column contiguous), gate * scale [B, Co, P]
    WT = weight.detach().to(torch.float32).reshape(G, Cog, CK).transpose(1, 2).contiguous()
    mul = None
    if scale is not None:
        mul = scale.detach().to(torch.float32).view(1, Co, 1, 1).expand(B, Co, Ho, Wo)
    if gate is not None:
        g32 = gate.detach().to(torch.float32)
        mul = g32 if mul is None else mul * g32
    mul = None if mul is None else mul.reshape(B, Co, P).contiguous()
    act = None if in_active is None else in_active.reshape(B, Ci * Hi * Wi)
    lowp = dt in (torch.bfloat16, torch.float16)
    # float32 operands: IEEE products (FMA) unless TF32 is allowed; 16-bit operands: the tensor
    # cores whatever this says (Triton's default, "tf32", which only concerns float32 operands)
    prec = "ieee"
    if lowp or (dt == torch.float32 and dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32):
        prec = "tf32"
    BM, BN, BK, warps, stages = _launch_config(Cog, pe, fma=prec == "ieee")
    out_flat = out.view(-1)

    # chunks of images: Q of the chunk + the pair lists (~4 int64 per candidate pair, worst case)
    budget = max_elems if max_elems > 0 else _DEFAULT_MAX_ELEMS
    per_img = (0 if copy_free else Ci * Hq * Wq * pe) + G * P * CK * 4 * max(1, 8 // patches.element_size())
    nbc = max(1, min(B, budget // max(1, per_img)))
    src_y = None if identity else torch.tensor(sy, dtype=torch.long, device=dev)
    src_x = None if identity else torch.tensor(sx, dtype=torch.long, device=dev)
    # place_li's anchors: input windows at the offsets, output windows at 0
    place_args = (torch.tensor(oy, dtype=torch.long, device=dev), torch.tensor(ox, dtype=torch.long, device=dev),
                  torch.zeros(Hq, dtype=torch.long, device=dev), torch.zeros(Wq, dtype=torch.long, device=dev))
    for b0 in range(0, B, nbc):
        nb = min(nbc, B - b0)
        Q = patches[b0: b0 + nb]
        if src_y is not None:
            Q = Q.index_select(2, src_y).index_select(3, src_x)
        if not copy_free and Hq and Wq:
            Q = _place_li(Q.contiguous(), *place_args, rh_out, rw_out)
        Q = Q.contiguous()
        # valid pairs of the chunk, listed ragged in (image, group, position, pair) order
        valid = tap_ok.unsqueeze(0).expand(nb, G, P, CK)
        if act is not None:
            valid = valid & act[b0: b0 + nb].index_select(1, nidx.reshape(-1)).view(nb, G, P, CK)
        J = nb * G * P
        jj, cc = valid.reshape(J, CK).nonzero(as_tuple=True)
        if jj.numel() == 0:  # no active pair in the chunk: all zeros
            out[b0: b0 + nb].zero_()
            continue
        cnt = torch.bincount(jj, minlength=J)
        offs = cnt.cumsum(0) - cnt
        bl, grp, p = jj // (G * P), (jj // P) % G, jj % P
        rows = qrow[grp, p, cc] + bl * (Ci * Hq * Wq)
        sel = cc
        jr = torch.arange(J, device=dev)
        jb, jg, jp = b0 + jr // (G * P), (jr // P) % G, jr % P
        wbase = jg * (CK * Cog)
        mbase = (jb * Co + jg * Cog) * P + jp
        obase = mbase * pe
        grid = (J, triton.cdiv(Cog, BM), triton.cdiv(pe, BN))
        _implicit_kernel[grid](WT, Q, sel, rows, offs, cnt, wbase, obase, mbase,
                               mul if mul is not None else WT, out_flat,
                               Cog, pe, P * pe, P,
                               HAS_MUL=mul is not None, LOWP=lowp, PREC=prec, BM=BM, BN=BN, BK=BK,
                               num_warps=warps, num_stages=stages)
    return out
