"""Training with per-epoch checkpoints, resumable and bit-reproducible.

``fit`` trains a classifier with cross-entropy and, after every epoch, writes a checkpoint
(model, optimizer, RNG states, history, configuration) atomically to ``checkpoint_dir``;
its :class:`TrainingHistory` names the checkpoints the analyses compare (well-trained,
over-fitted, training phases). ``default_demo_model`` trains (or reuses from the cache) the
demo's default model on the embedded cluttered-digits data set.

Modules: ``history`` (:class:`TrainingHistory`), ``loop`` (:func:`fit`, :func:`evaluate`,
:func:`load_checkpoint`), ``demo_model`` (:func:`default_demo_model`).
"""
from __future__ import annotations

from nns_cuda.train.demo_model import DEMO_CONFIG, DemoModel, default_demo_model
from nns_cuda.train.history import TrainingHistory
from nns_cuda.train.loop import (  # the file-format constants stay reachable here
    CHECKPOINT_FORMAT,
    CURVE_FILE,
    HISTORY_FILE,
    evaluate,
    fit,
    load_checkpoint,
)

__all__ = [
    "TrainingHistory", "fit", "evaluate", "load_checkpoint", "default_demo_model",
    "DemoModel", "DEMO_CONFIG",
]
