"""Captum-style drop-ins: learned images with the interface of ``captum.attr``'s neuron methods.

:class:`NeuronLearnedImage` is used exactly like ``captum.attr.NeuronGradient`` and returns the
neuron's learned image (docs/spec.md §1)

    LI_n(x) = g_n · x ⊙ J_n ,

which for a ReLU network equals ``NeuronGradient(model, layer).attribute(x, selector) * x``
whenever ``layer`` is the module whose output holds ``a_n`` (a ReLU, a pooling layer, the final
linear layer, …) — docs/spec.md §1, identity 1. It is computed by the NNS engine (exact,
gate-frozen, bias-free network), so whole layers cost one sweep: :class:`LayerLearnedImages`
returns the learned images of all neurons of a layer at once.

>>> from nns_cuda.captum import NeuronLearnedImage, LayerLearnedImages
>>> li = NeuronLearnedImage(model, model.features[1]).attribute(x, neuron_selector=(3, 5, 7))  # doctest: +SKIP
>>> all_li = LayerLearnedImages(model, "features.1").attribute(x)    # [B, C, H', W', D, H, W]  # doctest: +SKIP

Differences from Captum worth knowing:

* For a conv / linear layer that feeds a ReLU directly, the learned image is gated by the
  ReLU's gate ``S(z_n)`` (docs/spec.md §1, eq. 3-6): an inactive neuron has an all-zero
  learned image, while Captum's gradient of the (pre-activation) conv output is not gated.
  Pass the ReLU module as ``layer`` to compare like with like.
* ``attribute_to_neuron_input=True`` returns the learned image of the neuron that feeds the
  layer (the layer input's neuron selected by ``neuron_selector``), with the same gating rule.
* A callable ``neuron_selector`` (any function of the layer's output) has no neuron index, so it
  falls back to autograd: ``x ⊙ ∂selector(layer output)/∂x`` on the real model — the same
  value as Captum's ``NeuronGradient × input``.
* ``forward_func`` that is not an ``nn.Module``, or ``additional_forward_args``, also use the
  autograd path (the engine needs a module to trace).

Captum itself is not needed to use this module.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from nns_cuda._modules import split_call

__all__ = ["NeuronLearnedImage", "LayerLearnedImages"]

Selector = Union[int, Tuple[Union[int, slice], ...], Callable[..., torch.Tensor]]
LayerSpec = Union[str, nn.Module]


# ----------------------------------------------------------------------------- helpers
def _layer_name(model: Optional[nn.Module], layer: LayerSpec) -> Optional[str]:
    """Qualified name of ``layer`` inside ``model`` (None when it cannot be named)."""
    if isinstance(layer, str):
        return layer
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module or a module name (str), got {type(layer).__name__}")
    if model is None:
        return None
    for n, m in model.named_modules():
        if m is layer:
            return n
    raise ValueError(f"layer {type(layer).__name__} is not a sub-module of the model; pass a module of "
                     "forward_func (e.g. model.features[1]) or its name from model.named_modules()")


def _layer_module(model: Optional[nn.Module], layer: LayerSpec) -> Tuple[nn.Module, Optional[int]]:
    """(module, call index or None) for hooking ``layer``."""
    if isinstance(layer, nn.Module):
        return layer, None
    if model is None:
        raise TypeError("a layer given by name needs forward_func to be an nn.Module; pass the module itself")
    base, call = split_call(layer)
    mods = dict(model.named_modules())
    if base not in mods or base == "":
        import difflib

        close = difflib.get_close_matches(base, [n for n in mods if n], n=5)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown layer name {layer!r}.{hint} Layer names come from model.named_modules().")
    return mods[base], call


def _as_input(inputs: Any) -> Tuple[torch.Tensor, bool]:
    """(tensor, was_tuple). Only single-tensor inputs are supported (as the engine's models take)."""
    if isinstance(inputs, torch.Tensor):
        return inputs, False
    if isinstance(inputs, (tuple, list)) and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
        return inputs[0], True
    raise TypeError("inputs must be a Tensor [B, ...] or a 1-tuple of one; models with several input tensors are "
                    "not supported by the learned-image engine")


def _wrap(out: torch.Tensor, was_tuple: bool):
    return (out,) if was_tuple else out


def _expand_selector(sel: Union[int, tuple], shape: Tuple[int, ...], where: str) -> Tuple[List[Tuple[int, ...]], bool]:
    """Captum selector (int or tuple of int / slice) -> list of full neuron indices, and whether
    it held a slice (then Captum attributes the *sum* of the selected neurons)."""
    t = (sel,) if isinstance(sel, int) else tuple(sel)
    if isinstance(sel, bool) or not all(isinstance(v, (int, slice)) and not isinstance(v, bool) for v in t):
        raise TypeError(f"{where}: neuron_selector must be an int, a tuple of ints / slices, or a callable; got {sel!r}")
    if len(t) > len(shape):
        raise ValueError(f"{where}: neuron_selector {sel!r} has {len(t)} entries but the layer's neurons are indexed by "
                         f"{len(shape)} (layer shape without batch: {list(shape)})")
    has_slice = any(isinstance(v, slice) for v in t)
    if len(t) < len(shape):
        if not has_slice:
            hint = " (an int selects a neuron only in a layer with 2-D output [B, N]; use a tuple like (c, y, x))" \
                if isinstance(sel, int) else ""
            raise ValueError(f"{where}: neuron_selector {sel!r} selects {len(shape) - len(t)} dimension(s) short of one "
                             f"neuron of a layer shaped {list(shape)}{hint}")
        t = t + (slice(None),) * (len(shape) - len(t))
    axes = []
    for v, n in zip(t, shape):
        if isinstance(v, slice):
            axes.append(list(range(n))[v])
        else:
            if not -n <= v < n:
                raise IndexError(f"{where}: neuron index {sel!r} out of range for layer shape {list(shape)}")
            axes.append([v % n])
    return [tuple(c) for c in itertools.product(*axes)], has_slice


class _Capture:
    """Forward hook capturing one call's output (or input) of a module, also when it is called
    several times (``call`` picks which one; None = the last)."""

    def __init__(self, module: nn.Module, call: Optional[int], want_input: bool):
        self.module, self.call, self.want_input = module, call, want_input
        self.value: Optional[torch.Tensor] = None
        self.n = 0

    def __enter__(self):
        def hook(mod, inp, out):
            k = self.n
            self.n += 1
            if self.call is None or k == self.call:
                v = inp[0] if self.want_input else out
                if isinstance(v, (tuple, list)):
                    v = v[0] if len(v) == 1 else v
                self.value = v

        self.h = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.h.remove()
        return False


def _autograd_li(forward_func: Callable, module: nn.Module, call: Optional[int], x: torch.Tensor,
                 selector: Selector, additional_forward_args: Any, to_input: bool, where: str) -> torch.Tensor:
    """``x ⊙ ∂ selected / ∂x`` by autograd on the real model (the Captum path)."""
    args = () if additional_forward_args is None else (
        additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,))
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad(), _Capture(module, call, to_input) as cap:
        forward_func(xr, *args)
        if cap.value is None:
            raise RuntimeError(f"{where}: the layer did not run in the forward pass")
        out = cap.value
        if callable(selector):
            sel = selector(out)
        else:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{where}: the layer's output is not a single tensor; use a callable neuron_selector")
            neurons, _ = _expand_selector(selector, tuple(out.shape[1:]), where)
            flat = out.reshape(out.shape[0], -1)
            idx = torch.tensor([_ravel(n, tuple(out.shape[1:])) for n in neurons], device=out.device)
            sel = flat[:, idx].sum(1)
        if not isinstance(sel, torch.Tensor):
            raise TypeError(f"{where}: the neuron selector must return a Tensor, got {type(sel).__name__}")
        if sel.numel() not in (1, x.shape[0]):
            raise ValueError(f"{where}: the neuron selector must return one scalar per example ({x.shape[0]}) or a "
                             f"single element, got shape {list(sel.shape)}")
        (g,) = torch.autograd.grad(sel, xr, grad_outputs=torch.ones_like(sel), allow_unused=True)
    if g is None:
        return torch.zeros_like(x)
    return (g * x).detach()


