"""The per-epoch record of a training run: metrics, checkpoints, the checkpoints the analyses use.

The history names the checkpoints that the thesis's analyses compare (docs/spec.md §4, §5):

* ``best_checkpoint`` — the *well-trained* model: best validation accuracy (ties: lower
  validation loss, then the earlier epoch);
* ``last_checkpoint`` — the *over-fitted* model: the last epoch;
* ``phase_checkpoints()`` — early / middle / final checkpoints for the TIP typology.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from nns_cuda.data._io import atomic_write_bytes

__all__ = ["TrainingHistory", "PathLike"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class TrainingHistory:
    """Per-epoch metrics and checkpoints of a training run.

    Attributes
    ----------
    epochs : list of int
        1-based epoch numbers.
    train_loss, train_acc : list of float
        Mean cross-entropy and accuracy over the epoch's training batches (model in
        training mode, as the weights changed during the epoch).
    val_loss, val_acc : list of float
        On the validation set after the epoch (eval mode); NaN without validation data.
    epoch_seconds : list of float
        Wall time of each epoch (training + validation).
    checkpoints : list of str or None
        Checkpoint file of each epoch (``None`` without ``checkpoint_dir``).
    config : dict
        The run's configuration (optimizer, lr, batch size, seed, …).
    curve_png, curve_json : str or None
        Where the loss / accuracy curve was saved.
    """

    epochs: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    train_acc: List[float] = field(default_factory=list)
    val_loss: List[float] = field(default_factory=list)
    val_acc: List[float] = field(default_factory=list)
    epoch_seconds: List[float] = field(default_factory=list)
    checkpoints: List[Optional[str]] = field(default_factory=list)
    config: Dict[str, Any] = field(default_factory=dict)
    curve_png: Optional[str] = None
    curve_json: Optional[str] = None

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def best_epoch(self) -> Optional[int]:
        """Epoch of the best validation accuracy (ties: lower validation loss, then earlier);
        the last epoch when there is no validation data; ``None`` before any epoch."""
        if not self.epochs:
            return None
        if all(math.isnan(v) for v in self.val_acc):
            return self.epochs[-1]
        best = min(range(len(self.epochs)), key=lambda i: (
            -_nan_to(self.val_acc[i], -math.inf), _nan_to(self.val_loss[i], math.inf), i))
        return self.epochs[best]

    def checkpoint(self, epoch: int) -> Optional[str]:
        """Checkpoint path of ``epoch`` (1-based)."""
        return self.checkpoints[self.epochs.index(epoch)]

    @property
    def best_checkpoint(self) -> Optional[str]:
        """The *well-trained* checkpoint (docs/spec.md §5): best validation accuracy."""
        e = self.best_epoch
        return None if e is None else self.checkpoint(e)

    @property
    def last_checkpoint(self) -> Optional[str]:
        """The *over-fitted* checkpoint (docs/spec.md §5): the last epoch."""
        return self.checkpoints[-1] if self.checkpoints else None

    def phase_epochs(self, fractions: Sequence[float] = (0.1, 0.5, 1.0)) -> Dict[str, int]:
        """Epochs of the early / middle / final training phases.

        Epoch ``max(1, ceil(f · E))`` for each fraction ``f`` of the ``E`` epochs trained
        (for 10 epochs: 1, 5, 10; for 60: 6, 30, 60).
        """
        if not self.epochs:
            raise ValueError("no epoch trained yet")
        if len(fractions) != 3:
            raise ValueError("fractions must be (early, middle, final)")
        n = len(self.epochs)
        return {name: self.epochs[max(1, math.ceil(f * n)) - 1]
                for name, f in zip(("early", "middle", "final"), fractions)}

    def phase_checkpoints(self, fractions: Sequence[float] = (0.1, 0.5, 1.0)) -> Dict[str, Optional[str]]:
        """Checkpoints of the early / middle / final phases (for the TIP typology, docs/spec.md §4);
        see :meth:`phase_epochs`."""
        return {k: self.checkpoint(e) for k, e in self.phase_epochs(fractions).items()}

    def overfitting(self) -> Dict[str, float]:
        """Numbers that show over-fitting: the minimum validation loss and its epoch, the
        last validation loss, its rise over the minimum, and the train loss drop over the
        same epochs."""
        if not self.epochs or all(math.isnan(v) for v in self.val_loss):
            return {}
        i_min = int(np.nanargmin(self.val_loss))
        return {
            "min_val_loss": self.val_loss[i_min], "min_val_loss_epoch": self.epochs[i_min],
            "last_val_loss": self.val_loss[-1],
            "val_loss_rise": self.val_loss[-1] - self.val_loss[i_min],
            "train_loss_at_min": self.train_loss[i_min], "last_train_loss": self.train_loss[-1],
            "train_loss_drop": self.train_loss[i_min] - self.train_loss[-1],
            "best_val_acc": max(self.val_acc), "last_val_acc": self.val_acc[-1],
            "last_train_acc": self.train_acc[-1],
        }

    def to_dict(self) -> Dict[str, Any]:
        """JSON-compatible dictionary (NaN written as ``null``)."""
        d = asdict(self)
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            d[k] = [None if (v is None or math.isnan(v)) else float(v) for v in d[k]]
        d["best_epoch"] = self.best_epoch
        d["best_checkpoint"] = self.best_checkpoint
        d["last_checkpoint"] = self.last_checkpoint
        d["phase_checkpoints"] = self.phase_checkpoints() if self.epochs else {}
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainingHistory":
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            kw[k] = [math.nan if v is None else float(v) for v in kw.get(k, [])]
        return cls(**kw)

    def save_json(self, path: PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (atomically)."""
        data = json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()
        return atomic_write_bytes(data, path)

    @classmethod
    def load_json(cls, path: PathLike) -> "TrainingHistory":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, path: PathLike) -> Path:
        """Save the loss and accuracy curves (train vs validation) as a PNG.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change); marks
        the best epoch.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(self.epochs, self.train_loss, "o-", ms=3, label="train")
        ax1.plot(self.epochs, self.val_loss, "s-", ms=3, label="validation")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("cross-entropy loss")
        ax2.plot(self.epochs, [100 * a for a in self.train_acc], "o-", ms=3, label="train")
        ax2.plot(self.epochs, [100 * a for a in self.val_acc], "s-", ms=3, label="validation")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("accuracy (%)")
        b = self.best_epoch
        for ax in (ax1, ax2):
            if b is not None:
                ax.axvline(b, color="grey", ls="--", lw=0.8, label=f"best (epoch {b})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(self.config.get("title", "training curve"), fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp.png")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
        return path

    def summary(self) -> str:
        """Human-readable table of the epochs."""
        lines = ["epoch  train_loss  train_acc  val_loss  val_acc   seconds"]
        for i, e in enumerate(self.epochs):
            lines.append(f"{e:5d}  {self.train_loss[i]:10.4f}  {100 * self.train_acc[i]:8.2f}%"
                         f"  {self.val_loss[i]:8.4f}  {100 * self.val_acc[i]:6.2f}%"
                         f"  {self.epoch_seconds[i]:7.2f}")
        if self.epochs:
            lines.append(f"best epoch {self.best_epoch} (val acc), last epoch {self.epochs[-1]}")
        return "\n".join(lines)


def _nan_to(v: float, repl: float) -> float:
    return repl if (v is None or math.isnan(v)) else v
