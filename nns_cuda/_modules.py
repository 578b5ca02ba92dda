"""Addressing the modules of a model: names, calls, devices, modes, output capture.

A leaf shared by every layer above it (engine, analyses, application). It knows nothing of
learned images.

Layer names are ``model.named_modules()`` names (``"features.3"``, ``"layer1.0.conv1"``); a
module called more than once in one forward pass is addressed per call with ``"name:k"``
(``"layer1.0.relu:1"``, calls counted from 0).
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["UnsupportedModuleError", "split_call", "resolve_module", "check_layers", "model_device", "eval_mode", "check_eval",
           "layer_outputs", "layer_hook"]


class UnsupportedModuleError(TypeError):
    """A model holds a module or an operation that the scanner cannot linearise (the message
    names it, where it is, and what to do)."""


def split_call(name: str) -> Tuple[str, Optional[int]]:
    """Split a call-indexed layer name.

    Parameters
    ----------
    name : str
        ``"relu:1"`` or ``"relu"``.

    Returns
    -------
    (str, int or None)
        ``("relu", 1)`` or ``("relu", None)``. A suffix that is not a non-negative integer is
        part of the name.
    """
    if ":" in name:
        base, _, idx = name.rpartition(":")
        if idx.isdigit():
            return base, int(idx)
    return name, None


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (``model.named_modules()`` naming, no call index).

    Raises
    ------
    KeyError
        If no module has that name; the message suggests close names.
    """
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f" Did you mean one of {close}?" if close else ""
    raise KeyError(
        f"unknown layer name {name!r}: it is not in model.named_modules().{hint} "
        "Use a qualified module name such as 'features.3' or 'layer1.0.conv1'."
    )


def check_layers(model: nn.Module, layers: Sequence[str] | str, where: str) -> List[str]:
    """Return ``layers`` as a list after checking that every (base) name exists in the model.

    Parameters
    ----------
    model : nn.Module
    layers : str or sequence of str
        Layer names, call indices allowed (``"layer1.0.relu:1"``).
    where : str
        Prefix of error messages (the caller's name).

    Raises
    ------
    KeyError
        For an unknown layer (with close names).
    ValueError
        For an empty list or duplicate names.
    TypeError
        For a name that is not a string.
    """
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError(f"{where}: no layers given; pass qualified module names such as ['features.1'].")
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"{where}: layer names must be strings, got {name!r}.")
        try:
            resolve_module(model, split_call(name)[0])
        except KeyError as e:
            raise KeyError(f"{where}: {e.args[0]}") from None
    if len(set(layers)) != len(layers):
        raise ValueError(f"{where}: duplicate layer names in {layers}.")
    return layers


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's own ``training`` flag afterwards.

    Restoring per module (not ``model.train(was)``) keeps a user's mixed state, e.g. a model in
    training mode with frozen batch-norm layers, exactly as it was.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, f in flags:
            m.training = f


def check_eval(model: nn.Module, where: str) -> None:
    """Raise ``ValueError`` if ``model`` is in training mode (learned images need frozen BN / dropout)."""
    if model.training:
        raise ValueError(
            f"{where}: the model is in training mode; call model.eval() first (dropout and "
            "batch-norm must be frozen for learned images and losses to be well defined)."
        )


def layer_outputs(model: nn.Module, x: Tensor, layers: Sequence[str]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Run ``model(x)`` and capture the outputs of ``layers``.

    Parameters
    ----------
    model : nn.Module
    x : Tensor
        The model's input.
    layers : sequence of str
        Layer names, call indices allowed. Hooks are removed whatever happens.

    Returns
    -------
    (Tensor, dict)
        The model's output and ``{layer: output}`` (outputs cloned, so that a later in-place
        operation such as ResNet's ``out += identity`` does not change them).
    """
    captured: Dict[str, Tensor] = {}
    handles = []
    counters: Dict[str, int] = {}
    try:
        for name in layers:
            base, call = split_call(name)
            mod = resolve_module(model, base)

            def hook(m, i, o, _name=name, _call=call):
                k = counters.get(_name, 0)
                counters[_name] = k + 1
                if _call is None or k == _call:
                    captured[_name] = o.clone() if isinstance(o, Tensor) else o
            handles.append(mod.register_forward_hook(hook))
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, captured


@contextlib.contextmanager
def layer_hook(model: nn.Module, layer: str, fn: Callable[[Tensor], Optional[Tensor]]) -> Iterator[None]:
    """Call ``fn(output)`` on the output of ``layer`` (``name`` or ``name:k``) while open.

    A non-``None`` return of ``fn`` replaces the output. The call counter restarts at every
    forward pass of ``model``. Hooks are always removed.
    """
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
