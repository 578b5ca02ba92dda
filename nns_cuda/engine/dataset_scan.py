"""Data-set scans: per-neuron statistics of whole data sets, resumable and distributed.

:class:`DatasetScan` runs :class:`~nns_cuda.engine.scanner.Scanner` over every sample of a
map-style data set and reduces the results to per-neuron accumulators
(:mod:`nns_cuda.engine._scan_state`). The data set is cut into fixed blocks of
``block_size`` consecutive indices; each block's state is written to its own file as soon as
it is done, and the result is the merge of the blocks in block order. Hence

* the result is bitwise the same for any number of processes and any interruption (given the
  same per-sample computation: device type, backend and thread count),
* every sample is counted exactly once (no padding; the last block may be short),
* a rerun with ``resume=True`` skips the finished blocks (a block file whose checksum does not
  match is recomputed).

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set), :meth:`DatasetScan.run`
joins the process group (NCCL on GPUs, one GPU per local rank; gloo on CPUs), takes the blocks
``b`` with ``b % world_size == rank`` and sends the block states to rank 0 through collectives,
so no shared file system is needed; rank 0 writes the result. ``shard=(i, n)`` runs a share of
the blocks without a process group (job arrays); :func:`merge_scan` merges afterwards.

Besides reductions (sums, maxima, top-k, measures), a scan can keep *per-sample values*
(``per_sample=``: e.g. the flattened filter images the GMM analysis projects and clusters) and
the samples' labels (``labels=True``): each block stores its samples' rows with their global
sample indices, and the merge concatenates the blocks in block order, so the result holds every
sample's row in global sample order, bitwise the same for any number of processes or shards.
Under a process group the block files are gathered to rank 0 (a variable-length ``gather`` of
the blocks of each round of ``world_size`` blocks), so only rank 0 holds the assembled rows.
"""
from __future__ import annotations

import datetime
import numbers
import os
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nns_cuda._modules import model_device
from nns_cuda.engine import _scan_state as S
from nns_cuda.engine import _scan_store as F
from nns_cuda.engine._scan_store import ScanDirError
from nns_cuda.engine.dataset_result import DatasetScanResult, load_scan
from nns_cuda.engine.memory import parse_bytes

__all__ = ["DatasetScan", "DatasetScanResult", "load_scan", "merge_scan", "ScanDirError"]

#: ``measure(layer, layer_result, x, fg_mask) -> Tensor [B, *M] or None`` (None: not for this layer).
Measure = Callable[[str, Any, Tensor, Optional[Tensor]], Optional[Tensor]]


def _versions() -> Dict[str, str]:
    from nns_cuda._version import __version__

    return {"nns_cuda": __version__, "torch": torch.__version__}


