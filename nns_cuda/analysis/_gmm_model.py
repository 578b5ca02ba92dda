"""Model-level measures of the GMM pattern-level analysis (private; the public names live in
``gmm.py``).

Per-sample gradient magnitudes (Table 6-3), single-filter masking against a random baseline
(Tables 6-4, 6-5), and the largest Hessian eigenvalue of the training loss (eqs. 6-3, 6-4);
docs/spec.md §5.

Data arguments (``data``, ``train_data``, ``val_data``) are either a pair ``(x, y)`` of tensors
(one batch) or an iterable of batches ``(x, y[, fg_mask])`` such as a ``DataLoader``; a
foreground mask is ignored. Sample ``i`` is the ``i``-th sample in iteration order.
Every measure runs the model in eval mode and restores each module's mode afterwards.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nns_cuda._modules import eval_mode, model_device, resolve_module, split_call
from nns_cuda.analysis._toolkit import iter_raw_batches
from nns_cuda.analysis.masking import mask_filters

LossFn = Callable[[Tensor, Tensor], Tensor]
Data = Union[Tuple[Tensor, ...], Iterable]


# ------------------------------------------------------------------- per-sample gradient size
def per_sample_gradient_magnitude(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Optional[LossFn] = None,
    *,
    batch_size: int = 64,
) -> Tensor:
    """Mean absolute gradient of each sample's loss over all parameter entries (Table 6-3).

    ``g_i = mean_θ |∂ loss(model(x_i), y_i) / ∂θ|`` over every entry of every parameter with
    ``requires_grad``, computed with ``torch.func`` (``functional_call`` + ``vmap(grad)``) on the
    model in eval mode (BatchNorm uses its running statistics; the mode is restored afterwards).

    Parameters
    ----------
    model : nn.Module
    x : Tensor ``[B, ...]``
        Inputs (moved to the model's device).
    y : Tensor ``[B]``
        Targets for ``loss_fn``.
    loss_fn : callable ``(output [1, ...], target [1]) -> scalar``, optional
        Default ``torch.nn.functional.cross_entropy``.
    batch_size : int
        Samples per ``vmap`` call (memory: ``batch_size × n_parameters`` gradient entries).

    Returns
    -------
    Tensor ``[B]`` float32 (float64 if the model is float64), on the CPU.
    """
    from torch.func import functional_call, grad, vmap

    who = "per_sample_gradient_magnitude"
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{who}: x and y must be tensors.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{who}: x has {x.shape[0]} samples but y has {y.shape[0]}; pass matching batches.")
    if batch_size < 1:
        raise ValueError(f"{who}: batch_size must be >= 1, got {batch_size}.")
    loss_fn = loss_fn or F.cross_entropy
    dev = model_device(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{who}: the model has no parameter with requires_grad=True.")
    buffers = {n: b for n, b in model.named_buffers()}
    n_total = sum(p.numel() for p in params.values())

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    g_fn = vmap(grad(loss_one), in_dims=(None, 0, 0))
    out = []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(dev)
            yb = y[i : i + batch_size].to(dev)
            grads = g_fn(params, xb, yb)
            tot = None
            for g in grads.values():
                s = g.abs().flatten(1).sum(1, dtype=torch.float64)
                tot = s if tot is None else tot + s
            out.append((tot / n_total).cpu())
    dtype = next(iter(params.values())).dtype
    return torch.cat(out).to(dtype if dtype == torch.float64 else torch.float32)


def gradient_magnitudes(model: nn.Module, data: Data, loss_fn: Optional[LossFn] = None, *,
                        batch_size: int = 64, max_samples: Optional[int] = None) -> Tensor:
    """:func:`per_sample_gradient_magnitude` streamed over the batches of ``data``.

    Parameters
    ----------
    model : nn.Module
    data : ``(x, y)`` or an iterable of ``(x, y[, fg_mask])`` batches
        Labelled samples.
    loss_fn : callable ``(output [1, ...], target [1]) -> scalar``, optional
        Default ``torch.nn.functional.cross_entropy``.
    batch_size : int
        Samples per ``vmap`` call.
    max_samples : int, optional
        Use only the first ``max_samples`` samples.

    Returns
    -------
    Tensor ``[S]``
        One magnitude per sample, in data order, on the CPU.
    """
    out = []
    for x, y, _ in iter_raw_batches(data, "gradient_magnitudes", need_labels=True, max_samples=max_samples):
        out.append(per_sample_gradient_magnitude(model, x, y, loss_fn, batch_size=batch_size))
    if not out:
        raise ValueError("gradient_magnitudes: data is empty.")
    return torch.cat(out)


def _split_means(mag: Tensor, outliers: Tensor) -> Dict[str, float]:
    """Mean of ``mag [S]`` over the ``outliers`` (sample indices) and over the other samples."""
    s = mag.shape[0]
    idx = torch.as_tensor(outliers, dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= s):
        raise IndexError(f"outlier_gradient_report: outlier index out of range for {s} samples.")
    m = torch.zeros(s, dtype=torch.bool)
    m[idx] = True
    o, n = mag[m], mag[~m]
    om = float(o.double().mean()) if o.numel() else float("nan")
    nm = float(n.double().mean()) if n.numel() else float("nan")
    return {
        "outlier": om,
        "normal": nm,
        "ratio": om / nm if (n.numel() and o.numel() and nm != 0) else float("nan"),
        "n_outlier": int(o.numel()),
        "n_normal": int(n.numel()),
    }


def outlier_gradient_report(
    checkpoints: Mapping[str, nn.Module],
    data: Data,
    outliers: Union[Tensor, Sequence[int], Mapping[str, Union[Tensor, Sequence[int]]]],
    loss_fn: Optional[LossFn] = None,
    *,
    batch_size: int = 64,
    max_samples: Optional[int] = None,
    magnitudes: Optional[Mapping[str, Tensor]] = None,
) -> Dict[str, Dict[str, float]]:
    """Mean per-sample gradient magnitude of outlier vs normal samples per checkpoint (Table 6-3).

    Parameters
    ----------
    checkpoints : mapping ``name -> model``, e.g. ``{"WT": best_val_model, "OF": last_model}``.
    data : ``(x, y)`` or iterable of batches; sample ``i`` = ``i``-th sample in order (the
        order :class:`GMMAnalysis` numbers samples in).
    outliers : LongTensor of sample indices shared by all checkpoints, or a mapping
        ``name -> indices`` (each checkpoint's own outlier samples).
    magnitudes : optional mapping ``name -> Tensor [S]`` of precomputed magnitudes.

    Returns
    -------
    dict ``name -> {"outlier", "normal", "ratio", "n_outlier", "n_normal"}`` (means of
    :func:`per_sample_gradient_magnitude`; NaN where a group is empty).
    """
    rep = {}
    for name, model in checkpoints.items():
        if magnitudes is not None and name in magnitudes:
            mag = magnitudes[name]
        else:
            mag = gradient_magnitudes(model, data, loss_fn, batch_size=batch_size, max_samples=max_samples)
        idx = outliers[name] if isinstance(outliers, Mapping) else outliers
        rep[name] = _split_means(mag, torch.as_tensor(idx, dtype=torch.long))
    return rep


# ----------------------------------------------------------------------------------- masking
@torch.no_grad()
def accuracy(model: nn.Module, data: Data, *, max_samples: Optional[int] = None) -> Tuple[float, int]:
    """Top-1 accuracy of a classifier, in eval mode (each module's mode restored afterwards).

    Parameters
    ----------
    model : nn.Module
        Returns logits ``[B, classes]``.
    data : ``(x, y)`` or an iterable of ``(x, y[, fg_mask])`` batches
        Labelled samples.
    max_samples : int, optional
        Evaluate on the first ``max_samples`` samples only.

    Returns
    -------
    (float, int)
        Accuracy in percent and the number of samples evaluated.
    """
    dev = model_device(model)
    correct, n = 0, 0
    with eval_mode(model):
        for x, y, _ in iter_raw_batches(data, "accuracy", need_labels=True, max_samples=max_samples):
            out = model(x.to(dev))
            correct += int((out.argmax(1).cpu() == y.cpu()).sum())
            n += x.shape[0]
    if n == 0:
        raise ValueError("accuracy: data is empty.")
    return 100.0 * correct / n, n


def n_channels(model: nn.Module, layer: str, data: Data) -> int:
    """Number of output channels of ``layer``: dim 1 of its output on the first sample of ``data``.

    Parameters
    ----------
    model : nn.Module
    layer : str
        Module name, optionally with a call index ``"name:1"`` (the module is resolved by its
        base name).
    data : ``(x, y)`` or an iterable of batches
        Only the first sample is run.

    Returns
    -------
    int
    """
    base, _ = split_call(layer)
    mod = resolve_module(model, base)
    shape = []
    h = mod.register_forward_hook(lambda m, i, o: shape.append(tuple(o.shape)) if not shape else None)
    try:
        with torch.no_grad(), eval_mode(model):
            for x, _, _ in iter_raw_batches(data, "n_channels", max_samples=1):
                model(x.to(model_device(model)))
                break
    finally:
        h.remove()
    if not shape:
        raise ValueError(f"n_channels: layer {layer!r} did not run on the data (is it part of the forward pass?).")
    if len(shape[0]) < 2:
        raise ValueError(f"n_channels: layer {layer!r} output {shape[0]} has no channel dimension.")
    return shape[0][1]


def single_filter_masking(
    model: nn.Module,
    layer: str,
    filters: Union[Tensor, Sequence[int]],
    train_data: Data,
    val_data: Data,
    *,
    max_samples: Optional[int] = None,
    base: Optional[Mapping[str, float]] = None,
) -> Dict[str, object]:
    """Mask each filter alone; train and validation accuracy change (Tables 6-4, 6-5).

    Masking = zeroing the channel of ``layer``'s output (docs/spec.md §6, :func:`mask_filters`); the
    model is unchanged afterwards.

    Parameters
    ----------
    model : nn.Module
    layer : str
        Module name (``model.named_modules()``), optionally with a call index ``"name:1"``.
    filters : sequence of channel indices (e.g. the anomaly filters).
    train_data, val_data : ``(x, y)`` or iterables of batches.
    max_samples : int, optional
        Evaluate on the first ``max_samples`` samples of each set only.
    base : optional ``{"train_acc", "val_acc"}`` of the unmasked model (computed if absent).

    Returns
    -------
    dict with ``base_train_acc``, ``base_val_acc`` (percent), ``filters`` (list of per-filter
    dicts: ``filter``, ``train_acc``, ``val_acc``, ``train_change``, ``val_change`` in
    percentage points), ``n_filters``, ``n_train_down`` (train accuracy decreased),
    ``n_val_up`` (validation accuracy increased), ``mean_train_change``, ``mean_val_change``.
    """
    idx = [int(f) for f in torch.as_tensor(list(filters) if not isinstance(filters, Tensor) else filters).flatten()]
    if base is None:
        bt, _ = accuracy(model, train_data, max_samples=max_samples)
        bv, _ = accuracy(model, val_data, max_samples=max_samples)
    else:
        bt, bv = float(base["train_acc"]), float(base["val_acc"])
    rows = []
    for f in idx:
        with mask_filters(model, {layer: [f]}):
            ta, _ = accuracy(model, train_data, max_samples=max_samples)
            va, _ = accuracy(model, val_data, max_samples=max_samples)
        rows.append({"filter": f, "train_acc": ta, "val_acc": va,
                     "train_change": ta - bt, "val_change": va - bv})
    n = len(rows)
    return {
        "layer": layer,
        "base_train_acc": bt,
        "base_val_acc": bv,
        "filters": rows,
        "n_filters": n,
        "n_train_down": sum(r["train_change"] < 0 for r in rows),
        "n_val_up": sum(r["val_change"] > 0 for r in rows),
        "mean_train_change": (sum(r["train_change"] for r in rows) / n) if n else float("nan"),
        "mean_val_change": (sum(r["val_change"] for r in rows) / n) if n else float("nan"),
    }


def random_filter_baseline(
    model: nn.Module,
    layer: str,
    train_data: Data,
    val_data: Data,
    R: int = 10,
    seed: int = 0,
    *,
    exclude: Optional[Sequence[int]] = None,
    max_samples: Optional[int] = None,
    base: Optional[Mapping[str, float]] = None,
) -> Dict[str, object]:
    """Single-filter masking of ``R`` distinct random filters of ``layer`` (Table 6-5 baseline).

    Filters are drawn without replacement with ``torch.Generator().manual_seed(seed)``
    (optionally excluding ``exclude``, e.g. the anomaly filters).

    Parameters
    ----------
    model : nn.Module
    layer : str
        Module name, optionally with a call index ``"name:1"``.
    train_data, val_data : ``(x, y)`` or iterables of batches
    R : int
        Number of random filters (at most the number of eligible filters).
    seed : int
        Seed of the draw.
    exclude : sequence of int, optional
        Filters never drawn.
    max_samples : int, optional
        Evaluate on the first ``max_samples`` samples of each set only.
    base : optional ``{"train_acc", "val_acc"}`` of the unmasked model (computed if absent).

    Returns
    -------
    dict
        :func:`single_filter_masking`'s dict for the drawn filters, plus ``R`` and ``seed``.
    """
    if R < 1:
        raise ValueError(f"random_filter_baseline: R must be >= 1, got {R}.")
    c = n_channels(model, layer, train_data)
    pool = torch.arange(c)
    if exclude is not None and len(exclude):
        keep = torch.ones(c, dtype=torch.bool)
        keep[torch.as_tensor(list(exclude), dtype=torch.long)] = False
        pool = pool[keep]
    if R > pool.numel():
        raise ValueError(
            f"random_filter_baseline: R={R} but layer {layer!r} has only {pool.numel()} eligible filters; "
            "pass a smaller R."
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = pool[torch.randperm(pool.numel(), generator=gen)[:R]].tolist()
    rep = single_filter_masking(model, layer, chosen, train_data, val_data, max_samples=max_samples, base=base)
    rep.update({"R": R, "seed": seed})
    return rep


# ---------------------------------------------------------------------------------- Hessian
@dataclass
class HessianEigen:
    """Largest eigenvalue of the Hessian of the (mean) training loss (eqs. 6-3, 6-4).

    Attributes
    ----------
    eigenvalue : float
        Largest (algebraic) eigenvalue ``λ_max``.
    dominant : float
        Eigenvalue of largest magnitude found by the plain power iteration (equals
        ``eigenvalue`` unless the spectrum's negative end dominates).
    n_iter : int
        Hessian-vector products used.
    converged : bool
        Relative change of the Rayleigh quotient fell below ``tol``.
    history : list of float
        Rayleigh quotients of the (last) power iteration.
    """

    eigenvalue: float
    dominant: float
    n_iter: int
    converged: bool
    history: List[float] = field(default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        """The fields as a JSON-safe dict."""
        return asdict(self)


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: Optional[LossFn],
    data: Data,
    iters: int = 100,
    seed: int = 0,
    *,
    tol: float = 1e-6,
    max_samples: Optional[int] = None,
) -> HessianEigen:
    """Largest eigenvalue of ``∇²_θ L(θ)`` by power iteration on Hessian-vector products.

    ``L`` is the mean of ``loss_fn`` over the samples of ``data`` (each batch's loss is weighted
    by its size), for the parameters with ``requires_grad``, with the model in eval mode
    (restored afterwards). ``Hv`` is computed by double backward (``torch.autograd.grad`` with
    ``create_graph=True``), summed over batches, so the Hessian is never formed.

    Power iteration converges to the eigenvalue of largest *magnitude*; if that one is
    negative, a second power iteration on ``H - λ_dom I`` (whose top eigenvalue is
    ``λ_max - λ_dom ≥ 0``) recovers the largest algebraic eigenvalue.

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable ``(output, target) -> scalar`` with mean reduction, or None for
        cross-entropy.
    data : ``(x, y)`` or a re-iterable collection of batches (a list or a DataLoader).
    iters : int
        Maximum Hessian-vector products per power iteration.
    seed : int
        Seed of the random start vector.
    tol : float
        Stop when the Rayleigh quotient changes by less than ``tol · |λ|``.

    Returns
    -------
    HessianEigen
    """
    if iters < 1:
        raise ValueError(f"hessian_top_eigenvalue: iters must be >= 1, got {iters}.")
    loss_fn = loss_fn or F.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("hessian_top_eigenvalue: the model has no parameter with requires_grad=True.")
    dev = model_device(model)
    batches = []
    n = 0
    for x, y, _ in iter_raw_batches(data, "hessian_top_eigenvalue", need_labels=True, max_samples=max_samples):
        batches.append((x, y))
        n += x.shape[0]
    if n == 0:
        raise ValueError("hessian_top_eigenvalue: data is empty.")

    def hvp(v: List[Tensor]) -> List[Tensor]:
        out = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = loss_fn(model(x.to(dev)), y.to(dev)) * (x.shape[0] / n)
            g = torch.autograd.grad(loss, params, create_graph=True)
            gv = sum((gi * vi).sum() for gi, vi in zip(g, v))
            hv = torch.autograd.grad(gv, params)
            for o, h in zip(out, hv):
                o.add_(h.detach())
        return out

    def dot(a, b):
        return sum(float((ai.double() * bi.double()).sum()) for ai, bi in zip(a, b))

    def normalise(v):
        nv = math.sqrt(dot(v, v))
        return [vi / nv for vi in v] if nv > 0 else v

    gen = torch.Generator().manual_seed(seed)
    v0 = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(dev) for p in params]

    def power(shift: float):
        v = normalise(v0)
        lam, hist, conv, it = 0.0, [], False, 0
        for it in range(1, iters + 1):
            w = hvp(v)
            if shift:
                w = [wi - shift * vi for wi, vi in zip(w, v)]
            new = dot(v, w)
            hist.append(new + shift)
            nw = math.sqrt(dot(w, w))
            if nw == 0:
                lam, conv = new, True
                break
            v = [wi / nw for wi in w]
            if it > 1 and abs(new - lam) <= tol * max(abs(new), 1e-30):
                lam, conv = new, True
                break
            lam = new
        return lam + shift, it, conv, hist

    with eval_mode(model):
        dom, it1, conv1, hist1 = power(0.0)
        if dom >= 0:
            return HessianEigen(eigenvalue=dom, dominant=dom, n_iter=it1, converged=conv1, history=hist1)
        top, it2, conv2, hist2 = power(dom)
    return HessianEigen(eigenvalue=top, dominant=dom, n_iter=it1 + it2, converged=conv1 and conv2, history=hist2)
