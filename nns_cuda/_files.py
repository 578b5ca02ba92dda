"""Files shared by every layer: atomic writes (data cache, checkpoints, data-set scans,
results: a reader never sees a half-written file, and a crash leaves either the old file or the
new one), and telling a ``torch.save`` archive from other files for the messages about files
that do not load."""
from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["PathLike", "atomic_write", "atomic_write_bytes", "is_torch_archive"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fh)`` on a temporary file in ``path``'s folder, sync it, rename it to ``path``.

    Parameters
    ----------
    path : path
        Destination; its folder is created if missing.
    write : callable
        Writes the content to the binary file handle it is given.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data))


def is_torch_archive(path: PathLike) -> bool:
    """Whether ``path`` is a zip archive as ``torch.save`` writes it (with a ``data.pkl`` record)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
