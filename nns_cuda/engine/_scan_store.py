"""Files of a data-set scan: the manifest, block states, the merged result.

Layout of ``out_dir``::

    manifest.json                 what was scanned (model hash, layers, options, data set,
                                  versions) and the finished blocks with their checksums
    blocks/block_<b>.safetensors  the state of block ``b`` (samples ``b·block_size`` …)
    result.safetensors            the merge of all blocks, in block order

Every file is written to a temporary name and renamed, so a reader never sees half a file;
the manifest is updated under an exclusive lock so that several processes sharing the folder
can record their blocks. Nothing is ever unpickled: states are safetensors, the manifest JSON.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from nns_cuda._files import atomic_write_bytes

__all__ = ["MANIFEST", "RESULT", "FORMAT", "ScanDirError", "block_path", "write_atomic", "sha256_file",
           "weights_hash", "item_fingerprint", "read_manifest", "update_manifest", "write_state", "read_state",
           "state_to_bytes", "state_from_bytes", "check_compatible"]

MANIFEST = "manifest.json"
RESULT = "result.safetensors"
FORMAT = "nns_cuda.dataset_scan/1"


class ScanDirError(ValueError):
    """An output folder that cannot be used for this scan (made for another one, unreadable, …)."""


def block_path(out_dir: str, block: int) -> str:
    return os.path.join(out_dir, "blocks", f"block_{block:06d}.safetensors")


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    atomic_write_bytes(data, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and values, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def item_fingerprint(item: Any) -> str:
    """sha256 of a data-set item's tensors / numbers (types, shapes and values)."""
    h = hashlib.sha256()
    parts = item if isinstance(item, (tuple, list)) else (item,)
    for p in parts:
        if isinstance(p, Tensor):
            h.update(f"T{p.dtype}{list(p.shape)}".encode())
            h.update(_tensor_bytes(p))
        else:
            h.update(repr(p).encode())
    return h.hexdigest()


def state_to_bytes(state: Mapping[str, Tensor], meta: Optional[Dict[str, str]] = None) -> bytes:
    return save({k: v.contiguous() for k, v in state.items()}, metadata=meta or {})


def state_from_bytes(data: bytes) -> Dict[str, Tensor]:
    from safetensors.torch import load

    return load(data)


def write_state(path: str, state: Mapping[str, Tensor], meta: Optional[Dict[str, str]] = None) -> str:
    """Write a state atomically; returns the file's sha256."""
    data = state_to_bytes(state, meta)
    write_atomic(path, data)
    return sha256_bytes(data)


def read_state(path: str) -> Dict[str, Tensor]:
    return load_file(path)


@contextlib.contextmanager
def _locked(out_dir: str) -> Iterator[None]:
    with open(os.path.join(out_dir, ".manifest.lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_manifest(out_dir: str) -> Optional[Dict[str, Any]]:
    """The manifest of ``out_dir``, or ``None`` when there is none."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ScanDirError(f"{path} is not a readable manifest ({type(e).__name__}: {e}); remove the folder or "
                           "choose another --out") from None
    if m.get("format") != FORMAT:
        raise ScanDirError(f"{path} is not a data-set scan manifest of this version (format {m.get('format')!r}, "
                           f"expected {FORMAT!r}); choose another output folder")
    return m


def update_manifest(out_dir: str, base: Mapping[str, Any], blocks: Mapping[int, str] = (),
                    forget: Tuple[int, ...] = (), fields: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Record finished blocks (``{block: sha256}``), drop ``forget``, set ``fields``; create the
    manifest from ``base`` when there is none. Returns the manifest as written."""
    with _locked(out_dir):
        m = read_manifest(out_dir) or dict(base, blocks={})
        m.update(fields or {})
        if forget:
            m.pop("result_sha256", None)
        done = {int(k): v for k, v in m.get("blocks", {}).items()}
        for b in forget:
            done.pop(int(b), None)
        done.update({int(k): v for k, v in dict(blocks).items()})
        m["blocks"] = {str(k): done[k] for k in sorted(done)}
        m["blocks_done"] = sorted(done)
        write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(m, indent=1, sort_keys=True).encode())
        return m


_IDENTITY = ("model_hash", "layers", "options", "dataset")


def check_compatible(found: Mapping[str, Any], want: Mapping[str, Any], out_dir: str) -> None:
    """Refuse to continue a scan in a folder made for another model, layers, options or data."""
    for key in _IDENTITY:
        if found.get(key) != want.get(key):
            a, b = found.get(key), want.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                what = "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in diff)
            else:
                what = f"{a!r} there, {b!r} now"
            raise ScanDirError(f"{out_dir} holds a scan of another {key.replace('_', ' ')} ({what}); use a new "
                               "output folder, or remove this one to start over")
