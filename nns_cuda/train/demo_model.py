"""The demo's default model: trained once on the embedded data, then reused from the cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Union

import torch
from torch import nn

from nns_cuda.data._io import default_cache_dir
from nns_cuda.train.history import PathLike, TrainingHistory
from nns_cuda.train.loop import CHECKPOINT_FORMAT, CURVE_FILE, HISTORY_FILE, fit

__all__ = ["DEMO_CONFIG", "DemoModel", "default_demo_model"]

#: The demo's default model: the thesis's Chapter 6 CNN (conv 32-64-64) on the small
#: training split (300 samples) of the embedded cluttered digits, trained long enough to
#: over-fit visibly (validation loss rising from about epoch 13 while the training loss goes
#: to ~0). One thread: fastest for this size, and immune to a busy machine.
DEMO_CONFIG: Dict[str, Any] = {
    "model": "cnn_32_64_64", "num_classes": 10, "data_seed": 0, "n_train": 300,
    "epochs": 40, "optimizer": "adam", "lr": 3e-3, "momentum": 0.0, "weight_decay": 0.0,
    "batch_size": 20, "seed": 0, "init_seed": 0, "num_threads": 1,
}


class DemoModel(NamedTuple):
    """Result of :func:`default_demo_model`."""

    model: nn.Module              #: final (over-fitted) weights, eval mode
    history: TrainingHistory      #: curves and checkpoints (best = well-trained)
    name: str                     #: zoo name, for ``models.load_model(name, weights=...)``
    checkpoint_dir: Path


def _demo_dir(cache_dir: Optional[PathLike]) -> Path:
    from nns_cuda.data.cluttered import GENERATOR_VERSION

    key_src = json.dumps({"config": DEMO_CONFIG, "data": GENERATOR_VERSION,
                          "format": CHECKPOINT_FORMAT}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    return default_cache_dir(cache_dir) / "demo_model" / f"{DEMO_CONFIG['model']}_{key}"


def default_demo_model(cache_dir: Optional[PathLike] = None, *, force: bool = False,
                       progress: bool = True,
                       device: Union[str, torch.device] = "cpu") -> DemoModel:
    """Train — or reuse from the cache — the demo's default model.

    :data:`DEMO_CONFIG`: the thesis's Chapter 6 CNN (``"cnn_32_64_64"``), Adam, on the small
    training split (300 samples) of :func:`nns_cuda.data.cluttered_digits` (seed 0),
    validated on its validation split, for enough epochs that the validation loss rises again
    while the training loss keeps falling (over-fitting). Checkpoints, ``history.json`` and
    ``curve.png`` live in ``<cache>/demo_model/<name>_<key>/``; an interrupted run resumes.

    Parameters
    ----------
    cache_dir : path, optional
        Cache root (default ``$NNS_CACHE_DIR`` or ``~/.cache/nns_cuda``).
    force : bool
        Retrain even if a finished run is cached.
    progress : bool
    device : str or torch.device

    Returns
    -------
    DemoModel
        ``(model, history, name, checkpoint_dir)``; ``model`` holds the last (over-fitted)
        weights; ``models.load_model(name, weights=history.best_checkpoint)`` gives the
        well-trained one.
    """
    from nns_cuda import models
    from nns_cuda.data import cluttered_digits

    cfg = DEMO_CONFIG
    ckdir = _demo_dir(cache_dir)
    model = models.build(cfg["model"], cfg["num_classes"], seed=cfg["init_seed"])
    hist_file = ckdir / HISTORY_FILE
    if not force and hist_file.is_file():
        try:
            hist = TrainingHistory.load_json(hist_file)
            if (len(hist) == cfg["epochs"] and hist.last_checkpoint
                    and Path(hist.last_checkpoint).is_file()
                    and (ckdir / CURVE_FILE).is_file()):
                hist.curve_png = str(ckdir / CURVE_FILE)
                hist.curve_json = str(hist_file)
                loaded = models.load_model(cfg["model"], weights=hist.last_checkpoint,
                                           num_classes=cfg["num_classes"])
                return DemoModel(loaded, hist, cfg["model"], ckdir)
        except (ValueError, OSError, KeyError):
            pass  # damaged cache: fall through and (re)train / resume
    data_kw = dict(seed=cfg["data_seed"], cache_dir=cache_dir)
    train = cluttered_digits("train", n_train=cfg["n_train"], **data_kw)
    val = cluttered_digits("val", **data_kw)
    hist = fit(model, train, val, epochs=cfg["epochs"], optimizer=cfg["optimizer"],
               lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
               batch_size=cfg["batch_size"], seed=cfg["seed"], checkpoint_dir=ckdir,
               resume=not force, overwrite=force, device=device, progress=progress,
               num_threads=cfg["num_threads"], title=f"demo model {cfg['model']} on cluttered digits "
                     f"(n_train={cfg['n_train']})")
    return DemoModel(model.eval(), hist, cfg["model"], ckdir)
