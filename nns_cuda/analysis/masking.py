"""Filter masking (docs/spec.md §6): zero chosen output channels of a layer through removable hooks.

Masking filter ``k`` of a layer means zeroing channel ``k`` of that layer's output at every
position. It is done with a forward hook inside a context manager, so the model's parameters
are never touched and the hook is always removed, also when the body raises.

>>> with mask_filters(model, {"features.3": [0, 5]}):
...     logits = model(x)
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from nns_cuda._modules import resolve_module, split_call

__all__ = ["mask_filters", "resolve_module", "MaskSpec"]

MaskSpec = Mapping[str, Union[Sequence[int], torch.Tensor]]


@contextlib.contextmanager
def mask_filters(model: nn.Module, masks: MaskSpec) -> Iterator[nn.Module]:
    """Zero the given output channels of the given layers while the context is open.

    Parameters
    ----------
    model : nn.Module
    masks : mapping ``layer_name -> channel indices`` (list of int or 1-D integer / bool tensor).
        ``layer_name`` may carry a call index (``"layer1.0.relu:1"``) for a module that runs
        more than once per forward; without it every call of the module is masked.

    Yields
    ------
    The same model (unchanged after the context closes; no hook left behind).
    """
    handles = []
    counters: Dict[str, int] = {}
    try:
        for name, channels in masks.items():
            base, call = split_call(name)
            module = resolve_module(model, base)
            idx = _channel_index(name, channels)

            def hook(mod, inputs, output, _idx=idx, _call=call, _base=base, _name=name):
                n = counters.get(_base, 0)
                counters[_base] = n + 1
                if _call is not None and n != _call:
                    return output
                if not isinstance(output, torch.Tensor) or output.dim() < 2:
                    raise ValueError(
                        f"mask_filters: layer {_name!r} output has shape "
                        f"{tuple(getattr(output, 'shape', ()))}; masking needs a channel dimension (dim 1)."
                    )
                if _idx.numel() and int(_idx.max()) >= output.shape[1]:
                    raise IndexError(
                        f"mask_filters: channel {int(_idx.max())} out of range for layer {_name!r} "
                        f"with {output.shape[1]} channels."
                    )
                keep = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
                keep[_idx.to(output.device)] = 0
                shape = [1, output.shape[1]] + [1] * (output.dim() - 2)
                return output * keep.view(shape)

            handles.append(module.register_forward_hook(hook))
        # reset per-forward call counters
        handles.append(model.register_forward_pre_hook(lambda m, i: counters.clear()))
        yield model
    finally:
        for h in handles:
            h.remove()


def _channel_index(name: str, channels: Union[Iterable[int], torch.Tensor]) -> torch.Tensor:
    if isinstance(channels, torch.Tensor):
        t = channels
        if t.dtype == torch.bool:
            t = t.nonzero().flatten()
    else:
        t = torch.as_tensor(list(channels), dtype=torch.long)
    if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"mask_filters: channels for {name!r} must be integers or a bool mask, got {t.dtype}.")
    t = t.long().flatten()
    if t.numel() and int(t.min()) < 0:
        raise IndexError(f"mask_filters: negative channel index {int(t.min())} for layer {name!r}.")
    return t
