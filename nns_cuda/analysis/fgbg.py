"""Foreground / background filter types (thesis §5.3.3, eq. 5-11, Tables 5-3 … 5-6; docs/spec.md §4).

A property computed on the foreground entries only (``T_f``) and on the background entries only
(``T_b``) sorts the filters into six types: H-H, H-noH, noH-H (high = among the top ``per %``)
and L-L, L-noL, noL-L (low = among the bottom ``per %``). :func:`fg_bg_types` reports each
type's share of the filters and the accuracy change when its filters are masked, per training
checkpoint.

Decisions
---------
* High / low filters: the top / bottom ``⌈per/100 · K⌉`` filters of ``T_f`` and of ``T_b``
  (stable order: ties go to the lower index for both "high" and "low").
* "Accuracy change" is ``acc(unmasked) − acc(masked)`` in percentage points (positive = the
  accuracy drops), as in Table 5-3.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nns_cuda.analysis._tip_eval import DictResult, MaskedAccuracy, first_x, n_top, probe_layer
from nns_cuda.analysis._toolkit import FilterFn, check_reiterable
from nns_cuda.analysis.interpretable import InterpretableProperties
from nns_cuda.analysis.properties import get_property

__all__ = ["FILTER_TYPES", "filter_types", "load_checkpoint", "FgBgTypesResult", "fg_bg_types"]

#: The six types: high (H) or low (L) on the foreground, then on the background; "no" = not.
FILTER_TYPES = ("H-H", "H-noH", "noH-H", "L-L", "L-noL", "noL-L")


def filter_types(T_f: Union[torch.Tensor, Sequence[float]], T_b: Union[torch.Tensor, Sequence[float]],
                 per: float = 30.0) -> Dict[str, List[int]]:
    """Foreground / background filter types (§5.3.3, eq. 5-11).

    High = the top ``⌈per/100 · K⌉`` filters by ``T`` (descending), low = the bottom as many
    (ascending); ties go to the lower filter index in both orders.

    Parameters
    ----------
    T_f, T_b : Tensor [K] or sequence of float
        A property on the foreground / background entries.
    per : float in (0, 100]
        Percentage defining high / low (default 30).

    Returns
    -------
    dict of str to list of int
        type -> sorted filter indices, for the types H-H (high fg and high bg), H-noH (high fg,
        not high bg), noH-H, L-L, L-noL, noL-L (:data:`FILTER_TYPES`, in that order).

    Raises
    ------
    ValueError
        For vectors of different or zero length, NaN / Inf, or ``per`` outside (0, 100].
    """
    f = np.asarray(T_f.detach().cpu() if isinstance(T_f, torch.Tensor) else T_f, dtype=np.float64).ravel()
    b = np.asarray(T_b.detach().cpu() if isinstance(T_b, torch.Tensor) else T_b, dtype=np.float64).ravel()
    if f.size != b.size or f.size == 0:
        raise ValueError(f"filter_types: T_f and T_b must be [K] with the same K > 0, got {f.size} and {b.size}.")
    if not (np.all(np.isfinite(f)) and np.all(np.isfinite(b))):
        raise ValueError("filter_types: T_f / T_b contain NaN or Inf.")
    if not (0 < float(per) <= 100):
        raise ValueError(f"filter_types: per is a percentage in (0, 100], got {per}.")
    K = f.size
    n = n_top(float(per) / 100.0, K)
    hf, hb = set(np.argsort(-f, kind="stable")[:n].tolist()), set(np.argsort(-b, kind="stable")[:n].tolist())
    lf, lb = set(np.argsort(f, kind="stable")[:n].tolist()), set(np.argsort(b, kind="stable")[:n].tolist())
    sets = {"H-H": hf & hb, "H-noH": hf - hb, "noH-H": hb - hf, "L-L": lf & lb, "L-noL": lf - lb, "noL-L": lb - lf}
    return {k: sorted(int(i) for i in sets[k]) for k in FILTER_TYPES}


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint and check it against ``model`` without loading it.

    Parameters
    ----------
    model : nn.Module
        The model the checkpoint must fit (unchanged).
    checkpoint : str, os.PathLike or mapping
        Path to a ``torch.save``'d state dict (or a dict with a ``state_dict`` /
        ``model_state_dict`` / ``model`` entry), or such a dict itself.

    Returns
    -------
    dict of str to Tensor
        The state dict.

    Raises
    ------
    FileNotFoundError
        For a path that does not exist.
    TypeError
        For a checkpoint that is not a state dict.
    ValueError
        Naming the first key that is missing, unexpected or of another shape.
    """
    src = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"load_checkpoint: no file {os.fspath(checkpoint)!r}.")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"load_checkpoint: a checkpoint must be a state dict, got {type(checkpoint).__name__}.")
    if not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    want = model.state_dict()
    label = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "checkpoint"
    for k, v in want.items():
        if k not in checkpoint:
            raise ValueError(f"load_checkpoint: {label} does not match the model: key {k!r} is missing.")
        c = checkpoint[k]
        if not isinstance(c, torch.Tensor) or c.shape != v.shape:
            got = list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(f"load_checkpoint: {label} does not match the model: key {k!r} has shape {got}, "
                             f"the model expects {list(v.shape)}.")
    for k in checkpoint:
        if k not in want:
            raise ValueError(f"load_checkpoint: {label} does not match the model: unexpected key {k!r}.")
    return dict(checkpoint)


