"""The toolkit every analysis shares (private; one copy of each helper).

It holds

* the named warnings of the analyses,
* input validation with messages that name the problem and the fix (docs/spec.md §6),
* iteration over a data set of ``(x, y, fg_mask)`` batches,
* thin adapters to the engine's public API, each replaceable by an injected function,
* a forward-hook trace of the model's leaf-module calls, used to pick default layers,
* conversion of results to JSON-safe values.

Module addressing (``name:k`` calls, devices, eval mode, output capture) lives one layer
lower, in :mod:`nns_cuda._modules`, and is re-exported here for the analyses.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nns_cuda._modules import (  # noqa: F401  (re-exported for the analyses)
    check_eval,
    check_layers,
    eval_mode,
    layer_hook,
    layer_outputs,
    model_device,
    resolve_module,
    split_call,
)

__all__ = [
    "FQWarning",
    "EmptyForegroundWarning",
    "NoBackgroundWarning",
    "ZeroInputWarning",
    "Batch",
    "iter_batches",
    "check_layers",
    "check_finite",
    "check_input",
    "check_mask",
    "check_eval",
    "model_device",
    "make_scan",
    "make_li_fn",
    "make_filter_fn",
    "trace_calls",
    "conv_act_layers",
    "output_layer_name",
    "layer_outputs",
    "eval_mode",
    "layer_hook",
    "resolve_module",
    "split_call",
    "to_jsonable",
    "unpack_batch",
    "check_reiterable",
    "checked_scan",
    "NanMean",
    "NotFittedError",
    "ResultEstimator",
    "iter_raw_batches",
]


# --------------------------------------------------------------------------------------------
# warnings
# --------------------------------------------------------------------------------------------
class FQWarning(UserWarning):
    """Base class of the warnings of the neuron-level analyses."""


class EmptyForegroundWarning(FQWarning):
    """A sample has no active input entry in its foreground (``N_f = 0``): its ``F`` is 0.

    Raised when the foreground mask is empty (an all-background sample) or when the input is 0
    everywhere inside the mask. docs/spec.md §3 sets ``F = 0`` for such samples.
    """


class NoBackgroundWarning(FQWarning):
    """A sample's foreground mask covers the whole image, so ``N^n_x = 0`` and ``F = 0``.

    Eq. 4-6 is used literally (docs/spec.md §3 [decision]): its first factor counts learned-image entries
    in the background, so a sample without background has ``F = 0`` for every neuron. Data sets
    without boxes (CIFAR loaded without annotations) therefore give ``FQ = 0`` everywhere.
    """


class ZeroInputWarning(FQWarning):
    """A sample's input is zero everywhere, so ``count(x) = strength(x) = 0`` and the
    knowledge-quantity ratios of docs/spec.md §2 are undefined for it; the sample is left out."""


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def check_finite(name: str, t: Tensor, where: str) -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise ValueError(
            f"{where}: {name} contains {n_nan} NaN and {n_inf} Inf entries; the measures are "
            "undefined for non-finite values. Clean the input (e.g. torch.nan_to_num) or drop the sample."
        )


def check_input(x: Tensor, where: str, *, dims: Tuple[int, ...] = (4,), name: str = "x") -> Tensor:
    """Check that ``x`` is a finite floating tensor with one of the allowed ranks."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {x.dtype}; convert it with {name}.float().")
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{where}: {name} must be {want} ([B, D, H, W] for a batch), got shape {list(x.shape)}.")
    check_finite(name, x, where)
    return x


