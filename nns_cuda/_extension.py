"""The compiled extension ``nns_cuda._C``: loaded once, asked here.

This is the only module that imports ``_C``. Everything else asks :func:`has_ops`,
:func:`has_kernel` or :func:`ext_info`; nothing keeps a copy of the answer.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["has_ops", "has_op", "has_kernel", "ext_info", "load_error"]

#: Every op the extension registers under ``torch.ops.nns_cuda``.
OPS = ("conv_li", "conv_li_gemm", "conv_li_gather", "maxpool_li", "place_li", "linear_li", "li_stats",
       "filter_fold", "gmm_estep")
#: The ops the engine needs on a device before that device counts as having kernels.
ENGINE_OPS = ("conv_li", "conv_li_gemm", "conv_li_gather", "maxpool_li", "place_li", "linear_li", "li_stats",
              "filter_fold")

_ERROR: Optional[str] = None
try:  # registers torch.ops.nns_cuda.*
    from nns_cuda import _C  # noqa: F401
except Exception as _e:  # ImportError, or OSError for a library built against another torch
    _ERROR = f"{type(_e).__name__}: {_e}"


def load_error() -> Optional[str]:
    """Why the extension did not load (``"ImportError: ..."``), or ``None`` when it did."""
    return _ERROR


def has_ops() -> bool:
    """Whether the compiled ops are registered (otherwise the wrappers use the reference twins)."""
    return _ERROR is None and hasattr(torch.ops.nns_cuda, "conv_li")


def has_op(name: str) -> bool:
    """Whether the op ``torch.ops.nns_cuda.<name>`` is registered."""
    return _ERROR is None and hasattr(torch.ops.nns_cuda, name)


def _dispatch_key(device_type: str) -> str:
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device type must be 'cpu' or 'cuda', got {device_type!r}")
    return "CUDA" if device_type == "cuda" else "CPU"


def has_kernel(device_type: str, ops=ENGINE_OPS) -> bool:
    """Whether every op of ``ops`` has a compiled kernel for ``device_type`` (``"cpu"`` / ``"cuda"``)."""
    key = _dispatch_key(device_type)
    if not has_ops():
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"nns_cuda::{op}", key) for op in ops)
    except Exception:  # pragma: no cover - an op name the dispatcher does not know
        return False


def ext_info() -> dict:
    """Describe the compiled extension: whether it loaded and which backends it registers.

    Returns
    -------
    dict
        ``{"loaded": bool, "error": str | None, "cpu": bool, "cuda": bool}``.
    """
    return {"loaded": _ERROR is None, "error": _ERROR, "cpu": has_kernel("cpu"), "cuda": has_kernel("cuda")}
