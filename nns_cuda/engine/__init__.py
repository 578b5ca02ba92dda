"""The engine: learned images of every neuron of every requested layer, in one sweep.

``graph`` (the gate-frozen linearisation plan of a model) → forward patch propagation or reverse
VJPs → :class:`ScanResult`. The functional API (:func:`learned_images`, :func:`filter_images`,
:func:`layer_image`) and :class:`Scanner` are the entry points.

Modules, in the order a scan uses them:

===================  ===========================================================================
``graph``            the model traced into nodes (:class:`ScanGraph`), their kinds and shapes
``receptive_field``  the receptive-field geometry of every spatial node, per axis
``options``          backends, strategies, precisions, conv algorithms and their resolution
``inputs``           image shape of an input; checks of inputs and foreground masks
``memory``           default budgets, bytes per sample, chunk bounds of the GEMM conv ops
``forward``          the recorded forward pass: node values, activation gates, arg-max indices
``patches``          ``Patches`` (the patch representation); dense images, filter images
``rules``            the forward rule of every node kind (``RULES``: ``{kind: rule}``)
``propagate``        ``PatchPropagator``: forward patch propagation
``reverse``          the reverse strategy: batched vector–Jacobian products
``plan``             the per-layer plan of ``strategy="auto"`` (cost model, cut); records in
                     ``_plan_records`` (:class:`~nns_cuda.engine.plan.Plan`)
``results``          :class:`LayerResult`, :class:`ScanResult`
``scanner``          :class:`Scanner`
``functional``       :func:`learned_images`, :func:`filter_images`, :func:`layer_image`
``dataset_scan``     :class:`DatasetScan`: per-neuron accumulators over whole data sets (resumable,
                     distributed), :func:`merge_scan`
``dataset_result``   :class:`DatasetScanResult`, :func:`load_scan`
``oracle``           dense autograd oracles, independent of the engine (tests, cross-checks)
===================  ===========================================================================
"""
from nns_cuda.engine.dataset_result import DatasetScanResult, load_scan
from nns_cuda.engine.dataset_scan import DatasetScan, ScanDirError, merge_scan
from nns_cuda.engine.functional import filter_images, layer_image, learned_images
from nns_cuda.engine.graph import ScanGraph, UnsupportedModuleError, build_graph
from nns_cuda.engine.results import LayerResult, ScanResult
from nns_cuda.engine.scanner import Scanner

__all__ = ["Scanner", "ScanResult", "LayerResult", "learned_images", "filter_images", "layer_image",
           "ScanGraph", "build_graph", "UnsupportedModuleError", "DatasetScan", "DatasetScanResult", "load_scan",
           "merge_scan", "ScanDirError"]
