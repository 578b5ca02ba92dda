"""nns_cuda — the Neural Network Scanner (NNS) with C++/CUDA kernels.

Learned images (SPEC §1) of every neuron of a CNN: ``LI_n(x) = g_n · x ⊙ J_n`` with ``J_n`` the
gradient of neuron ``n`` in the gate-frozen, bias-free network. See README.md.
"""
from __future__ import annotations

import os as _os
import warnings as _warnings

# Idle OpenMP threads must not spin: on small shared CPU machines spinning made the small
# autograd / PCA loops of the analyses several times slower (measured in benchmarks/bench_gmm.py).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

import torch as _torch  # noqa: F401  (loads libc10 / libtorch before the extension)

try:  # the compiled extension registers torch.ops.nns_cuda.*
    from . import _C  # noqa: F401

    _HAS_EXT = True
    _EXT_ERROR = None
except Exception as _e:  # pragma: no cover - depends on the build
    _HAS_EXT = False
    _EXT_ERROR = f"{type(_e).__name__}: {_e}"


def ext_info() -> dict:
    """Describe the compiled extension: whether it loaded and which backends it registers."""
    import torch

    info = {"loaded": _HAS_EXT, "error": _EXT_ERROR, "cpu": False, "cuda": False}
    if _HAS_EXT:
        try:
            info["cpu"] = torch._C._dispatch_has_kernel_for_dispatch_key("nns_cuda::conv_li", "CPU")
            info["cuda"] = torch._C._dispatch_has_kernel_for_dispatch_key("nns_cuda::conv_li", "CUDA")
        except Exception:  # pragma: no cover
            pass
    return info


from .engine import (  # noqa: E402
    LayerResult,
    ScanResult,
    Scanner,
    filter_images,
    layer_image,
    learned_images,
)
from .graph import ScanGraph, UnsupportedModuleError, build_graph  # noqa: E402
from .masking import mask_filters  # noqa: E402

# analyses, data and models are sub-modules: ``from nns_cuda import fq, tip, gmm, data, models``
_SUBMODULES = ("fq", "chapter3", "tip", "gmm", "data", "models", "train", "captum", "report", "viz", "ops")


def __getattr__(name):  # lazy: importing nns_cuda stays light (no sklearn / matplotlib at import)
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nns_cuda' has no attribute {name!r}")

__all__ = [
    "__version__",
    "ext_info",
    "learned_images",
    "filter_images",
    "layer_image",
    "Scanner",
    "ScanResult",
    "LayerResult",
    "ScanGraph",
    "build_graph",
    "UnsupportedModuleError",
    "mask_filters",
]
