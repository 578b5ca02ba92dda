"""Per-neuron accumulators of a data-set scan, with an exact, associative merge.

A *state* is a flat ``{name: tensor}`` dictionary (the form safetensors stores), with names
``"<layer>/<field>"``. For a layer whose neurons have shape ``S`` (the output shape without the
batch dimension):

==========================  ==========================  =========================================
name                        dtype, shape                meaning
==========================  ==========================  =========================================
``L/count``                 int64 ``[]``                samples seen
``L/act_sum``               float64 ``S``               Σ activation
``L/act_sq_sum``            float64 ``S``               Σ activation²
``L/act_pos_count``         int64 ``S``                 samples where the activation is > 0
``L/act_max``               float32 ``S``               largest activation
``L/act_argmax``            int64 ``S``                 global index of the first sample reaching it
``L/topk_values``           float32 ``S + [k]``         the ``k`` largest activations, descending
``L/topk_index``            int64 ``S + [k]``           their sample indices (ties: smaller index first)
``L/stats_sum``             float64 ``S + [n_stats]``   Σ of the fused statistics (docs/spec.md §2–§3)
``L/filter_image_sum``      float64 ``[C, D, H, W]``    Σ of the filter images ``L^k``
``L/measure/<m>/sum``       float64 measure shape       Σ of a per-sample measure
``L/measure/<m>/max``       float64 measure shape       its largest value
``L/measure/<m>/argmax``    int64 measure shape         global index of the first sample reaching it
``L/sample/<m>/values``     the value's dtype           a per-sample value, one row per sample:
                            ``[n] + value shape``       ``n`` samples of the state, in sample order
``L/sample/<m>/index``      int64 ``[n]``               their global sample indices (ascending)
``sample/label/values``     int64 ``[n]``               the samples' labels ``y`` (``labels=True``)
``sample/label/index``      int64 ``[n]``               their global sample indices
==========================  ==========================  =========================================

Top-k slots not yet filled hold ``-inf`` and index ``-1``. Per-sample values (``…/values`` with
their ``…/index``) are not reduced: a merge concatenates them, so the merged state holds every
sample's row, in global sample order, bitwise as computed.

Exactness: sums are float64 and every reduction over samples is a sequential left-to-right
sum in sample order; :func:`merge` of ``a`` then ``b`` (``a``'s samples all precede ``b``'s)
is the same left-to-right sum continued. Maxima keep the earlier sample on ties, top-k orders
by (value descending, index ascending). So the state of a range of samples does not depend on
how the range was cut, given the same per-sample values. :class:`Merger` merges many states
(e.g. all blocks) with one concatenation of the per-sample values at the end.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional

import torch
from torch import Tensor

State = Dict[str, Tensor]

__all__ = ["State", "batch_state", "merge", "merge_all", "Merger", "layer_names", "is_sample_key",
           "sample_keys", "sample_entries", "LABELS"]

_SUMS = ("act_sum", "act_sq_sum", "stats_sum", "filter_image_sum")

#: Prefix of the per-sample labels (``sample/label/values``, ``sample/label/index``).
LABELS = "sample/label"


def is_sample_key(key: str) -> bool:
    """Whether ``key`` is a per-sample entry (``…/sample/<m>/values`` or ``…/index``, or the labels)."""
    field = key.rsplit("/", 1)[-1]
    return field in ("values", "index") and (key.startswith("sample/") or "/sample/" in key)


def sample_keys(state: Mapping[str, Tensor]) -> list:
    """The per-sample entries of a state: the ``…/values`` keys (each has its ``…/index``)."""
    return [k for k in state if is_sample_key(k) and k.endswith("/values")]


def sample_entries(base: str, first_index: int, values: Tensor) -> State:
    """``{base/values: values, base/index: first_index …}``: one row per sample of a batch."""
    n = values.shape[0]
    return {f"{base}/values": values.detach().cpu().contiguous(),
            f"{base}/index": torch.arange(first_index, first_index + n, dtype=torch.int64)}


def _seq_sum(v: Tensor) -> Tensor:
    """Σ over dim 0 in float64, strictly left to right (independent of threads and batch cuts)."""
    acc = torch.zeros(v.shape[1:], dtype=torch.float64, device=v.device)
    for i in range(v.shape[0]):
        acc += v[i].to(torch.float64)
    return acc


def _max_first(values: Tensor, index: Tensor, prev_max: Optional[Tensor], prev_idx: Optional[Tensor]):
    """Largest value over dim 0 and the index of its first occurrence (earlier state first)."""
    if prev_max is not None:
        values = torch.cat([prev_max.unsqueeze(0).to(values.dtype), values], 0)
        index = torch.cat([prev_idx.unsqueeze(0), index], 0)
    j = torch.argmax(values, dim=0, keepdim=True)  # first maximal value (documented by torch)
    return values.gather(0, j).squeeze(0), index.gather(0, j).squeeze(0)


def _topk(values: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim by (value descending, index ascending); ``index`` already ascends
    within ties when the candidates are laid out in sample order."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]
    return values.gather(-1, order), index.gather(-1, order)


def _sample_index(first: int, n: int, shape, device) -> Tensor:
    idx = torch.arange(first, first + n, dtype=torch.int64, device=device)
    return idx.view(n, *([1] * len(shape))).expand(n, *shape)


def batch_state(layer: str, first_index: int, activations: Tensor, *, top_k: int,
                stats: Optional[Tensor] = None, filter_images: Optional[Tensor] = None,
                measures: Optional[Mapping[str, Tensor]] = None,
                per_sample: Optional[Mapping[str, Tensor]] = None) -> State:
    """The state of one batch of consecutive samples.

    Parameters
    ----------
    layer : str
        The layer's name (prefix of every key).
    first_index : int
        Global data-set index of the batch's first sample.
    activations : Tensor [B, *S]
        The layer's outputs.
    top_k : int
        How many largest activations to keep per neuron.
    stats : Tensor [B, *S, n_stats], optional
        Fused per-neuron statistics.
    filter_images : Tensor [B, C, D, H, W], optional
        Filter learned images.
    measures : {name: Tensor [B, *M]}, optional
        Per-sample measures (e.g. FQ's ``F``), reduced to their sum, maximum and arg-max.
    per_sample : {name: Tensor [B, *M]}, optional
        Per-sample values kept row by row (any dtype), with their global sample indices.

    Returns
    -------
    State
    """
    B = activations.shape[0]
    S = tuple(activations.shape[1:])
    dev = activations.device
    a32 = activations.detach().to(torch.float32)
    idx = _sample_index(first_index, B, S, dev)
    st: State = {
        f"{layer}/count": torch.tensor(B, dtype=torch.int64),
        f"{layer}/act_sum": _seq_sum(activations.detach()),
        f"{layer}/act_sq_sum": _seq_sum(activations.detach().to(torch.float64) ** 2),
        f"{layer}/act_pos_count": (activations > 0).sum(0, dtype=torch.int64),
    }
    st[f"{layer}/act_max"], st[f"{layer}/act_argmax"] = _max_first(a32, idx, None, None)
    pad = max(0, top_k - B)
    vals = torch.movedim(a32, 0, -1)
    ids = torch.movedim(idx, 0, -1)
    if pad:
        vals = torch.cat([vals, torch.full(S + (pad,), float("-inf"), dtype=torch.float32, device=dev)], -1)
        ids = torch.cat([ids, torch.full(S + (pad,), -1, dtype=torch.int64, device=dev)], -1)
    st[f"{layer}/topk_values"], st[f"{layer}/topk_index"] = _topk(vals, ids, top_k)
    if stats is not None:
        st[f"{layer}/stats_sum"] = _seq_sum(stats.detach())
    if filter_images is not None:
        st[f"{layer}/filter_image_sum"] = _seq_sum(filter_images.detach())
    for name, v in (measures or {}).items():
        v = v.detach().to(torch.float64)
        base = f"{layer}/measure/{name}"
        st[f"{base}/sum"] = _seq_sum(v)
        st[f"{base}/max"], st[f"{base}/argmax"] = _max_first(v, _sample_index(first_index, B, v.shape[1:], dev),
                                                             None, None)
    for name, v in (per_sample or {}).items():
        if v.dim() < 1 or v.shape[0] != B:
            raise ValueError(f"per-sample value {name!r} of layer {layer!r} must have one row per sample "
                             f"([{B}, ...]), got shape {list(v.shape)}")
        st.update(sample_entries(f"{layer}/sample/{name}", first_index, v))
    return {k: t.cpu().contiguous() for k, t in st.items()}


def layer_names(state: Mapping[str, Tensor]) -> list:
    """The layers of a state, in the order their ``count`` keys appear."""
    return [k[: -len("/count")] for k in state if k.endswith("/count") and "/measure/" not in k
            and not is_sample_key(k)]


def _check_order(key: str, a_index: Tensor, b_index: Tensor) -> None:
    if a_index.numel() and b_index.numel() and int(a_index[-1]) >= int(b_index[0]):
        raise ValueError(f"cannot merge {key!r}: the second state's samples (from {int(b_index[0])}) do not all "
                         f"follow the first's (up to {int(a_index[-1])}); merge states in sample order")


def merge(a: Optional[State], b: State) -> State:
    """The state of ``a``'s samples followed by ``b``'s (``a`` may be ``None``: then ``b``).

    Raises
    ------
    ValueError
        If the two states do not hold the same tensors.
    """
    if a is None:
        return dict(b)
    if set(a) != set(b):
        raise ValueError(f"cannot merge scan states with different contents: {sorted(set(a) ^ set(b))[:6]}")
    out: State = {}
    for key, va in a.items():
        vb = b[key]
        field = key.rsplit("/", 1)[-1]
        if is_sample_key(key):
            if field == "values":
                base = key[: -len("values")]
                _check_order(key, a[base + "index"], b[base + "index"])
                out[key] = _cat_rows(key, [va, vb])
                out[base + "index"] = torch.cat([a[base + "index"], b[base + "index"]])
            continue
        if field in ("count", "act_pos_count") or field in _SUMS or (field == "sum" and "/measure/" in key):
            out[key] = va + vb
        elif field in ("act_max", "max"):
            base = key[: -len(field)]
            arg = base + ("act_argmax" if field == "act_max" else "argmax")
            out[key], out[arg] = _max_first(vb.unsqueeze(0), b[arg].unsqueeze(0), va, a[arg])
        elif field == "topk_values":
            base = key[: -len("topk_values")]
            k = va.shape[-1]
            vals = torch.cat([va, vb], -1)
            ids = torch.cat([a[base + "topk_index"], b[base + "topk_index"]], -1)
            out[key], out[base + "topk_index"] = _topk(vals, ids, k)
        elif field in ("act_argmax", "argmax", "topk_index"):
            continue  # written with its values
        else:
            raise ValueError(f"unknown accumulator {key!r}")
    return out


def _cat_rows(key: str, parts) -> Tensor:
    first = parts[0]
    for p in parts[1:]:
        if p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
            raise ValueError(f"cannot merge {key!r}: rows of {p.dtype} {list(p.shape[1:])} after rows of "
                             f"{first.dtype} {list(first.shape[1:])}; a per-sample value must have one dtype and "
                             "shape for every sample")
    return torch.cat(parts) if len(parts) > 1 else first


class Merger:
    """Merge states given in sample order; the per-sample values are concatenated once, at the end
    (so merging ``n`` blocks copies each row once, not ``n`` times)."""

    def __init__(self):
        self._reduced: Optional[State] = None
        self._rows: Dict[str, list] = {}
        self._last: Dict[str, Tensor] = {}

    def add(self, state: Mapping[str, Tensor]) -> None:
        rows = {k: v for k, v in state.items() if is_sample_key(k)}
        reduced = {k: v for k, v in state.items() if not is_sample_key(k)}
        if self._reduced is not None and set(rows) != set(self._rows):
            raise ValueError("cannot merge scan states with different contents: "
                             f"{sorted(set(rows) ^ set(self._rows))[:6]}")
        self._reduced = merge(self._reduced, reduced)
        for key in sample_keys(rows):
            base = key[: -len("values")]
            idx = rows[base + "index"]
            if base in self._last:
                _check_order(key, self._last[base], idx)
            if idx.numel():
                self._last[base] = idx
            self._rows.setdefault(key, []).append(rows[key])
            self._rows.setdefault(base + "index", []).append(idx)

    def result(self) -> Optional[State]:
        """The merged state (``None`` when nothing was added)."""
        if self._reduced is None:
            return None
        out = dict(self._reduced)
        for key, parts in self._rows.items():
            out[key] = _cat_rows(key, parts)
        return out


def merge_all(states: Iterable[State]) -> Optional[State]:
    """Merge states given in sample order, left to right."""
    m = Merger()
    for s in states:
        m.add(s)
    return m.result()
