"""The result of a data-set scan, read back from its folder (safetensors + JSON only)."""
from __future__ import annotations

import csv
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from nns_cuda.engine import _scan_store as F
from nns_cuda.engine._scan_state import LABELS
from nns_cuda.engine._scan_store import ScanDirError
from nns_cuda.ops.reference.stats import STAT_NAMES

__all__ = ["DatasetScanResult", "load_scan"]


class DatasetScanResult:
    """Per-neuron accumulators of a data-set scan.

    Attributes
    ----------
    out_dir : str
    manifest : dict
        ``samples``, ``layers``, ``options``, ``blocks_done``, ``model_hash``, ``versions`` …
    tensors : {str: Tensor}
        Every accumulator, named ``"<layer>/<field>"`` (see the README's file layout).
    blocks_computed, blocks_skipped : int or None
        For a result returned by :meth:`DatasetScan.run`: blocks this run computed / found done.
    """

    def __init__(self, out_dir: str, manifest: Mapping[str, Any], tensors: Mapping[str, Tensor]):
        self.out_dir = out_dir
        self.manifest = dict(manifest)
        self.tensors = dict(tensors)
        self.blocks_computed: Optional[int] = None
        self.blocks_skipped: Optional[int] = None

    @property
    def layers(self) -> List[str]:
        return list(self.manifest["layers"])

    @property
    def samples(self) -> int:
        return int(self.manifest["samples"])

    def __repr__(self) -> str:
        shapes = {L: list(self.tensors[f"{L}/act_sum"].shape) for L in self.layers}
        return f"DatasetScanResult({self.out_dir!r}, samples={self.samples}, layers={shapes})"

    def get(self, layer: str, field: str) -> Tensor:
        """One accumulator, e.g. ``get("features.relu3", "act_max")``."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer!r} was not scanned; scanned: {self.layers}")
        key = f"{layer}/{field}"
        if key not in self.tensors:
            have = sorted(k[len(layer) + 1:] for k in self.tensors if k.startswith(layer + "/"))
            raise KeyError(f"no accumulator {field!r} for layer {layer!r}; it has {have}")
        return self.tensors[key]

    def count(self, layer: str) -> int:
        return int(self.get(layer, "count"))

    def mean_activation(self, layer: str) -> Tensor:
        """Mean activation per neuron (float64, the neuron shape)."""
        return self.get(layer, "act_sum") / self.count(layer)

    def std_activation(self, layer: str) -> Tensor:
        """Population standard deviation of the activation per neuron (float64)."""
        m = self.mean_activation(layer)
        return (self.get(layer, "act_sq_sum") / self.count(layer) - m * m).clamp_min(0).sqrt()

    def active_fraction(self, layer: str) -> Tensor:
        """Fraction of samples where the neuron's activation is > 0."""
        return self.get(layer, "act_pos_count").to(torch.float64) / self.count(layer)

    def mean_stats(self, layer: str) -> Tensor:
        """Mean of the fused statistics per neuron: neuron shape + ``[n_stats]`` (order of ``STAT_NAMES``)."""
        return self.get(layer, "stats_sum") / self.count(layer)

    def mean_stat(self, layer: str, name: str) -> Tensor:
        """Mean of one fused statistic per neuron (``name`` in ``STAT_NAMES``)."""
        if name not in STAT_NAMES:
            raise KeyError(f"unknown statistic {name!r}; known: {list(STAT_NAMES)}")
        return self.mean_stats(layer)[..., STAT_NAMES.index(name)]

    def mean_filter_images(self, layer: str) -> Tensor:
        """Mean filter learned image per filter: ``[C, D, H, W]`` (needs ``filter_images=True``)."""
        return self.get(layer, "filter_image_sum") / self.count(layer)

    def measure_mean(self, layer: str, measure: str) -> Tensor:
        return self.get(layer, f"measure/{measure}/sum") / self.count(layer)

    def measure_max(self, layer: str, measure: str) -> Tensor:
        return self.get(layer, f"measure/{measure}/max")

    def measure_argmax(self, layer: str, measure: str) -> Tensor:
        return self.get(layer, f"measure/{measure}/argmax")

    def sample_values(self, layer: str, name: str) -> Tensor:
        """The per-sample value ``name`` (``per_sample=``) of every sample: ``[N, *M]``, row ``i``
        from sample ``i`` (global order), bitwise as computed."""
        return self.get(layer, f"sample/{name}/values")

    def sample_index(self, layer: str, name: str) -> Tensor:
        """The global sample index of each row of :meth:`sample_values` (int64 ``[N]``: ``0 … N−1``)."""
        return self.get(layer, f"sample/{name}/index")

    @property
    def has_labels(self) -> bool:
        """Whether the scan kept the samples' labels (``labels=True``)."""
        return f"{LABELS}/values" in self.tensors

    def labels(self) -> Tensor:
        """The samples' integer labels ``y`` in global sample order (int64 ``[N]``; ``labels=True``)."""
        if not self.has_labels:
            raise KeyError(f"{self.out_dir}: the scan kept no labels; scan with labels=True")
        return self.tensors[f"{LABELS}/values"]

    def summary(self) -> List[Dict[str, Any]]:
        """One row per layer: neurons, samples, mean activation, active fraction, largest activation."""
        rows = []
        for L in self.layers:
            m = self.mean_activation(L)
            rows.append({"layer": L, "neurons": m.numel(), "shape": list(m.shape), "samples": self.count(L),
                         "mean_activation": float(m.mean()), "active_fraction": float(self.active_fraction(L).mean()),
                         "max_activation": float(self.get(L, "act_max").max())})
        return rows

    def write_neuron_csv(self, layer: str, path: str) -> str:
        """Write one row per neuron of ``layer``: index, mean, std, active fraction, max, arg-max
        sample, and the mean of each fused statistic when present."""
        mean = self.mean_activation(layer).reshape(-1)
        std = self.std_activation(layer).reshape(-1)
        frac = self.active_fraction(layer).reshape(-1)
        mx = self.get(layer, "act_max").reshape(-1)
        arg = self.get(layer, "act_argmax").reshape(-1)
        shape = list(self.get(layer, "act_sum").shape)
        stats = self.mean_stats(layer).reshape(mean.numel(), -1) if f"{layer}/stats_sum" in self.tensors else None
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["neuron", "mean", "std", "active_fraction", "max", "argmax_sample"]
                       + ([f"mean_{s}" for s in STAT_NAMES] if stats is not None else []))
            for i in range(mean.numel()):
                idx = list(_unravel(i, shape))
                w.writerow([":".join(map(str, idx)), f"{mean[i]:.9g}", f"{std[i]:.9g}", f"{frac[i]:.6g}",
                            f"{mx[i]:.9g}", int(arg[i])] + ([f"{v:.9g}" for v in stats[i].tolist()]
                                                            if stats is not None else []))
        return path


def _unravel(i: int, shape: List[int]):
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return reversed(out)


def load_scan(out_dir: str) -> DatasetScanResult:
    """Open the result of a finished data-set scan (never unpickles: safetensors and JSON only).

    Raises
    ------
    ScanDirError
        No scan in ``out_dir``, or no merged result yet, or a result that does not match the
        checksum recorded in the manifest.
    """
    m = F.read_manifest(out_dir)
    if m is None:
        raise ScanDirError(f"{out_dir} holds no data-set scan (no {F.MANIFEST})")
    path = os.path.join(out_dir, F.RESULT)
    if not os.path.exists(path):
        raise ScanDirError(f"{out_dir} has no {F.RESULT} yet ({len(m.get('blocks_done', []))} of {m['n_blocks']} "
                           "blocks done); finish the scan with --resume, or run `nns merge` after all shards")
    if m.get("result_sha256") and F.sha256_file(path) != m["result_sha256"]:
        raise ScanDirError(f"{path} does not match the checksum in the manifest; run `nns merge {out_dir}` again")
    return DatasetScanResult(out_dir, m, F.read_state(path))
