"""The engine: learned images of every neuron of every requested layer, in one sweep.

``graph`` (the gate-frozen linearisation plan of a model) → forward patch propagation or reverse
VJPs → :class:`ScanResult`. The functional API (:func:`learned_images`, :func:`filter_images`,
:func:`layer_image`) and :class:`Scanner` are the entry points.

Modules, in the order a scan uses them:

==============  ===============================================================================
``graph``       the model traced into nodes with receptive-field geometry (:class:`ScanGraph`)
``options``     backends, strategies, precisions, conv algorithms and their resolution
``inputs``      image shape of an input; checks of inputs and foreground masks
``memory``      default budgets, bytes per sample, chunk bounds of the GEMM conv ops
``forward``     the recorded forward pass: every node's value, activation gates, arg-max indices
``patches``     :class:`~nns_cuda.engine.patches.Patches`, the patch representation, and its
                reductions to dense images and filter images
``rules``       the forward rule of every node kind (``RULES``: ``{kind: rule}``)
``propagate``   :class:`~nns_cuda.engine.propagate.PatchPropagator`, forward patch propagation
``reverse``     the reverse strategy: batched vector–Jacobian products
``results``     :class:`LayerResult`, :class:`ScanResult`
``scanner``     :class:`Scanner`
``functional``  :func:`learned_images`, :func:`filter_images`, :func:`layer_image`
``oracle``      dense autograd oracles, independent of the engine (tests, cross-checks)
==============  ===============================================================================
"""
from nns_cuda.engine.functional import filter_images, layer_image, learned_images
from nns_cuda.engine.graph import ScanGraph, UnsupportedModuleError, build_graph
from nns_cuda.engine.results import LayerResult, ScanResult
from nns_cuda.engine.scanner import Scanner

__all__ = ["Scanner", "ScanResult", "LayerResult", "learned_images", "filter_images", "layer_image",
           "ScanGraph", "build_graph", "UnsupportedModuleError"]
