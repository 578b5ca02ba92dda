"""The training loop: ``fit`` with per-epoch checkpoints, ``evaluate``, ``load_checkpoint``.

Reproducibility: ``fit`` seeds ``torch``, ``numpy`` and ``random`` with ``seed``; the
training order of epoch ``e`` is a permutation drawn from a generator seeded by
``(seed, e)``; the global RNG states are saved in each checkpoint and restored on resume. So
two runs with the same seed give identical weights, and "train 2 epochs" equals "train 1
epoch, then resume for 1 more" bit for bit (on the CPU; on CUDA as far as deterministic
kernels allow, see ``deterministic``).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from nns_cuda.data._io import atomic_save
from nns_cuda.train.history import PathLike, TrainingHistory

__all__ = ["fit", "evaluate", "load_checkpoint", "CHECKPOINT_FORMAT", "HISTORY_FILE",
           "CURVE_FILE"]

CHECKPOINT_FORMAT = "nns_cuda.checkpoint/1"
HISTORY_FILE = "history.json"
CURVE_FILE = "curve.png"
_CKPT_PREFIX = "epoch_"
#: Configuration keys that must agree between a checkpoint and the run that resumes it.
_RESUME_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "seed",
                "n_train", "model_class")


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
        raise ValueError(f"cannot read checkpoint {path}: not a file written by torch.save, or it is "
                         f"damaged ({type(e).__name__}); delete it and resume from the one before") from e
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
