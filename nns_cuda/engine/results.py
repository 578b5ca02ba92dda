"""What a scan returns: :class:`LayerResult` per layer, :class:`ScanResult` for the scan."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch

from nns_cuda.ops.reference.stats import NUM_STATS, STAT_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from nns_cuda.engine.plan import Plan

__all__ = ["LayerResult", "ScanResult", "concat_batches", "empty_layer_result"]


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
        Fused per-neuron statistics of the learned images, last axis in ``STAT_NAMES`` order;
        read one by name with :meth:`stat`.
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
        """One statistic of every neuron's learned image ``LI`` by name (docs/spec.md §2–§3).

        Sums run over the image entries ``t`` (all ``D·H·W``), ``F`` / ``B`` are the foreground
        and background of the mask given to ``scan`` (no mask: all foreground), and
        ``nz(t) = [LI(t) ≠ 0]``:

        ====================  =====================================
        ``"nz_fg"``           ``Σ_{t∈F} nz(t)`` (active foreground entries)
        ``"nz_bg"``           ``Σ_{t∈B} nz(t)``
        ``"abs_sum"``         ``Σ_t |LI(t)|`` (strength)
        ``"sum"``             ``Σ_t LI(t)``
        ``"sq_sum"``          ``Σ_t LI(t)²``
        ``"x_dot"``           ``Σ_t x(t)·LI(t)``
        ``"fg_sum"``          ``Σ_{t∈F} LI(t)``
        ``"fg_sq_sum"``       ``Σ_{t∈F} LI(t)²``
        ``"fg_xnz_sum"``      ``Σ_{t∈F} x(t)·nz(t)``
        ``"fg_xnz_sq_sum"``   ``Σ_{t∈F} (x(t)·nz(t))²``
        ``"fg_x_dot"``        ``Σ_{t∈F} x(t)·LI(t)``
        ====================  =====================================

        Parameters
        ----------
        name : str
            One of ``STAT_NAMES`` (``nns_cuda.ops.reference.stats.STAT_NAMES``), listed above.

        Returns
        -------
        Tensor [B, *shape]

        Raises
        ------
        ValueError
            The layer was scanned with ``stats=False``.
        KeyError
            An unknown name (the message lists the known ones).
        """
        if self.stats is None:
            raise ValueError(f"layer {self.name!r} was scanned without stats; pass stats=True to Scanner")
        if name not in STAT_NAMES:
            raise KeyError(f"unknown statistic {name!r}; known: {list(STAT_NAMES)}")
        return self.stats[..., STAT_NAMES.index(name)]

    def __repr__(self) -> str:
        parts = [f"{self.name!r}", f"shape={_shape(self.activations)[1:]}", f"batch={_batch(self.activations)}"]
        parts += [f"{a}={_shape(getattr(self, a))}" for a in ("stats", "filter_images", "images")
                  if getattr(self, a) is not None]
        parts += [f"{a}={getattr(self, a)!r}" for a in ("backend", "strategy", "precision", "conv_algorithm")
                  if getattr(self, a)]
        return f"LayerResult({', '.join(parts)})"


@dataclass
class ScanResult:
    """Per-layer results of :meth:`Scanner.scan <nns_cuda.engine.scanner.Scanner.scan>`
    (mapping-like: ``result[layer]``).

    Attributes
    ----------
    layers : dict of str to LayerResult
    backend : str
        ``"reference"``, ``"cpu"``, ``"cuda"`` (the forward layers' backend); ``"autograd"``
        when every layer ran the reverse strategy (each :class:`LayerResult` names its own).
    strategy : str
        ``"forward"`` or ``"reverse"`` when every layer ran that strategy, ``"mixed"`` when the
        plan split them (each :class:`LayerResult` names its own).
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
    plan : Plan or None
        The per-layer plan that ran (:class:`~nns_cuda.engine.plan.Plan`: each layer's
        strategy, predicted time share and memory, the cut, the row bands); ``print`` it for a
        table.
    """

    layers: Dict[str, LayerResult]
    backend: str
    strategy: str
    input_shape: Tuple[int, ...] = ()
    logits: Optional[torch.Tensor] = None
    precision: str = ""
    conv_algorithm: str = ""
    conv_algorithms: Dict[str, str] = field(default_factory=dict)
    plan: Optional["Plan"] = None

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

    def __repr__(self) -> str:
        head = [f"{len(self.layers)} layer(s)", f"backend={self.backend!r}", f"strategy={self.strategy!r}"]
        head += [f"{a}={getattr(self, a)!r}" for a in ("precision", "conv_algorithm") if getattr(self, a)]
        head.append(f"input_shape={list(self.input_shape)}")
        lines = []
        for name, lr in self.layers.items():
            extra = "".join(f", {a} {_shape(getattr(lr, a))}" for a in ("stats", "filter_images", "images")
                            if getattr(lr, a) is not None)
            lines.append(f"  {name!r}: activations {_shape(lr.activations)}{extra}")
        return f"ScanResult({', '.join(head)}" + ("".join("\n" + ln for ln in lines) + "\n)" if lines else ")")


def _shape(t: Optional[torch.Tensor]):
    return None if t is None else list(t.shape)


def _batch(t: Optional[torch.Tensor]):
    return None if t is None or t.dim() == 0 else int(t.shape[0])


def empty_layer_result(name: str, shape: Tuple[int, ...], input_shape: Tuple[int, ...], dtype: torch.dtype,
                       out_dtype: torch.dtype, device: torch.device, *, stats: bool, filter_images: bool,
                       images: bool, backend: str, strategy: str, precision: str,
                       conv_algorithm: str) -> LayerResult:
    """The result of a layer on an empty batch: every requested tensor with batch size 0.

    Parameters
    ----------
    name : str
    shape : tuple of int
        The layer's output shape without the batch.
    input_shape : tuple of int
        The model input's shape without the batch.
    dtype, out_dtype : torch.dtype
        Of the activations and gates; of statistics, filter images and images.
    device : torch.device
    stats, filter_images, images : bool
        Which results were asked for.
    backend, strategy, precision, conv_algorithm : str

    Returns
    -------
    LayerResult

    Raises
    ------
    ValueError
        Filter images of a layer without channels (as a non-empty batch would).
    """
    if filter_images and len(shape) not in (1, 3):
        raise ValueError(f"filter images need a layer with channels ([C, H, W] or [N]); {name!r} has shape "
                         f"{list(shape)}")
    act = torch.zeros(0, *shape, dtype=dtype, device=device)
    return LayerResult(
        name, act, act.clone(),
        torch.zeros(0, *shape, NUM_STATS, dtype=out_dtype, device=device) if stats else None,
        torch.zeros(0, shape[0], *input_shape, dtype=out_dtype, device=device) if filter_images else None,
        torch.zeros(0, *shape, *input_shape, dtype=out_dtype, device=device) if images else None,
        backend, strategy, precision, conv_algorithm)


def concat_batches(parts: List[LayerResult]) -> LayerResult:
    """One layer's results of consecutive batch chunks joined along the batch dimension."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(attr: str) -> Optional[torch.Tensor]:
        return None if getattr(first, attr) is None else torch.cat([getattr(p, attr) for p in parts])

    return LayerResult(first.name, cat("activations"), cat("gates"), cat("stats"), cat("filter_images"),
                       cat("images"), first.backend, first.strategy, first.precision, first.conv_algorithm)
