"""Filter-image workloads: ``L^k = Σ a^k · LI_k`` (docs/spec.md §1) of every filter of every
conv layer, with the strategy the engine picks (``strategy="auto"``), against the batched
reverse-VJP baseline (cotangent ``g ⊙ a^k`` per filter, :class:`bench_baselines.ReverseVJP`).

Correctness first: on the check batch, the engine's filter images of a sample of layers (first,
middle, last conv) are compared with the VJP oracle computed for those layers alone
(``max |a − b| / max |b|`` per layer). Run through ``python -m benchmarks.run``.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List

import torch

import nns_cuda

from . import bench_baselines as BL
from .bench_scan import Options, Skip, _free_bytes, log, measure, past_deadline, record_failure, speedups, \
    start_row
from .common import FloorCount, Workload, build_model, conv_layer_names, count_floor, make_inputs, precision, \
    reverse_flops, sync

__all__ = ["run_filters_workload", "rel_err"]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    g = got.detach().to("cpu", torch.float64)
    w = want.detach().to("cpu", torch.float64)
    if g.shape != w.shape:
        raise ValueError(f"shapes differ {tuple(g.shape)} vs {tuple(w.shape)}")
    if not bool(torch.isfinite(g).all()):
        return math.inf
    return float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))


def filter_oracle(model: torch.nn.Module, x: torch.Tensor, names: List[str], chunk: int = 32) -> Dict[str, torch.Tensor]:
    """Filter images by plain autograd on the real model, independent of the VJP baseline:
    forward hooks capture each layer's output ``z``; for chunks of channels one batched backward
    (``is_grads_batched``) with cotangents ``g ⊙ z`` restricted to one channel each, then
    ``x ⊙ grad``. ``{name: [B, C, D, H, W]}``."""
    from .common import neuron_gates

    graph = nns_cuda.build_graph(model, x[:1])
    captured: Dict[str, torch.Tensor] = {}
    hooks = []
    try:
        for n in names:
            mod = graph.resolve(n).module
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)))
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            model(xr)
    finally:
        for h in hooks:
            h.remove()
    gates = neuron_gates(graph, names, {graph.resolve(n).idx: captured[n].detach() for n in names})
    out = {}
    for n in names:
        z = captured[n]
        cot = gates[n] * z.detach()
        B, C = cot.shape[:2]
        L = torch.empty(B, C, *x.shape[1:], dtype=x.dtype, device=x.device)
        for s in range(0, C, chunk):
            ch = torch.arange(s, min(C, s + chunk), device=x.device)
            go = torch.zeros(ch.numel(), *cot.shape, dtype=x.dtype, device=x.device)
            go[torch.arange(ch.numel(), device=x.device), :, ch] = cot[:, ch].transpose(0, 1)
            with torch.enable_grad():
                (gr,) = torch.autograd.grad(z, xr, go, retain_graph=True, is_grads_batched=True)
            L[:, s: s + ch.numel()] = (gr * x.unsqueeze(0)).transpose(0, 1)
        out[n] = L
    return out


def _sample_layers(names: List[str]) -> List[str]:
    idx = sorted({0, len(names) // 2, len(names) - 1})
    return [names[i] for i in idx]


def run_filters_workload(wl: Workload, opts: Options, peaks: Dict[str, Any],
                         emit: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    dev = opts.device
    B = opts.batch or (wl.batch_cuda if dev == "cuda" else wl.batch_cpu)
    Bc = max(1, min(B, opts.check_batch))
    model = build_model(wl, dev, seed=opts.seed)
    x, fg = make_inputs(wl, B, dev, seed=opts.seed + 1)
    names = conv_layer_names(model, x, wl.conv_layers)
    graph = nns_cuda.build_graph(model, x[:1])
    n_filters = sum(graph.resolve(n).shape[0] for n in names)
    floors: Dict[int, FloorCount] = {}

    def floor(b: int) -> FloorCount:
        if b not in floors:
            f = count_floor(model, x[:b], names, stats=False, filters=True)
            rv = reverse_flops(model, x[:b], names)
            f.reverse_flops = rv  # type: ignore[attr-defined]
            floors[b] = f
        return floors[b]

    f1 = floor(1)
    info = {"description": wl.description, "model": wl.model, "input": [3, wl.size, wl.size], "task": wl.task,
            "layers": names, "filters_per_image": n_filters, "batch": B, "check_batch": Bc,
            "floor_per_image": {"flops": f1.flops, "bytes": f1.bytes, "reverse_flops": f1.reverse_flops}}
    log(opts, f"[{wl.name}] {wl.description}: {len(names)} conv layers, {n_filters} filters/image; forward-patch "
              f"floor {f1.flops / 1e9:.1f} GFLOP + {f1.bytes / 1e9:.2f} GB, reverse {f1.reverse_flops / 1e9:.1f} GFLOP "
              f"per image; batch {B}")

    sample = _sample_layers(names)
    t0 = time.perf_counter()
    with precision("fp32"):
        ref = filter_oracle(model, x[:Bc], sample)
        sync(dev)
    info["oracle_s"] = time.perf_counter() - t0
    info["checked_layers"] = sample
    log(opts, f"  oracle (autograd, is_grads_batched, on {sample}, batch {Bc}): {info['oracle_s']:.2f} s")

    def compare_engine(out: Dict[str, torch.Tensor]) -> float:
        return max(rel_err(out[n], ref[n]) for n in sample)

    def compare_vjp(out) -> float:
        errs = []
        for n, (idx, L) in out.items():
            if n in ref:
                errs.append(rel_err(L, ref[n][:, idx.to(ref[n].device)]))
        return max(errs) if errs else math.nan

    rows: List[Dict[str, Any]] = []
    plan = []
    for m in opts.methods:
        if m in ("cuda", "cpu", "reference"):
            if m in ("cuda", "cpu") and m != dev:
                continue
            for p in opts.precisions:
                if p == "tf32" and (dev != "cuda" or m != "cuda"):
                    continue
                plan.append((m, p))
        elif m == "vjp":
            plan.append(("vjp", "fp32"))
    for method, prec in plan:
        row = start_row(wl, method, prec, opts)
        if past_deadline(opts, row, rows, emit):
            continue
        common = dict(x=x, fg=fg, check_batch=Bc, opts=opts, floor=floor, peaks=peaks, neurons_per_image=n_filters)
        try:
            if method in ("cuda", "cpu", "reference"):
                if method != "reference" and not nns_cuda.ext_info().get(method):
                    raise Skip(f"the extension has no {method} kernels")
                sc = nns_cuda.Scanner(model, names, backend=method, strategy="auto", stats=False, filter_images=True)
                seen = {}

                def run(xx, ff, sc=sc, seen=seen):
                    r = sc.scan(xx)
                    seen["strategy"], seen["backend"] = r.strategy, r.backend
                    return {n: r[n].filter_images for n in names}

                measure(row=row, run=run, compare=compare_engine, batch=B,
                        consistency=lambda o, c: max(rel_err(o[n][: c[n].shape[0]], c[n]) for n in names), **common)
                row["backend"], row["strategy"] = seen.get("backend"), seen.get("strategy")
                row["notes"].append(f"strategy {seen.get('strategy')}")
            else:
                rows_ = opts.vjp_rows or (max(B, min(512, int(0.3 * _free_bytes(dev)) // max(1, 12 * _act_elems(graph))))
                                          if dev == "cuda" else 16)
                m = BL.ReverseVJP(model, names, x[:B], rows=rows_, chunks=opts.vjp_chunks, mode="filters")
                row["notes"] += m.notes
                row["sample"] = {"chunks_timed": len(m.chunk_ids), "chunks": m.n_chunks, "rows": m.k * B}
                measure(row=row, run=m.run, compare=compare_vjp, batch=B, extrapolate=m.extrapolate, **common)
            fl = floor(row["batch"])
            pf = peaks.get(f"{prec}_flops")
            if pf and row.get("total_s"):
                # the reverse strategy may need less work than the forward patches at 224:
                # the floor is the smaller of the two
                rf = fl.reverse_flops / pf
                row["forward_floor_s"] = row.get("floor_s")
                row["reverse_floor_s"] = rf
                fs = min(v for v in (row.get("floor_s"), rf) if v)
                row["floor_s"] = fs
                row["floor_fraction"] = fs / row["total_s"]
                row["time_over_floor"] = row["total_s"] / fs
                row["notes"].append("floor = min(forward patches, dense reverse)")
        except Skip as e:
            row["error"] = f"skipped: {e}"
        except Exception as e:
            record_failure(opts, row, e, dev)
        rows.append(row)
        speedups(rows)
        emit(row)
    return info


def _act_elems(graph) -> int:
    return sum(int(math.prod(g.shape)) for g in graph.nodes if g.kind not in ("aux",) and g.shape)
