"""Saliency of filters and its rank correlation with the properties (thesis §5.3.2, Table 5-2;
docs/spec.md §4).

* AVoU (eq. 5-8): mean of the filter's activation ``a^k`` over positions and samples.
* SoU (eqs. 5-9, 5-10): mean over samples and over the filter's weights ``w`` of
  ``|loss(θ) − loss(θ with w = 0)|``, exactly or by its first-order (Taylor) estimate.
* Spearman ρ (eq. 5-12) between each saliency and each ``T``.

Decisions
---------
* SoU counts the filter's weights (``weight[k]`` of the conv producing the channel), not its
  bias: eq. 5-10's ``W`` is the number of connections. Default loss: per-sample cross-entropy.
* ρ is None when it is undefined (a constant vector, fewer than two filters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nns_cuda.analysis._tip_eval import DictResult, first_x, probe_layer
from nns_cuda.analysis._toolkit import (
    check_reiterable,
    eval_mode,
    layer_hook,
    model_device,
    resolve_module,
    unpack_batch,
)

__all__ = ["avou", "sou", "spearman_table", "SaliencyResult", "saliency"]


def avou(model: nn.Module, data: Iterable, layer: str, *, progress: bool = True) -> torch.Tensor:
    """Average value of unit (AVoU, eq. 5-8): mean of ``a^k`` over positions and samples.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode without gradients; every module's flag is restored.
    data : re-iterable of ``(x [B, D, H, W], ...)`` batches
    layer : str
        Module (``name`` or ``name:i``) whose output ``[B, K, *spatial]`` holds ``a^k``.
    progress : bool
        A progress bar on stderr over the batches.

    Returns
    -------
    Tensor [K]
        float64, CPU.
    """
    check_reiterable(data, "avou")
    x0 = first_x(data, "avou", model)
    K = probe_layer(model, x0, layer, "avou").channels
    dev = model_device(model)
    total = torch.zeros(K, dtype=torch.float64)
    n = [0]

    def grab(out: torch.Tensor) -> None:
        total.add_(out.detach().flatten(2).to(torch.float64).mean(2).sum(0).cpu())
        n[0] += out.shape[0]

    with torch.no_grad(), eval_mode(model), layer_hook(model, layer, grab):
        for batch in tqdm(data, desc="AVoU", unit="batch", leave=False, disable=not progress):
            x, _, _ = unpack_batch(batch, "avou")
            model(x.to(dev))
    return total / n[0]


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy: logits [B, classes], y [B] -> [B]."""
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def _weight_param(model: nn.Module, layer: str, weight_layer: Optional[str], x0: torch.Tensor,
                  where: str) -> Tuple[str, str, int]:
    """Find the weight whose rows are the filters of ``layer``.

    Returns
    -------
    (str, str, int)
        The weight module's name, the weight's qualified parameter name, and ``K``.
    """
    info = probe_layer(model, x0, layer, where, record_order=True)
    K = info.channels

    def ok(mod: nn.Module) -> bool:
        w = getattr(mod, "weight", None)
        return isinstance(w, torch.Tensor) and w.dim() >= 2 and w.shape[0] == K

    if weight_layer is not None:
        mod = resolve_module(model, weight_layer)
        if not ok(mod):
            w = getattr(mod, "weight", None)
            raise ValueError(f"{where}: weight_layer {weight_layer!r} must have a weight [K={K}, ...] (one row per "
                             f"filter of {layer!r}), got {list(w.shape) if isinstance(w, torch.Tensor) else None}.")
        name = weight_layer
    else:
        mods = dict(model.named_modules())
        name = None
        for n in reversed(info.call_order[: info.layer_pos + 1]):
            if ok(mods[n]):
                name = n
                break
        if name is None:
            raise ValueError(f"{where}: found no conv / linear module with weight [{K}, ...] at or before layer "
                             f"{layer!r}; pass weight_layer= (the module whose weight[k] is filter k).")
    w = resolve_module(model, name).weight
    pname = next((n for n, p in model.named_parameters() if p is w), None)
    if pname is None:
        raise ValueError(f"{where}: the weight of {name!r} is not a registered parameter of the model.")
    return name, pname, K