@dataclass
class FgBgTypesResult(DictResult):
    """Filter types per checkpoint (Tables 5-3 … 5-6).

    Attributes
    ----------
    layer : str
        The analysed layer.
    property : str
        The property ``T`` (e.g. "mean" for ``T_m``).
    per : float
        Percentage of high / low filters.
    checkpoints : list of str [n]
        Labels.
    types : list of dict of str to list of int [n]
        Per checkpoint: type -> filter indices.
    share : list of dict of str to float [n]
        Per checkpoint: type -> ``|type| / K``.
    accuracy_drop : list of dict of str to float [n]
        Per checkpoint: type -> ``acc(unmasked) − acc(type masked)`` (pp).
    base_accuracy : list of float [n]
        Per checkpoint, in %.
    T_f, T_b : list of list of float [n][K]
        Per checkpoint.
    channels : int
        ``K``.
    """

    layer: str
    property: str
    per: float
    checkpoints: List[str]
    types: List[Dict[str, List[int]]]
    share: List[Dict[str, float]]
    accuracy_drop: List[Dict[str, float]]
    base_accuracy: List[float]
    T_f: List[List[float]]
    T_b: List[List[float]]
    channels: int


def fg_bg_types(model: nn.Module, data: Iterable, layer: str,
                checkpoints: Union[None, Sequence[Any], Mapping[str, Any]] = None, *,
                property: str = "mean", per: float = 30.0, filter_fn: Optional[FilterFn] = None,
                vectorize: bool = True, progress: bool = True) -> FgBgTypesResult:
    """Foreground / background filter types, their share and the accuracy change when each type
    is masked, for each checkpoint (§5.3.3, Tables 5-3 … 5-6).

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``[B, classes]``; its own weights and modes are restored
        afterwards.
    data : re-iterable of ``(x [B, D, H, W], y [B], fg_mask [B, H, W] bool)`` batches
    layer : str
        Layer whose output channels are the filters.
    checkpoints : None, sequence or mapping
        None (the model's current weights), a sequence of state-dict paths / dicts, or a
        mapping label -> path / dict (e.g. ``{"phase1": …, "phase2": …}``).
    property : str
        Registered property name (default "mean", the thesis's ``T_m``).
    per : float
        Percentage of high / low filters (default 30).
    filter_fn : callable ``(model, x [B, D, H, W], layer) -> [B, C, D, H, W]``, optional
        Filter images (default the engine's).
    vectorize : bool
        Evaluate several masks per forward pass (see :func:`nns_cuda.analysis.aipc.aipc`).
    progress : bool
        Progress bars on stderr over the batches of each pass over ``data``.

    Returns
    -------
    FgBgTypesResult

    Raises
    ------
    PropertyNotFoundError
        For an unknown property.
    ValueError
        For ``per`` outside (0, 100], no checkpoints, a checkpoint that does not fit the model,
        or batches without ``fg_mask``.
    TypeError
        For one-shot ``data`` (a generator).
    """
    get_property(property)
    if not (0 < float(per) <= 100):
        raise ValueError(f"fg_bg_types: per is a percentage in (0, 100], got {per}.")
    check_reiterable(data, "fg_bg_types")
    if checkpoints is None:
        items: List[Tuple[str, Any]] = [("current", None)]
    elif isinstance(checkpoints, Mapping):
        items = [(str(k), v) for k, v in checkpoints.items()]
    elif isinstance(checkpoints, (str, os.PathLike)):
        items = [(os.fspath(checkpoints), checkpoints)]
    else:
        items = [(os.fspath(c) if isinstance(c, (str, os.PathLike)) else f"checkpoint{i}", c)
                 for i, c in enumerate(checkpoints)]
    if not items:
        raise ValueError("fg_bg_types: checkpoints is empty; pass None to use the model's current weights.")
    states = [(lab, None if c is None else load_checkpoint(model, c)) for lab, c in items]  # check all first
    x0 = first_x(data, "fg_bg_types", model)
    K = probe_layer(model, x0, layer, "fg_bg_types").channels
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = FgBgTypesResult(layer, property, float(per), [], [], [], [], [], [], [], K)
    try:
        for lab, sd in states:
            if sd is not None:
                model.load_state_dict(sd, strict=True)
            ip = InterpretableProperties(property, ["foreground", "background"], filter_fn=filter_fn, progress=progress)
            ip.fit(model, data, layer)
            tf, tb = ip.T(layer, property, "foreground"), ip.T(layer, property, "background")
            types = filter_types(tf, tb, per)
            ev = MaskedAccuracy(model, data, layer, K, vectorize=vectorize, where="fg_bg_types", progress=progress)
            accs = ev([()] + [tuple(types[t]) for t in FILTER_TYPES])
            res.checkpoints.append(lab)
            res.types.append(types)
            res.share.append({t: len(types[t]) / K for t in FILTER_TYPES})
            res.accuracy_drop.append({t: accs[0] - a for t, a in zip(FILTER_TYPES, accs[1:])})
            res.base_accuracy.append(accs[0])
            res.T_f.append(tf.tolist())
            res.T_b.append(tb.tolist())
    finally:
        with torch.no_grad():
            model.load_state_dict(original, strict=True)
    return res