# ----------------------------------------------------------------------------- data
class _Indexed(torch.utils.data.Dataset):
    """``ds[i] -> (i, item)``, so that a batch knows its samples' global indices."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return i, self.ds[i]


def _split_item(i: int, item: Any) -> Tuple[Tensor, Any, Optional[Tensor]]:
    if isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], Tensor):
        return item[0], item[1], (item[2] if len(item) == 3 else None)
    raise TypeError(f"sample {i}: a data-set item must be (x, y, fg_mask) or (x, y) with a tensor x, got "
                    f"{type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))


def _label(i: int, y: Any) -> int:
    """An integer class label (``int``, NumPy integer or a one-element integer tensor)."""
    if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point() and not y.is_complex() \
            and y.dtype != torch.bool:
        return int(y.reshape(()))
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        return int(y)
    what = f"a {y.dtype} tensor of shape {list(y.shape)}" if isinstance(y, Tensor) else repr(type(y).__name__)
    raise ValueError(f"sample {i}: labels=True keeps integer class labels y, got {what}; give integer labels, "
                     "or scan with labels=False")


class _Collate:
    """Stack items after checking each against sample 0 (the error names the sample index)."""

    def __init__(self, x_shape: Tuple[int, ...], has_mask: bool, labels: bool = False):
        self.x_shape, self.has_mask, self.labels = x_shape, has_mask, labels

    def __call__(self, batch):
        idx, xs, fgs, ys = [], [], [], []
        for i, item in batch:
            x, y, fg = _split_item(i, item)
            if self.labels:
                ys.append(_label(i, y))
            if tuple(x.shape) != self.x_shape:
                raise ValueError(f"sample {i}: x has shape {list(x.shape)}, expected {list(self.x_shape)} (the shape "
                                 "of sample 0); every sample of a scanned data set must have one shape (resize them)")
            if not x.is_floating_point() or not bool(torch.isfinite(x).all()):
                raise ValueError(f"sample {i}: x must be a finite floating-point tensor (got {x.dtype}"
                                 f"{'' if not x.is_floating_point() else ' with NaN/Inf'}); clean or drop the sample")
            if (fg is not None) != self.has_mask:
                raise ValueError(f"sample {i}: {'no' if fg is None else 'a'} foreground mask, unlike sample 0; "
                                 "a data set must give masks for all samples or for none")
            if fg is not None:
                if fg.dtype != torch.bool or tuple(fg.shape) != self.x_shape[-2:]:
                    raise ValueError(f"sample {i}: fg_mask must be bool {list(self.x_shape[-2:])}, got {fg.dtype} "
                                     f"{list(fg.shape)}")
                fgs.append(fg)
            idx.append(i)
            xs.append(x)
        return (torch.tensor(idx, dtype=torch.int64), torch.stack(xs), (torch.stack(fgs) if fgs else None),
                (torch.tensor(ys, dtype=torch.int64) if self.labels else None))


def _to_device(batches, device: torch.device) -> Iterator[Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]]:
    """Move batches to ``device`` (labels stay on the CPU); on CUDA the copy of batch i+1 runs
    on a side stream while batch i is scanned."""
    if device.type != "cuda":
        for idx, x, fg, y in batches:
            yield idx, x.to(device), (None if fg is None else fg.to(device)), y
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    prev = None
    for idx, x, fg, y in batches:
        with torch.cuda.stream(side):
            cur = (idx, x.to(device, non_blocking=True), None if fg is None else fg.to(device, non_blocking=True), y)
        if prev is not None:
            yield prev
        main.wait_stream(side)
        for t in cur[1:3]:
            if t is not None:
                t.record_stream(main)
        prev = cur
    if prev is not None:
        yield prev


# ----------------------------------------------------------------------------- processes
class _Group:
    """The process group of a run: ``rank``, ``world``; joined here when the launcher set it up."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(
                seconds=float(os.environ.get("NNS_DIST_TIMEOUT_S", "1800"))))
            self.owned = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self._store = None
        if self.active:
            try:
                self._store = dist.distributed_c10d._get_default_store()
            except Exception:  # pragma: no cover - a process group without a store
                self._store = None

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def add_samples(self, n: int) -> int:
        """Add ``n`` to the samples done by all ranks; returns the total (this rank's alone without a store)."""
        if self._store is None:
            self._local = getattr(self, "_local", 0) + n
            return self._local
        return int(self._store.add("nns_samples_done", n))

    def gather_bytes(self, payload: bytes) -> Optional[List[bytes]]:
        """Every rank's ``payload`` (any length, also empty) on rank 0, in rank order; ``None``
        on the other ranks. The lengths are all-gathered, the payloads padded to the longest and
        gathered to rank 0 (uint8 tensors; on the GPU under NCCL)."""
        dev = (torch.device("cuda", torch.cuda.current_device()) if self.dist.get_backend() == "nccl"
               else torch.device("cpu"))
        size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self.dist.all_gather(sizes, size)
        sizes_ = [int(v) for v in torch.cat(sizes).cpu()]
        longest = max(sizes_)
        if longest == 0:
            return [b""] * self.world if self.rank == 0 else None
        buf = torch.zeros(longest, dtype=torch.uint8)
        if payload:
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        buf = buf.to(dev)
        parts = [torch.empty_like(buf) for _ in range(self.world)] if self.rank == 0 else None
        self.dist.gather(buf, parts, dst=0)
        if self.rank != 0:
            return None
        return [parts[r][: sizes_[r]].cpu().numpy().tobytes() for r in range(self.world)]

    def sum(self, v: int) -> int:
        if not self.active:
            return v
        t = torch.tensor([v], dtype=torch.int64)
        if self.dist.get_backend() == "nccl":
            t = t.cuda()
        self.dist.all_reduce(t)
        return int(t.item())

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