def _ravel(idx: Tuple[int, ...], shape: Tuple[int, ...]) -> int:
    f = 0
    for v, n in zip(idx, shape):
        f = f * n + int(v)
    return f


# ----------------------------------------------------------------------------- public classes
class NeuronLearnedImage:
    """Learned image of one neuron (or the sum over a slice of neurons), Captum-style.

    Parameters
    ----------
    forward_func : nn.Module or callable
        The model in eval mode; any other callable uses the autograd path.
    layer : nn.Module or str
        The module whose output holds the neuron (a module of ``forward_func``), or its name
        from ``named_modules()`` (``"name:k"`` for the k-th call of a reused module).
    device_ids : list of int or None
        Accepted for Captum compatibility; unused.
    backend, strategy, max_memory, linearize
        Engine options (see :class:`nns_cuda.Scanner`).
    gate_outputs : bool
        Gate the model's output neurons by ``S(z)`` too (docs/spec.md §1; default False, as the
        thesis).
    """

    def __init__(self, forward_func: Callable, layer: LayerSpec, device_ids: Optional[List[int]] = None, *,
                 backend: str = "auto", strategy: str = "auto", max_memory: Optional[int] = None,
                 gate_outputs: bool = False, linearize: Optional[str] = None):
        self.forward_func = forward_func
        self.model = forward_func if isinstance(forward_func, nn.Module) else None
        self.layer = layer
        self.layer_name = _layer_name(self.model, layer)
        self.device_ids = device_ids
        self.backend, self.strategy, self.max_memory = backend, strategy, max_memory
        self.gate_outputs, self.linearize = gate_outputs, linearize

    def attribute(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor]], neuron_selector: Selector,
                  additional_forward_args: Any = None, attribute_to_neuron_input: bool = False):
        """Learned image of the selected neuron for each example.

        Parameters
        ----------
        inputs : Tensor [B, D, H, W] (or [B, N]), or a 1-tuple of it
        neuron_selector : int, tuple of int / slice, or callable
            An int (2-D layer outputs), a tuple of ints (``(c, y, x)``) or slices (the learned
            image of the sum of the selected neurons — by linearity the sum of their learned
            images), or a callable ``f(layer_output) -> Tensor [B]`` (autograd path).
        additional_forward_args : Any
            Extra arguments of ``forward_func`` (autograd path).
        attribute_to_neuron_input : bool
            Select among the layer's *input* neurons instead.

        Returns
        -------
        Tensor [B, D, H, W] (like ``inputs``; a 1-tuple if ``inputs`` was one)
        """
        where = "NeuronLearnedImage.attribute"
        x, was_tuple = _as_input(inputs)
        use_engine = (self.model is not None and additional_forward_args is None and not callable(neuron_selector)
                      and self.layer_name is not None)
        if not use_engine:
            module, call = _layer_module(self.model, self.layer if self.layer_name is None else self.layer_name)
            return _wrap(_autograd_li(self.forward_func, module, call, x, neuron_selector, additional_forward_args,
                                      attribute_to_neuron_input, where), was_tuple)
        from nns_cuda.engine.functional import learned_images
        from nns_cuda.engine.graph import build_graph

        model = self.model
        graph = build_graph(model, x[:1], self.linearize)
        g = graph.resolve(self.layer_name)
        target = g
        if attribute_to_neuron_input:
            if not g.inputs:
                raise ValueError(f"{where}: layer {self.layer_name!r} has no input that carries learned images")
            target = graph.nodes[g.inputs[0]]
        neurons, _ = _expand_selector(neuron_selector, tuple(target.shape), where)
        if target.kind == "input":
            # an input neuron's learned image is its own value at its own position (LI = x ⊙ e_t)
            out = torch.zeros_like(x)
            flat_out, flat_x = out.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1)
            for n in neurons:
                f = _ravel(n, tuple(target.shape))
                flat_out[:, f] += flat_x[:, f]
            return _wrap(out, was_tuple)
        li = learned_images(model, x, target.name, neurons=neurons, backend=self.backend, strategy=self.strategy,
                            gate_outputs=self.gate_outputs, linearize=self.linearize, max_memory=self.max_memory)
        out = li.sum(1) if li.shape[1] > 1 else li[:, 0]
        return _wrap(out.reshape(x.shape).to(x.dtype), was_tuple)


