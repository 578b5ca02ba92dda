"""ScanGraph: the gate-frozen linearisation plan of a model (docs/spec.md §1).

The model is traced with ``torch.fx`` into an ordered list of :class:`GNode` (conv, linear,
pool, BN, ReLU, add, reshape…). Each node knows its inputs, its output shape and, for spatial
nodes, its receptive-field geometry per axis: jump ``J``, start offset ``P`` and size ``R`` —
neuron ``(c, y, x)`` sees input rows ``[y·J − P, y·J − P + R)`` (clipped to the image).

Addressing (docs/spec.md §0): a node is addressed by its module's qualified name
(``model.named_modules()``). A module called more than once per forward pass gets ``name:0``,
``name:1``… (the bare name then raises, listing the call names). A container's name (a
residual block ``layer1.0``, a ``Sequential`` ``features``) addresses its output. Functional
operations (``torch.flatten``, ``+``, ``torch.cat``) are addressed by their ``torch.fx`` node
names (``flatten``, ``add_1``, ``cat``), listed by :meth:`ScanGraph.layer_names`.

An operation the scanner cannot linearise becomes an ``unsupported`` node: it blocks only the
layers computed from it (:meth:`ScanGraph.resolve` raises :class:`UnsupportedModuleError`,
naming the module whose forward holds it), so the layers before it, or on another branch,
can still be scanned.
"""
from __future__ import annotations

import builtins
import difflib
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from nns_cuda._modules import UnsupportedModuleError
from nns_cuda.engine.receptive_field import Geometry, assign_geometry

__all__ = [
    "ScanGraph",
    "GNode",
    "Geometry",
    "build_graph",
    "UnsupportedModuleError",
    "SUPPORTED_MODULES",
]

SUPPORTED_MODULES = (
    "Conv2d (stride, padding, dilation, groups), Linear, ReLU, LeakyReLU, ReLU6 / Hardtanh, "
    "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (and their F. / torch. functions), global mean over H, W, "
    "BatchNorm1d/2d (eval), Dropout, Flatten / torch.flatten / view / reshape, Identity, "
    "residual +, torch.cat / concat along channels (dim 1), channel ranges x[:, a:b] / torch.split / chunk; "
    "sizes read from tensors (x.shape, x.size(i), len(x)) as view / reshape arguments"
)

_GRADIENT_ACTIVATIONS = {
    nn.Sigmoid: torch.sigmoid,
    nn.Tanh: torch.tanh,
    nn.GELU: F.gelu,
    nn.SiLU: F.silu,
    nn.ELU: F.elu,
    nn.Softplus: F.softplus,
    nn.Mish: F.mish,
}


#: node kinds that are activations: their gate is their local slope (docs/spec.md §1)
ACTIVATIONS = ("relu", "leaky_relu", "hardtanh", "act_grad")