def check_mask(mask: Optional[Tensor], x: Tensor, where: str, *, batched: bool, required: bool = True) -> Optional[Tensor]:
    """Check a foreground mask against its input.

    ``batched``: ``x`` is ``[B, D, H, W]`` and the mask must be ``[B, H, W]``; otherwise ``x`` is
    ``[D, H, W]`` and the mask ``[H, W]``. The mask must be ``torch.bool``.
    """
    if mask is None:
        if required:
            raise ValueError(
                f"{where}: a foreground mask is required (bool [H, W] per sample, from the object's "
                "bounding box). Pass torch.ones(H, W, dtype=torch.bool) only if you really mean "
                "'everything is foreground' (then F = 0, docs/spec.md §3)."
            )
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: fg_mask must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{where}: fg_mask must have dtype torch.bool, got {mask.dtype}. Convert it explicitly, "
            "e.g. fg_mask > 0.5 for a float mask or fg_mask.bool() for a 0/1 integer mask."
        )
    H, W = x.shape[-2:]
    want = (x.shape[0], H, W) if batched else (H, W)
    if tuple(mask.shape) != tuple(want):
        raise ValueError(
            f"{where}: fg_mask must have shape {list(want)} ({'[B, H, W]' if batched else '[H, W]'}) "
            f"to match the input {list(x.shape)} "
            f"(one [H, W] mask per sample, broadcast over the D channels), got {list(mask.shape)}."
        )
    return mask.to(x.device)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One validated batch: ``x [B, D, H, W]``, ``y [B]`` long or None, ``fg_mask [B, H, W]`` bool or None,
    and ``offset``, the data-set index of its first sample."""

    x: Tensor
    y: Optional[Tensor]
    fg_mask: Optional[Tensor]
    offset: int


def _unpack_item(item: Any) -> Tuple[Any, Any, Any]:
    if isinstance(item, Tensor):
        return item, None, None
    if isinstance(item, Mapping):
        def get(*keys):
            for k in keys:
                if k in item:
                    return item[k]
            return None
        return get("x", "image", "input", "inputs"), get("y", "label", "labels", "target"), get("fg_mask", "mask", "box_mask")
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return item[0], None, None
        if len(item) == 2:
            return item[0], item[1], None
        if len(item) == 3:
            return item[0], item[1], item[2]
    raise TypeError(
        "data must yield batches (x, y, fg_mask), (x, y) or x, or dicts with keys 'x', 'y', "
        f"'fg_mask'; got an item of type {type(item).__name__}"
        + (f" with {len(item)} entries" if isinstance(item, (tuple, list)) else "")
        + "."
    )


def iter_batches(
    data: Any,
    where: str,
    *,
    batch_size: int = 64,
    device: Optional[torch.device] = None,
    need_labels: bool = False,
    need_mask: bool = False,
    input_dims: Tuple[int, ...] = (4,),
    max_samples: Optional[int] = None,
) -> Iterator[Batch]:
    """Iterate over ``data`` as validated batches.

    ``data`` may be a ``DataLoader`` or any iterable of batches (``(x, y, fg_mask)``,
    ``(x, y)``, ``x`` or dicts), a map-style ``Dataset`` of single samples (wrapped in a
    ``DataLoader`` with ``batch_size``), or one batch given as a tuple of tensors.
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, tuple) and data and isinstance(data[0], Tensor):
        data = [data]
    elif isinstance(data, Tensor):
        data = [data]
    offset = 0
    for bi, item in enumerate(data):
        x, y, m = _unpack_item(item)
        label = f"{where} (batch {bi})"
        x = check_input(x, label, dims=input_dims)
        if device is not None:
            x = x.to(device)
        if y is not None:
            if not isinstance(y, Tensor):
                y = torch.as_tensor(y)
            if y.dim() == 0:
                y = y.view(1)
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"{label}: labels y must be integer class indices, got dtype {y.dtype}.")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{label}: labels y must have shape [{x.shape[0]}], got {list(y.shape)}.")
            y = y.long().to(x.device)
        elif need_labels:
            raise ValueError(
                f"{label}: this analysis needs class labels, but the data yields no y. Pass batches "
                "(x, y, fg_mask) or (x, y) with integer labels."
            )
        if m is None and need_mask:
            raise ValueError(
                f"{label}: this analysis needs a foreground mask per sample (bool [B, H, W], from the "
                "bounding box), but the data yields none. Pass batches (x, y, fg_mask)."
            )
        if m is not None:
            if x.dim() != 4:
                raise ValueError(f"{label}: a foreground mask needs image inputs [B, D, H, W], got {list(x.shape)}.")
            m = check_mask(m, x, label, batched=True)
        if max_samples is not None and offset + x.shape[0] > max_samples:
            keep = max_samples - offset
            if keep <= 0:
                return
            x = x[:keep]
            y = None if y is None else y[:keep]
            m = None if m is None else m[:keep]
        yield Batch(x, y, m, offset)
        offset += x.shape[0]
        if max_samples is not None and offset >= max_samples:
            return
    if offset == 0:
        raise ValueError(f"{where}: the data set is empty (no batch was yielded).")


# --------------------------------------------------------------------------------------------
# engine adapters (lazy; replaceable by injected functions)
# --------------------------------------------------------------------------------------------
#: ``scan_fn(model, x, fg_mask, layers) -> {layer: (activations [B, *shape], stats [B, *shape, NUM_STATS])}``
#: (an object with ``.activations`` and ``.stats`` per layer is accepted too).
ScanFn = Callable[[nn.Module, Tensor, Optional[Tensor], Sequence[str]], Mapping[str, Any]]
#: ``li_fn(model, x, layer, neurons) -> [B, n, D, H, W]`` (``neurons=None``: ``[B, *shape, D, H, W]``).
LiFn = Callable[..., Tensor]
#: ``filter_fn(model, x, layer) -> [B, C, D, H, W]``.
FilterFn = Callable[[nn.Module, Tensor, str], Tensor]


