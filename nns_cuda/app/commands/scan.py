"""``nns scan``: learned images and per-neuron statistics of chosen layers of a model."""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import sys
import textwrap
import time
from typing import Any, Dict, List, Sequence

from nns_cuda.app._common import CLIError, engine_options, guarded, load_data, load_model, model_options

HELP = "learned images and per-neuron statistics of chosen layers"
DESCRIPTION = textwrap.dedent("""\
    Scan layers of a model on images: the learned image of every neuron (docs/spec.md §1),
    reduced to per-neuron statistics, plus heat maps of the layer and filter learned images.

    Writes into --out:
      learned_images.png         inputs and the layer learned image of each layer
      filters_<layer>.png        filter learned images of the most active filters
      layers.csv, scan.json      per-layer summary (active neurons, knowledge quantity, ...)
      neurons_<layer>.csv        per-neuron means over the samples

    Models: a zoo name (`nns scan --list-models`), `package.module:factory` (called with
    no arguments, must return an nn.Module), or a file saved with torch.save(model).
    Weights (--weights) are a state dict or a `nns train` checkpoint.
    Data: `digits` (the embedded default; --split) or a folder of image files.
    """)
EPILOG = "Example: nns scan --model simple_cnn --layers features.relu1 features.relu3 --samples 8"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns scan`` options to ``p`` (returns it)."""
    model_options(p)
    p.add_argument("--in-channels", type=int, default=3, help="input channels of a zoo model / folder images")
    p.add_argument("--input-size", type=int, default=None, help="input side (folder images are resized to it)")
    p.add_argument("--data", default="digits", help="'digits' (embedded default) or a folder of images")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of the digits")
    p.add_argument("--samples", type=int, default=16, metavar="N", help="samples to scan")
    p.add_argument("--layers", nargs="+", default=None,
                   help="layer names from model.named_modules() (default: every ReLU and the output layer)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp64", "tf32", "bf16", "fp16"],
                   help="learned-image precision: auto = the input's dtype; bf16 / fp16 store the patches in 16 "
                        "bits (counts become unreliable); tf32 = TF32 tensor-core GEMMs (CUDA only)")
    p.add_argument("--conv-algorithm", default="auto", choices=["auto", "direct", "gemm", "gather", "implicit"],
                   help="conv propagation: direct gated kernels, one dense GEMM per image, GEMMs over the active "
                        "(input, tap) pairs (gather), or those as one Triton kernel (implicit, CUDA); auto = direct "
                        "on the CPU, gather on CUDA")
    p.add_argument("--strategy", default="auto", choices=["auto", "forward", "reverse"],
                   help="forward: all neurons in one sweep; reverse: one backward pass per neuron/filter")
    p.add_argument("--images", type=int, default=4, metavar="N", help="samples drawn in learned_images.png")
    p.add_argument("--filters", type=int, default=8, metavar="K", help="filter images drawn per layer")
    p.add_argument("--cmap", default="RdBu_r", help="heat-map colours: RdBu_r (red +, blue -) or jet (thesis look)")
    p.add_argument("--gate-outputs", action="store_true", help="gate the output layer by S(z) too")
    p.add_argument("--list-models", action="store_true", help="print the zoo's model names and exit")
    p.add_argument("--out", default="nns_output/scan", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine_options(p, batch=32)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``nns scan``: writes the figures, CSVs and ``scan.json`` into ``args.out``. Returns the exit status.

    The time it prints is the whole command's, from ``args.started`` (a ``time.perf_counter()``
    value that ``nns`` sets when it starts) or from this call, with its parts named.
    """
    started = getattr(args, "started", None) or time.perf_counter()
    return guarded("scan", args, lambda: _run(args, started))


def _progress(total: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=disable, leave=False)


