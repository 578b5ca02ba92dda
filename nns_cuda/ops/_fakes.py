"""Fake (meta) kernels of the compiled ops, for ``torch.compile`` and ``FakeTensorMode``.

Each one runs the op's argument checks (:mod:`nns_cuda.ops._checks`, the same as the compiled
kernels' except the data-dependent ones) and returns an empty tensor of the result's shape.
:func:`register` is called once by :mod:`nns_cuda.ops` when the extension is loaded.
"""
from __future__ import annotations

import torch

from nns_cuda import _extension
from nns_cuda.ops import _checks
from nns_cuda.ops.reference.stats import NUM_STATS

__all__ = ["register"]


def _conv_fake(op: str):
    """The fake kernel of ``conv_li`` (``op="conv_li"``, whose schema has no ``max_elems``: it
    stays 0) or of one of its GEMM formulations, which take ``max_elems`` (>= 0) after
    conv_li's arguments."""

    def fake(patches, ay_in, ax_in, in_active, weight, scale, gate, ay_out, ax_out,
             stride, padding, dilation, groups, rh_out, rw_out, max_elems=0):
        B, Co, Ho, Wo, D = _checks.check_conv_li(patches, ay_in, ax_in, in_active, weight, scale, gate,
                                                 ay_out, ax_out, stride, padding, dilation, groups,
                                                 rh_out, rw_out, op=op)
        torch._check_value(max_elems >= 0, lambda: f"{op}: max_elems must be >= 0 (0: default), got {max_elems}")
        return patches.new_empty((B, Co, Ho, Wo, D, rh_out, rw_out))

    return fake


def register() -> None:
    """Register the fake kernel of every compiled op (``gmm_estep`` only where it is built)."""
    for op in ("conv_li", "conv_li_gemm", "conv_li_gather"):
        torch.library.register_fake(f"nns_cuda::{op}")(_conv_fake(op))

    @torch.library.register_fake("nns_cuda::maxpool_li")
    def _maxpool_li_fake(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out):
        B, C, Ho, Wo, D = _checks.check_maxpool_li(patches, ay_in, ax_in, indices, ay_out, ax_out, rh_out, rw_out)
        return patches.new_empty((B, C, Ho, Wo, D, rh_out, rw_out))

    @torch.library.register_fake("nns_cuda::place_li")
    def _place_li_fake(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate=None):
        B, C, Ho, Wo, D = _checks.check_place_li(patches, ay_in, ax_in, ay_out, ax_out, rh_out, rw_out, accumulate)
        return patches.new_empty((B, C, Ho, Wo, D, rh_out, rw_out))

    @torch.library.register_fake("nns_cuda::linear_li")
    def _linear_li_fake(dense, weight, gate):
        B, Nout, P = _checks.check_linear_li(dense, weight, gate)
        return dense.new_empty((B, Nout, P))

    @torch.library.register_fake("nns_cuda::li_stats")
    def _li_stats_fake(patches, ay, ax, x, fg):
        B, C, Ho, Wo = _checks.check_li_stats(patches, ay, ax, x, fg)
        return patches.new_empty((B, C, Ho, Wo, NUM_STATS), dtype=_checks.opmath(patches.dtype))

    @torch.library.register_fake("nns_cuda::filter_fold")
    def _filter_fold_fake(patches, ay, ax, act, h, w):
        B, C, D = _checks.check_filter_fold(patches, ay, ax, act, h, w)
        return patches.new_empty((B, C, D, h, w))

    if _extension.has_op("gmm_estep"):
        @torch.library.register_fake("nns_cuda::gmm_estep")
        def _gmm_estep_fake(coef, phit, want_moments, want_labels):
            B, k, S = _checks.check_gmm_estep(coef, phit)
            mom = coef.new_empty((B, k, 6) if want_moments else (0,))
            lab = coef.new_empty((B, S) if want_labels else (0,), dtype=torch.int64)
            return mom, coef.new_empty((B,)), lab
