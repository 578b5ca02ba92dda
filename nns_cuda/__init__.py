"""nns_cuda — the Neural Network Scanner (NNS) with C++/CUDA kernels.

Learned images (docs/spec.md §1) of every neuron of a CNN: ``LI_n(x) = g_n · x ⊙ J_n`` with
``J_n`` the gradient of neuron ``n`` in the gate-frozen, bias-free network.

This module is the public facade: it re-exports the engine's functional API and makes the
analyses and the application reachable under their short names (``nns_cuda.fq``,
``nns_cuda.viz``, ...). The code lives in layers, bottom to top (``docs/architecture.md``):
``_extension`` → ``ops`` → ``engine`` (beside it ``data``, ``models``, ``train``) →
``analysis`` → ``app``.
"""
from __future__ import annotations

import importlib as _importlib
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

# Idle OpenMP threads must not spin: on small shared CPU machines spinning made the small
# autograd / PCA loops of the analyses several times slower (benchmarks/NOTES.md, GMM section).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch as _torch  # noqa: F401,E402  (loads libc10 / libtorch before the extension)

from ._extension import ext_info  # noqa: E402
from ._version import __version__  # noqa: E402
from .analysis.masking import mask_filters  # noqa: E402
from .engine import (  # noqa: E402
    DatasetScan,
    DatasetScanResult,
    LayerResult,
    ScanGraph,
    ScanResult,
    Scanner,
    UnsupportedModuleError,
    build_graph,
    filter_images,
    layer_image,
    learned_images,
    load_scan,
)

#: Short public names of modules that live inside a layer. ``from nns_cuda import fq`` and
#: ``from nns_cuda.fq import FeatureQuantity`` both work; the module object is the same.
_ALIASES = {
    "fq": "nns_cuda.analysis.fq",
    "chapter3": "nns_cuda.analysis.chapter3",
    "tip": "nns_cuda.analysis.tip",
    "gmm": "nns_cuda.analysis.gmm",
    "masking": "nns_cuda.analysis.masking",
    "captum": "nns_cuda.analysis.captum",
    "thesis": "nns_cuda.analysis.thesis",
    "report": "nns_cuda.app.report",
    "viz": "nns_cuda.app.viz",
    "cli": "nns_cuda.app.cli",
    "demo": "nns_cuda.app.demo",
    "graph": "nns_cuda.engine.graph",
    "reference": "nns_cuda.ops.reference",
}
#: Sub-packages loaded on first use (importing nns_cuda stays light: no sklearn / matplotlib).
_SUBPACKAGES = ("data", "models", "train", "ops", "engine", "analysis", "app")


class _AliasFinder(_abc.MetaPathFinder, _abc.Loader):
    """Resolve ``nns_cuda.<alias>`` (and its sub-modules) to the module inside its layer."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, rest = fullname.partition(".")[2].partition(".")
        if not fullname.startswith(__name__ + ".") or head not in _ALIASES:
            return None
        return _util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        head, _, rest = spec.name.partition(".")[2].partition(".")
        real = _ALIASES[head] + ("." + rest if rest else "")
        return _importlib.import_module(real)

    def exec_module(self, module):  # the real module is already executed
        pass


if not any(isinstance(f, _AliasFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_AliasFinder())


def __getattr__(name):
    if name in _ALIASES:
        return _importlib.import_module(_ALIASES[name])
    if name in _SUBPACKAGES:
        return _importlib.import_module(f".{name}", __name__)
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
    "DatasetScan",
    "DatasetScanResult",
    "load_scan",
]