def call_out_of_place(mod: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``mod(z)`` without modifying ``z`` (modules built with ``inplace=True`` get a copy)."""
    return mod(z.clone()) if getattr(mod, "inplace", False) else mod(z)


class _InputMismatch(ValueError):
    """The example input does not run through the model."""


@dataclass
class GNode:
    """One node of a :class:`ScanGraph`: a module call or a tensor operation of the traced model.

    ``shape`` is the output shape without the batch dimension; ``gy`` / ``gx`` are the
    receptive-field geometry of a spatial node (output ``[C, H', W']`` of a spatial input),
    None for a dense one; ``attrs`` holds the kind's parameters (kernel, stride, slope, ...).
    """

    idx: int
    name: str                 # address (docs/spec.md §0)
    kind: str                 # input, conv, linear, relu, leaky_relu, hardtanh, act_grad, maxpool, avgpool,
    #                           adaptive_avgpool, bn, identity, reshape, add, aux
    inputs: List[int]         # indices of the tensor inputs that carry learned images
    fx_node: fx.Node
    module: Optional[nn.Module] = None
    attrs: Dict[str, Any] = field(default_factory=dict)
    users: List[int] = field(default_factory=list)
    shape: Tuple[int, ...] = ()   # output shape without the batch dimension
    gy: Optional[Geometry] = None  # spatial geometry (None: dense / non-spatial)
    gx: Optional[Geometry] = None
    scopes: Tuple[str, ...] = ()

    @property
    def spatial(self) -> bool:
        return self.gy is not None

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        g = f" J={self.gy.J},{self.gx.J} P={self.gy.P},{self.gx.P} R={self.gy.R},{self.gx.R}" if self.gy else ""
        return f"<{self.idx}:{self.kind} {self.name} {list(self.shape)} in={self.inputs}{g}>"


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


class ScanGraph:
    """The frozen-linearisation plan of ``model`` for inputs of one shape.

    Parameters
    ----------
    model : nn.Module in eval mode
    example : Tensor [B, *input_shape] (only its shape, dtype and device are used)
    linearize : None or "gradient" — allow non-piecewise-linear activations, using their
        local derivative as the gate (an extension, not part of the thesis; docs/spec.md §1).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, linearize: Optional[str] = None):
        if linearize not in (None, "gradient"):
            raise ValueError(f"linearize must be None or 'gradient', got {linearize!r}")
        _check_eval(model)
        self.model = model
        self.linearize = linearize
        self.input_shape = tuple(example.shape[1:])
        try:
            self.gm = _trace(model)
        except Exception as e:
            raise UnsupportedModuleError(
                f"torch.fx could not trace {type(model).__name__}: {e}. The scanner needs a "
                "model whose forward has no data-dependent control flow.") from e
        self.modules = dict(model.named_modules())
        self.nodes: List[GNode] = []
        self._build()
        self._shapes(example)
        self._geometry()
        self._addresses()

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        fx2idx: Dict[fx.Node, int] = {}
        calls: Dict[str, int] = {}
        for n in self.gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        seen: Dict[str, int] = {}
        self._fx2idx = fx2idx
        for n in self.gm.graph.nodes:
            idx = len(self.nodes)
            stack = n.meta.get("nn_module_stack") or {}
            scopes = tuple(k.split("@")[0] for k in stack.keys())
            tensor_inputs = [fx2idx[a] for a in n.all_input_nodes if a in fx2idx
                             and self.nodes[fx2idx[a]].kind != "aux"]
            if n.op == "placeholder":
                if any(nd.kind == "input" for nd in self.nodes):
                    raise UnsupportedModuleError("the scanner supports models with a single tensor input")
                g = GNode(idx, "input", "input", [], n)
            elif n.op == "output":
                args = n.args[0]
                # a model returning several tensors can still be scanned up to its layers
                self.output_idx = fx2idx.get(args) if isinstance(args, fx.Node) else None
                continue
            elif n.op == "get_attr":
                g = GNode(idx, n.name, "aux", [], n)
            elif n.op == "call_module":
                name = n.target
                k = seen.get(name, 0)
                seen[name] = k + 1
                addr = f"{name}:{k}" if calls[name] > 1 else name
                g = self._unsupported_or(idx, addr, n, tensor_inputs, self._module_node, idx, addr, n,
                                         self.modules[name], tensor_inputs)
            else:
                g = self._unsupported_or(idx, n.name, n, tensor_inputs, self._function_node, idx, n, tensor_inputs)
            g.scopes = scopes
            self.nodes.append(g)
            fx2idx[n] = idx
        for g in self.nodes:
            for i in g.inputs:
                self.nodes[i].users.append(g.idx)

    def _unsupported_or(self, idx, name, n, tin, make, *args) -> GNode:
        """``make(*args)``, or an ``unsupported`` node holding the error: it blocks only the
        layers computed from it (:meth:`blocker`), not the whole model."""
        try:
            return make(*args)
        except UnsupportedModuleError as e:
            return GNode(idx, name, "unsupported", list(tin), n, attrs=dict(error=self._in_module(n, str(e))))

    def _in_module(self, n: fx.Node, why: str) -> str:
        """``why`` prefixed with the module whose forward holds fx node ``n`` (its nn.Module path)."""
        if n.op == "call_module":
            return why  # the message already names the module
        stack = n.meta.get("nn_module_stack") or {}
        if not stack:
            return f"in the forward of the model ({type(self.model).__name__}): {why}"
        path, cls = list(stack.values())[-1]
        return f"in module {path!r} ({getattr(cls, '__name__', cls)}): {why}"

    def _mark_unsupported(self, g: GNode, why: str) -> None:
        g.attrs["error"] = self._in_module(g.fx_node, why)
        g.kind = "unsupported"

    def blocker(self, node: GNode) -> Optional[GNode]:
        """The first unsupported node on the way from the input to ``node`` (itself included),
        or None when ``node`` can be scanned."""
        i = self._blocked.get(node.idx)
        return None if i is None else self.nodes[i]

    def ancestors(self, idxs) -> set:
        """Indices of the nodes in ``idxs`` and of every node they are computed from."""
        seen, todo = set(), list(idxs)
        while todo:
            i = todo.pop()
            if i not in seen:
                seen.add(i)
                todo.extend(self.nodes[i].inputs)
        return seen

    def _module_node(self, idx, addr, n, mod, tin) -> GNode:
        def one_input():
            if len(tin) != 1:
                raise UnsupportedModuleError(f"module {addr!r} must take exactly one tensor input")
        if isinstance(mod, nn.Conv2d):
            one_input()
            if mod.padding_mode != "zeros":
                raise UnsupportedModuleError(f"{addr}: Conv2d padding_mode={mod.padding_mode!r} is not supported; use 'zeros'")
            if isinstance(mod.padding, str):
                raise UnsupportedModuleError(f"{addr}: Conv2d padding={mod.padding!r} (string) is not supported; give explicit integers")
            return GNode(idx, addr, "conv", tin, n, mod, dict(
                kernel=_pair(mod.kernel_size), stride=_pair(mod.stride), padding=_pair(mod.padding),
                dilation=_pair(mod.dilation), groups=mod.groups))
        if isinstance(mod, nn.Linear):
            one_input()
            return GNode(idx, addr, "linear", tin, n, mod)
        if isinstance(mod, nn.ReLU):
            one_input()
            return GNode(idx, addr, "relu", tin, n, mod)
        if isinstance(mod, nn.LeakyReLU):
            one_input()
            return GNode(idx, addr, "leaky_relu", tin, n, mod, dict(slope=float(mod.negative_slope)))
        if isinstance(mod, nn.MaxPool2d):
            one_input()
            return GNode(idx, addr, "maxpool", tin, n, mod, _maxpool_attrs(
                mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode))
        if isinstance(mod, nn.AvgPool2d):
            one_input()
            return GNode(idx, addr, "avgpool", tin, n, mod, _avgpool_attrs(
                mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad, mod.divisor_override))
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            one_input()
            return GNode(idx, addr, "adaptive_avgpool", tin, n, mod, dict(output_size=mod.output_size))
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            one_input()
            return GNode(idx, addr, "bn", tin, n, mod)
        if isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.Identity, nn.AlphaDropout)):
            one_input()
            return GNode(idx, addr, "identity", tin, n, mod)
        if isinstance(mod, nn.Flatten):
            one_input()
            return GNode(idx, addr, "reshape", tin, n, mod)
        if isinstance(mod, nn.Hardtanh):  # ReLU6 too: piecewise linear, slope 1 inside (min, max), 0 outside
            one_input()
            return GNode(idx, addr, "hardtanh", tin, n, mod, dict(lo=float(mod.min_val), hi=float(mod.max_val)))
        for cls in _GRADIENT_ACTIVATIONS:
            if isinstance(mod, cls):
                if self.linearize != "gradient":
                    raise UnsupportedModuleError(
                        f"module {addr!r} is {type(mod).__name__}, which is not piecewise linear: learned "
                        "images are defined for ReLU networks (docs/spec.md §1). Pass linearize='gradient' to use "
                        "its local derivative f'(z) as the gate (an extension, not the thesis).")
                one_input()
                return GNode(idx, addr, "act_grad", tin, n, mod)
        raise UnsupportedModuleError(
            f"module {addr!r} of type {type(mod).__name__} is not supported by the scanner. "
            f"Supported: {SUPPORTED_MODULES}.")

    def _function_node(self, idx, n, tin) -> GNode:
        t = n.target
        name = n.name
        if (t is getattr and len(n.args) == 2 and n.args[1] in _SHAPE_ATTRS) or t is _BUILTIN_LEN:
            return GNode(idx, name, "aux", [], n)  # x.shape, x.ndim, len(x): sizes, no learned image
        if not tin and not self._is_split_item(n):
            return GNode(idx, name, "aux", [], n)  # computed from sizes / constants only (h.size(1) * 4)
        if n.op == "call_method":
            if t in ("view", "reshape", "flatten"):
                return GNode(idx, name, "reshape", tin[:1], n)
            if t in ("contiguous", "clone", "detach"):
                return GNode(idx, name, "identity", tin[:1], n)
            if t in ("relu", "relu_"):
                return GNode(idx, name, "relu", tin[:1], n)
            if t in ("size", "dim", "numel"):
                return GNode(idx, name, "aux", [], n)
            if t in ("add", "add_", "__add__", "__iadd__"):
                return self._add_node(idx, n, tin)
            if t == "mean":
                return self._mean_node(idx, n, tin)
            if t in ("chunk", "split"):
                return self._split_node(idx, n, tin, t)
            raise UnsupportedModuleError(
                f"operation '.{t}()' at fx node {name!r} is not supported. Supported: {SUPPORTED_MODULES}.")
        # call_function
        if t in _CAT_FUNCTIONS:
            return self._cat_node(idx, n)
        if t is F.max_pool2d_with_indices:
            raise UnsupportedModuleError(f"max_pool2d at fx node {name!r} with return_indices=True is not supported; "
                                         "use return_indices=False (the scanner records the arg-max itself)")
        if t in (F.max_pool2d, torch.max_pool2d):
            kw = self._normalized(n)
            if kw.get("return_indices"):
                raise UnsupportedModuleError(f"max_pool2d at fx node {name!r} with return_indices=True is not supported")
            return GNode(idx, name, "maxpool", tin[:1], n, attrs=_maxpool_attrs(
                kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), kw.get("dilation", 1),
                kw.get("ceil_mode", False)))
        if t is F.avg_pool2d:
            kw = self._normalized(n)
            return GNode(idx, name, "avgpool", tin[:1], n, attrs=_avgpool_attrs(
                kw["kernel_size"], kw.get("stride"), kw.get("padding", 0), kw.get("ceil_mode", False),
                kw.get("count_include_pad", True), kw.get("divisor_override")))
        if t is torch.mean:
            return self._mean_node(idx, n, tin)
        if t in (torch.flatten, torch.reshape):
            return GNode(idx, name, "reshape", tin[:1], n)
        if t in (F.relu, torch.relu, torch.relu_, getattr(F, "relu_", None)):
            return GNode(idx, name, "relu", tin[:1], n)
        if t is F.relu6:
            return GNode(idx, name, "hardtanh", tin[:1], n, attrs=dict(lo=0.0, hi=6.0))
        if t is F.hardtanh:
            kw = self._normalized(n)
            return GNode(idx, name, "hardtanh", tin[:1], n,
                         attrs=dict(lo=float(kw.get("min_val", -1.0)), hi=float(kw.get("max_val", 1.0))))
        if t is F.leaky_relu:
            slope = n.kwargs.get("negative_slope", n.args[1] if len(n.args) > 1 else 0.01)
            return GNode(idx, name, "leaky_relu", tin[:1], n, attrs=dict(slope=float(slope)))
        if t in (operator.add, torch.add, operator.iadd):
            return self._add_node(idx, n, tin)
        if t is F.dropout or t is torch.nn.functional.dropout:
            return GNode(idx, name, "identity", tin[:1], n)
        if t is F.adaptive_avg_pool2d:
            return GNode(idx, name, "adaptive_avgpool", tin[:1], n,
                         attrs=dict(output_size=n.args[1] if len(n.args) > 1 else n.kwargs["output_size"]))
        if t in (torch.chunk, torch.split):
            return self._split_node(idx, n, tin, "chunk" if t is torch.chunk else "split")
        if t is operator.getitem:
            src = n.args[0]
            sg = self.nodes[self._fx2idx[src]] if isinstance(src, fx.Node) and src in self._fx2idx else None
            if sg is not None and sg.attrs.get("split"):  # one piece of torch.split / chunk
                return GNode(idx, name, "slice", [sg.attrs["src"]], n, attrs=dict(split=sg.idx, item=n.args[1]))
            if tin:  # x[:, a:b]
                return GNode(idx, name, "slice", tin[:1], n, attrs=dict(index=n.args[1]))
        if t in (getattr, operator.getitem) and not tin:
            return GNode(idx, name, "aux", [], n)
        raise UnsupportedModuleError(
            f"function {getattr(t, '__name__', t)!r} at fx node {name!r} is not supported. Supported: {SUPPORTED_MODULES}.")

    def _is_split_item(self, n: fx.Node) -> bool:
        """Whether ``n`` is ``pieces[i]`` of a ``torch.split`` / ``chunk`` node."""
        src = n.args[0] if n.target is operator.getitem and n.args else None
        return (isinstance(src, fx.Node) and src in self._fx2idx
                and bool(self.nodes[self._fx2idx[src]].attrs.get("split")))

    def _tensor_operands(self, args) -> List[int]:
        """Node indices of the tensor operands among ``args``, in order, repeats kept (``x + x``,
        ``torch.cat([x, x])``: ``fx.Node.all_input_nodes`` lists ``x`` once)."""
        return [self._fx2idx[a] for a in args if isinstance(a, fx.Node) and a in self._fx2idx
                and self.nodes[self._fx2idx[a]].kind != "aux"]

    def _normalized(self, n: fx.Node) -> Dict[str, Any]:
        pair = n.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
        if pair is None:  # pragma: no cover - every supported function has a signature
            raise UnsupportedModuleError(f"cannot read the arguments of {n.target} at fx node {n.name!r}")
        return dict(pair.kwargs)

    def _add_node(self, idx, n, tin) -> GNode:
        alpha = n.kwargs.get("alpha", 1)
        if alpha != 1:
            raise UnsupportedModuleError(f"addition at {n.name!r} with alpha={alpha!r} is not supported; "
                                         "write a + alpha * b with a module (e.g. a 1x1 conv) or alpha=1")
        ops = self._tensor_operands(n.args[:2])
        if len(ops) == 2:
            return GNode(idx, n.name, "add", ops, n)
        if len(ops) == 1:  # tensor + constant: an additive bias, dropped in the frozen network
            return GNode(idx, n.name, "identity", ops, n, attrs=dict(bias_add=True))
        raise UnsupportedModuleError(f"addition at {n.name!r} has no tensor operand")

    def _cat_node(self, idx, n) -> GNode:
        kw = self._normalized(n)
        seq = kw.get("tensors")
        dim = kw.get("dim", kw.get("axis", 0))
        if not isinstance(seq, (list, tuple)) or not seq:
            raise UnsupportedModuleError(f"torch.cat at fx node {n.name!r}: expected a list of tensors")
        ops = self._tensor_operands(seq)
        if len(ops) != len(seq):
            raise UnsupportedModuleError(
                f"torch.cat at fx node {n.name!r} concatenates something other than the model's tensors "
                "(a constant or parameter); only tensors computed from the input can be concatenated")
        return GNode(idx, n.name, "cat", ops, n, attrs=dict(dim=int(dim)))

    def _split_node(self, idx, n, tin, how: str) -> GNode:
        """``torch.split`` / ``torch.chunk`` (function or method): a tuple, not a tensor, so an
        ``aux`` node; each ``[i]`` of it becomes a ``slice`` node of the split tensor."""
        if len(tin) != 1:
            raise UnsupportedModuleError(f"{how} at fx node {n.name!r} must split exactly one tensor")
        args = list(n.args[1:])
        dim = n.kwargs.get("dim", args[1] if len(args) > 1 else 0)
        return GNode(idx, n.name, "aux", [], n, attrs=dict(split=True, src=tin[0], dim=int(dim), how=how))

    def _slice_bounds(self, g: GNode, values: Dict[Any, Any]) -> None:
        """``start`` / ``stop`` along dim 1 of a ``slice`` node (from the forward values)."""
        src = values[g.inputs[0]]
        C = src.shape[1] if src.dim() >= 2 else 0
        if "split" in g.attrs:
            sp = self.nodes[g.attrs["split"]]
            if not _is_channel_dim(sp.attrs["dim"], src.dim()):
                raise UnsupportedModuleError(
                    f"{sp.attrs['how']} at fx node {sp.name!r} splits a {src.dim()}-d tensor along dim "
                    f"{sp.attrs['dim']}: only channels of [B, C, H, W] maps or features of [B, N] vectors (dim 1) "
                    "can be split")
            item = g.attrs["item"]
            pieces = values[sp.idx]
            if not isinstance(item, int):
                raise UnsupportedModuleError(f"fx node {g.name!r}: index the pieces of {sp.name!r} with an integer")
            sizes = [int(p.shape[1]) for p in pieces]
            i = item + len(sizes) if item < 0 else item
            start = sum(sizes[:i])
            g.attrs.update(start=start, stop=start + sizes[i])
            return
        idx = g.attrs["index"]
        idx = idx if isinstance(idx, tuple) else (idx,)
        rest_ok = all(e is Ellipsis or (isinstance(e, slice) and e == slice(None)) for e in idx[2:])
        if (src.dim() not in (2, 4) or len(idx) < 2 or idx[0] != slice(None) or not isinstance(idx[1], slice)
                or idx[1].step not in (None, 1) or not rest_ok):
            raise UnsupportedModuleError(
                f"indexing at fx node {g.name!r} ({idx!r} of a {src.dim()}-d tensor) is not supported: only a "
                "channel range x[:, a:b] (step 1) of [B, C, H, W] maps or [B, N] vectors keeps every neuron's "
                "learned image defined")
        start, stop, _ = idx[1].indices(C)
        g.attrs.update(start=start, stop=max(start, stop))

    def _mean_node(self, idx, n, tin) -> GNode:
        """``x.mean((2, 3))`` / ``torch.mean(x, dim=(-2, -1), keepdim=...)``: global average pooling."""
        args = list(n.args[1:])
        dim = n.kwargs.get("dim", args[0] if args else None)
        keepdim = bool(n.kwargs.get("keepdim", args[1] if len(args) > 1 else False))
        if n.kwargs.get("dtype") is not None:
            raise UnsupportedModuleError(f"mean at fx node {n.name!r} with dtype= is not supported")
        dims = (dim,) if isinstance(dim, int) else tuple(dim) if dim is not None else None
        return GNode(idx, n.name, "global_mean", tin[:1], n, attrs=dict(dims=dims, keepdim=keepdim))

    # ------------------------------------------------------------------ shapes
    def _shapes(self, example: torch.Tensor) -> None:
        try:
            values = self.run(example, record=False)
        except (RuntimeError, ValueError, IndexError) as e:
            raise _InputMismatch(f"input of shape {list(example.shape)} does not fit the model: {e}") from e
        self._blocked: Dict[int, int] = {}
        for g in self.nodes:
            v = values[g.idx]
            if g.kind == "aux":
                continue
            cause = next((self._blocked[i] for i in g.inputs if i in self._blocked), None)
            if cause is None and g.kind != "unsupported":
                try:
                    self._check_node(g, v, values, example)
                except UnsupportedModuleError as e:
                    self._mark_unsupported(g, str(e))
            if g.kind == "unsupported":
                cause = g.idx if cause is None else cause
            if cause is not None:  # never scanned: its shape only for the memory model
                self._blocked[g.idx] = cause
                g.shape = tuple(v.shape[1:]) if isinstance(v, torch.Tensor) and v.dim() > 0 else ()
                continue
            g.shape = tuple(v.shape[1:])

    def _check_node(self, g: GNode, v, values: Dict[Any, Any], example: torch.Tensor) -> None:
        """Raise ``UnsupportedModuleError`` unless node ``g``'s value ``v`` can be linearised."""
        if not isinstance(v, torch.Tensor):
            raise UnsupportedModuleError(f"node {g.name!r} does not produce a tensor")
        if g.kind == "cat":
            if not _is_channel_dim(g.attrs["dim"], v.dim()):
                raise UnsupportedModuleError(
                    f"torch.cat at fx node {g.name!r} joins {v.dim()}-d tensors along dim {g.attrs['dim']}: only "
                    "channels of [B, C, H, W] maps or features of [B, N] vectors (dim 1) can be concatenated")
        if g.kind == "slice":
            self._slice_bounds(g, values)
        if g.kind == "global_mean":
            src = values[g.inputs[0]]
            dims = g.attrs["dims"]
            dd = None if dims is None else sorted(d + src.dim() if d < 0 else d for d in dims)
            if src.dim() != 4 or dd != [2, 3]:
                raise UnsupportedModuleError(
                    f"mean at fx node {g.name!r} over dims {dims} of a {src.dim()}-d tensor: only the global "
                    "average over H, W of a [B, C, H, W] map (dims (2, 3)) is supported")
        if v.dim() == 0 or v.shape[0] != example.shape[0]:
            raise UnsupportedModuleError(
                f"node {g.name!r} changes the batch dimension (shape {list(v.shape)}); reshapes must keep dim 0")

    def run(self, x: torch.Tensor, record: bool = True) -> Dict[int, Any]:
        """Run the model node by node (non-inplace). Returns ``{node index: value}``;
        max-pool nodes also store their arg-max indices under ``("indices", idx)``."""
        env: Dict[fx.Node, Any] = {}
        values: Dict[Any, Any] = {}
        for g in self.nodes:
            n = g.fx_node
            args = fx.graph.map_arg(n.args, lambda a: env[a])
            kwargs = fx.graph.map_arg(n.kwargs, lambda a: env[a])
            if g.kind == "unsupported":  # it may work in place: keep the recorded values intact
                args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            if g.kind == "input":
                v = x
            elif n.op == "get_attr":
                v = _fetch_attr(self.gm, n.target)
            elif g.kind in ("relu",):
                v = F.relu(args[0])
            elif g.kind == "leaky_relu":
                v = F.leaky_relu(args[0], g.attrs["slope"])
            elif g.kind == "hardtanh":
                v = F.hardtanh(args[0], g.attrs["lo"], g.attrs["hi"])
            elif g.kind == "act_grad":  # never in place: the input value is kept for the gate
                v = call_out_of_place(g.module, args[0])
            elif g.kind == "maxpool":
                a = g.attrs
                v, ind = F.max_pool2d(args[0], a["kernel"], a["stride"], a["padding"], a["dilation"],
                                      a["ceil_mode"], return_indices=True)
                values[("indices", g.idx)] = ind
            elif n.op == "call_module":
                v = self.gm.get_submodule(n.target)(*args, **kwargs)
            elif n.op == "call_function":
                kw = dict(kwargs)
                kw.pop("inplace", None)
                fn = n.target
                if fn is operator.iadd:
                    fn = operator.add
                elif fn is torch.relu_:
                    fn = torch.relu
                v = fn(*args, **kw)
            elif n.op == "call_method":
                meth = n.target.rstrip("_") if n.target in ("relu_", "add_") else n.target
                v = getattr(args[0], meth)(*args[1:], **kwargs)
            else:  # pragma: no cover
                raise UnsupportedModuleError(f"unexpected fx node {n.op}")
            env[n] = v
            values[g.idx] = v
        return values

    # ------------------------------------------------------------------ geometry
    def _geometry(self) -> None:
        """Receptive-field geometry of every node (:func:`~nns_cuda.engine.receptive_field.assign_geometry`)."""
        assign_geometry(self.nodes, self.input_shape, ACTIVATIONS + ("bn", "identity", "slice"))

    # ------------------------------------------------------------------ addressing
    def _addresses(self) -> None:
        self.by_name: Dict[str, int] = {}
        multi: Dict[str, List[str]] = {}
        for g in self.nodes:
            if g.kind in ("aux", "input"):
                continue
            self.by_name[g.name] = g.idx
            if ":" in g.name and g.fx_node.op == "call_module":
                multi.setdefault(g.name.rsplit(":", 1)[0], []).append(g.name)
        self.ambiguous = multi
        # containers: last node inside their scope
        for mname, mod in self.modules.items():
            if mname == "" or mname in self.by_name or mname in multi:
                continue
            last = None
            for g in self.nodes:
                if g.kind in ("aux", "input"):
                    continue
                if mname in g.scopes or any(s.startswith(mname + ".") for s in g.scopes):
                    last = g.idx
            if last is not None and len(list(mod.children())) > 0:
                self.by_name[mname] = last
        if self.output_idx is not None:
            self.by_name[""] = self.output_idx

    def layer_names(self) -> List[str]:
        """All addresses that :meth:`resolve` accepts (modules, calls, containers, fx ops):
        the nodes that can be scanned (no unsupported operation on the way to them)."""
        return [n for n, i in self.by_name.items() if n and i not in self._blocked]

    def resolve(self, name: str) -> GNode:
        """The node addressed by ``name`` (docs/spec.md §0); errors name close matches."""
        if not isinstance(name, str):
            raise TypeError(f"layer must be a module name (str), got {type(name).__name__}")
        if name in self.by_name:
            node = self.nodes[self.by_name[name]]
            bad = self.blocker(node)
            if bad is not None:
                raise UnsupportedModuleError(f"layer {name!r} cannot be scanned: {bad.attrs['error']}")
            return node
        if name in self.ambiguous:
            raise KeyError(
                f"layer {name!r} is called {len(self.ambiguous[name])} times in one forward pass; "
                f"address one call: {self.ambiguous[name]}")
        if name in self.modules:
            raise KeyError(
                f"layer {name!r} exists but is not used in the forward pass (or produces no tensor); "
                f"scannable layers: {self.layer_names()[:40]}")
        close = difflib.get_close_matches(name, self.layer_names(), n=5)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown layer name {name!r}.{hint} Layer names come from "
                       "model.named_modules(); see ScanGraph.layer_names().")

    def gate_user(self, g: GNode) -> Optional[GNode]:
        """The activation that follows ``g`` directly (its only user), if any (docs/spec.md §1 ``g_n``)."""
        if len(g.users) == 1:
            u = self.nodes[g.users[0]]
            if u.kind in ACTIVATIONS:
                return u
        return None

    @property
    def output(self) -> GNode:
        if self.output_idx is None:
            raise UnsupportedModuleError("the model does not return a single tensor")
        return self.nodes[self.output_idx]