def _run(args: argparse.Namespace, started: float) -> int:
    import torch

    from nns_cuda import models
    from nns_cuda.app.demo import scan_layers
    from nns_cuda.engine.memory import parse_bytes
    from nns_cuda.engine.scanner import Scanner
    from nns_cuda.ops.reference.stats import STAT_INDEX

    if args.list_models:
        for n in models.available():
            try:
                d = models.describe(n)
            except Exception:
                d = ""
            print(f"{n:20s} {d}")
        return 0
    for name, v in (("--batch-size", args.batch_size), ("--images", args.images), ("--filters", args.filters)):
        if v < 0 or (name == "--batch-size" and v < 1):
            raise CLIError(f"{name} must be positive, got {v}")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    model, mdesc = load_model(args.model, args.weights, num_classes=args.num_classes, in_channels=args.in_channels,
                              input_size=args.input_size, who="nns scan")
    model = model.to(dev).eval()
    x, y, fg, ddesc = load_data(args.data, split=args.split, samples=args.samples, in_channels=args.in_channels,
                                input_size=args.input_size, who="nns scan")
    layers = args.layers or scan_layers(model, x[:1].to(dev))
    scanner = Scanner(model, layers, backend=args.backend, strategy=args.strategy, max_memory=parse_bytes(args.max_memory),
                      stats=True, gate_outputs=args.gate_outputs, precision=args.precision,
                      conv_algorithm=args.conv_algorithm)
    os.makedirs(args.out, exist_ok=True)
    n = x.shape[0]
    acc: Dict[str, Dict[str, Any]] = {}
    backend = strategy = None
    numerics: Dict[str, Any] = {}
    bar = _progress((n + args.batch_size - 1) // args.batch_size, "nns scan", args.no_progress)
    t_scan0 = time.perf_counter()
    try:
        for s in range(0, n, args.batch_size):
            xb, fb = x[s:s + args.batch_size].to(dev), fg[s:s + args.batch_size].to(dev)
            res = scanner.scan(xb, fb)
            backend, strategy = res.backend, res.strategy
            numerics = {"precision": res.precision, "conv_algorithm": res.conv_algorithm,
                        "conv_algorithms": dict(res.conv_algorithms)}
            cx = (xb != 0).flatten(1).sum(1).double()
            sx = xb.abs().flatten(1).sum(1).double()
            for l in layers:
                r = res[l]
                st = r.stats.double().reshape(xb.shape[0], -1, r.stats.shape[-1])
                a = r.activations.double().reshape(xb.shape[0], -1)
                cnt = st[..., STAT_INDEX["nz_fg"]] + st[..., STAT_INDEX["nz_bg"]]
                stren = st[..., STAT_INDEX["abs_sum"]]
                li_sum = st[..., STAT_INDEX["sum"]]
                active = cnt > 0
                d = acc.setdefault(l, {"shape": list(r.activations.shape[1:]), "act": 0, "active": 0, "count": 0,
                                       "strength": 0, "li_sum": 0, "count_ratio": 0.0, "strength_ratio": 0.0,
                                       "n": 0})
                d["act"] = d["act"] + a.sum(0).cpu()
                d["active"] = d["active"] + active.double().sum(0).cpu()
                d["count"] = d["count"] + cnt.sum(0).cpu()
                d["strength"] = d["strength"] + stren.sum(0).cpu()
                d["li_sum"] = d["li_sum"] + li_sum.sum(0).cpu()
                d["count_ratio"] += float((cnt.mean(1) / cx.clamp_min(1)).sum())
                d["strength_ratio"] += float((stren.mean(1) / sx.clamp_min(1e-300)).sum())
                d["n"] += xb.shape[0]
            bar.update(1)
    finally:
        bar.close()
    t_fig0 = time.perf_counter()
    rows, files = _write_tables(args.out, layers, acc)
    if args.images > 0:
        files += _scan_figures(model, x, layers, args, dev)
    t_end = time.perf_counter()
    seconds = {"start-up and loading": t_scan0 - started, "scan": t_fig0 - t_scan0, "tables and figures": t_end - t_fig0}
    meta = {"model": mdesc, "data": ddesc, "samples": n, "layers": rows, "backend": backend, "strategy": strategy,
            **numerics, "device": str(dev),
            "seconds": {**{k: round(v, 3) for k, v in seconds.items()}, "total": round(t_end - started, 3)},
            "files": files + ["scan.json"],
            "notes": "count = non-zero entries of a learned image, strength = sum of |values| (docs/spec.md §2); ratios are "
                     "relative to the input's; neurons_<layer>.csv index = position in the layer output"}
    with open(os.path.join(args.out, "scan.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    print(f"nns scan: {n} samples, {len(layers)} layers ({backend}, {strategy}) in {time.perf_counter() - started:.1f} s "
          f"({parts}); wrote {len(meta['files'])} files to {args.out}")
    return 0


def _write_tables(out: str, layers: Sequence[str], acc: Dict[str, Dict[str, Any]]):
    """Write ``neurons_<layer>.csv`` and ``layers.csv`` from the sums in ``acc``; returns (layer rows, file names)."""
    rows = []
    files = []
    for l in layers:
        d = acc[l]
        N = d["n"]
        act, active = d["act"] / N, d["active"] / N
        row = {"layer": l, "shape": "x".join(map(str, d["shape"])), "neurons": int(act.numel()),
               "active_fraction": float(active.mean()), "mean_activation": float(act.mean()),
               "count_ratio": d["count_ratio"] / N, "strength_ratio": d["strength_ratio"] / N}
        rows.append(row)
        fname = f"neurons_{_safe(l)}.csv"
        with open(os.path.join(out, fname), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["neuron", "index", "mean_activation", "active_fraction", "mean_count", "mean_strength",
                        "mean_li_sum"])
            idx = _unravel_all(d["shape"])
            cols = [act, active, d["count"] / N, d["strength"] / N, d["li_sum"] / N]
            cols = [c.tolist() for c in cols]
            for i in range(len(idx)):
                w.writerow([i, idx[i]] + [f"{c[i]:.6g}" for c in cols])
        files.append(fname)
    with open(os.path.join(out, "layers.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r_ in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r_.items()})
    files.append("layers.csv")
    return rows, files


def _scan_figures(model, x, layers, args, dev) -> List[str]:
    import torch

    from nns_cuda.app import viz
    from nns_cuda.engine.scanner import Scanner

    k = min(args.images, x.shape[0])
    xb = x[:k].to(dev)
    res = Scanner(model, layers, backend=args.backend, strategy=args.strategy, stats=False, filter_images=True,
                  gate_outputs=args.gate_outputs, precision=args.precision,
                  conv_algorithm=args.conv_algorithm).scan(xb)
    rows = [{l: res[l].filter_images[b].sum(0) for l in layers} for b in range(k)]
    files = []
    fig = viz.layer_grid([xb[b] for b in range(k)], rows, cmap=args.cmap, colorbar=True)
    viz.save(fig, os.path.join(args.out, "learned_images.png"))
    files.append("learned_images.png")
    if args.filters > 0:
        for l in layers:
            L = res[l].filter_images[0]
            a = res[l].activations[0]
            score = a.reshape(a.shape[0], -1).sum(1) if a.dim() > 1 else a
            top = torch.argsort(score, descending=True, stable=True)[: args.filters].tolist()
            fig = viz.filter_grid(xb[0], L, indices=top, cmap=args.cmap, title=f"{l}: most active filters", colorbar=True)
            name = f"filters_{_safe(l)}.png"
            viz.save(fig, os.path.join(args.out, name))
            files.append(name)
    return files


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _unravel_all(shape: Sequence[int]) -> List[str]:
    return [":".join(map(str, t)) for t in itertools.product(*[range(s) for s in shape])]