def _engine():
    from nns_cuda import engine

    return engine


def _unpack_layer_result(r: Any, layer: str) -> Tuple[Tensor, Optional[Tensor]]:
    if isinstance(r, (tuple, list)) and len(r) == 2:
        return r[0], r[1]
    act = getattr(r, "activations", None)
    if act is None:
        raise TypeError(f"scan result for layer {layer!r} has no activations (got {type(r).__name__}).")
    return act, getattr(r, "stats", None)


def make_scan(model: nn.Module, layers: Sequence[str], scan_fn: Optional[ScanFn], *, stats: bool = True):
    """Return ``scan(x, fg_mask) -> {layer: (activations, stats)}`` using ``scan_fn`` or the engine's
    ``Scanner(model, layers, stats=True)`` (built once per call of an analysis)."""
    layers = list(layers)
    if scan_fn is not None:
        def scan(x: Tensor, fg_mask: Optional[Tensor]):
            res = scan_fn(model, x, fg_mask, layers)
            return {l: _unpack_layer_result(res[l], l) for l in layers}
        return scan
    scanner = _engine().Scanner(model, layers=layers, stats=stats)

    def scan(x: Tensor, fg_mask: Optional[Tensor]):
        res = scanner.scan(x, fg_mask=fg_mask) if stats else scanner.scan(x)
        return {l: _unpack_layer_result(res[l], l) for l in layers}
    return scan


def make_li_fn(li_fn: Optional[LiFn]) -> LiFn:
    if li_fn is not None:
        return li_fn

    def f(model, x, layer, neurons=None):
        return _engine().learned_images(model, x, layer, neurons=neurons)
    return f


def make_filter_fn(filter_fn: Optional[FilterFn]) -> FilterFn:
    if filter_fn is not None:
        return filter_fn

    def f(model, x, layer):
        return _engine().filter_images(model, x, layer)
    return f


# --------------------------------------------------------------------------------------------
# model structure
# --------------------------------------------------------------------------------------------
@dataclass
class Call:
    """One call of a leaf module during a forward pass."""

    name: str  # qualified name, with ':k' when the module is called more than once
    module: nn.Module
    out_shape: Tuple[int, ...]  # without the batch dimension


_ACT = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def trace_calls(model: nn.Module, x: Tensor) -> List[Call]:
    """Run ``model(x)`` once with forward hooks on every leaf module and return the calls in order.

    Hooks are removed afterwards, also on error.
    """
    raw: List[Tuple[str, nn.Module, Tuple[int, ...]]] = []
    handles = []
    try:
        for name, mod in model.named_modules():
            if name and not list(mod.children()):
                def hook(m, i, o, _n=name):
                    if isinstance(o, Tensor):
                        raw.append((_n, m, tuple(o.shape[1:])))
                handles.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    counts: Dict[str, int] = {}
    for n, _, _ in raw:
        counts[n] = counts.get(n, 0) + 1
    seen: Dict[str, int] = {}
    calls = []
    for n, m, s in raw:
        k = seen.get(n, 0)
        seen[n] = k + 1
        calls.append(Call(n if counts[n] == 1 else f"{n}:{k}", m, s))
    return calls


def conv_act_layers(calls: Sequence[Call]) -> List[str]:
    """Names of the activation calls that follow a ``Conv2d`` (directly or through a BatchNorm):
    the thesis's 'convolutional layers' (conv + activation, §4.4.1), in call order."""
    out = []
    for i, c in enumerate(calls):
        if isinstance(c.module, _ACT) and len(c.out_shape) == 3:
            j = i - 1
            while j >= 0 and isinstance(calls[j].module, (nn.BatchNorm2d,)):
                j -= 1
            if j >= 0 and isinstance(calls[j].module, nn.Conv2d):
                out.append(c.name)
    return out


def pool_layers(calls: Sequence[Call]) -> List[str]:
    """Names of the 2-D pooling calls with a spatial output larger than 1×1, in call order."""
    return [c.name for c in calls if isinstance(c.module, _POOL) and len(c.out_shape) == 3 and c.out_shape[1] * c.out_shape[2] > 1]


def output_layer_name(calls: Sequence[Call]) -> str:
    """The last leaf call of the forward pass (the output layer of a sequential classifier)."""
    if not calls:
        raise ValueError("the model has no leaf modules to take as its output layer; pass output_layer=.")
    return calls[-1].name


