"""The engine: learned images of every neuron of every requested layer, in one sweep.

``graph`` (the frozen-linearisation plan of a model) → forward patch propagation or reverse
VJPs → :class:`ScanResult`. The functional API (:func:`learned_images`, :func:`filter_images`,
:func:`layer_image`) and :class:`Scanner` are the entry points.
"""
from nns_cuda.engine.graph import ScanGraph, UnsupportedModuleError, build_graph
from nns_cuda.engine.scanner import (
    LayerResult,
    ScanResult,
    Scanner,
    filter_images,
    layer_image,
    learned_images,
)

__all__ = ["Scanner", "ScanResult", "LayerResult", "learned_images", "filter_images", "layer_image",
           "ScanGraph", "build_graph", "UnsupportedModuleError"]
