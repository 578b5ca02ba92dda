"""The benchmark suite's entry point (correctness first, then timing; ``benchmarks/NOTES.md``).

    python -m benchmarks.run [--quick] [--device cpu|cuda] [--json out.json] [--markdown out.md]
                             [--workloads vgg16_32,resnet18_32,...] [--methods cuda,dense,...]
                             [--precision fp32,tf32] [--algorithms auto,direct,gemm,gather]
                             [--time-limit SECONDS] ...

For each workload and method: a correctness check against the reference backend (fp32 within
1e-4 relative per statistic; tf32 errors are measured and reported), then timing (CUDA events
after a warm-up, or ``time.perf_counter`` on the CPU; median of repeats), peak memory, useful
GFLOP/s and the fraction of the gated floor (``benchmarks/NOTES.md``, "Floors") with peaks measured in the same run.
The JSON holds the machine, versions, commit, date, peaks and every row; the markdown table is
printed last. Speed goals are reported as measured, never asserted.

``--algorithms``: the ``conv_algorithm`` options of :class:`nns_cuda.Scanner` the engine methods
(``cuda``, ``cpu``) run, one row each (default ``auto`` only); ``tf32`` + ``direct`` is not run
(the engine refuses it) and an explicit algorithm that ``auto`` already ran is recorded as
skipped. The other methods run once per precision.

``--workloads res224`` runs the benchmark with its own driver registered in :data:`STANDALONE`
(``benchmarks/bench_res224.py``: ResNet-18 / VGG-16 at 224 × 224, the per-layer plan against the
users' batched VJP); ``--list`` lists it too.

``main(argv)`` returns 0, 1 when a method raised, 2 when an fp32 correctness check failed.
``--quick`` runs a CI-sized subset (VGG-16 @32's first four conv layers, batch 1) in a few
minutes on a 2-core CPU.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP (when run as a script): on a shared 2-core machine spin-waiting
# OpenMP workers make small operations many times slower (benchmarks/bench_gmm.py measured it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402

from . import common as C  # noqa: E402
from .bench_filters import run_filters_workload  # noqa: E402
from .bench_scan import ALL_METHODS, CONV_ALGORITHMS, Options, log, run_stats_workload  # noqa: E402

SCHEMA = "nns_cuda.bench/1"

#: Benchmarks with their own driver, registered here so that the suite lists and runs them:
#: ``--workloads res224`` runs ``python -m benchmarks.bench_res224`` (``--quick`` and ``--json``
#: passed on), alone or before the suite's own workloads.
STANDALONE = {
    "res224": ("benchmarks.bench_res224",
               "ResNet-18 / VGG-16 @224 (CPU): per-layer plan vs the users' batched VJP (filter images, statistics)"),
}

#: The GPU speed goals (reported, never asserted): (workload, precision, ratio, target).
CUDA_GOALS = [("vgg16_32", 10.0), ("resnet18_32", 10.0), ("vgg16_64", 20.0)]
CAPTUM_GOAL = 10_000.0
FLOOR_GOAL = 3.0
CPU_GOAL = 2.0


def _csv(v: Optional[str]) -> Optional[List[str]]:
    if v is None:
        return None
    return [s for s in v.replace(" ", ",").split(",") if s]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized run (CPU: < 5 min on 2 cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when visible, else cpu")
    p.add_argument("--json", metavar="PATH", help="write the results (updated after every row)")
    p.add_argument("--markdown", metavar="PATH", help="write the markdown report")
    p.add_argument("--workloads", help="comma-separated names (see --list)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    p.add_argument("--precision", default=None, help="fp32,tf32 (tf32: CUDA only; default both on CUDA)")
    p.add_argument("--algorithms", default=None,
                   help=f"comma-separated conv_algorithm options ({','.join(CONV_ALGORITHMS)}) of the cuda / cpu "
                        "rows, one row each (default: auto); tf32 + direct is not run; an explicit algorithm that "
                        "auto already ran is recorded as skipped")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (median reported)")
    p.add_argument("--batch", type=int, default=None, help="batch of our backends (default: per workload)")
    p.add_argument("--check-batch", type=int, default=None, help="batch of the correctness checks")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole suite; methods that would start later are skipped")
    p.add_argument("--max-method-seconds", type=float, default=None,
                   help="stop repeating a method's timed runs after this many seconds")
    p.add_argument("--captum-neurons", type=int, default=None, help="neurons sampled by the Captum loop")
    p.add_argument("--vjp-rows", type=int, default=None, help="stacked rows per backward of the VJP baseline")
    p.add_argument("--vjp-chunks", type=int, default=None,
                   help="backward passes timed by the VJP baseline (0: all), extrapolated to all")
    p.add_argument("--dense-chunk", type=int, default=None, help="input tangents per vmap call (dense forward)")
    p.add_argument("--dense-batch", type=int, default=None, help="images per dense forward run")
    p.add_argument("--neurons", choices=list(C.NEURON_SETS), default="conv",
                   help="stats workloads: conv outputs (default; a conv followed by BN has g_n = 1, so all its "
                        "neurons are active) or the ReLU outputs that follow them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--render", metavar="JSON",
                   help="only re-render the markdown of a saved JSON (e.g. of a run killed by a timeout)")
    return p


def _options(a: argparse.Namespace, device: str) -> Options:
    quick = a.quick
    o = Options(device=device, quick=quick, verbose=not a.quiet, seed=a.seed, neurons=a.neurons)
    o.methods = _csv(a.methods) or list(ALL_METHODS)
    bad = [m for m in o.methods if m not in ALL_METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; known: {list(ALL_METHODS)}")
    o.precisions = _csv(a.precision) or (["fp32", "tf32"] if device == "cuda" else ["fp32"])
    bad = [p for p in o.precisions if p not in C.PRECISIONS]
    if bad:
        raise SystemExit(f"unknown precision(s) {bad}; known: {list(C.PRECISIONS)}")
    o.algorithms = list(dict.fromkeys(_csv(a.algorithms) or ["auto"]))
    bad = [g for g in o.algorithms if g not in CONV_ALGORITHMS]
    if bad:
        raise SystemExit(f"unknown conv algorithm(s) {bad}; known: {list(CONV_ALGORITHMS)}")
    o.repeats = a.repeats or (1 if quick else 3)
    o.batch = a.batch
    o.check_batch = a.check_batch or (2 if device == "cuda" else 1)
    o.max_method_seconds = a.max_method_seconds or (5.0 if quick or device == "cuda" else 60.0)
    o.captum_neurons = a.captum_neurons or (5 if quick else (256 if device == "cuda" else 20))
    o.vjp_rows = a.vjp_rows
    o.vjp_chunks = None if a.vjp_chunks == 0 else (a.vjp_chunks or (2 if quick else 4))
    o.dense_chunk = a.dense_chunk
    o.dense_batch = a.dense_batch
    return o


def goals(rows: Sequence[Dict[str, Any]], device: str) -> List[Dict[str, Any]]:
    """The speed goals, evaluated on the measured rows (reported, never asserted).
    Where a method has several rows at one precision (one per conv algorithm): the row of the
    engine's default (``requested_algorithm`` ``auto``, or none recorded), else the fastest; on
    CUDA the fastest row is evaluated too when it is not the default's (tagged with its
    algorithm)."""
    def cands(wl, method, prec):
        return [r for r in rows if r["workload"] == wl and r["method"] == method and r["precision"] == prec
                and not r.get("error") and r.get("s_per_image")]

    def row(wl, method, prec):
        cs = cands(wl, method, prec)
        default = [r for r in cs if r.get("requested_algorithm", "auto") == "auto"]
        if default:
            return default[0]
        return min(cs, key=lambda r: r["s_per_image"]) if cs else None

    def rows_to_rate(wl, prec):  # the default's row, then the fastest if it is another
        r = row(wl, "cuda", prec)
        if r is None:
            return []
        best = min(cands(wl, "cuda", prec), key=lambda c: c["s_per_image"])
        return [r] if best is r else [r, best]

    def tag(r):  # the algorithm of a row that is not the default's
        a = r.get("requested_algorithm", "auto")
        return "" if a == "auto" else f" ({r.get('conv_algorithm') or a})"

    out: List[Dict[str, Any]] = []
    if device == "cuda":
        for wl, target in CUDA_GOALS:
            for prec, r in [(p, r) for p in ("fp32", "tf32") for r in rows_to_rate(wl, p)]:
                out.append({"goal": f"{wl} cuda{tag(r)} {prec} vs dense forward {prec}", "target": f">= {target:g}x",
                            "measured": r.get("speedup_vs_dense"),
                            "met": _ge(r.get("speedup_vs_dense"), target)})
                if prec == "fp32":
                    out.append({"goal": f"{wl} cuda{tag(r)} fp32 vs Captum loop", "target": f">= {CAPTUM_GOAL:,.0f}x",
                                "measured": r.get("speedup_vs_captum"),
                                "met": _ge(r.get("speedup_vs_captum"), CAPTUM_GOAL)})
                out.append({"goal": f"{wl} cuda{tag(r)} {prec} time / floor", "target": f"<= {FLOOR_GOAL:g}x",
                            "measured": r.get("time_over_floor"),
                            "met": None if r.get("time_over_floor") is None else r["time_over_floor"] <= FLOOR_GOAL})
        for r in rows:
            if r["workload"] == "resnet18_224_filters" and r["method"] == "cuda":
                out.append({"goal": "resnet18_224 filter images, all conv layers, no OOM", "target": "completes",
                            "measured": "ok" if not r.get("error") else r["error"][:80],
                            "met": not r.get("error")})
    else:
        for wl in ("vgg16_32", "vgg16_32_head4"):
            r = row(wl, "cpu", "fp32")
            if r is None:
                continue
            others = [row(wl, m, "fp32") for m in ("reference", "dense")]
            best = min((o["s_per_image"] for o in others if o), default=None)
            ratio = best / r["s_per_image"] if best else None
            label = "" if wl == "vgg16_32" else " (quick proxy: first 4 conv layers; the goal is vgg16_32)"
            out.append({"goal": f"{wl} cpu{tag(r)} vs faster of reference / dense forward, batch {r['batch']}{label}",
                        "target": f">= {CPU_GOAL:g}x", "measured": ratio, "met": _ge(ratio, CPU_GOAL)})
    return out


def _ge(v, t) -> Optional[bool]:
    return None if v is None else bool(v >= t)


def render_markdown(doc: Dict[str, Any]) -> str:
    env, peaks = doc["env"], doc.get("peaks") or {}
    gpu = env.get("gpu") or {}
    lines = [f"## nns_cuda benchmarks — {env['date']}", ""]
    lines.append(f"- device: **{env['device']}**" + (f" ({gpu.get('name')}, {gpu.get('memory_gib')} GiB)" if gpu else "")
                 + f"; CPU: {env['cpu']} × {env['cpu_count']} (torch threads {env['torch_threads']}, "
                 f"load {env.get('load_average')})")
    lines.append(f"- torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}), python {env['python']}, "
                 f"captum {env.get('captum')}, nns_cuda {env['nns_cuda']} (extension: "
                 f"{'cpu ' if env['extension'].get('cpu') else ''}{'cuda' if env['extension'].get('cuda') else ''}"
                 f"{'' if env['extension'].get('loaded') else 'not loaded'}), commit `{env['commit']}`")
    pk = []
    for k, lab in (("fp32_flops", "fp32"), ("tf32_flops", "tf32"), ("bf16_flops", "bf16")):
        if peaks.get(k):
            pk.append(f"{lab} {peaks[k] / 1e12:.3g} TFLOP/s")
    if peaks.get("copy_bytes_per_s"):
        pk.append(f"copy {peaks['copy_bytes_per_s'] / 1e9:.4g} GB/s (read + write)")
    lines.append("- measured peaks: " + (", ".join(pk) or "not measured"))
    lines.append(f"- mode: {'quick' if doc['config'].get('quick') else 'full'}; repeats {doc['config'].get('repeats')}; "
                 f"wall {doc.get('wall_s', 0):.0f} s")
    lines.append("")
    for name, w in doc.get("workloads", {}).items():
        n = w.get("neurons_per_image") or w.get("filters_per_image")
        unit = "neurons" if w.get("neurons_per_image") else "filters"
        fl = w.get("floor_per_image", {})
        lines.append(f"- `{name}`: {w['description']}; {n:,} {unit}/image; floor per image "
                     f"{fl.get('flops', 0) / 1e9:,.1f} GFLOP, {fl.get('bytes', 0) / 1e9:,.3g} GB; batch {w['batch']}")
    lines.append("")
    lines.append("s/image, neurons/s (filters/s for filter workloads), useful GFLOP/s and the floor are as in "
                 "benchmarks/NOTES.md (Floors); "
                 "'vs dense' = dense forward's s/image at the same precision / this row's; 'vs captum' = Captum "
                 "loop's (fp32) / this row's; sampled baselines are extrapolated (notes). Engine rows name the "
                 "conv algorithm: 'cuda (gather)' ran the requested gather, 'cuda (auto→gemm)' the engine's "
                 "default, which chose gemm.")
    lines.append("")
    lines.append(C.markdown_table(doc["rows"]))
    if doc.get("goals"):
        lines += ["", "### Goals — measured, not asserted", "", "| goal | target | measured | met |",
                  "|---|---|---|---|"]
        for g in doc["goals"]:
            m = g["measured"]
            ms = C.fmt(m, "x") if isinstance(m, (int, float)) else (m or "–")
            lines.append(f"| {g['goal']} | {g['target']} | {ms} | "
                         f"{'–' if g['met'] is None else ('yes' if g['met'] else 'no')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite (see the module docstring and ``--help``); returns the exit status."""
    with warnings.catch_warnings():
        # torch.func's first vmap and Captum's "did not already require gradients" are noise here
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        return _main(argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(list(argv) if argv is not None else None)
    if a.render:
        import json

        with open(a.render) as f:
            doc = json.load(f)
        doc["goals"] = doc.get("goals") or goals(doc.get("rows", []), doc["env"]["device"])
        md = render_markdown(doc)
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(md)
        print(md)
        return 0
    if a.list:
        for name, w in C.WORKLOADS.items():
            tag = " (quick)" if name in C.QUICK_WORKLOADS else (" (full)" if name in C.FULL_WORKLOADS else "")
            print(f"{name:24s}{tag:9s} {w.description}")
        for name, (module, description) in STANDALONE.items():
            print(f"{name:24s}{' (own)':9s} {description} [python -m {module}]")
        return 0
    names = _csv(a.workloads) or []
    own = [n for n in names if n in STANDALONE]
    if own:
        import importlib

        rc = 0
        for n in own:
            args = ["--quick"] if a.quick else []
            if a.json:
                base, ext = os.path.splitext(a.json)
                args += ["--json", a.json if len(names) == 1 else f"{base}_{n}{ext or '.json'}"]
            rc = max(rc, importlib.import_module(STANDALONE[n][0]).main(args))
        rest = [n for n in names if n not in STANDALONE]
        if not rest:
            return rc
        a.workloads = ",".join(rest)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible", file=sys.stderr)
        return 1
    opts = _options(a, device)
    t_start = time.time()
    if a.time_limit:
        opts.deadline = t_start + a.time_limit
    names = _csv(a.workloads) or list(C.QUICK_WORKLOADS if a.quick else C.FULL_WORKLOADS)
    unknown = [n for n in names if n not in C.WORKLOADS]
    if unknown:
        print(f"unknown workload(s) {unknown}; known: {list(C.WORKLOADS) + list(STANDALONE)}", file=sys.stderr)
        return 1
    doc: Dict[str, Any] = {"schema": SCHEMA, "env": C.env_info(device),
                           "config": {"quick": a.quick, "device": device, "workloads": names, "methods": list(opts.methods),
                                      "precisions": list(opts.precisions), "algorithms": list(opts.algorithms),
                                      "repeats": opts.repeats,
                                      "check_batch": opts.check_batch, "neurons": opts.neurons, "captum_neurons": opts.captum_neurons,
                                      "vjp_rows": opts.vjp_rows, "vjp_chunks": opts.vjp_chunks,
                                      "time_limit_s": a.time_limit, "argv": list(argv) if argv is not None else sys.argv[1:]},
                           "peaks": None, "workloads": {}, "rows": [], "goals": []}

    def save() -> None:
        doc["wall_s"] = time.time() - t_start
        if a.json:
            C.write_json(a.json, doc)

    log(opts, f"nns_cuda benchmarks on {device}: workloads {names}, methods {list(opts.methods)}, "
              f"precisions {list(opts.precisions)}, conv algorithms {list(opts.algorithms)}")
    doc["peaks"] = C.measure_peaks(device, quick=a.quick)
    pk = doc["peaks"]
    log(opts, "peaks: " + ", ".join(f"{k} {v:.4g}" for k, v in pk.items() if isinstance(v, float)))
    save()

    def emit(row: Dict[str, Any]) -> None:
        doc["rows"].append(row)
        save()

    for name in names:
        wl = C.WORKLOADS[name]
        if wl.cuda_only and device != "cuda":
            emit({"workload": name, "task": wl.task, "method": "-", "precision": "-", "device": device, "notes": [],
                  "error": "skipped: CUDA-only workload", "verified": None})
            continue
        if time.time() > opts.deadline:
            emit({"workload": name, "task": wl.task, "method": "-", "precision": "-", "device": device, "notes": [],
                  "error": "skipped: suite time limit reached", "verified": None})
            continue
        try:
            runner = run_filters_workload if wl.task == "filters" else run_stats_workload
            doc["workloads"][name] = runner(wl, opts, pk, emit)
        except Exception as e:  # e.g. the oracle itself failed
            import traceback

            log(opts, f"[{name}] ERROR: " + traceback.format_exc()[-3000:])
            emit({"workload": name, "task": wl.task, "method": "-", "precision": "-", "device": device, "notes": [],
                  "error": f"{type(e).__name__}: {str(e)[:300]}", "verified": None})
        if device == "cuda":
            torch.cuda.empty_cache()
        save()
    doc["goals"] = goals(doc["rows"], device)
    save()
    md = render_markdown(doc)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    print(md)
    failed_check = any(r.get("verified") is False and r.get("precision") == "fp32" for r in doc["rows"])
    errored = any(r.get("error") and not str(r["error"]).startswith("skipped") for r in doc["rows"])
    return 2 if failed_check else (1 if errored else 0)


if __name__ == "__main__":
    sys.exit(main())
