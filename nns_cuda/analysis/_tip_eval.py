"""Private helpers of the TIP analyses: layer probing and masked-accuracy evaluation.

Used by :mod:`nns_cuda.analysis.interpretable`, :mod:`nns_cuda.analysis.aipc`,
:mod:`nns_cuda.analysis.saliency` and :mod:`nns_cuda.analysis.fgbg` (docs/spec.md §4 AIPC and
fg/bg types, §6 masking). Nothing here is public API; :mod:`nns_cuda.analysis.tip` documents
the behaviour.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from nns_cuda.analysis._toolkit import (
    eval_mode,
    layer_hook,
    model_device,
    resolve_module,
    split_call,
    to_jsonable,
    unpack_batch,
)
from nns_cuda.analysis.masking import mask_filters

__all__: List[str] = []


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
class DictResult:
    """Base of the TIP result dataclasses: :meth:`to_dict`."""

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict of the fields (tensors and arrays as lists, NaN / Inf as None).

        Returns
        -------
        dict
        """
        return to_jsonable(asdict(self))


# --------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    """What one probe forward pass tells about a layer.

    Attributes
    ----------
    name : str
        The layer as addressed (``name`` or ``name:k``).
    out_shape : tuple of int
        Per-sample output shape ``(C, *spatial)``.
    calls : int
        Calls of the base module per forward pass.
    call_order : list of str
        Module names in forward-hook order (only with ``record_order=True``).
    layer_pos : int
        Position of the analysed call in ``call_order`` (-1 without ``record_order``).
    """

    name: str
    out_shape: Tuple[int, ...]
    calls: int
    call_order: List[str] = field(default_factory=list)
    layer_pos: int = -1

    @property
    def channels(self) -> int:
        """Number of filters ``K`` (the output's channel dimension)."""
        return self.out_shape[0]


def probe_layer(model: nn.Module, x: torch.Tensor, layer: str, where: str, record_order: bool = False) -> LayerInfo:
    """Run ``model`` on ``x`` once and check that ``layer`` outputs a ``[B, C, *spatial]`` map.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode (every module's flag is restored afterwards), without gradients.
    x : Tensor [B, D, H, W]
        A small input batch (two samples suffice).
    layer : str
        Module name, ``name:k`` for one call of a module called several times.
    where : str
        Prefix of error messages.
    record_order : bool
        Also record the order in which all modules run (for finding the weight of a filter).

    Returns
    -------
    LayerInfo

    Raises
    ------
    KeyError
        For an unknown layer.
    ValueError
        For a layer that is not called, is called several times without a call index, or whose
        output has no channel dimension.
    """
    base, call = split_call(layer)
    module = resolve_module(model, base)
    outs: List[Any] = []
    order: List[str] = []
    pos = [-1]
    handles = []

    def hook(mod, inputs, output):
        outs.append(output)
        if call is None or len(outs) - 1 == call:
            pos[0] = len(order)  # this module's own entry is appended right after (see below)

    try:
        if record_order:
            for n, m in model.named_modules():
                if m is module:
                    continue
                handles.append(m.register_forward_hook(lambda mod, i, o, _n=n: order.append(_n) and None))

            def hook_and_record(mod, inputs, output):
                hook(mod, inputs, output)
                order.append(base)

            handles.append(module.register_forward_hook(hook_and_record))
        else:
            handles.append(module.register_forward_hook(hook))
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not outs:
        raise ValueError(f"{where}: layer {layer!r} is not called in the model's forward pass; pick a layer that runs.")
    if call is None and len(outs) > 1:
        names = [f"{base}:{i}" for i in range(len(outs))]
        raise ValueError(
            f"{where}: module {base!r} is called {len(outs)} times per forward pass, so the bare name is ambiguous; "
            f"address one call: {names}."
        )
    if call is not None and call >= len(outs):
        raise ValueError(f"{where}: layer {layer!r}: module {base!r} is called only {len(outs)} time(s) per forward.")
    out = outs[call or 0]
    if not isinstance(out, torch.Tensor) or out.dim() < 3:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{where}: layer {layer!r} has output {shape}, which has no channels: TIP analyses filters, i.e. the "
            "channels C of a [B, C, H, W] feature map. Pick a conv / activation / pooling layer."
        )
    return LayerInfo(layer, tuple(out.shape[1:]), len(outs), order, pos[0])


