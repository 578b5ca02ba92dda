"""Training with per-epoch checkpoints, resumable and bit-reproducible.

``fit`` trains a classifier with cross-entropy and, after every epoch, writes a checkpoint
(model, optimizer, RNG states, history, configuration) atomically to ``checkpoint_dir``.
The history names the checkpoints that the thesis's analyses compare (SPEC §5, §4):

* ``best_checkpoint`` — the *well-trained* model: best validation accuracy (ties: lower
  validation loss, then the earlier epoch);
* ``last_checkpoint`` — the *over-fitted* model: the last epoch;
* ``phase_checkpoints()`` — early / middle / final checkpoints for the TIP typology.

Reproducibility: ``fit`` seeds ``torch``, ``numpy`` and ``random`` with ``seed``; the
training order of epoch ``e`` is a permutation drawn from a generator seeded by
``(seed, e)``; the global RNG states are saved in each checkpoint and restored on resume. So
two runs with the same seed give identical weights, and "train 2 epochs" equals "train 1
epoch, then resume for 1 more" bit for bit (on the CPU; on CUDA as far as deterministic
kernels allow, see ``deterministic``).

``default_demo_model`` trains (or reuses from the cache) the demo's default model on the
embedded cluttered-digits data set.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nns_cuda.data._io import atomic_save, atomic_write_bytes, default_cache_dir

__all__ = [
    "TrainingHistory", "fit", "evaluate", "load_checkpoint", "default_demo_model",
    "DemoModel", "DEMO_CONFIG", "add_train_arguments", "run_train",
]

CHECKPOINT_FORMAT = "nns_cuda.checkpoint/1"
HISTORY_FILE = "history.json"
CURVE_FILE = "curve.png"
_CKPT_PREFIX = "epoch_"
#: Configuration keys that must agree between a checkpoint and the run that resumes it.
_RESUME_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "seed",
                "n_train", "model_class")

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- history
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
        """The *well-trained* checkpoint (SPEC §5): best validation accuracy."""
        e = self.best_epoch
        return None if e is None else self.checkpoint(e)

    @property
    def last_checkpoint(self) -> Optional[str]:
        """The *over-fitted* checkpoint (SPEC §5): the last epoch."""
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
        """Checkpoints of the early / middle / final phases (for the TIP typology, SPEC §4);
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


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms (warn-only) + cuDNN determinism, restored on exit."""
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic = prev[2]
        torch.backends.cudnn.benchmark = prev[3]


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, restored on exit (``None``: unchanged)."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"num_threads must be positive, got {n}")
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _rng_state(device: torch.device) -> Dict[str, Any]:
    st: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
    }
    np_state = np.random.get_state()
    st["numpy"] = (np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                   int(np_state[2]), int(np_state[3]), float(np_state[4]))
    if device.type == "cuda" and torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    h = hashlib.sha256(f"nns_cuda.train/{seed}/{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def _unpack(batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise ValueError("each batch must be (x, y) or (x, y, fg_mask, ...), "
                     f"got {type(batch).__name__}")


def _train_loader(data: Union[Dataset, DataLoader], batch_size: int, seed: int, epoch: int,
                  num_workers: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    perm = torch.randperm(len(data), generator=_epoch_generator(seed, epoch)).tolist()
    return DataLoader(data, batch_size=batch_size, sampler=perm, num_workers=num_workers)


def _eval_loader(data: Union[Dataset, DataLoader], batch_size: int,
                 num_workers: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@torch.no_grad()
def evaluate(model: nn.Module, data: Union[Dataset, DataLoader], *, batch_size: int = 256,
             device: Union[str, torch.device] = "cpu", num_workers: int = 0) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``data``.

    Parameters
    ----------
    model : nn.Module
        Maps ``[B, C, H, W]`` to logits ``[B, classes]``.
    data : Dataset or DataLoader
        Items / batches ``(x, y, ...)``.

    Returns
    -------
    (loss, accuracy) : (float, float)
        NaN, NaN for an empty data set.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for batch in _eval_loader(data, batch_size, num_workers):
            x, y = _unpack(batch)
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        return math.nan, math.nan
    return loss_sum / total, correct / total


def _make_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                               weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def _ckpt_path(directory: Path, epoch: int) -> Path:
    return directory / f"{_CKPT_PREFIX}{epoch:03d}.pt"


def _existing_checkpoints(directory: Path) -> List[Path]:
    out = []
    for p in directory.glob(f"{_CKPT_PREFIX}*.pt"):
        stem = p.stem[len(_CKPT_PREFIX):]
        if stem.isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.stem[len(_CKPT_PREFIX):]))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`fit`.

    Returns
    -------
    dict
        ``{"format", "epoch", "model" (state dict), "optimizer", "rng", "history", "config"}``.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing, unreadable, or not an ``nns_cuda`` checkpoint (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an nns_cuda training checkpoint "
                         f"(format {CHECKPOINT_FORMAT!r})")
    return ckpt


# ----------------------------------------------------------------------------- fit
def fit(model: nn.Module, train_data: Union[Dataset, DataLoader],
        val_data: Optional[Union[Dataset, DataLoader]] = None, *, epochs: int,
        optimizer: str = "sgd", lr: float = 0.01, momentum: float = 0.9,
        weight_decay: float = 0.0, batch_size: int = 64, seed: int = 0,
        deterministic: bool = True, checkpoint_dir: Optional[PathLike] = None,
        resume: bool = False, overwrite: bool = False,
        device: Union[str, torch.device] = "cpu", progress: bool = True,
        num_workers: int = 0, num_threads: Optional[int] = None,
        title: Optional[str] = None) -> TrainingHistory:
    """Train a classifier with cross-entropy; checkpoint every epoch.

    Parameters
    ----------
    model : nn.Module
        Maps ``x [B, C, H, W]`` to logits ``[B, classes]``; trained in place. Its initial
        weights are the caller's (build it with ``models.build(..., seed=...)`` for a
        reproducible initialisation).
    train_data : Dataset or DataLoader
        Items ``(x, y)`` or ``(x, y, fg_mask)``. With a Dataset the order of epoch ``e`` is
        seeded by ``(seed, e)`` (needed for bit-exact resumption); a DataLoader is used as is.
    val_data : Dataset or DataLoader, optional
        Evaluated after every epoch (eval mode).
    epochs : int
        Total number of epochs (a resumed run continues up to it).
    optimizer : {"sgd", "adam"}
    lr, momentum, weight_decay : float
        ``momentum`` is used by SGD only.
    batch_size : int
    seed : int
        Seeds ``torch``, ``numpy`` and ``random`` at the start of a fresh run, and the
        per-epoch shuffling.
    deterministic : bool
        ``torch.use_deterministic_algorithms(True, warn_only=True)`` and cuDNN determinism
        during training (restored afterwards).
    checkpoint_dir : path, optional
        Where ``epoch_NNN.pt``, ``history.json`` and ``curve.png`` go. Without it nothing is
        written and the history's checkpoints are ``None``.
    resume : bool
        Continue from the latest checkpoint in ``checkpoint_dir`` (model, optimizer, RNG
        states, history). Its configuration must match (optimizer, lr, momentum,
        weight_decay, batch_size, seed, training-set size, model class).
    overwrite : bool
        Delete existing ``epoch_*.pt`` checkpoints of ``checkpoint_dir`` and start afresh.
        (Without ``resume`` or ``overwrite``, existing checkpoints raise an error.)
    device : str or torch.device
    progress : bool
        tqdm progress bars (stderr) and one summary line per epoch.
    num_workers : int
        DataLoader workers.
    num_threads : int, optional
        ``torch.set_num_threads`` for the duration of the run (restored afterwards). Small
        models train fastest with 1 thread; on a busy machine more threads than free cores
        slow training down by orders of magnitude. Does not change the results.
    title : str, optional
        Title of the curve plot.

    Returns
    -------
    TrainingHistory
        Per-epoch losses / accuracies, checkpoint paths, ``best_checkpoint``,
        ``last_checkpoint``, ``phase_checkpoints()``; ``curve_png`` / ``curve_json`` when
        ``checkpoint_dir`` is given.

    Raises
    ------
    FileExistsError
        ``checkpoint_dir`` holds checkpoints and neither ``resume`` nor ``overwrite`` is set.
    ValueError
        Bad arguments, or a checkpoint whose configuration differs from this run's (naming
        the key).
    """
    from tqdm.auto import tqdm

    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if len(train_data.dataset if isinstance(train_data, DataLoader) else train_data) == 0:
        raise ValueError("train_data is empty")
    device = torch.device(device)
    n_train = len(train_data.dataset if isinstance(train_data, DataLoader) else train_data)
    config = {
        "optimizer": optimizer, "lr": float(lr), "momentum": float(momentum),
        "weight_decay": float(weight_decay), "batch_size": int(batch_size), "seed": int(seed),
        "n_train": int(n_train), "model_class": type(model).__qualname__, "epochs": int(epochs),
        "deterministic": bool(deterministic), "device": str(device),
        "title": title or f"{type(model).__name__}: {optimizer} lr={lr:g} bs={batch_size}",
    }
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    model.to(device)
    opt = _make_optimizer(model, optimizer, lr, momentum, weight_decay)
    history = TrainingHistory(config=dict(config))
    start = 1

    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
        existing = _existing_checkpoints(ckdir)
        if existing and overwrite:
            for p in existing:
                p.unlink()
            existing = []
        if existing and not resume:
            raise FileExistsError(
                f"{ckdir} already holds checkpoints ({existing[-1].name}); pass resume=True to "
                "continue the run, overwrite=True to start afresh, or another checkpoint_dir")
        if existing and resume:
            ckpt = load_checkpoint(existing[-1], map_location=device)
            old = ckpt.get("config", {})
            for k in _RESUME_KEYS:
                if k in old and old[k] != config[k]:
                    raise ValueError(
                        f"cannot resume from {existing[-1]}: {k} was {old[k]!r}, now "
                        f"{config[k]!r} (use the same setting or overwrite=True)")
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as e:
                raise ValueError(f"cannot resume from {existing[-1]}: the model does not "
                                 f"match its weights ({e})") from e
            opt.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"], device)
            history = TrainingHistory.from_dict(ckpt["history"])
            history.config = dict(config)
            start = int(ckpt["epoch"]) + 1
    elif resume:
        raise ValueError("resume=True needs a checkpoint_dir")

    if start == 1:
        torch.manual_seed(seed)
        np.random.seed(seed % (2 ** 32))
        random.seed(seed)

    with _deterministic_mode(deterministic, device), _threads(num_threads):
        for epoch in range(start, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            loader = _train_loader(train_data, batch_size, seed, epoch, num_workers)
            total, loss_sum, correct = 0, 0.0, 0
            bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False,
                       disable=not progress, file=sys.stderr, dynamic_ncols=True)
            for batch in bar:
                x, y = _unpack(batch)
                x, y = x.to(device), y.to(device)
                out = model(x)
                loss = F.cross_entropy(out, y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"epoch {epoch}: the training loss is {float(loss.detach())}; lower the "
                        f"learning rate (lr={lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bs = int(y.numel())
                total += bs
                loss_sum += float(loss.detach()) * bs
                correct += int((out.detach().argmax(1) == y).sum())
                bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.3f}")
            bar.close()
            tr_loss, tr_acc = loss_sum / total, correct / total
            if val_data is not None:
                va_loss, va_acc = evaluate(model, val_data, batch_size=max(batch_size, 256),
                                           device=device, num_workers=num_workers)
            else:
                va_loss, va_acc = math.nan, math.nan
            history.epochs.append(epoch)
            history.train_loss.append(tr_loss)
            history.train_acc.append(tr_acc)
            history.val_loss.append(va_loss)
            history.val_acc.append(va_acc)
            history.epoch_seconds.append(time.perf_counter() - t0)
            if ckdir is not None:
                path = _ckpt_path(ckdir, epoch)
                history.checkpoints.append(str(path))
                atomic_save({
                    "format": CHECKPOINT_FORMAT, "epoch": epoch, "config": config,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(), "rng": _rng_state(device),
                    "history": history.to_dict(),
                }, path)
                history.curve_json = str(ckdir / HISTORY_FILE)
                history.save_json(history.curve_json)
            else:
                history.checkpoints.append(None)
            if progress:
                tqdm.write(f"epoch {epoch:3d}/{epochs}: train loss {tr_loss:.4f} acc "
                           f"{100 * tr_acc:5.1f}% | val loss {va_loss:.4f} acc "
                           f"{100 * va_acc:5.1f}% | {history.epoch_seconds[-1]:.1f}s",
                           file=sys.stderr)
    if ckdir is not None and history.epochs:
        history.curve_png = str(ckdir / CURVE_FILE)
        history.curve_json = str(ckdir / HISTORY_FILE)
        history.plot(history.curve_png)
        history.save_json(history.curve_json)
    model.eval()
    return history


# ----------------------------------------------------------------------------- demo model
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


# ----------------------------------------------------------------------------- CLI
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``nns train`` to ``parser`` (see :func:`run_train`)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default="digits", choices=["digits", "imagefolder", "coco", "cifar"],
                   help="digits: the embedded cluttered digits (default); imagefolder: "
                        "ImageFolder + VOC XML; coco: COCO-style JSON; cifar: local CIFAR "
                        "pickles")
    g.add_argument("--data-seed", type=int, default=0, help="cluttered digits: rendering seed")
    g.add_argument("--small-train", action="store_true",
                   help="cluttered digits: the small training split (100 samples)")
    g.add_argument("--n-train", type=int, default=None,
                   help="cluttered digits: training-subset size")
    g.add_argument("--train-dir", help="imagefolder: training root; coco: training images")
    g.add_argument("--val-dir", help="imagefolder: validation root; coco: validation images")
    g.add_argument("--train-annotations", help="coco: training JSON; imagefolder: XML folder")
    g.add_argument("--val-annotations", help="coco: validation JSON; imagefolder: XML folder")
    g.add_argument("--cifar-root", help="cifar: folder of the python pickles (val = test split)")
    g.add_argument("--box-missing", default="error", choices=["error", "whole"],
                   help="imagefolder: image without XML → error or whole-image foreground")
    g.add_argument("--resize", type=int, default=None, help="resize the shorter side")
    g.add_argument("--center-crop", type=int, default=None, help="centre crop (square)")
    g.add_argument("--upscale-to", type=int, default=None,
                   help="bicubic up-scaling to this square size (thesis §6.3.1: 224)")
    t = parser.add_argument_group("model and training")
    t.add_argument("--model", default="simple_cnn", help="zoo model name (nns models)")
    t.add_argument("--num-classes", type=int, default=None,
                   help="default: the number of classes of the data")
    t.add_argument("--in-channels", type=int, default=3)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-deterministic", action="store_true")
    t.add_argument("--checkpoint-dir", default="nns_output/train")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--num-workers", type=int, default=0)
    t.add_argument("--num-threads", type=int, default=None,
                   help="torch threads during training (1 is fastest for small models)")
    t.add_argument("--demo", action="store_true",
                   help="train (or reuse) the demo's default model; other options ignored "
                        "except --cache-dir, --device, --no-progress")
    t.add_argument("--cache-dir", default=None, help="cache root (default $NNS_CACHE_DIR "
                                                     "or ~/.cache/nns_cuda)")
    return parser


def _datasets_from_args(args: argparse.Namespace) -> Tuple[Dataset, Dataset, int]:
    from nns_cuda import data as D

    tf = None
    if args.resize or args.center_crop or args.upscale_to:
        tf = D.PairTransform(resize=args.resize, center_crop=args.center_crop,
                             upscale_to=args.upscale_to)
    if args.data == "digits":
        kw = dict(seed=args.data_seed, cache_dir=args.cache_dir, transform=tf)
        train = D.cluttered_digits("train", small_train=args.small_train, n_train=args.n_train,
                                   **kw)
        return train, D.cluttered_digits("val", **kw), 10
    if args.data == "cifar":
        if not args.cifar_root:
            raise ValueError("--data cifar needs --cifar-root")
        train = D.CifarFolder(args.cifar_root, "train", transform=tf)
        return train, D.CifarFolder(args.cifar_root, "test", transform=tf), len(train.classes)
    if not args.train_dir or not args.val_dir:
        raise ValueError(f"--data {args.data} needs --train-dir and --val-dir")
    ch = args.in_channels if args.in_channels in (1, 3) else 3
    if args.data == "imagefolder":
        train = D.ImageFolderBoxes(args.train_dir, args.train_annotations, transform=tf,
                                   channels=ch, missing=args.box_missing)
        val = D.ImageFolderBoxes(args.val_dir, args.val_annotations, transform=tf, channels=ch,
                                 missing=args.box_missing)
        return train, val, len(train.classes)
    if not args.train_annotations or not args.val_annotations:
        raise ValueError("--data coco needs --train-annotations and --val-annotations")
    train = D.CocoBoxes(args.train_dir, args.train_annotations, transform=tf, channels=ch)
    val = D.CocoBoxes(args.val_dir, args.val_annotations, transform=tf, channels=ch)
    return train, val, len(train.classes)


def run_train(args: argparse.Namespace) -> int:
    """Run ``nns train`` with parsed arguments (from :func:`add_train_arguments`).

    Prints the per-epoch table and where the checkpoints and curves are; returns 0 on
    success, 2 on bad input (the message goes to stderr).
    """
    from nns_cuda import models

    try:
        if args.demo:
            res = default_demo_model(args.cache_dir, force=args.overwrite,
                                     progress=not args.no_progress, device=args.device)
            hist = res.history
        else:
            train, val, n_cls = _datasets_from_args(args)
            x0 = train[0][0]
            model = models.build(args.model, args.num_classes or n_cls,
                                 in_channels=int(x0.shape[0]), input_size=tuple(x0.shape[-2:]),
                                 seed=args.seed)
            hist = fit(model, train, val, epochs=args.epochs, optimizer=args.optimizer,
                       lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                       batch_size=args.batch_size, seed=args.seed,
                       deterministic=not args.no_deterministic,
                       checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                       overwrite=args.overwrite, device=args.device,
                       progress=not args.no_progress, num_workers=args.num_workers,
                       num_threads=args.num_threads, title=f"{args.model} on {args.data}")
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"nns train: error: {e}", file=sys.stderr)
        return 2
    print(hist.summary())
    print(f"well-trained (best val acc): {hist.best_checkpoint}")
    print(f"over-fitted (last):          {hist.last_checkpoint}")
    for k, v in hist.phase_checkpoints().items():
        print(f"phase {k:6s}: {v}")
    print(f"curve: {hist.curve_png}  history: {hist.curve_json}")
    return 0
