"""Precision and conv-algorithm measurements: the error of every ``precision`` /
``conv_algorithm`` pair of :class:`nns_cuda.Scanner` against float32 and float64, and its time.

    python -m benchmarks.bench_precision --device cpu --models vgg16_32 --json OUT.json
    python -m benchmarks.bench_precision --render OUT.json          # the markdown table again

Models: ``vgg16_32`` = ``nns_cuda.models.build("vgg16_cifar", seed=0)`` (random weights, eval),
``simple_cnn_32`` = the thesis's simple CNN, ``models.build("simple_cnn", seed=0)``; input
standard normal ``[B, 3, 32, 32]`` (seed 1) with a box foreground mask (the central half,
``benchmarks.common.make_inputs``). Layers: the ReLU after every conv (all 13 for VGG-16).

For each configuration the forward strategy runs once with the scan's own machinery
(``ForwardPass`` / ``PatchPropagator``, exactly what :meth:`Scanner.scan` runs) so that the
learned-image patches of all layers can be compared, not only their reductions:

* ``img``: relative Frobenius error of the learned images, ``‖LI − LI_ref‖_F / ‖LI_ref‖_F``
  per layer (the patches hold every non-zero entry of the dense images, so this is the dense
  images' error); reported: the largest over layers, and all of them in the JSON;
* ``stats``: per statistic column (STAT_NAMES), ``max |s − s_ref| / max |s_ref|`` over every
  neuron of a layer, the largest over layers; the table splits the columns into *sums* (the
  value statistics) and *counts* (``nz_fg``, ``nz_bg``, ``fg_xnz_sum``, ``fg_xnz_sq_sum``: they
  depend on which entries are exactly zero) and reports the largest of each; all in the JSON;
* ``filt``: relative Frobenius error of the filter images ``L^k``, the largest over layers.

References: ``fp64`` = ``precision="fp64"`` on the same float32 model and input (the same
gates: this isolates the arithmetic of the learned images) and ``fp32`` = the default scan.
``time_s``: forward pass + propagation + fused statistics of all layers (the stats workload),
median of ``--repeats`` runs; on CUDA the error run is the warm-up, on the CPU (same batch) it
is the first timed run. Nothing is asserted: figures are measured and reported.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

import nns_cuda
from nns_cuda import models as zoo
from nns_cuda.engine.forward import ForwardPass
from nns_cuda.engine.memory import default_budget, gemm_max_elems
from nns_cuda.engine.options import matmul_precision, resolve_backend, resolve_conv_algorithm, resolve_precision
from nns_cuda.engine.patches import fold_filter_images
from nns_cuda.engine.propagate import PatchPropagator
from nns_cuda.ops.reference.stats import NUM_STATS, STAT_NAMES

from .common import Workload, conv_layer_names, env_info, make_inputs, sync, write_json

MODELS = {"vgg16_32": "vgg16_cifar", "simple_cnn_32": "simple_cnn"}
#: (precision, conv_algorithm) pairs in run order; "tf32" runs on CUDA only
CONFIGS = [("fp64", "direct"), ("fp32", "direct"), ("fp32", "gemm"), ("fp32", "gather"), ("bf16", "direct"),
           ("bf16", "gemm"), ("fp16", "direct"), ("fp16", "gemm"), ("tf32", "gemm")]
#: on CUDA the tensor-core / GEMM configurations first (a time limit cuts the tail): gather (the
#: predicted fast one) at tf32 and fp32 first of all
CONFIGS_CUDA = [("tf32", "gather"), ("fp32", "gather"), ("tf32", "implicit"), ("fp32", "implicit"), ("tf32", "gemm"),
                ("bf16", "gather"), ("bf16", "implicit"), ("bf16", "gemm"),
                ("fp16", "gemm"), ("fp32", "gemm"), ("fp32", "direct"), ("bf16", "direct"), ("fp16", "direct"),
                ("fp64", "direct")]


def _run(model, x, fg, names, precision: str, algo: str,
         device: str) -> Tuple[Dict[str, Dict[str, torch.Tensor]], float, Dict[str, int]]:
    """One forward-strategy scan: ``{layer: {"patches", "stats", "filters"}}``, its time
    (forward + propagation + statistics; the filter fold runs after the clock stops) and how
    many convolutions ran each op (``{"gather": 10, "direct": 3}``: ``gather`` falls back to the
    direct kernels where it does not pay, ``gemm`` for grouped convolutions)."""
    sc = nns_cuda.Scanner(model, names, precision=precision, conv_algorithm=algo, stats=True)
    graph = sc.graph(x)
    nodes = sc.layer_nodes(graph)
    prec, storage, out_dtype = resolve_precision(precision, x)
    algo_r = resolve_conv_algorithm(algo, x.device, prec)
    backend = resolve_backend("auto", x.device)
    res: Dict[str, Dict[str, torch.Tensor]] = {}
    with torch.no_grad(), matmul_precision(prec, x.device):
        sync(device)
        t0 = time.perf_counter()
        fwd = ForwardPass(graph, x, False)
        prop = PatchPropagator(graph, fwd, x, backend, [g.idx for g in nodes], storage, algo_r,
                               gemm_max_elems(default_budget(x.device), storage))
        patches = prop.run()
        for n, g in zip(names, nodes):
            p = patches[g.idx]
            stats = prop.ops.li_stats(p.data, p.ay, p.ax, x, fg.to(x.dtype)).to(out_dtype)
            res[n] = {"patches": p.data, "stats": stats}
        sync(device)
        elapsed = time.perf_counter() - t0
        for n, g in zip(names, nodes):
            res[n]["filters"] = fold_filter_images(prop.ops, g, patches[g.idx], fwd.value(g),
                                                   graph.input_shape).to(out_dtype)
    used = list(prop.conv_ops_used.values())
    return res, elapsed, {k: used.count(k) for k in dict.fromkeys(used)}


def _frob(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64, in slices (the patches of a layer can be large)."""
    num = den = 0.0
    a2, b2 = a.reshape(a.shape[0] * a.shape[1], -1), b.reshape(b.shape[0] * b.shape[1], -1)
    step = max(1, (1 << 24) // max(1, a2.shape[1]))
    for i in range(0, a2.shape[0], step):
        bb = b2[i: i + step].double()
        d = a2[i: i + step].double() - bb
        if not bool(torch.isfinite(d).all()):
            return math.inf
        num += float((d * d).sum())
        den += float((bb * bb).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def _stat_cols(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    g = a.detach().double().reshape(-1, NUM_STATS)
    w = b.detach().double().reshape(-1, NUM_STATS)
    if not bool(torch.isfinite(g).all()):
        return [math.inf] * NUM_STATS
    return ((g - w).abs().amax(0) / w.abs().amax(0).clamp_min(1e-300)).tolist()


def _errors(got, ref) -> Dict[str, Any]:
    img = {n: _frob(got[n]["patches"], ref[n]["patches"]) for n in got}
    filt = {n: _frob(got[n]["filters"], ref[n]["filters"]) for n in got}
    cols = [0.0] * NUM_STATS
    for n in got:
        cols = [max(c, e) for c, e in zip(cols, _stat_cols(got[n]["stats"], ref[n]["stats"]))]
    return {"img": max(img.values()), "stats": max(cols), "filt": max(filt.values()), "img_per_layer": img,
            "filt_per_layer": filt, "stats_per_column": dict(zip(STAT_NAMES, cols))}


def run_model(key: str, device: str, batch: int, repeats: int, configs: List[Tuple[str, str]],
              time_batch: Optional[int]) -> Iterator[Dict[str, Any]]:
    """One row per configuration, yielded as soon as it is measured."""
    model = zoo.build(MODELS[key], seed=0).eval().to(device)
    x, fg = make_inputs(Workload(key, MODELS[key], 32), batch, device)
    names = conv_layer_names(model, x, neurons="act")
    print(f"[{key}] {len(names)} layers, batch {batch}, device {device}", file=sys.stderr, flush=True)
    ref64, t64, ops64 = _run(model, x, fg, names, "fp64", "direct", device)
    ref32, t32, ops32 = _run(model, x, fg, names, "fp32", "direct", device)
    for prec, algo in configs:
        if prec == "tf32" and device != "cuda":
            continue
        row: Dict[str, Any] = {"model": key, "precision": prec, "conv_algorithm": algo, "batch": batch,
                               "layers": len(names)}
        try:
            if (prec, algo) == ("fp64", "direct"):
                got, t_first, ops = ref64, t64, ops64
            elif (prec, algo) == ("fp32", "direct"):
                got, t_first, ops = ref32, t32, ops32
            else:
                got, t_first, ops = _run(model, x, fg, names, prec, algo, device)
            if ops:
                row["conv_ops"] = ops
            e64, e32 = _errors(got, ref64), _errors(got, ref32)
            del got
            row.update({f"{k}_vs_fp64": v for k, v in e64.items()})
            row.update({f"{k}_vs_fp32": v for k, v in e32.items()})
            tb = time_batch or batch
            xt, ft = (x, fg) if tb == batch else make_inputs(Workload(key, MODELS[key], 32), tb, device)
            reuse = device != "cuda" and tb == batch  # the error run is the first timed run
            times = [t_first] if reuse else []
            for _ in range(repeats - len(times)):
                times.append(_run(model, xt, ft, names, prec, algo, device)[1])
            row["time_s"] = statistics.median(times)
            row["time_batch"] = tb
        except Exception as e:  # reported, never fatal: the other configurations still run
            row["error"] = f"{type(e).__name__}: {e}"
        print(f"  {prec:4s} {algo:6s} " + ("ERROR " + row["error"] if "error" in row else
              f"img {row['img_vs_fp64']:.2e} stats {row['stats_vs_fp64']:.2e} (vs fp64)  "
              f"img {row['img_vs_fp32']:.2e} stats {row['stats_vs_fp32']:.2e} (vs fp32)  {row['time_s']:.3g} s"),
              file=sys.stderr, flush=True)
        yield row
    del ref64, ref32
    if device == "cuda":
        torch.cuda.empty_cache()


COUNT_STATS = ("nz_fg", "nz_bg", "fg_xnz_sum", "fg_xnz_sq_sum")
COLUMNS = ("model", "precision", "algorithm", "img vs fp32", "img vs fp64", "sums vs fp32", "sums vs fp64",
           "counts vs fp32", "counts vs fp64", "filters vs fp32", "filters vs fp64", "time (s)")


def _split(cols: Dict[str, float]) -> Tuple[float, float]:
    """(largest value-statistic error, largest count-statistic error)."""
    return (max(v for k, v in cols.items() if k not in COUNT_STATS),
            max(v for k, v in cols.items() if k in COUNT_STATS))


def table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of the rows (errors to 2 digits)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        ops = r.get("conv_ops") or {}
        algo = r["conv_algorithm"]
        if set(ops) - {algo}:  # some convolutions ran another op
            algo += " (" + ", ".join(f"{v} {k}" for k, v in ops.items()) + ")"
        head = [r["model"], r["precision"], algo]
        if "error" in r:
            cells = head + [r["error"]] + [""] * (len(COLUMNS) - 4)
        else:
            v32, c32 = _split(r["stats_per_column_vs_fp32"])
            v64, c64 = _split(r["stats_per_column_vs_fp64"])
            errs = (r["img_vs_fp32"], r["img_vs_fp64"], v32, v64, c32, c64, r["filt_vs_fp32"], r["filt_vs_fp64"])
            cells = head + [f"{e:.1e}" for e in errs] + [f"{r['time_s']:.3g} (B={r['time_batch']})"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default="vgg16_32,simple_cnn_32")
    p.add_argument("--configs", default=None,
                   help="comma-separated precision:algorithm pairs (default: all; tf32 on CUDA only)")
    p.add_argument("--batch", type=int, default=1, help="batch of the error measurement")
    p.add_argument("--time-batch", type=int, default=None, help="batch of the timed runs (default: --batch)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--render", default=None, help="print the table of an earlier --json file and exit")
    a = p.parse_args(argv)
    if a.render:
        with open(a.render) as f:
            print(table(json.load(f)["rows"]))
        return 0
    if a.configs is None:
        configs = CONFIGS_CUDA if a.device == "cuda" else CONFIGS
    else:
        configs = [tuple(c.split(":")) for c in a.configs.split(",")]
    doc: Dict[str, Any] = {"schema": "nns_cuda.bench_precision/1", "env": env_info(a.device),
                           "command": "python -m benchmarks.bench_precision " + " ".join(argv or sys.argv[1:]),
                           "rows": []}
    for key in a.models.split(","):
        for row in run_model(key, a.device, a.batch, a.repeats, configs, a.time_batch):
            doc["rows"].append(row)
            if a.json:  # after every row: a run cut by a timeout keeps what it measured
                write_json(a.json, doc)
    print(table(doc["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
