"""Per-neuron statistics of learned images (the engine's fused reduction).

The analyses (knowledge quantity and distances, docs/spec.md §2; FQ, docs/spec.md §3) need
only these sums per neuron and sample, so a data-set scan never stores the images
themselves. Every backend's ``li_stats`` op returns them in this order along the last
dimension; this module is the dense pure-PyTorch definition they are all tested against.

Entries ``t`` run over all ``D·H·W`` input entries; the foreground mask ``[H, W]`` is
broadcast over the ``D`` channels; ``nz(t) = 1[LI(t) != 0]``.
"""
from __future__ import annotations

import torch

__all__ = ["STAT_NAMES", "STAT_INDEX", "NUM_STATS", "li_stats_dense"]

#: Names of the statistics, in the order of the last dimension of every ``li_stats`` result.
STAT_NAMES = (
    "nz_fg",      # Σ_{t∈F} nz(t)                       (N^e_x, docs/spec.md §3)
    "nz_bg",      # Σ_{t∈B} nz(t)                       (N^n_x)
    "abs_sum",    # Σ_t |LI(t)|                        (strength, docs/spec.md §2)
    "sum",        # Σ_t LI(t)                          (completeness)
    "sq_sum",     # Σ_t LI(t)²
    "x_dot",      # Σ_t x(t)·LI(t)
    "fg_sum",     # Σ_{t∈F} LI(t)
    "fg_sq_sum",  # Σ_{t∈F} LI(t)²
    "fg_xnz_sum",  # Σ_{t∈F} x(t)·nz(t)                 (I^fe, docs/spec.md §3)
    "fg_xnz_sq_sum",  # Σ_{t∈F} (x(t)·nz(t))²
    "fg_x_dot",   # Σ_{t∈F} x(t)·LI(t)  (= Σ_F I^fe·I^e since LI=0 where nz=0)
)
STAT_INDEX = {n: i for i, n in enumerate(STAT_NAMES)}
NUM_STATS = len(STAT_NAMES)


def li_stats_dense(li: torch.Tensor, x: torch.Tensor, fg_mask: torch.Tensor | None) -> torch.Tensor:
    """Statistics of dense learned images.

    Parameters
    ----------
    li : Tensor [B, *N, D, H, W]
        Learned images of ``N`` neurons for each of ``B`` samples.
    x : Tensor [B, D, H, W]
        The inputs.
    fg_mask : bool Tensor [B, H, W] or None
        Foreground masks; ``None`` means the whole image is foreground.

    Returns
    -------
    Tensor [B, *N, NUM_STATS] in the order of :data:`STAT_NAMES`.
    """
    B, D, H, W = x.shape
    if li.shape[0] != B or tuple(li.shape[-3:]) != (D, H, W):
        raise ValueError(f"li_stats_dense: li must be [B, ..., D, H, W] = [{B}, ..., {D}, {H}, {W}], got {list(li.shape)}")
    nmid = li.dim() - 4
    if fg_mask is None:
        fg = torch.ones(B, H, W, dtype=li.dtype, device=li.device)
    else:
        fg = fg_mask.to(li.dtype)
    view = lambda t: t.reshape(B, *([1] * nmid), *t.shape[1:])  # noqa: E731
    fgv = view(fg.unsqueeze(1).expand(B, D, H, W))
    xv = view(x.to(li.dtype))
    nz = (li != 0).to(li.dtype)
    dims = (-3, -2, -1)
    xnz = xv * nz
    out = [
        (nz * fgv).sum(dims),
        (nz * (1 - fgv)).sum(dims),
        li.abs().sum(dims),
        li.sum(dims),
        (li * li).sum(dims),
        (xv * li).sum(dims),
        (li * fgv).sum(dims),
        (li * li * fgv).sum(dims),
        (xnz * fgv).sum(dims),
        (xnz * xnz * fgv).sum(dims),
        (xv * li * fgv).sum(dims),
    ]
    return torch.stack(out, dim=-1)
