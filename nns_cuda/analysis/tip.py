"""TIP — Test with Interpretable Properties (thesis Chapter 5, docs/spec.md §4).

A filter's learned image ``L^k(x)`` (docs/spec.md §1, ``[D, H, W]``, input-sized) is summarised
by *interpretable properties* ``P^k(x)``; their mean over a data set is ``T^k`` (eq. 5-7). Three
analyses explain a model with them:

* **AIPC** (§5.3.1): accuracy drop when the top-ranked filters (by ``T``) are masked, as a
  curve over the mask ratio, and its area (Table 5-1) — :func:`aipc`, :func:`aipc_curves`.
* **Saliency** (§5.3.2): AVoU (eq. 5-8) and SoU (eqs. 5-9, 5-10) per filter and their Spearman
  rank correlation with each ``T`` (Table 5-2) — :func:`avou`, :func:`sou`,
  :func:`spearman_table`, :func:`saliency`.
* **Foreground / background filter types** (§5.3.3, eq. 5-11): ``T_f``, ``T_b`` on the
  foreground / background entries; types H-H, H-noH, noH-H, L-L, L-noL, noL-L, their share and
  the accuracy change when each type is masked, per checkpoint (Tables 5-3 … 5-6) —
  :func:`filter_types`, :func:`fg_bg_types`.

Properties form a registry: built-ins ``mean`` (``P_m``), ``variance`` (``P_v``),
``covariance`` (``P_c``) and ``correlation`` (``P_cor``); add one with
:func:`register_property`. Every property maps ``(L [B, C, D, H, W], x [B, D, H, W],
mask [B, H, W] bool | None)`` to ``[B, C]``. :class:`InterpretableProperties` estimates ``T``.

This module gathers the public API; the code lives in
:mod:`nns_cuda.analysis.properties` (properties and registry),
:mod:`nns_cuda.analysis.interpretable` (the estimator of ``T``),
:mod:`nns_cuda.analysis.aipc`, :mod:`nns_cuda.analysis.saliency` and
:mod:`nns_cuda.analysis.fgbg`. The comparison with the thesis's numbers is in
:mod:`nns_cuda.analysis.thesis.chapter5`.

Decisions (docs/spec.md §4) are stated in the module they concern: statistics over all
``D·H·W`` entries, population moments and the zero-σ correlation in ``properties``; samples
with an empty region in ``interpretable``; ties in the ranking, ``⌈rK⌉`` and the area's units
(pp·%) in ``aipc``; the weights SoU counts and its loss in ``saliency``; high / low filters and
the sign of the accuracy change in ``fgbg``.

Layers are addressed by module names (``model.named_modules()``); a module called several
times per forward is addressed per call as ``name:i`` (docs/spec.md §0).
"""
from __future__ import annotations

from nns_cuda.analysis import aipc as _aipc
from nns_cuda.analysis import fgbg as _fgbg
from nns_cuda.analysis import interpretable as _interpretable
from nns_cuda.analysis import properties as _properties
from nns_cuda.analysis import saliency as _saliency
from nns_cuda.analysis.aipc import *  # noqa: F401,F403  (the public API of each part)
from nns_cuda.analysis.fgbg import *  # noqa: F401,F403
from nns_cuda.analysis.interpretable import *  # noqa: F401,F403
from nns_cuda.analysis.properties import *  # noqa: F401,F403
from nns_cuda.analysis.saliency import *  # noqa: F401,F403

__all__ = [*_properties.__all__, *_interpretable.__all__, *_aipc.__all__, *_saliency.__all__, *_fgbg.__all__]