def warn_once(category, message: str, count: int, total: int, first: Sequence[int]) -> None:
    if count:
        idx = ", ".join(str(i) for i in list(first)[:5])
        warnings.warn(f"{message} ({count} of {total} samples; first indices: {idx}).", category, stacklevel=3)


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------
def to_jsonable(obj: Any, max_array: Optional[int] = None) -> Any:
    """Convert a result to JSON-safe values.

    Tensors and numpy arrays become (nested) lists, numpy scalars Python numbers, NaN / Inf
    ``None``, tuples lists, mapping keys strings, dataclasses dicts; any other object its
    ``str``. With ``max_array``, an array of more entries is replaced by
    ``{"array_shape": [...], "note": ...}``.
    """
    import dataclasses
    import math

    import numpy as np

    if isinstance(obj, Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if max_array is not None and obj.size > max_array:
            return {"array_shape": list(obj.shape), "note": "omitted (large array; see the report's figures)"}
        return to_jsonable(obj.tolist(), max_array)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), max_array)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, max_array) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, max_array) for v in obj]
    return str(obj)


# --------------------------------------------------------------------------------------------
# data passed over several times
# --------------------------------------------------------------------------------------------
def unpack_batch(batch: Any, where: str) -> Tuple[Tensor, Any, Any]:
    """Split one batch into its parts without validating them (see :func:`iter_batches` for that).

    Parameters
    ----------
    batch : ``(x, y, fg_mask)``, ``(x, y)``, ``(x,)``, ``x`` or a dict with keys ``x``, ``y``, ``fg_mask``
    where : str
        Prefix of error messages.

    Returns
    -------
    (Tensor, y or None, fg_mask or None)
        ``x [B, ...]`` and the labels and foreground mask as given (``None`` when absent).

    Raises
    ------
    TypeError
        For a batch of another form, or one whose ``x`` is not a tensor.
    """
    try:
        x, y, m = _unpack_item(batch)
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: a data batch must start with the input tensor x, got {type(x).__name__}.")
    return x, y, m


def check_reiterable(data: Any, where: str) -> None:
    """Refuse a one-shot iterator (a generator): the caller passes over ``data`` several times.

    Parameters
    ----------
    data : iterable of batches
    where : str
        Prefix of error messages.

    Raises
    ------
    TypeError
        If ``data`` is not iterable, or ``iter(data) is data``.
    """
    try:
        it = iter(data)
    except TypeError as e:
        raise TypeError(f"{where}: data must be an iterable of batches, got {type(data).__name__}.") from e
    if it is data:
        raise TypeError(
            f"{where}: data is a one-shot iterator ({type(data).__name__}); this analysis passes over the "
            "data several times. Pass a list of batches or a DataLoader."
        )


# --------------------------------------------------------------------------------------------
# data, unvalidated (model-level measures: accuracies, gradients, Hessians)
# --------------------------------------------------------------------------------------------
def _is_single_batch(data: Any) -> bool:
    """Whether ``data`` is one batch ``(x[, y[, fg_mask]])`` of tensors rather than a collection."""
    return (
        isinstance(data, (tuple, list))
        and 1 <= len(data) <= 3
        and all(isinstance(t, Tensor) for t in data)
        and data[0].dim() >= 2
        and (len(data) == 1 or (data[1].dim() >= 1 and data[1].shape[0] == data[0].shape[0]))
    )


def iter_raw_batches(
    data: Any,
    where: str,
    *,
    need_labels: bool = False,
    max_samples: Optional[int] = None,
) -> Iterator[Tuple[Tensor, Any, Any]]:
    """Iterate over ``data`` as ``(x, y, fg_mask)`` parts without validating their values.

    For measures of the whole model (accuracies, per-sample gradients, Hessians) whose inputs
    need not be images with foreground masks; :func:`iter_batches` is the validating iterator.
    Sample ``i`` is the ``i``-th sample in iteration order. An empty batch ends the iteration.

    Parameters
    ----------
    data : one batch or an iterable of batches
        A pair / triple ``(x, y[, fg_mask])`` of tensors (one batch), or an iterable (a list, a
        ``DataLoader``) of batches in the forms :func:`unpack_batch` accepts.
    where : str
        Prefix of error messages.
    need_labels : bool
        Raise ``ValueError`` for a batch without labels ``y``.
    max_samples : int, optional
        Stop after this many samples (the last batch is cut).

    Yields
    ------
    (Tensor, y or None, fg_mask or None)
        ``x [B, ...]``, the labels ``[B]`` and the foreground mask as given.

    Raises
    ------
    TypeError
        If ``data`` is a single tensor, not iterable, or yields a batch of another form.
    """
    if isinstance(data, Tensor):
        raise TypeError(
            f"{where}: data must be a pair (x, y) of tensors or an iterable of (x, y[, fg_mask]) "
            f"batches, got a single tensor of shape {tuple(data.shape)}; pass (x, y)."
        )
    batches = [data] if _is_single_batch(data) else data
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(
            f"{where}: data must be a pair (x, y) of tensors or an iterable of (x, y[, fg_mask]) "
            f"batches, got {type(data).__name__}."
        ) from None
    n = 0
    for batch in it:
        x, y, fg = unpack_batch(batch, where)
        if need_labels and y is None:
            raise ValueError(f"{where}: the data has no labels y; pass batches (x, y) with integer class labels.")
        if max_samples is not None:
            x = x[: max_samples - n]
            y = None if y is None else y[: max_samples - n]
            fg = fg[: max_samples - n] if isinstance(fg, Tensor) else fg
        if x.shape[0] == 0:
            return
        yield x, y, fg
        n += x.shape[0]
        if max_samples is not None and n >= max_samples:
            return