class LayerLearnedImages:
    """Learned images of every neuron of a layer at once (the engine's forward strategy).

    Parameters
    ----------
    forward_func : nn.Module
        The model, in eval mode.
    layer : nn.Module or str
        A module of ``forward_func`` or its name (``"name:k"`` for a call of a reused module).
    device_ids : list of int or None
        Accepted for Captum compatibility; unused.
    backend, strategy, max_memory, gate_outputs, linearize
        Engine options (see :class:`nns_cuda.Scanner`).
    """

    def __init__(self, forward_func: nn.Module, layer: LayerSpec, device_ids: Optional[List[int]] = None, *,
                 backend: str = "auto", strategy: str = "auto", max_memory: Optional[int] = None,
                 gate_outputs: bool = False, linearize: Optional[str] = None):
        if not isinstance(forward_func, nn.Module):
            raise TypeError("LayerLearnedImages needs forward_func to be an nn.Module (the engine traces it); "
                            "for a plain function use NeuronLearnedImage with a callable selector")
        self.model = forward_func
        self.layer_name = _layer_name(forward_func, layer)
        self.device_ids = device_ids
        self.backend, self.strategy, self.max_memory = backend, strategy, max_memory
        self.gate_outputs, self.linearize = gate_outputs, linearize

    def _target(self, x: torch.Tensor, to_input: bool) -> str:
        if not to_input:
            return self.layer_name
        from nns_cuda.engine.graph import build_graph

        graph = build_graph(self.model, x[:1], self.linearize)
        g = graph.resolve(self.layer_name)
        if not g.inputs or graph.nodes[g.inputs[0]].kind == "input":
            raise ValueError(f"layer {self.layer_name!r}: its input is the model input; the learned image of input "
                             "entry t is just x ⊙ e_t")
        return graph.nodes[g.inputs[0]].name

    def attribute(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor]], attribute_to_layer_input: bool = False):
        """Learned images of all neurons of the layer (or of its input with ``attribute_to_layer_input``).

        Parameters
        ----------
        inputs : Tensor [B, D, H, W] (or [B, N]), or a 1-tuple of it
        attribute_to_layer_input : bool
            The learned images of the neurons of the layer's input instead.

        Returns
        -------
        Tensor [B, *layer_shape, *inputs.shape[1:]] (a 1-tuple if ``inputs`` was one)
        """
        from nns_cuda.engine.functional import learned_images

        x, was_tuple = _as_input(inputs)
        name = self._target(x, attribute_to_layer_input)
        out = learned_images(self.model, x, name, backend=self.backend, strategy=self.strategy,
                             gate_outputs=self.gate_outputs, linearize=self.linearize, max_memory=self.max_memory)
        return _wrap(out, was_tuple)

    def filter_images(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor]]):
        """Filter learned images ``L^k = Σ_{i,j} LI_{k,i,j} · a^k_{i,j}`` of the layer.

        Parameters
        ----------
        inputs : Tensor [B, D, H, W] (or [B, N]), or a 1-tuple of it

        Returns
        -------
        Tensor [B, C, *inputs.shape[1:]] (a 1-tuple if ``inputs`` was one)
        """
        from nns_cuda.engine.functional import filter_images

        x, was_tuple = _as_input(inputs)
        return _wrap(filter_images(self.model, x, self.layer_name, backend=self.backend, strategy=self.strategy,
                                   max_memory=self.max_memory, gate_outputs=self.gate_outputs,
                                   linearize=self.linearize), was_tuple)