def _pool_stride(kernel: Tuple[int, int], stride) -> Tuple[int, int]:
    """A pool's stride; None (modules) or empty (``torch.max_pool2d``'s ``[]``) means the kernel."""
    return kernel if stride is None or (isinstance(stride, (list, tuple)) and not stride) else _pair(stride)


def _maxpool_attrs(kernel_size, stride, padding, dilation, ceil_mode) -> Dict[str, Any]:
    k = _pair(kernel_size)
    return dict(kernel=k, stride=_pool_stride(k, stride), padding=_pair(padding), dilation=_pair(dilation),
                ceil_mode=bool(ceil_mode))


def _avgpool_attrs(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override) -> Dict[str, Any]:
    k = _pair(kernel_size)
    return dict(kernel=k, stride=_pool_stride(k, stride), padding=_pair(padding), ceil_mode=bool(ceil_mode),
                count_include_pad=bool(count_include_pad), divisor_override=divisor_override)


def _is_channel_dim(dim: int, rank: int) -> bool:
    """Whether ``dim`` of a rank-``rank`` tensor is the channels of ``[B, C, H, W]`` or the
    features of ``[B, N]`` (the only axis that cat / split / channel ranges may act on)."""
    return rank in (2, 4) and (dim + rank if dim < 0 else dim) == 1


