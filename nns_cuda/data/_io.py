"""Small I/O helpers shared by the data package and training: cache directory, atomic saves."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from nns_cuda._files import PathLike, atomic_write, atomic_write_bytes

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


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (see :func:`nns_cuda._files.atomic_write`)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))
