"""Private helpers of :mod:`nns_cuda.tip`: data batches, hooks on one layer call, layer probing
and masked-accuracy evaluation (SPEC §4 AIPC / fg-bg types, §6 masking).

Nothing here is public API; :mod:`nns_cuda.tip` documents the behaviour.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nns_cuda.analysis.masking import mask_filters, resolve_module

__all__: List[str] = []


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def unpack_batch(batch: Any, where: str) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(x, y, fg_mask)`` / ``(x, y)`` / ``x`` -> ``(x, y or None, fg_mask or None)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        m = batch[2] if len(batch) > 2 else None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: a data batch must start with the input tensor x, got {type(x).__name__}.")
        return x, y, m
    raise TypeError(
        f"{where}: each data batch must be (x, y, fg_mask), (x, y) or x; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "."
    )


def check_reiterable(data: Any, where: str) -> None:
    """Several passes over ``data`` are needed: refuse one-shot iterators (generators)."""
    try:
        it = iter(data)
    except TypeError as e:
        raise TypeError(f"{where}: data must be an iterable of batches, got {type(data).__name__}.") from e
    if it is data:
        raise TypeError(
            f"{where}: data is a one-shot iterator ({type(data).__name__}); this analysis passes over the "
            "data several times. Pass a list of batches or a DataLoader."
        )


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def check_mask(mask: Optional[torch.Tensor], x: torch.Tensor, where: str) -> Optional[torch.Tensor]:
    """Validate a foreground mask ``[B, H, W]`` (bool) against ``x [B, D, H, W]``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask must be a bool tensor [B, H, W] or None, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{where}: mask must be a bool tensor [B, H, W], got dtype {mask.dtype}; convert it with mask.bool() "
            "(True = entry in the region)."
        )
    want = (x.shape[0],) + tuple(x.shape[2:])
    if tuple(mask.shape) != want:
        raise ValueError(
            f"{where}: mask has shape {list(mask.shape)} but x has shape {list(x.shape)}; the mask must be "
            f"[B, H, W] = {list(want)} (it is broadcast over the D channels)."
        )
    return mask


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each one's ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, f in flags:
            m.training = f


# --------------------------------------------------------------------------------------------
# hooks on one call of one module
# --------------------------------------------------------------------------------------------
def split_call(name: str) -> Tuple[str, Optional[int]]:
    if ":" in name:
        base, _, idx = name.rpartition(":")
        if idx.isdigit():
            return base, int(idx)
    return name, None


@contextlib.contextmanager
def layer_hook(model: nn.Module, layer: str, fn: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Iterator[None]:
    """Call ``fn(output)`` on the output of ``layer`` (``name`` or ``name:i``); a non-None return
    replaces the output. Hooks are always removed."""
    base, call = split_call(layer)
    module = resolve_module(model, base)
    counter = [0]

    def hook(mod, inputs, output):
        n = counter[0]
        counter[0] = n + 1
        if call is not None and n != call:
            return None
        return fn(output)

    handles = [
        model.register_forward_pre_hook(lambda m, i: counter.__setitem__(0, 0)),
        module.register_forward_hook(hook),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerInfo:
    """What one probe forward pass tells about a layer."""

    name: str
    out_shape: Tuple[int, ...]  # per-sample output shape (C, *spatial)
    calls: int  # calls of the base module per forward
    call_order: List[str] = field(default_factory=list)  # module names in forward-hook order
    layer_pos: int = -1  # position of the analysed call in call_order

    @property
    def channels(self) -> int:
        return self.out_shape[0]


def probe_layer(model: nn.Module, x: torch.Tensor, layer: str, where: str, record_order: bool = False) -> LayerInfo:
    """Run ``model`` on ``x`` once and check that ``layer`` outputs a ``[B, C, *spatial]`` map.

    Raises ``KeyError`` for an unknown layer and ``ValueError`` for a layer that is not called,
    is called several times without a call index, or whose output has no channel dimension.
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


# --------------------------------------------------------------------------------------------
# masked accuracy
# --------------------------------------------------------------------------------------------
def n_top(fraction: float, k: int) -> int:
    """``⌈fraction · k⌉`` without float artefacts (0.07 · 100 = 7.000000000000001 -> 7)."""
    return int(math.ceil(round(fraction * k, 9)))


class MaskedAccuracy:
    """Accuracy (%) of a classifier with chosen output channels of one layer zeroed (SPEC §6).

    Results are cached per channel set. With ``vectorize=True`` one forward pass of a batch
    evaluates a group of masks: the hook replicates the layer's output once per mask (so the
    layers before it run once) and the logits come back as ``[G·B, classes]``. If the model
    cannot run on the replicated batch (e.g. a skip connection around the layer), the
    evaluation falls back to one pass per mask with :func:`nns_cuda.masking.mask_filters`.
    """

    def __init__(self, model: nn.Module, data: Iterable, layer: str, channels: int, *,
                 vectorize: bool = True, max_rows: int = 2048, where: str = "tip") -> None:
        self.model, self.data, self.layer, self.K = model, data, layer, channels
        self.vectorize, self.max_rows, self.where = vectorize, max_rows, where
        self.cache: Dict[Tuple[int, ...], float] = {}
        self.mode: Optional[str] = None

    def __call__(self, masks: Sequence[Sequence[int]]) -> List[float]:
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
        with torch.no_grad(), eval_mode(self.model):
            for batch in self.data:
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


def accuracy(model: nn.Module, data: Iterable, where: str) -> float:
    """Plain accuracy (%) of ``model`` on ``data`` (no masking)."""
    dev = model_device(model)
    correct, total = 0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in data:
            x, y, _ = unpack_batch(batch, where)
            if y is None:
                raise ValueError(f"{where}: accuracy needs labels; batches must be (x, y[, fg_mask]).")
            x, y = x.to(dev), torch.as_tensor(y).to(dev)
            logits = model(x)
            _check_logits(logits, x.shape[0], y, where)
            correct += int((logits.argmax(1) == y).sum())
            total += x.shape[0]
    if total == 0:
        raise ValueError(f"{where}: data has no samples.")
    return 100.0 * correct / total