_CAT_FUNCTIONS = tuple(f for f in (torch.cat, getattr(torch, "concat", None), getattr(torch, "concatenate", None))
                       if f is not None)


_SHAPE_ATTRS = ("shape", "ndim", "dtype", "device")
_BUILTIN_LEN = builtins.len
_TRACE_LOCK = threading.RLock()


def _traced_len(obj):
    """``len`` during tracing: ``len(proxy)`` becomes a graph node (sizes used in view / reshape)."""
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", _BUILTIN_LEN, (obj,), {})
    return _BUILTIN_LEN(obj)


def _trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, with ``len(tensor)`` recorded (builtins.len is
    swapped for the trace; traces are serialised, torch.fx patches global state anyway)."""
    with _TRACE_LOCK:
        builtins.len = _traced_len
        try:
            tracer = fx.Tracer()
            graph = tracer.trace(model)
        finally:
            builtins.len = _BUILTIN_LEN
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _fetch_attr(mod: nn.Module, target: str):
    obj = mod
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _check_eval(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training
                and isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d)) ]
    if model.training or training:
        raise RuntimeError(
            "the model is in training mode (" + (", ".join(training[:5]) or type(model).__name__) +
            "): learned images are defined for the eval-mode network (BatchNorm with running "
            "statistics, no dropout). Call model.eval() first.")


_GRAPH_CACHE: Dict[Tuple[int, Tuple[int, ...], Optional[str]], ScanGraph] = {}


def build_graph(model: nn.Module, example: torch.Tensor, linearize: Optional[str] = None) -> ScanGraph:
    """Build (or reuse) the :class:`ScanGraph` of ``model`` for inputs shaped like ``example``.

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    example : Tensor [B, *input_shape]
        The batch (or any part of it): only its non-batch shape, dtype and device are used,
        the model runs on one sample.
    linearize : None or "gradient"
        As :class:`ScanGraph`.

    Returns
    -------
    ScanGraph
        Cached per (model, input shape, linearize) while the model object lives.

    Raises
    ------
    ValueError
        ``example`` does not fit the model (for a 3-d ``example``: "x must be [B, C, H, W]").
    """
    _check_eval(model)
    shape = list(example.shape)
    # one sample (an empty batch: one zero sample of the same shape)
    example = example[:1] if example.shape[0] else example.new_zeros((1, *example.shape[1:]))
    key = (id(model), tuple(example.shape[1:]), linearize)
    g = _GRAPH_CACHE.get(key)
    if g is not None and g.model is model:
        return g
    try:
        g = ScanGraph(model, example, linearize)
    except _InputMismatch as e:
        if len(shape) == 3:
            raise ValueError(f"x must be [B, C, H, W], got {shape}; add the missing dimension: x.unsqueeze(0) for one "
                             "image [C, H, W], x.unsqueeze(1) for a batch of one-channel images [B, H, W]") from e
        raise
    if len(_GRAPH_CACHE) > 32:
        _GRAPH_CACHE.clear()
    _GRAPH_CACHE[key] = g
    return g