def first_x(data: Iterable, where: str, model: nn.Module) -> torch.Tensor:
    """The first two samples of ``data``, on the model's device.

    Parameters
    ----------
    data : iterable of batches ``(x, ...)``
    where : str
        Prefix of error messages.
    model : nn.Module

    Returns
    -------
    Tensor [min(2, B), D, H, W]

    Raises
    ------
    ValueError
        If ``data`` has no samples.
    """
    for batch in data:
        x, _, _ = unpack_batch(batch, where)
        if x.shape[0] == 0:
            continue
        return x[:2].to(model_device(model))
    raise ValueError(f"{where}: data has no samples.")


def n_top(fraction: float, k: int) -> int:
    """``⌈fraction · k⌉`` without float artefacts (0.07 · 100 = 7.000000000000001 -> 7).

    Parameters
    ----------
    fraction : float in [0, 1]
    k : int

    Returns
    -------
    int
    """
    return int(math.ceil(round(fraction * k, 9)))


# --------------------------------------------------------------------------------------------
# masked accuracy
# --------------------------------------------------------------------------------------------
class MaskedAccuracy:
    """Accuracy (%) of a classifier with chosen output channels of one layer zeroed (docs/spec.md §6).

    Results are cached per channel set. With ``vectorize=True`` one forward pass of a batch
    evaluates a group of masks: the hook replicates the layer's output once per mask (so the
    layers before it run once) and the logits come back as ``[G·B, classes]``. If the model
    cannot run on the replicated batch (e.g. a skip connection around the layer), the
    evaluation falls back to one pass per mask with :func:`nns_cuda.analysis.masking.mask_filters`.
    With no channel masked it is the model's plain accuracy.

    Parameters
    ----------
    model : nn.Module
        A classifier returning logits ``[B, classes]`` (run in eval mode, flags restored).
    data : re-iterable of ``(x [B, D, H, W], y [B][, fg_mask])`` batches
    layer : str
        Module name (``name:k`` per call) whose output channels are masked.
    channels : int
        ``K``, the layer's number of output channels.
    vectorize : bool
        Evaluate several masks per forward pass.
    max_rows : int
        Upper bound of ``G·B`` rows per replicated forward pass.
    where : str
        Prefix of error messages (and the progress bar's label).
    progress : bool
        A progress bar on stderr over the batches of each evaluation run.
    """

    def __init__(self, model: nn.Module, data: Iterable, layer: str, channels: int, *,
                 vectorize: bool = True, max_rows: int = 2048, where: str = "tip", progress: bool = True) -> None:
        self.model, self.data, self.layer, self.K = model, data, layer, channels
        self.vectorize, self.max_rows, self.where, self.progress = vectorize, max_rows, where, progress
        self.cache: Dict[Tuple[int, ...], float] = {}
        self.mode: Optional[str] = None

    def __call__(self, masks: Sequence[Sequence[int]]) -> List[float]:
        """Accuracy (%) with each channel set masked.

        Parameters
        ----------
        masks : sequence of channel-index sequences (``()`` for nothing masked)

        Returns
        -------
        list of float, one per mask
        """
        keys = [tuple(sorted(set(int(c) for c in m))) for m in masks]
        for key in keys:
            if key and (key[0] < 0 or key[-1] >= self.K):
                raise IndexError(f"{self.where}: channel index out of range [0, {self.K}) in {list(key)}.")
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        if todo:
            self.cache.update(zip(todo, self._evaluate(todo)))
        return [self.cache[k] for k in keys]

    # -- internals ---------------------------------------------------------------------------
    def _evaluate(self, masks: List[Tuple[int, ...]]) -> List[float]:
        dev = model_device(self.model)
        correct = torch.zeros(len(masks), dtype=torch.float64)
        total = 0
        bar = tqdm(self.data, desc=f"{self.where}: {len(masks)} masked accuracies", unit="batch", leave=False,
                   disable=not self.progress)
        with torch.no_grad(), eval_mode(self.model):
            for batch in bar:
                x, y, _ = unpack_batch(batch, self.where)
                if y is None:
                    raise ValueError(f"{self.where}: accuracy needs labels; batches must be (x, y[, fg_mask]).")
                x, y = x.to(dev), torch.as_tensor(y).to(dev)
                if y.shape != (x.shape[0],):
                    raise ValueError(f"{self.where}: labels must be [B] class indices, got {list(y.shape)} for B = {x.shape[0]}.")
                correct += self._batch(x, y, masks)
                total += x.shape[0]
        if total == 0:
            raise ValueError(f"{self.where}: data has no samples.")
        return (100.0 * correct / total).tolist()

    def _batch(self, x: torch.Tensor, y: torch.Tensor, masks: List[Tuple[int, ...]]) -> torch.Tensor:
        out = torch.zeros(len(masks), dtype=torch.float64)
        B = x.shape[0]
        if self.vectorize and self.mode != "loop":
            g = max(1, min(len(masks), self.max_rows // max(B, 1)))
            try:
                for s in range(0, len(masks), g):
                    out[s:s + g] = self._group(x, y, masks[s:s + g])
                self.mode = "replicate"
                return out
            except _CannotReplicate as e:
                if self.mode == "replicate":  # worked on an earlier batch: a real error
                    raise RuntimeError(f"{self.where}: replicated masked evaluation failed: {e}") from e
                warnings.warn(
                    f"{self.where}: the model cannot run on a replicated batch after layer {self.layer!r} ({e}); "
                    "evaluating one forward pass per mask instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.mode = "loop"
        for i, m in enumerate(masks):
            with mask_filters(self.model, {self.layer: list(m)}):
                logits = self.model(x)
            _check_logits(logits, B, y, self.where)
            out[i] = (logits.argmax(1) == y).sum().item()
        return out

    def _group(self, x: torch.Tensor, y: torch.Tensor, masks: List[Tuple[int, ...]]) -> torch.Tensor:
        B, G = x.shape[0], len(masks)
        keep = torch.ones(G, self.K, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
        for i, m in enumerate(masks):
            if m:
                keep[i, list(m)] = 0

        def rep(output: torch.Tensor) -> torch.Tensor:
            if not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[1] != self.K:
                raise _CannotReplicate(f"layer output {getattr(output, 'shape', type(output))} is not [B, {self.K}, ...]")
            k = keep.to(output.dtype).view((G, 1, self.K) + (1,) * (output.dim() - 2))
            return (output.unsqueeze(0) * k).reshape((G * output.shape[0],) + tuple(output.shape[1:]))

        try:
            with layer_hook(self.model, self.layer, rep):
                logits = self.model(x)
        except _CannotReplicate:
            raise
        except RuntimeError as e:
            raise _CannotReplicate(str(e).splitlines()[0]) from e
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != G * B:
            raise _CannotReplicate(f"logits have shape {getattr(logits, 'shape', None)}, expected [{G * B}, classes]")
        pred = logits.view(G, B, -1).argmax(2)
        return (pred == y.view(1, B)).sum(1).to(torch.float64).cpu()


class _CannotReplicate(Exception):
    pass


def _check_logits(logits: Any, B: int, y: torch.Tensor, where: str) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != B:
        raise ValueError(
            f"{where}: accuracy needs a classifier returning logits [B, classes]; got "
            f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}."
        )
    if y.shape != (B,):
        raise ValueError(f"{where}: labels must be [B] class indices, got {list(y.shape)} for B = {B}.")
