"""What a scan returns: :class:`LayerResult` per layer, :class:`ScanResult` for the scan."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from nns_cuda.ops.reference.stats import STAT_NAMES

__all__ = ["LayerResult", "ScanResult", "concat_batches"]


@dataclass
class LayerResult:
    """What a scan produced for one layer.

    Attributes
    ----------
    name : str
        The layer's address.
    activations : Tensor [B, *shape]
        The layer's output values.
    gates : Tensor [B, *shape]
        ``g_n`` (docs/spec.md §1): ReLU gate / LeakyReLU slope, or 1.
    stats : Tensor [B, *shape, NUM_STATS] or None
        Fused per-neuron statistics (``STAT_NAMES`` order).
    filter_images : Tensor [B, C, *image] or None
        ``L^k`` (docs/spec.md §1), for layers with channels.
    images : Tensor [B, *shape, *image] or None
        Dense learned images (``keep_images=True``).
    backend, strategy, precision, conv_algorithm : str
        What ran (see :class:`ScanResult`).
    """

    name: str
    activations: torch.Tensor
    gates: torch.Tensor
    stats: Optional[torch.Tensor] = None
    filter_images: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None
    backend: str = ""
    strategy: str = ""
    precision: str = ""
    conv_algorithm: str = ""

    def stat(self, name: str) -> torch.Tensor:
        """One statistic by name (see ``nns_cuda.ops.reference.stats.STAT_NAMES``): Tensor [B, *shape]."""
        if self.stats is None:
            raise ValueError(f"layer {self.name!r} was scanned without stats; pass stats=True to Scanner")
        if name not in STAT_NAMES:
            raise KeyError(f"unknown statistic {name!r}; known: {list(STAT_NAMES)}")
        return self.stats[..., STAT_NAMES.index(name)]


@dataclass
class ScanResult:
    """Per-layer results of :meth:`Scanner.scan <nns_cuda.engine.scanner.Scanner.scan>`
    (mapping-like: ``result[layer]``).

    Attributes
    ----------
    layers : dict of str to LayerResult
    backend : str
        ``"reference"``, ``"cpu"``, ``"cuda"``; ``"autograd"`` for the reverse strategy.
    strategy : str
        ``"forward"`` or ``"reverse"``.
    input_shape : tuple of int
        The input's shape without the batch dimension.
    logits : Tensor or None
    precision : str
        The resolved precision (``"fp32"``, ``"fp64"``, ``"tf32"``, ``"bf16"``, ``"fp16"``;
        ``"auto"`` resolves to the input's dtype).
    conv_algorithm : str
        The resolved option (``"direct"``, ``"gemm"``, ``"gather"``, ``"implicit"``),
        ``"autograd"`` for the reverse strategy.
    conv_algorithms : dict of str to str
        For every convolution the forward strategy ran, the op it used (``"direct"``,
        ``"gemm"``, ``"gather"``, ``"implicit"``).
    """

    layers: Dict[str, LayerResult]
    backend: str
    strategy: str
    input_shape: Tuple[int, ...] = ()
    logits: Optional[torch.Tensor] = None
    precision: str = ""
    conv_algorithm: str = ""
    conv_algorithms: Dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerResult:
        if name not in self.layers:
            raise KeyError(f"layer {name!r} was not scanned; scanned: {list(self.layers)}")
        return self.layers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __iter__(self):
        return iter(self.layers)

    def items(self):
        return self.layers.items()


def concat_batches(parts: List[LayerResult]) -> LayerResult:
    """One layer's results of consecutive batch chunks joined along the batch dimension."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(attr: str) -> Optional[torch.Tensor]:
        return None if getattr(first, attr) is None else torch.cat([getattr(p, attr) for p in parts])

    return LayerResult(first.name, cat("activations"), cat("gates"), cat("stats"), cat("filter_images"),
                       cat("images"), first.backend, first.strategy, first.precision, first.conv_algorithm)
