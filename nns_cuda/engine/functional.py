"""The functional API: learned images, filter images and the layer image of one layer."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from nns_cuda.engine.graph import build_graph
from nns_cuda.engine.inputs import check_input
from nns_cuda.engine.memory import (check_dense_result, default_budget, forward_bytes_per_sample, parse_bytes,
                                    reverse_fallback_message)
from nns_cuda.engine.options import (STRATEGIES, check_choice, matmul_precision, resolve_backend,
                                     resolve_conv_algorithm, resolve_precision, reverse_supports)
from nns_cuda.engine.reverse import reverse_learned_images
from nns_cuda.engine.scanner import Scanner

__all__ = ["learned_images", "filter_images", "layer_image"]


def _neuron_index(neurons: Sequence, shape: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Flat indices (int64 Tensor [n]) of neuron index tuples into a layer's output ``shape``."""
    flat = []
    for nrn in neurons:
        t = (nrn,) if isinstance(nrn, int) else tuple(nrn)
        if len(t) != len(shape):
            raise ValueError(f"neuron index {t} has {len(t)} entries; the layer's neurons are indexed by {len(shape)} "
                             f"(layer output shape {list(shape)})")
        for v, n in zip(t, shape):
            if not (0 <= int(v) < n):
                raise IndexError(f"neuron index {t} out of range for layer output shape {list(shape)}")
        f = 0
        for v, n in zip(t, shape):
            f = f * n + int(v)
        flat.append(f)
    return torch.tensor(flat, dtype=torch.long, device=device)


def learned_images(model: nn.Module, x: torch.Tensor, layer: str, *, neurons: Optional[Sequence] = None,
                   backend: str = "auto", strategy: str = "auto", gate_outputs: bool = False,
                   linearize: Optional[str] = None, max_memory: Union[None, int, str] = None, precision: str = "auto",
                   conv_algorithm: str = "auto", progress: Optional[bool] = None) -> torch.Tensor:
    """Learned images of the neurons of one layer (docs/spec.md §1).

    Parameters
    ----------
    model : nn.Module
        In eval mode.
    x : Tensor [B, D, H, W] (or [B, N])
    layer : str
        Qualified module name (``model.named_modules()``), ``name:k`` for the k-th call of a
        reused module, or a container's name for its output.
    neurons : list of index tuples or None
        Indices into the layer's output shape (without the batch); None: all neurons. With
        ``strategy="auto"``, 64 neurons or fewer run the reverse strategy.
    backend, strategy, gate_outputs, linearize, max_memory, precision, conv_algorithm, progress
        See :class:`~nns_cuda.engine.scanner.Scanner` (a reduced precision makes
        ``strategy="auto"`` use the forward strategy, which alone implements it). When
        ``strategy="auto"`` takes the reverse strategy because one sample does not fit
        ``max_memory`` (not for a few ``neurons``, where it is the fast choice), a
        ``UserWarning`` says so.

    Returns
    -------
    Tensor
        [B, *layer_output_shape, *x.shape[1:]] (``neurons=None``) or [B, n, *x.shape[1:]];
        float32 for the tf32 / bf16 / fp16 precisions.

    Raises
    ------
    MemoryError
        The dense result would not fit the device's memory (the message gives its size and
        what to ask for instead).
    ValueError
        ``x`` does not fit the model (a 3-d ``x``: "x must be [B, C, H, W]"), or bad options.
    """
    check_input(x)
    check_choice("strategy", strategy, STRATEGIES)
    max_memory = parse_bytes(max_memory)
    prec, storage, out_dtype = resolve_precision(precision, x)
    resolve_conv_algorithm(conv_algorithm, x.device, prec, resolve_backend(backend, x.device))
    graph = build_graph(model, x, linearize)
    node = graph.resolve(layer)
    sel = None if neurons is None else _neuron_index(neurons, node.shape, x.device)
    if x.shape[0] == 0:  # an empty batch: an empty result of the right shape
        return torch.zeros(0, *(node.shape if sel is None else (sel.numel(),)), *graph.input_shape,
                           dtype=out_dtype, device=x.device)
    n_out = math.prod(node.shape) if sel is None else sel.numel()
    check_dense_result((x.shape[0], n_out, *graph.input_shape), out_dtype, x.device,
                       f"learned_images of layer {layer!r}")
    budget = max_memory or default_budget(x.device)
    if strategy == "auto":
        few = sel is not None and sel.numel() <= 64 and reverse_supports(precision, prec, x.dtype)
        fit = max_memory or default_budget(x.device, fit=True)
        per_sample = forward_bytes_per_sample(graph, node.idx, storage)
        strategy = "reverse" if few or per_sample > fit else "forward"
        if strategy == "reverse" and not few and reverse_supports(precision, prec, x.dtype):
            warnings.warn(reverse_fallback_message(per_sample, fit), UserWarning, stacklevel=2)
    if strategy == "reverse":
        if not reverse_supports(precision, prec, x.dtype):
            raise ValueError(f"precision={precision!r} needs the forward strategy: the reverse strategy runs "
                             f"autograd in the input's dtype ({x.dtype})")
        with matmul_precision(prec if precision != "auto" else "auto", x.device):
            return reverse_learned_images(graph, x, node, sel, gate_outputs, budget, progress)
    res = Scanner(model, [layer], backend=backend, strategy="forward", max_memory=max_memory, stats=False,
                  keep_images=True, gate_outputs=gate_outputs, linearize=linearize, precision=precision,
                  conv_algorithm=conv_algorithm, progress=progress).scan(x)
    imgs = res[layer].images
    if sel is None:
        return imgs
    return imgs.reshape(x.shape[0], math.prod(node.shape), *graph.input_shape)[:, sel]


