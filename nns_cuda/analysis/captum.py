"""Captum-style drop-ins: learned images with the interface of ``captum.attr``'s neuron methods.

:class:`NeuronLearnedImage` is used exactly like ``captum.attr.NeuronGradient`` and, by default,
returns Captum's own numbers

    NeuronGradient(model, layer).attribute(x, neuron_selector, attribute_to_neuron_input=...) * x

for every layer and every ``neuron_selector`` form Captum accepts (an int, a tuple of ints /
slices, a callable): one vector–Jacobian product on the model, as Captum computes it. With
``gated=True`` it returns the thesis's learned image of the selected neuron(s) instead
(docs/spec.md §1)

    LI_n(x) = g_n · x ⊙ J_n ,

computed by the NNS engine (gate-frozen, bias-free network). The two differ only by the gate
``g_n``: for a neuron whose layer feeds an activation directly (a conv or BN before its ReLU,
``classifier.0`` of VGG, the input of a ReLU with ``attribute_to_neuron_input=True``) the
learned image is multiplied by that activation's gate ``S(z_n)`` — all zero for an inactive
neuron — while Captum's gradient of the pre-activation value is not. On activations, pooling
layers and ungated outputs the two are equal (docs/spec.md §1, identity 1).

:class:`LayerLearnedImages` returns the learned images (gated, as the thesis) of all neurons of
a layer at once, in one engine sweep.

>>> from nns_cuda.captum import NeuronLearnedImage, LayerLearnedImages
>>> li = NeuronLearnedImage(model, model.features[1]).attribute(x, neuron_selector=(3, 5, 7))  # doctest: +SKIP
>>> all_li = LayerLearnedImages(model, "features.1").attribute(x)    # [B, C, H', W', D, H, W]  # doctest: +SKIP

Differences from Captum worth knowing:

* ``NeuronLearnedImage(..., gated=True)`` and :class:`LayerLearnedImages` gate as above; pass
  the ReLU module as ``layer`` to compare them with Captum like with like.
* A module called several times in one forward pass (torchvision's ``BasicBlock.relu``) is
  taken at its last call, as Captum does; a name ``"name:k"`` picks the k-th call.
* ``gated=True`` needs an ``nn.Module`` ``forward_func``, no ``additional_forward_args`` and a
  neuron index (int or tuple): a callable selector has no neuron whose gate could be applied.
* A selected value with no gradient path from the input raises ``ValueError`` (never zeros).
* ``attribute`` may be called from several threads at once (each call captures its own
  layer output).

Captum itself is not needed to use this module.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from nns_cuda._modules import split_call
from nns_cuda.engine.memory import parse_bytes

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


def _check_selector(sel: Union[int, tuple], shape: Tuple[int, ...], where: str) -> Tuple[tuple, bool]:
    """Captum selector (int or tuple of int / slice), checked against the layer ``shape`` and
    padded with ``slice(None)`` to one entry per axis; and whether it holds a slice (then
    Captum attributes the *sum* of the selected neurons)."""
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
    for v, n in zip(t, shape):
        if not isinstance(v, slice) and not -n <= v < n:
            raise IndexError(f"{where}: neuron index {sel!r} out of range for layer shape {list(shape)}")
    return t, has_slice


def _expand_selector(sel: Union[int, tuple], shape: Tuple[int, ...], where: str) -> Tuple[List[Tuple[int, ...]], bool]:
    """Captum selector (int or tuple of int / slice) -> list of full neuron indices, and whether
    it held a slice (then Captum attributes the *sum* of the selected neurons)."""
    t, has_slice = _check_selector(sel, shape, where)
    axes = [list(range(n))[v] if isinstance(v, slice) else [v % n] for v, n in zip(t, shape)]
    return [tuple(c) for c in itertools.product(*axes)], has_slice


class _Capture:
    """Hook capturing a copy of one call's output (or input) of a module, as Captum does.

    Per-call state: the hook only records calls made by the thread that entered the block, so
    concurrent calls on the same module each see their own forward pass. The value is cloned
    when captured (an in-place activation after the layer, or an in-place layer itself, would
    otherwise change the captured tensor and its gradient). ``call`` picks which call of a
    module run several times (None: the last, as Captum)."""

    def __init__(self, module: nn.Module, call: Optional[int], want_input: bool):
        self.module, self.call, self.want_input = module, call, want_input
        self.value: Any = None
        self.n = 0
        self.owner = threading.get_ident()

    def _record(self, v) -> None:
        if threading.get_ident() != self.owner:
            return
        k = self.n
        self.n += 1
        if self.call is None or k == self.call:
            if isinstance(v, (tuple, list)):
                v = v[0] if len(v) == 1 else type(v)(t.clone() if isinstance(t, torch.Tensor) else t for t in v)
            self.value = v.clone() if isinstance(v, torch.Tensor) else v

    def __enter__(self):
        if self.want_input:
            self.h = self.module.register_forward_pre_hook(lambda mod, inp: self._record(inp))
        else:
            self.h = self.module.register_forward_hook(lambda mod, inp, out: self._record(out))
        return self

    def __exit__(self, *exc):
        self.h.remove()
        return False


def _no_path(where: str) -> ValueError:
    return ValueError(f"{where}: the selected value does not depend on the input (no gradient path from the "
                      "inputs to it), so its gradient is undefined; select a neuron computed from the inputs")


def _autograd_li(forward_func: Callable, module: nn.Module, call: Optional[int], x: torch.Tensor,
                 selector: Selector, additional_forward_args: Any, to_input: bool, where: str) -> torch.Tensor:
    """``x ⊙ ∂ selected / ∂x`` by one vector–Jacobian product on the real model (Captum's
    ``NeuronGradient × input``)."""
    args = () if additional_forward_args is None else (
        additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,))
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with _Capture(module, call, to_input) as cap:
            forward_func(xr, *args)
        if cap.n == 0:
            raise RuntimeError(f"{where}: the layer did not run in the forward pass")
        if cap.value is None:
            raise IndexError(f"{where}: call {call} of the layer was asked for, but it ran {cap.n} time(s)")
        out = cap.value
        if callable(selector):
            sel = selector(out)
        else:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"{where}: the layer's output is not a single tensor; use a callable neuron_selector")
            t, _ = _check_selector(selector, tuple(out.shape[1:]), where)
            picked = out[(slice(None),) + t]  # Captum's selection; a slice selects the sum
            sel = picked.reshape(out.shape[0], -1).sum(1)
        if not isinstance(sel, torch.Tensor):
            raise TypeError(f"{where}: the neuron selector must return a Tensor, got {type(sel).__name__}")
        if sel.numel() not in (1, x.shape[0]):
            raise ValueError(f"{where}: the neuron selector must return one scalar per example ({x.shape[0]}) or a "
                             f"single element, got shape {list(sel.shape)}")
        if not sel.requires_grad:
            raise _no_path(where)
        # allow_unused only to tell "no path" (None) apart: it raises, it is never read as zero
        (g,) = torch.autograd.grad(sel, xr, grad_outputs=torch.ones_like(sel), allow_unused=True)
    if g is None:
        raise _no_path(where)
    return (g * x).detach()


def _ravel(idx: Tuple[int, ...], shape: Tuple[int, ...]) -> int:
    f = 0
    for v, n in zip(idx, shape):
        f = f * n + int(v)
    return f


# ----------------------------------------------------------------------------- public classes
class NeuronLearnedImage:
    """Captum's ``NeuronGradient × input`` of one neuron (or of the sum over a slice of
    neurons), or with ``gated=True`` the thesis's learned image of it.

    By default ``attribute`` returns exactly
    ``captum.attr.NeuronGradient(forward_func, layer).attribute(inputs, neuron_selector,
    additional_forward_args, attribute_to_neuron_input) * inputs``, for every layer and every
    selector form, by one vector–Jacobian product on the model (as Captum). ``gated=True``
    returns the learned image ``g_n · x ⊙ J_n`` of docs/spec.md §1 from the NNS engine: the same
    numbers except that a neuron whose layer feeds an activation directly (a conv or BN before
    its ReLU, a linear layer before its ReLU) is multiplied by that activation's gate ``S(z_n)``
    (zero for an inactive neuron).

    Parameters
    ----------
    forward_func : nn.Module or callable
        The model in eval mode (``gated=True`` needs an ``nn.Module``).
    layer : nn.Module or str
        The module whose output holds the neuron (a module of ``forward_func``), or its name
        from ``named_modules()``. A module called several times per forward pass is taken at
        its last call (as Captum); ``"name:k"`` picks the k-th call.
    device_ids : list of int or None
        Accepted for Captum compatibility; unused.
    gated : bool
        False (default): Captum's numbers. True: the thesis's gated learned image (engine).
    backend, strategy, max_memory, linearize
        Engine options of ``gated=True`` (see :class:`nns_cuda.Scanner`).
    gate_outputs : bool
        With ``gated=True``: gate the model's output neurons by ``S(z)`` too (docs/spec.md §1;
        default False, as the thesis).

    Raises
    ------
    ValueError
        ``gate_outputs=True`` without ``gated=True``.
    """

    def __init__(self, forward_func: Callable, layer: LayerSpec, device_ids: Optional[List[int]] = None, *,
                 gated: bool = False, backend: str = "auto", strategy: str = "auto",
                 max_memory: Union[None, int, str] = None, gate_outputs: bool = False,
                 linearize: Optional[str] = None):
        if gate_outputs and not gated:
            raise ValueError("gate_outputs=True gates learned images, which needs gated=True (the default returns "
                             "Captum's ungated NeuronGradient x input)")
        parse_bytes(max_memory)  # validated here, used by the engine
        self.forward_func = forward_func
        self.model = forward_func if isinstance(forward_func, nn.Module) else None
        self.layer = layer
        self.layer_name = _layer_name(self.model, layer)
        self.device_ids = device_ids
        self.gated = gated
        self.backend, self.strategy, self.max_memory = backend, strategy, max_memory
        self.gate_outputs, self.linearize = gate_outputs, linearize

    def attribute(self, inputs: Union[torch.Tensor, Tuple[torch.Tensor]], neuron_selector: Selector,
                  additional_forward_args: Any = None, attribute_to_neuron_input: bool = False):
        """``NeuronGradient × input`` (or, with ``gated=True``, the learned image) of the selected
        neuron for each example.

        Parameters
        ----------
        inputs : Tensor [B, D, H, W] (or [B, N]), or a 1-tuple of it
        neuron_selector : int, tuple of int / slice, or callable
            An int (2-D layer outputs), a tuple of ints (``(c, y, x)``) or slices (the sum of
            the selected neurons — by linearity the sum of their images), or a callable
            ``f(layer_output) -> Tensor [B]`` (not with ``gated=True``).
        additional_forward_args : Any
            Extra arguments of ``forward_func`` (not with ``gated=True``).
        attribute_to_neuron_input : bool
            Select among the layer's *input* neurons instead.

        Returns
        -------
        Tensor [B, D, H, W] (like ``inputs``; a 1-tuple if ``inputs`` was one)

        Raises
        ------
        ValueError
            The selected value has no gradient path from the inputs; or ``gated=True`` with a
            callable selector, ``additional_forward_args`` or a non-module ``forward_func``.
        """
        where = "NeuronLearnedImage.attribute"
        x, was_tuple = _as_input(inputs)
        if not self.gated:
            module, call = _layer_module(self.model, self.layer if self.layer_name is None else self.layer_name)
            return _wrap(_autograd_li(self.forward_func, module, call, x, neuron_selector, additional_forward_args,
                                      attribute_to_neuron_input, where), was_tuple)
        if self.model is None or self.layer_name is None:
            raise ValueError(f"{where}: gated=True runs the NNS engine, which needs forward_func to be an nn.Module")
        if additional_forward_args is not None:
            raise ValueError(f"{where}: gated=True runs the NNS engine on single-input models: additional_forward_args "
                             "is not supported (use gated=False)")
        if callable(neuron_selector):
            raise ValueError(f"{where}: gated=True needs a neuron index (an int or a tuple of ints / slices): a "
                             "callable selector has no neuron whose gate could be applied (use gated=False)")
        from nns_cuda.engine.functional import learned_images
        from nns_cuda.engine.graph import build_graph

        model = self.model
        graph = build_graph(model, x, self.linearize)
        g = graph.resolve(_last_call(graph, self.layer_name))
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


def _last_call(graph, name: str) -> str:
    """The engine address of ``name``: a module called several times is taken at its last call
    (Captum's hooks keep the last one)."""
    calls = getattr(graph, "ambiguous", {}).get(name)
    return calls[-1] if calls else name


class LayerLearnedImages:
    """Learned images of every neuron of a layer at once (the engine's forward strategy).

    These are the thesis's (gated) learned images, as ``NeuronLearnedImage(..., gated=True)``:
    equal to Captum's ``NeuronGradient × input`` neuron by neuron except on a layer that feeds
    an activation directly, where each image is multiplied by the activation's gate ``S(z_n)``.

    Parameters
    ----------
    forward_func : nn.Module
        The model, in eval mode.
    layer : nn.Module or str
        A module of ``forward_func`` or its name; a module called several times is taken at its
        last call (as Captum), ``"name:k"`` picks the k-th call.
    device_ids : list of int or None
        Accepted for Captum compatibility; unused.
    backend, strategy, max_memory, gate_outputs, linearize
        Engine options (see :class:`nns_cuda.Scanner`).
    """

    def __init__(self, forward_func: nn.Module, layer: LayerSpec, device_ids: Optional[List[int]] = None, *,
                 backend: str = "auto", strategy: str = "auto", max_memory: Union[None, int, str] = None,
                 gate_outputs: bool = False, linearize: Optional[str] = None):
        if not isinstance(forward_func, nn.Module):
            raise TypeError("LayerLearnedImages needs forward_func to be an nn.Module (the engine traces it); "
                            "for a plain function use NeuronLearnedImage with a callable selector")
        parse_bytes(max_memory)  # validated here, used by the engine
        self.model = forward_func
        self.layer_name = _layer_name(forward_func, layer)
        self.device_ids = device_ids
        self.backend, self.strategy, self.max_memory = backend, strategy, max_memory
        self.gate_outputs, self.linearize = gate_outputs, linearize

    def _target(self, x: torch.Tensor, to_input: bool) -> str:
        from nns_cuda.engine.graph import build_graph

        graph = build_graph(self.model, x, self.linearize)
        name = _last_call(graph, self.layer_name)
        if not to_input:
            return name
        g = graph.resolve(name)
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
        return _wrap(filter_images(self.model, x, self._target(x, False), backend=self.backend, strategy=self.strategy,
                                   max_memory=self.max_memory, gate_outputs=self.gate_outputs,
                                   linearize=self.linearize), was_tuple)