# --------------------------------------------------------------------------------------------
# neuron-level analyses: scan output, running means, fitted estimators
# --------------------------------------------------------------------------------------------
def checked_scan(scan: Callable[[Tensor, Optional[Tensor]], Mapping[str, Tuple[Tensor, Optional[Tensor]]]],
                 x: Tensor, fg_mask: Optional[Tensor], layers: Sequence[str], where: str, *,
                 finite: bool = True) -> Dict[str, Tuple[Tensor, Tensor]]:
    """Run ``scan(x, fg_mask)`` (from :func:`make_scan`) and check each layer's output.

    Parameters
    ----------
    scan : callable
        ``scan(x, fg_mask) -> {layer: (activations, stats)}``.
    x : Tensor [B, ...]
    fg_mask : bool Tensor [B, H, W] or None
    layers : sequence of str
    where : str
        Prefix of error messages.
    finite : bool
        Also raise for NaN / Inf statistics.

    Returns
    -------
    dict of str to (Tensor [B, *shape], Tensor [B, *shape, NUM_STATS])
        Activations and per-neuron statistics of each layer.

    Raises
    ------
    ValueError
        When a layer has no statistics, the shapes do not match ``[B, *shape]`` and
        ``[B, *shape, NUM_STATS]``, or (``finite``) the statistics are not finite.
    """
    from nns_cuda.ops.reference.stats import NUM_STATS

    res = scan(x, fg_mask)
    B = x.shape[0]
    out = {}
    for layer in layers:
        act, st = res[layer]
        if st is None:
            raise ValueError(f"{where}: the scan returned no statistics for layer {layer!r}; scan with stats=True.")
        if act.shape[0] != B or tuple(st.shape) != (*act.shape, NUM_STATS):
            raise ValueError(f"{where}: scan output for {layer!r} has activations {list(act.shape)} and stats "
                             f"{list(st.shape)}; expected [B={B}, *shape] and [B, *shape, {NUM_STATS}].")
        if finite:
            check_finite(f"the scan statistics of {layer!r}", st, where)
        out[layer] = (act, st)
    return out


class NanMean:
    """Running mean of values, ignoring NaN and Inf (``value`` is NaN while nothing was counted).

    Attributes
    ----------
    n : int
        Number of finite values added.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0

    def add(self, v: Tensor) -> None:
        """Add the finite entries of ``v`` (any shape)."""
        v = v.double().flatten()
        ok = torch.isfinite(v)
        self.total += float(v[ok].sum())
        self.n += int(ok.sum())

    @property
    def value(self) -> float:
        """The mean of the finite values added so far."""
        return self.total / self.n if self.n else float("nan")


class NotFittedError(ValueError, AttributeError):
    """An estimator's results were asked for before ``fit``."""


class ResultEstimator:
    """Base of the analysis estimators whose ``fit`` stores one result object in ``result_``.

    ``__init__`` of a subclass stores its parameters unchanged; ``fit(...)`` validates them,
    computes, sets ``self.result_`` and returns ``self``.
    """

    def to_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """The JSON-safe results of the last :meth:`fit`: ``self.result_.to_dict(*args, **kwargs)``.

        Parameters
        ----------
        *args, **kwargs
            Passed to the result's ``to_dict`` (e.g. ``arrays=True`` where it has that option).

        Returns
        -------
        dict

        Raises
        ------
        NotFittedError
            Before the first ``fit``.
        """
        result = getattr(self, "result_", None)
        if result is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet; call fit(...) first.")
        return result.to_dict(*args, **kwargs)