# ----------------------------------------------------------------------------- the scan
class DatasetScan:
    """Per-neuron statistics of every requested layer over a whole data set.

    Parameters
    ----------
    model : nn.Module
        In eval mode; its device is the scan's device.
    layers : sequence of str
        Layer names as for :class:`~nns_cuda.engine.scanner.Scanner`.
    top_k : int
        Largest activations kept per neuron (with their sample indices).
    block_size : int
        Samples per block (the unit of saving, resuming and distribution). Fixed for a folder.
    batch_size : int
        Samples per scan call (a block is cut into batches of this size).
    backend, precision, max_memory : as for :class:`~nns_cuda.engine.scanner.Scanner`.
    num_workers : int
        DataLoader worker processes.
    stats : bool
        Accumulate the fused learned-image statistics (``stats_sum``).
    filter_images : bool
        Accumulate the sum of the filter images (``filter_image_sum``).
    measures : {name: measure}, optional
        Per-sample measures ``f(layer, layer_result, x, fg_mask) -> Tensor [B, *M] or None``;
        their sum, maximum and arg-max sample are accumulated (``measure/<name>/…``).
    per_sample : {name: measure}, optional
        Per-sample values, called like ``measures`` but kept row by row (any dtype, e.g. the
        flattened filter images of the GMM analysis): ``<layer>/sample/<name>/values``
        ``[N, *M]`` in global sample order and ``<layer>/sample/<name>/index`` (int64 ``[N]``),
        read with :meth:`DatasetScanResult.sample_values`. The result holds ``N`` rows, so size
        them: ``N · prod(M)`` values are written to the block files, the result and, under a
        process group, gathered on rank 0.
    labels : bool
        Keep each sample's integer label ``y`` (``sample/label/values``, int64 ``[N]``); a
        sample whose ``y`` is not an integer is refused.
    progress : bool
        One progress bar (rank 0) counting the samples of all ranks.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, top_k: int = 8, block_size: int = 256,
                 batch_size: int = 64, backend: str = "auto", precision: str = "auto",
                 max_memory: Optional[int] = None, num_workers: int = 0, stats: bool = True,
                 filter_images: bool = False, measures: Optional[Mapping[str, Measure]] = None,
                 per_sample: Optional[Mapping[str, Measure]] = None, labels: bool = False,
                 progress: bool = True):
        self.model = model
        self.layers = layers
        self.top_k = top_k
        self.block_size = block_size
        self.batch_size = batch_size
        self.backend = backend
        self.precision = precision
        self.max_memory = parse_bytes(max_memory)
        self.num_workers = num_workers
        self.stats = stats
        self.filter_images = filter_images
        self.measures = measures
        self.per_sample = per_sample
        self.labels = labels
        self.progress = progress

    # -- validation ---------------------------------------------------------------------
    def _check(self, dataset) -> Tuple[List[str], int]:
        for name in ("top_k", "block_size", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DatasetScan: {name} must be a positive integer, got {v!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"DatasetScan: num_workers must be an integer >= 0, got {self.num_workers!r}")
        layers = [self.layers] if isinstance(self.layers, str) else list(self.layers or [])
        if not layers or not all(isinstance(n, str) for n in layers):
            raise ValueError(f"DatasetScan: layers must be a non-empty list of layer names, got {self.layers!r}")
        if self.model.training:
            raise ValueError("DatasetScan: the model is in training mode; call model.eval() first")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"DatasetScan: the data set must be map-style (len() and [i]), got {type(dataset).__name__}")
        n = len(dataset)
        if n < 1:
            raise ValueError("DatasetScan: the data set is empty")
        overlap = sorted(set(self.measures or {}) & set(self.per_sample or {}))
        if overlap:
            raise ValueError(f"DatasetScan: {overlap} named both in measures and per_sample; give them distinct names")
        return layers, n

    def _scanner(self, layers):
        from nns_cuda.engine.scanner import Scanner

        return Scanner(self.model, layers, backend=self.backend, precision=self.precision,
                       max_memory=self.max_memory, stats=self.stats, filter_images=self.filter_images)

    def _identity(self, layers: List[str], dataset, n: int) -> Dict[str, Any]:
        first, last = dataset[0], dataset[n - 1]
        _split_item(0, first)
        _split_item(n - 1, last)
        options = {"top_k": self.top_k, "block_size": self.block_size, "batch_size": self.batch_size,
                   "backend": self.backend, "precision": self.precision, "stats": bool(self.stats),
                   "filter_images": bool(self.filter_images), "measures": sorted(self.measures or {})}
        if self.per_sample:  # only when used: folders of scans without them stay resumable
            options["per_sample"] = sorted(self.per_sample)
        if self.labels:
            options["labels"] = True
        return {
            "format": F.FORMAT,
            "model_hash": F.weights_hash(self.model),
            "layers": layers,
            "options": options,
            "dataset": {"length": n, "first": F.item_fingerprint(first), "last": F.item_fingerprint(last)},
            "samples": n,
            "n_blocks": -(-n // self.block_size),
            "versions": _versions(),
        }

    # -- the run ------------------------------------------------------------------------
    def run(self, dataset, out_dir: str, resume: bool = True,
            shard: Optional[Tuple[int, int]] = None) -> Optional[DatasetScanResult]:
        """Scan ``dataset`` into ``out_dir``.

        Parameters
        ----------
        dataset : map-style data set of ``(x, y, fg_mask)`` or ``(x, y)`` items
            ``x`` ``[D, H, W]`` float, ``fg_mask`` ``[H, W]`` bool (without masks the whole
            image is the foreground of the statistics).
        out_dir : str
            Folder of the manifest, block files and result (created if missing).
        resume : bool
            Continue a scan found in ``out_dir`` (finished blocks are skipped). With ``False``
            a folder that already holds a scan is refused.
        shard : (i, n), optional
            Run only the blocks ``b`` with ``b % n == i``, without a process group.

        Returns
        -------
        DatasetScanResult or None
            The merged result (on rank 0; ``None`` on other ranks, and for a shard while other
            shards' blocks are missing).

        Raises
        ------
        ScanDirError
            ``out_dir`` holds a scan of another model, layers, options or data set, holds a
            scan and ``resume`` is False, or cannot be written.
        """
        layers, n = self._check(dataset)
        if shard is not None:
            i, k = shard
            if not (isinstance(i, int) and isinstance(k, int) and 0 <= i < k):
                raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
        device = model_device(self.model)
        ident = self._identity(layers, dataset, n)
        x0, _, fg0 = _split_item(0, dataset[0])
        self._validate_layers(layers, x0, device)
        group = _Group(device)
        try:
            if shard is not None and group.active:
                raise ValueError("shard= runs without a process group; under torchrun the blocks are shared "
                                 "among the ranks already")
            rank, world = (shard if shard is not None else (group.rank, group.world))
            if group.rank == 0:
                self._prepare_dir(out_dir, ident, resume, shared=shard is not None)
            group.barrier()
            if group.rank != 0:
                self._prepare_dir(out_dir, ident, True, shared=True)
            mine = [b for b in range(ident["n_blocks"]) if b % world == rank]
            todo, skipped = self._pending(out_dir, mine)
            self._scan_blocks(dataset, n, layers, x0, fg0, out_dir, todo, skipped, group, device)
            done_here = group.sum(len(todo))
            skipped_all = group.sum(len(mine) - len(todo))
            if group.active:
                state = self._collect(out_dir, ident["n_blocks"], group)
                result = None
                if group.rank == 0:
                    result = _write_result(out_dir, state, ident)
                state = None
                group.barrier()
            elif shard is not None:
                m = F.read_manifest(out_dir)
                result = merge_scan(out_dir) if len(m["blocks_done"]) == ident["n_blocks"] else None
            else:
                result = merge_scan(out_dir)
            if result is not None:
                result.blocks_computed, result.blocks_skipped = done_here, skipped_all
            return result
        finally:
            group.close()

    def _validate_layers(self, layers: List[str], x0: Tensor, device: torch.device) -> None:
        from nns_cuda.engine.graph import build_graph

        graph = build_graph(self.model, x0.unsqueeze(0).to(device), None)
        for name in layers:
            graph.resolve(name)

    def _prepare_dir(self, out_dir: str, ident: Dict[str, Any], resume: bool, shared: bool) -> None:
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ScanDirError(f"{out_dir} exists and is not a folder; choose another output folder")
        try:
            os.makedirs(os.path.join(out_dir, "blocks"), exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ScanDirError(f"cannot write to {out_dir} ({type(e).__name__}: {e.strerror or e}); choose a "
                               "writable output folder") from None
        found = F.read_manifest(out_dir)
        if found is not None:
            F.check_compatible(found, ident, out_dir)
            if not resume and not shared:
                raise ScanDirError(f"{out_dir} already holds a scan ({len(found.get('blocks_done', []))} of "
                                   f"{ident['n_blocks']} blocks done); pass resume=True (--resume) to continue it, "
                                   "or choose a new folder")
        F.update_manifest(out_dir, ident)

    def _pending(self, out_dir: str, mine: List[int]) -> Tuple[List[int], int]:
        m = F.read_manifest(out_dir) or {}
        recorded = {int(b): h for b, h in m.get("blocks", {}).items()}
        todo, bad = [], []
        for b in mine:
            path = F.block_path(out_dir, b)
            if b in recorded and os.path.exists(path) and F.sha256_file(path) == recorded[b]:
                continue
            if b in recorded:
                bad.append(b)
            todo.append(b)
        if bad:
            warnings.warn(f"{out_dir}: block file(s) {bad[:10]} are missing or do not match their checksum; "
                          "recomputing them", RuntimeWarning, stacklevel=3)
            F.update_manifest(out_dir, {}, forget=tuple(bad))
        return todo, len(mine) - len(todo)

    def _scan_blocks(self, dataset, n, layers, x0, fg0, out_dir, todo, skipped, group, device) -> None:
        from torch.utils.data import DataLoader

        if not todo:
            group.add_samples(0)
            return
        bs = self.block_size
        batches: List[List[int]] = []
        for b in todo:
            idx = list(range(b * bs, min((b + 1) * bs, n)))
            batches += [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        loader = DataLoader(_Indexed(dataset), batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=_Collate(tuple(x0.shape), fg0 is not None, bool(self.labels)),
                            pin_memory=device.type == "cuda")
        scanner = self._scanner(layers)
        m = F.read_manifest(out_dir) or {}
        initial = sum(min(bs, n - int(b) * bs) for b in m.get("blocks_done", []))
        bar = self._bar(n, group, initial)
        block, state = None, S.Merger()
        for idx, x, fg, y in _to_device(loader, device):
            b = int(idx[0]) // bs
            if block is not None and b != block:
                self._finish_block(out_dir, block, state.result())
                state = S.Merger()
            block = b
            state.add(self._batch_state(scanner, layers, idx, x, fg, y))
            total = group.add_samples(x.shape[0])
            if bar is not None:
                bar.n = min(n, total + initial)
                bar.refresh()
        self._finish_block(out_dir, block, state.result())
        if bar is not None:
            bar.close()

    def _bar(self, n: int, group: _Group, initial: int):
        if not self.progress or group.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=n, initial=initial, desc="scan", unit="sample", dynamic_ncols=True)

    def _batch_state(self, scanner, layers, idx: Tensor, x: Tensor, fg: Optional[Tensor],
                     y: Optional[Tensor] = None) -> S.State:
        res = scanner.scan(x, fg)
        out: S.State = {}
        first = int(idx[0])
        for name in layers:
            lr = res[name]
            meas, rows = {}, {}
            for fns, dst in ((self.measures, meas), (self.per_sample, rows)):
                for m_name, fn in (fns or {}).items():
                    v = fn(name, lr, x, fg)
                    if v is not None:
                        dst[m_name] = v
            out.update(S.batch_state(name, first, lr.activations, top_k=self.top_k,
                                     stats=lr.stats if self.stats else None,
                                     filter_images=lr.filter_images if self.filter_images else None,
                                     measures=meas, per_sample=rows))
        if y is not None:
            out.update(S.sample_entries(S.LABELS, first, y))
        return out

    def _finish_block(self, out_dir: str, block: int, state: S.State) -> None:
        digest = F.write_state(F.block_path(out_dir, block), state, {"block": str(block)})
        F.update_manifest(out_dir, {}, blocks={block: digest})

    def _collect(self, out_dir: str, n_blocks: int, group: _Group) -> Optional[S.State]:
        """Gather every block's state to rank 0 and merge there in block order (``None`` on the
        other ranks). Round ``r`` gathers blocks ``r·world … r·world + world − 1`` (block
        ``r·world + rank`` is this rank's; past the last block a rank sends nothing), each block
        file's bytes as they are, variable in length (per-sample rows make blocks differ)."""
        merger = S.Merger()
        world = group.world
        for r in range(-(-n_blocks // world)):
            b = r * world + group.rank
            payload = b""
            if b < n_blocks:
                with open(F.block_path(out_dir, b), "rb") as fh:
                    payload = fh.read()
            got = group.gather_bytes(payload)
            if group.rank == 0:
                for owner, data in enumerate(got):
                    if r * world + owner < n_blocks:
                        merger.add(F.state_from_bytes(data))
        return merger.result() if group.rank == 0 else None


def _write_result(out_dir: str, state: S.State, ident: Mapping[str, Any]) -> DatasetScanResult:
    n = int(ident["samples"])
    for key in S.sample_keys(state):
        idx = state[key[: -len("values")] + "index"]
        if idx.numel() != n or not torch.equal(idx, torch.arange(n, dtype=torch.int64)):
            raise ScanDirError(f"{out_dir}: the per-sample rows {key!r} are not one per sample in order ({idx.numel()} "
                               f"rows for {n} samples); remove the folder and scan again")
    digest = F.write_state(os.path.join(out_dir, F.RESULT), state, {"format": F.FORMAT})
    F.update_manifest(out_dir, ident, fields={"result_sha256": digest})
    return load_scan(out_dir)


def merge_scan(out_dir: str) -> DatasetScanResult:
    """Merge the block files of ``out_dir`` (in block order) into ``result.safetensors``.

    Raises
    ------
    ScanDirError
        No scan in ``out_dir``, blocks missing, or a block file that does not match its checksum.
    """
    m = F.read_manifest(out_dir)
    if m is None:
        raise ScanDirError(f"{out_dir} holds no data-set scan (no {F.MANIFEST}); run `nns scan-dataset` first")
    n_blocks = int(m["n_blocks"])
    recorded = {int(b): h for b, h in m.get("blocks", {}).items()}
    missing = [b for b in range(n_blocks) if b not in recorded]
    if missing:
        raise ScanDirError(f"{out_dir}: {len(missing)} of {n_blocks} blocks are not done (first: {missing[:10]}); "
                           "run the missing shards, or rerun with --resume")
    merger = S.Merger()
    for b in range(n_blocks):
        path = F.block_path(out_dir, b)
        if not os.path.exists(path) or F.sha256_file(path) != recorded[b]:
            raise ScanDirError(f"{path} is missing or does not match its checksum; rerun the scan with --resume "
                               "to recompute it")
        merger.add(F.read_state(path))
    return _write_result(out_dir, merger.result(), m)
