"""Small I/O helpers shared by the data package and training: cache directory, atomic saves."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["default_cache_dir", "atomic_save", "atomic_write_bytes"]


def default_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """Resolve the user cache directory.

    Parameters
    ----------
    cache_dir : path, optional
        Explicit directory; wins over everything.

    Returns
    -------
    Path
        ``cache_dir``, else ``$NNS_CACHE_DIR``, else ``$XDG_CACHE_HOME/nns_cuda``, else
        ``~/.cache/nns_cuda``. Not created here.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("NNS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "nns_cuda"
    return Path.home() / ".cache" / "nns_cuda"


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder + rename).

    A reader never sees a half-written file, and a crash leaves either the old file or the
    new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