def sou(model: nn.Module, data: Iterable, layer: str, method: str = "taylor", *,
        weight_layer: Optional[str] = None, loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        chunk_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Sensitivity of unit (SoU, eqs. 5-9, 5-10): mean over samples and over the filter's weights
    ``w`` of ``|loss(θ) − loss(θ with w = 0)|``.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``[B, classes]`` (run in eval mode, flags restored; no
        ``.grad`` is written).
    data : re-iterable of ``(x [B, D, H, W], y [B][, fg_mask])`` batches
    layer : str
        Layer whose output channels are the filters.
    method : "taylor" (default) or "exact"
        ``exact`` zeroes each weight in turn (``K · |w_k|`` forward passes per batch, vectorised
        with ``torch.func.vmap`` over ``chunk_size`` perturbed weight tensors); ``taylor`` uses
        the first-order estimate ``|w · ∂loss_i/∂w|`` per sample ``i`` (SNIP). Per-sample
        gradients: for ``Conv2d`` (groups 1, zero padding) and ``Linear`` weights, from one
        forward / backward per chunk (``grad_out ⊗ unfold(input)``; needs samples that do not
        interact, i.e. eval mode); otherwise ``torch.func.vmap(grad)`` over single samples.
    weight_layer : str, optional
        Module whose ``weight[k]`` is filter ``k`` (default: ``layer`` itself if it has one, else
        the last module before it in the forward pass with a weight ``[K, ...]``).
    loss_fn : callable ``(logits [B, classes], y [B]) -> [B]``, optional
        Per-sample loss (default cross-entropy).
    chunk_size : int
        Perturbed weights (exact) or samples (taylor) per vectorised call.
    progress : bool
        A progress bar on stderr over the batches.

    Returns
    -------
    Tensor [K]
        float64, CPU.

    Raises
    ------
    ValueError
        For an unknown method, a layer without channels, no weight ``[K, ...]`` for its filters,
        data without labels or samples, or a loss that is not per sample.
    """
    if method not in ("taylor", "exact"):
        raise ValueError(f"sou: method must be 'taylor' or 'exact', got {method!r}.")
    if chunk_size < 1:
        raise ValueError(f"sou: chunk_size must be >= 1, got {chunk_size}.")
    from torch.func import functional_call, grad, vmap

    loss_fn = loss_fn or _ce
    check_reiterable(data, "sou")
    x0 = first_x(data, "sou", model)
    wname, pname, K = _weight_param(model, layer, weight_layer, x0, "sou")
    W = dict(model.named_parameters())[pname].detach()
    per = W[0].numel()
    dev = model_device(model)
    total = torch.zeros(K, per if method == "exact" else 1, dtype=torch.float64)
    S = 0
    with eval_mode(model):
        for batch in tqdm(data, desc=f"SoU ({method})", unit="batch", leave=False, disable=not progress):
            x, y, _ = unpack_batch(batch, "sou")
            if y is None:
                raise ValueError("sou: the loss needs labels; batches must be (x, y[, fg_mask]).")
            x, y = x.to(dev), torch.as_tensor(y).to(dev)
            B = x.shape[0]
            S += B
            if method == "exact":
                with torch.no_grad():
                    base = loss_fn(model(x), y)
                    if base.shape != (B,):
                        raise ValueError(f"sou: loss_fn must return per-sample losses [B] = [{B}], got {list(base.shape)}.")

                    def f(wp: torch.Tensor) -> torch.Tensor:
                        return loss_fn(functional_call(model, {pname: wp}, (x,)), y)

                    flat = W.reshape(-1)
                    for s in range(0, flat.numel(), chunk_size):
                        idx = torch.arange(s, min(s + chunk_size, flat.numel()), device=W.device)
                        Wp = flat.unsqueeze(0).repeat(idx.numel(), 1)
                        Wp[torch.arange(idx.numel(), device=W.device), idx] = 0
                        Wp = Wp.view((idx.numel(),) + tuple(W.shape))
                        try:
                            losses = vmap(f)(Wp)  # [P, B]
                        except Exception:  # noqa: BLE001 - vmap-unsupported op: plain loop, same values
                            losses = torch.stack([f(w) for w in Wp])
                        d = (losses - base.unsqueeze(0)).abs().sum(1).to(torch.float64).cpu()
                        total.view(-1)[idx.cpu()] += d
            else:
                wmod = resolve_module(model, wname)
                fast = _unfold_grads_ok(wmod)
                # bound the per-sample gradient block [b, K, per] to ~2^26 entries
                step = max(1, min(chunk_size, (1 << 26) // max(1, K * per)))

                def loss1(w: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                    return loss_fn(functional_call(model, {pname: w}, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

                for s in range(0, B, step):
                    xs, ys = x[s:s + step], y[s:s + step]
                    if fast:
                        g = _per_sample_weight_grads(model, wmod, xs, ys, loss_fn)  # [b, K, per]
                    else:
                        with torch.no_grad():  # torch.func.grad still differentiates; no outer graph
                            try:
                                g = vmap(grad(loss1), in_dims=(None, 0, 0))(W, xs, ys)  # [b, *W.shape]
                            except Exception:  # noqa: BLE001 - per-sample loop, same values
                                g = torch.stack([grad(loss1)(W, xi, yi) for xi, yi in zip(xs, ys)])
                    t = (W.reshape(1, K, per) * g.reshape(g.shape[0], K, per)).abs_()
                    total[:, 0] += t.mean(2).to(torch.float64).sum(0).cpu()
                    del g, t
    if S == 0:
        raise ValueError("sou: data has no samples.")
    if method == "taylor":
        return total[:, 0] / S
    return total.sum(1) / (per * S)


def _unfold_grads_ok(mod: nn.Module) -> bool:
    """Per-sample weight gradients from (input, grad_output) are exact for these modules."""
    if type(mod) is nn.Linear:
        return True
    return (type(mod) is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros"
            and not isinstance(mod.padding, str))


def _per_sample_weight_grads(model: nn.Module, mod: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``∂loss_i/∂W`` for every sample ``i`` of ``x`` ([b, K, per]) from one forward / backward.

    For a conv, ``∂loss_i/∂W[k] = Σ_p grad_out_i[k, p] · unfold(input_i)[:, p]`` (a linear layer:
    the outer product), summed over the module's calls. Samples must not interact (eval mode),
    so ``∂(Σ_j loss_j)/∂out_i = ∂loss_i/∂out_i``. Uses ``torch.autograd.grad`` w.r.t. the
    module outputs only: no ``.grad`` is written.

    Parameters
    ----------
    model : nn.Module
    mod : nn.Conv2d or nn.Linear
        The module of ``model`` whose weight ``[K, ...]`` is differentiated.
    x : Tensor [b, D, H, W]
    y : Tensor [b]
    loss_fn : callable ``(logits [b, classes], y [b]) -> [b]``

    Returns
    -------
    Tensor [b, K, per]
        ``per`` = the number of entries of ``weight[k]``.
    """
    caps: List[Tuple[torch.Tensor, torch.Tensor]] = []
    h = mod.register_forward_hook(lambda m, i, o: caps.append((i[0].detach(), o)) and None)
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x.detach().requires_grad_(True)), y)
            if loss.shape != (x.shape[0],):
                raise ValueError(f"sou: loss_fn must return per-sample losses [B] = [{x.shape[0]}], got {list(loss.shape)}.")
            if not caps:
                raise ValueError(f"sou: module {type(mod).__name__} did not run in the model's forward pass")
            # allow_unused: a call whose output does not reach the loss contributes exactly 0 to ∂loss/∂W;
            # when no call reaches it the saliency is undefined and raises (never read as zeros)
            gouts = torch.autograd.grad(loss.sum(), [o for _, o in caps], allow_unused=True)
            if all(go is None for go in gouts):
                raise ValueError(f"sou: the output of module {type(mod).__name__} does not reach the loss (no "
                                 "gradient path), so its weight gradients are undefined; pick a module on the "
                                 "path to the logits")
    finally:
        h.remove()
    K = mod.weight.shape[0]
    g = torch.zeros((x.shape[0], K, mod.weight[0].numel()), dtype=mod.weight.dtype, device=mod.weight.device)
    for (inp, _), go in zip(caps, gouts):
        if go is None:
            continue
        if isinstance(mod, nn.Conv2d):
            cols = torch.nn.functional.unfold(inp, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
            g += torch.bmm(go.flatten(2), cols.transpose(1, 2))  # [b, K, P] @ [b, P, Cin·kh·kw]
        else:  # Linear on [b, ..., in]
            g += torch.bmm(go.reshape(go.shape[0], -1, K).transpose(1, 2), inp.reshape(inp.shape[0], -1, inp.shape[-1]))
    return g


def spearman_table(saliencies: Mapping[str, Union[torch.Tensor, Sequence[float]]],
                   props: Mapping[str, Union[torch.Tensor, Sequence[float]]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Spearman ρ (eq. 5-12, :func:`scipy.stats.spearmanr`) between each saliency and each ``T``.

    Parameters
    ----------
    saliencies : mapping of str to Tensor [K]
        E.g. ``{"AVoU": …, "SoU": …}``.
    props : mapping of str to Tensor [K]
        E.g. ``{"mean": T_m, …}``.

    Returns
    -------
    dict of str to dict of str to float or None
        saliency -> property -> ρ (None when undefined, e.g. a constant vector).

    Raises
    ------
    ValueError
        When two vectors have different lengths.
    """
    from scipy.stats import spearmanr

    out: Dict[str, Dict[str, Optional[float]]] = {}
    for sn, s in saliencies.items():
        a = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64).ravel()
        out[sn] = {}
        for pn, p in props.items():
            b = np.asarray(p.detach().cpu() if isinstance(p, torch.Tensor) else p, dtype=np.float64).ravel()
            if a.size != b.size:
                raise ValueError(f"spearman_table: {sn!r} has {a.size} filters, {pn!r} has {b.size}.")
            if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
                out[sn][pn] = None
                continue
            rho = float(spearmanr(a, b).statistic)
            out[sn][pn] = rho if math.isfinite(rho) else None
    return out


@dataclass
class SaliencyResult(DictResult):
    """AVoU, SoU and their Spearman table with the properties (Table 5-2).

    Attributes
    ----------
    layer : str
        The analysed layer.
    avou : list of float [K]
        AVoU per filter.
    sou : list of float [K]
        SoU per filter.
    sou_method : str
        "taylor" or "exact".
    spearman : dict of str to dict of str to float or None
        saliency ("AVoU", "SoU") -> property -> ρ.
    """

    layer: str
    avou: List[float]
    sou: List[float]
    sou_method: str
    spearman: Dict[str, Dict[str, Optional[float]]]


def saliency(model: nn.Module, data: Iterable, layer: str, T: Mapping[str, torch.Tensor], *,
             sou_method: str = "taylor", weight_layer: Optional[str] = None, progress: bool = True,
             **sou_kwargs: Any) -> SaliencyResult:
    """AVoU, SoU and the Spearman table against the properties ``T`` (§5.3.2, Table 5-2).

    Parameters
    ----------
    model, data, layer
        As in :func:`sou`.
    T : mapping of str to Tensor [K]
        Property name -> ``T``.
    sou_method : "taylor" or "exact"
    weight_layer : str, optional
        Passed to :func:`sou`.
    progress : bool
        Progress bars on stderr over the batches of AVoU and SoU.
    **sou_kwargs
        Passed to :func:`sou` (``loss_fn``, ``chunk_size``).

    Returns
    -------
    SaliencyResult
    """
    check_reiterable(data, "saliency")
    a = avou(model, data, layer, progress=progress)
    s = sou(model, data, layer, sou_method, weight_layer=weight_layer, progress=progress, **sou_kwargs)
    return SaliencyResult(layer, a.tolist(), s.tolist(), sou_method, spearman_table({"AVoU": a, "SoU": s}, T))