def filter_images(model: nn.Module, x: torch.Tensor, layer: str, *, backend: str = "auto", strategy: str = "auto",
                  max_memory: Optional[int] = None, gate_outputs: bool = False,
                  linearize: Optional[str] = None, precision: str = "auto",
                  conv_algorithm: str = "auto") -> torch.Tensor:
    """Filter learned images ``L^k = Σ_{i,j} LI_{k,i,j} · a^k_{i,j}`` (docs/spec.md §1, eqs. 5-2 / 6-2).

    ``a^k`` is the layer's own output map (for a layer followed by ReLU its gated images make
    ``Σ LI·z = Σ LI·ReLU(z)``).

    Parameters
    ----------
    model, x
        As :func:`learned_images`.
    layer : str
        A layer with channels (output ``[C, H', W']`` or ``[N]``); names as :func:`learned_images`.
    backend, strategy, max_memory, gate_outputs, linearize, precision, conv_algorithm
        See :class:`~nns_cuda.engine.scanner.Scanner`.

    Returns
    -------
    Tensor [B, C, *x.shape[1:]]
        float32 for the tf32 / bf16 / fp16 precisions.
    """
    res = Scanner(model, [layer], backend=backend, strategy=strategy, max_memory=max_memory, stats=False,
                  filter_images=True, gate_outputs=gate_outputs, linearize=linearize, precision=precision,
                  conv_algorithm=conv_algorithm).scan(x)
    return res[layer].filter_images


def layer_image(model: nn.Module, x: torch.Tensor, layer: str, *, backend: str = "auto", strategy: str = "auto",
                max_memory: Optional[int] = None, precision: str = "auto",
                conv_algorithm: str = "auto") -> torch.Tensor:
    """Layer learned image ``Σ_k L^k`` (docs/spec.md §1; §3.4.1 of the thesis).

    Parameters
    ----------
    model, x, layer, backend, strategy, max_memory, precision, conv_algorithm
        As :func:`filter_images`.

    Returns
    -------
    Tensor [B, *x.shape[1:]]
    """
    return filter_images(model, x, layer, backend=backend, strategy=strategy, max_memory=max_memory,
                         precision=precision, conv_algorithm=conv_algorithm).sum(1)
