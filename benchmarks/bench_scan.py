"""Scan workloads: every conv neuron's learned image reduced to the fused statistics
(``nns_cuda.ops.reference.stats.STAT_NAMES``) with a box foreground mask, by the engine's
backends (forward strategy) and by the three user baselines of :mod:`benchmarks.bench_baselines`.

Per method and precision: a correctness check on the check batch against the reference
backend's statistics, then the timed runs (warm-up, median of repeats) on the method's batch,
then a batch-consistency check (the first check-batch samples of the timed output must equal
the check output). Run through ``python -m benchmarks.run``.

Conv algorithms (``Options.algorithms``, ``--algorithms``): the engine methods ``cuda`` and
``cpu`` run once per requested ``conv_algorithm`` of :class:`nns_cuda.Scanner` (one row per
method, precision and algorithm; the row records ``requested_algorithm`` and, from the
:class:`nns_cuda.ScanResult`, the ``conv_algorithm`` that ran). ``reference`` and the baselines
are unaffected (one row per precision). Not planned: ``tf32`` with ``direct`` (the engine refuses
it). An explicit algorithm that ``auto`` already ran at the same method and precision is not run
again: its row is kept, marked ``skipped: same as auto``.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import nns_cuda
from nns_cuda.engine.options import CONV_ALGORITHMS

from . import bench_baselines as BL
from .common import (FP32_TOL, TF32_FLAG, FloorCount, Workload, build_model, conv_layer_names, count_floor,
                     make_inputs, precision, stats_errors, stats_rel_err, sync, time_runs)

__all__ = ["Options", "Skip", "run_stats_workload", "measure", "log", "speedups", "plan_methods",
           "algorithm_skip_reason", "CONV_ALGORITHMS"]


class Skip(Exception):
    """A method that cannot run here (missing extension kernels, captum not installed)."""

ENGINE_METHODS = ("cuda", "cpu", "reference")
BASELINE_METHODS = ("dense", "vjp", "captum")
ALL_METHODS = ENGINE_METHODS + BASELINE_METHODS
#: the engine methods that run once per requested conv algorithm
ALGORITHM_METHODS = ("cuda", "cpu")


@dataclass
class Options:
    device: str = "cpu"
    quick: bool = False
    methods: Sequence[str] = ALL_METHODS
    precisions: Sequence[str] = ("fp32", "tf32")
    algorithms: Sequence[str] = ("auto",)  # conv_algorithm of the cuda / cpu rows (one row each)
    repeats: int = 3
    batch: Optional[int] = None          # overrides the workload's batch for our backends
    check_batch: int = 1
    max_method_seconds: float = 20.0     # timed repeats stop after this much
    deadline: float = math.inf           # time.time() after which methods are skipped
    captum_neurons: int = 100
    vjp_rows: Optional[int] = None       # stacked rows per backward (None: from memory)
    vjp_chunks: Optional[int] = 4        # timed chunks (None: all)
    dense_chunk: Optional[int] = None
    dense_batch: Optional[int] = None
    seed: int = 0
    neurons: str = "conv"                # "conv": conv outputs; "act": the ReLUs after them
    verbose: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)


def log(opts: Options, msg: str) -> None:
    if opts.verbose:
        print(msg, file=sys.stderr, flush=True)


def record_failure(opts: Options, row: Dict[str, Any], e: BaseException, dev: str) -> None:
    """Mark a row failed (a failing method must not stop the others) and free cached GPU memory."""
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    log(opts, "    ERROR " + "".join(traceback.format_exception_only(type(e), e)).strip()[:2000])
    if dev == "cuda":
        torch.cuda.empty_cache()


def _free_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    return 4 << 30


def _cmp_full(out: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per-component agreement (:func:`benchmarks.common.stats_errors`), the max over layers."""
    errs = [stats_errors(out[n], ref[n]) for n in ref]
    return {k: max(e[k] for e in errs) for k in errs[0]}


def _cmp_sampled(out: Dict[str, Any], ref: Dict[str, torch.Tensor]) -> float:
    errs = []
    for n, (idx, st) in out.items():
        B = st.shape[0]
        want = ref[n].reshape(ref[n].shape[0], -1, ref[n].shape[-1])[:B, idx.to(ref[n].device)]
        errs.append(stats_rel_err(st, want))
    return max(errs) if errs else math.nan


def measure(*, row: Dict[str, Any], run: Callable[[torch.Tensor, torch.Tensor], Any],
            compare: Callable[[Any], float], x: torch.Tensor, fg: torch.Tensor, batch: int, check_batch: int,
            opts: Options, floor: Callable[[int], FloorCount], peaks: Dict[str, Any], neurons_per_image: int,
            extrapolate: Optional[Callable[[float], float]] = None,
            consistency: Optional[Callable[[Any, Any], float]] = None,
            precomputed: Optional[tuple] = None) -> Dict[str, Any]:
    """Check, then time one method; fills ``row`` with the figures (see NOTES.md).
    ``precomputed = (output, seconds)``: the check-batch run already done (the oracle itself)."""
    dev = opts.device
    prec = row["precision"]
    tol = FP32_TOL if prec == "fp32" else TF32_FLAG
    xc, fc = x[:check_batch], fg[:check_batch]
    with precision(prec):
        if precomputed is not None:
            check_out, row["check_s"] = precomputed
        else:
            t0 = time.perf_counter()
            check_out = run(xc, fc)
            sync(dev)
            row["check_s"] = time.perf_counter() - t0
        err = compare(check_out)
        if isinstance(err, dict):  # components: values, support, flip_frac, rel_err
            row["check_detail"] = err
            err = err["rel_err"]
        row["rel_err"] = err
        row["tol"] = tol
        row["verified"] = bool(err <= tol)
        row["check_batch"] = check_batch
        row["checked_at"] = time.time()
        log(opts, f"    check: rel. err {err:.2e} (tol {tol:.0e}) in {row['check_s']:.2f} s")
        xt, ft = x[:batch], fg[:batch]
        warm = 0 if batch == check_batch else 1
        budget = max(0.0, min(opts.max_method_seconds, opts.deadline - time.time()))
        row["timing_started_at"] = time.time()
        times, out, peak = time_runs(lambda: run(xt, ft), dev, opts.repeats, warmup=warm, max_seconds=budget)
    if consistency is not None and batch > check_batch:
        c = consistency(out, check_out)
        row["batch_consistency_err"] = c
        if not c <= max(tol, 1e-6):
            row["verified"] = False
            row["notes"].append(f"timed batch differs from check batch by {c:.1e}")
    del out, check_out
    t_med = statistics.median(times)
    row["times_s"] = times
    row["warmup_runs"] = warm
    row["repeats"] = len(times)
    row["measured_s"] = t_med
    t = extrapolate(t_med) if extrapolate is not None else t_med
    row["extrapolated"] = extrapolate is not None and t != t_med
    row["total_s"] = t
    row["batch"] = batch
    row["s_per_image"] = t / batch
    row["neurons_per_s"] = neurons_per_image * batch / t
    row["peak_bytes"] = peak
    fl = floor(batch)
    row["useful_flops"] = fl.flops
    row["useful_bytes"] = fl.bytes
    row["gflops"] = fl.flops / t / 1e9
    pf = peaks.get(f"{prec}_flops")
    fs = fl.time(pf, peaks.get("copy_bytes_per_s"))
    row["floor_s"] = fs
    row["floor_fraction"] = (fs / t) if fs else None
    row["time_over_floor"] = (t / fs) if fs else None
    log(opts, f"    time: median {t_med:.4g} s over {len(times)} run(s)"
        + (f", extrapolated {t:.4g} s" if row["extrapolated"] else "")
        + f"; {row['s_per_image']:.4g} s/image; peak {peak / 2**20:.0f} MiB"
        + (f"; {row['time_over_floor']:.3g}x floor" if fs else ""))
    return row


def start_row(wl: Workload, method: str, prec: str, opts: Options, algorithm: Optional[str] = None) -> Dict[str, Any]:
    """A fresh result row (filled by :func:`measure`), announced in the log. ``algorithm``: the
    requested conv algorithm of an engine row (``requested_algorithm``; ``conv_algorithm``, what
    ran, is filled in after the run)."""
    log(opts, f"  {method} {prec}" + (f" conv_algorithm={algorithm}" if algorithm else "") + ":")
    row = {"workload": wl.name, "task": wl.task, "method": method, "precision": prec, "device": opts.device,
           "batch": None, "notes": [], "error": None, "verified": None, "rel_err": None}
    if algorithm is not None:
        row["requested_algorithm"] = algorithm
        row["conv_algorithm"] = None
    return row


def past_deadline(opts: Options, row: Dict[str, Any], rows: List[Dict[str, Any]], emit) -> bool:
    """When the suite's time limit has passed: record ``row`` as skipped (kept and emitted) and
    return True, so that the caller moves on."""
    if time.time() <= opts.deadline:
        return False
    row["error"] = "skipped: suite time limit reached"
    rows.append(row)
    emit(row)
    return True


def speedups(rows: List[Dict[str, Any]]) -> None:
    """Ratio columns of one workload's rows: the dense forward mode's s/image at the same
    precision over the row's, and the Captum loop's (fp32) over the row's. Every row gets its
    own ratios (several rows of one method and precision, e.g. one per conv algorithm, each
    against the same dense / Captum row)."""
    def s(method, prec):
        for r in rows:
            if r["method"] == method and r["precision"] == prec and r.get("s_per_image") and not r.get("error"):
                return r["s_per_image"]
        return None
    captum = s("captum", "fp32")
    for r in rows:
        if r["method"] in ("dense", "captum") or not r.get("s_per_image"):
            continue
        d = s("dense", r["precision"])
        r["speedup_vs_dense"] = d / r["s_per_image"] if d else None
        r["speedup_vs_captum"] = captum / r["s_per_image"] if captum else None


def algorithm_skip_reason(precision: str, algorithm: str) -> Optional[str]:
    """Why an engine row of this precision and requested conv algorithm is not planned (None:
    it is): tf32 runs the convolutions as TF32 GEMMs, the engine refuses ``direct``."""
    if precision == "tf32" and algorithm == "direct":
        return "precision tf32 needs a GEMM conv algorithm (the engine refuses 'direct')"
    return None


def plan_methods(opts: Options, task: str = "stats",
                 not_planned: Optional[List[tuple]] = None) -> List[tuple]:
    """(method, precision, algorithm) triples to run on ``opts.device``, in priority order.

    ``algorithm`` is the requested ``conv_algorithm`` for the ``cuda`` / ``cpu`` rows (one
    triple per entry of ``opts.algorithms``, duplicates dropped) and None for the others.
    Order: the engine rows first (the ``auto`` ones first of all, fp32 before the others, then
    the explicit algorithms in the requested order), then dense, captum, vjp, reference.
    Combinations :func:`algorithm_skip_reason` refuses (tf32 + direct) are left out and, when
    ``not_planned`` is a list, appended to it as (method, precision, algorithm, reason)."""
    algos = list(dict.fromkeys(opts.algorithms or ("auto",)))
    out = []
    for m in opts.methods:
        if m in ("cuda", "cpu") and m != opts.device:
            continue
        for p in opts.precisions:
            if p == "tf32" and (opts.device != "cuda" or m not in ("cuda", "dense")):
                continue
            if m not in ALGORITHM_METHODS:
                out.append((m, p, None))
                continue
            for a in algos:
                why = algorithm_skip_reason(p, a)
                if why:
                    if not_planned is not None:
                        not_planned.append((m, p, a, why))
                    continue
                out.append((m, p, a))
    order = {"cuda": 0, "cpu": 0, "dense": 1, "captum": 2, "vjp": 3, "reference": 4}
    return sorted(out, key=lambda mpa: (order.get(mpa[0], 9), mpa[2] not in (None, "auto"), mpa[1] != "fp32"))


def _vjp_rows(opts: Options, graph, names, batch: int, device: str) -> int:
    if opts.vjp_rows:
        return opts.vjp_rows
    if device != "cuda":
        return 16 if opts.quick else 64
    last = max(graph.resolve(n).idx for n in names)
    per_copy = 4 * 3 * sum(int(math.prod(g.shape)) for g in graph.nodes[: last + 1] if g.kind != "aux")
    return int(max(batch, min(4096, 0.3 * _free_bytes(device) // max(1, per_copy))))


def run_stats_workload(wl: Workload, opts: Options, peaks: Dict[str, Any],
                       emit: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Run every planned method on one stats workload; ``emit`` receives each finished row.
    Returns the workload's description for the JSON."""
    dev = opts.device
    opts.extra.pop("oracle_run", None)
    B = opts.batch or (wl.batch_cuda if dev == "cuda" else wl.batch_cpu)
    Bc = max(1, min(B, opts.check_batch))
    model = build_model(wl, dev, seed=opts.seed)
    x, fg = make_inputs(wl, B, dev, seed=opts.seed + 1)
    names = conv_layer_names(model, x, wl.conv_layers, opts.neurons)
    graph = nns_cuda.build_graph(model, x[:1])
    npi = sum(int(math.prod(graph.resolve(n).shape)) for n in names)
    floors: Dict[int, FloorCount] = {}

    def floor(b: int) -> FloorCount:
        if b not in floors:
            floors[b] = count_floor(model, x[:b], names)
        return floors[b]

    f1 = floor(1)
    info = {"description": wl.description, "model": wl.model, "input": [3, wl.size, wl.size], "task": wl.task,
            "layers": names, "neuron_set": opts.neurons, "neurons_per_image": npi, "batch": B, "check_batch": Bc,
            "floor_per_image": {"flops": f1.flops, "bytes": f1.bytes, "active_neurons": f1.active}}
    log(opts, f"[{wl.name}] {wl.description}: {len(names)} conv layers, {npi:,} neurons/image, "
              f"floor {f1.flops / 1e9:.1f} GFLOP + {f1.bytes / 1e9:.2f} GB per image; batch {B}, check batch {Bc}")

    # the oracle: the reference backend on the check batch (fp32)
    t0 = time.perf_counter()
    ref_scanner = nns_cuda.Scanner(model, names, backend="reference", strategy="forward", stats=True)
    with precision("fp32"):
        res = ref_scanner.scan(x[:Bc], fg[:Bc])
        ref = {n: res[n].stats for n in names}
        sync(dev)
    info["oracle_s"] = time.perf_counter() - t0
    log(opts, f"  oracle (reference backend, batch {Bc}): {info['oracle_s']:.2f} s")
    del res
    opts.extra["oracle_run"] = (ref, info["oracle_s"])

    rows: List[Dict[str, Any]] = []
    not_planned: List[tuple] = []
    plan = plan_methods(opts, not_planned=not_planned)
    for m, p, a, why in not_planned:
        log(opts, f"  {m} {p} conv_algorithm={a}: not planned ({why})")
    for method, prec, algo in plan:
        row = start_row(wl, method, prec, opts, algo)
        if past_deadline(opts, row, rows, emit):
            continue
        try:
            dup = _same_as_auto(rows, method, prec, algo)
            if dup is not None:
                raise Skip(f"same as auto (the auto row ran {algo})")
            _run_method(row, method, prec, wl, model, names, graph, x, fg, B, Bc, ref, opts, floor, peaks, npi,
                        algo)
        except Skip as e:
            row["error"] = f"skipped: {e}"
            log(opts, f"    {row['error']}")
        except Exception as e:  # a failing method must not stop the others
            record_failure(opts, row, e, dev)
        rows.append(row)
        speedups(rows)
        emit(row)
    return info


def _same_as_auto(rows: List[Dict[str, Any]], method: str, prec: str, algo: Optional[str]) -> Optional[Dict[str, Any]]:
    """The finished ``auto`` row of this workload, method and precision that ran ``algo``
    (an explicit request of the same algorithm need not run again), or None."""
    if algo in (None, "auto"):
        return None
    for r in rows:
        if r["method"] == method and r["precision"] == prec and r.get("requested_algorithm") == "auto" \
                and r.get("conv_algorithm") == algo and not r.get("error"):
            return r
    return None


def _run_method(row, method, prec, wl, model, names, graph, x, fg, B, Bc, ref, opts, floor, peaks, npi,
                algo: Optional[str] = None) -> None:
    dev = opts.device
    common = dict(x=x, fg=fg, check_batch=Bc, opts=opts, floor=floor, peaks=peaks, neurons_per_image=npi)
    if method in ENGINE_METHODS:
        if method != "reference" and not nns_cuda.ext_info().get(method):
            raise Skip(f"the extension has no {method} kernels ({nns_cuda.ext_info().get('error')})")
        kw = {} if algo is None else {"conv_algorithm": algo}
        sc = nns_cuda.Scanner(model, names, backend=method, strategy="forward", stats=True, **kw)
        info = {}

        def run(xx, ff):
            r = sc.scan(xx, ff)
            info["backend"], info["strategy"] = r.backend, r.strategy
            info["conv_algorithm"] = getattr(r, "conv_algorithm", None)
            info["conv_algorithms"] = dict(getattr(r, "conv_algorithms", None) or {})
            return {n: r[n].stats for n in names}

        batch = Bc if method == "reference" else B
        pre = None
        if method == "reference":
            row["notes"].append("timed at the check batch")
            if prec == "fp32" and "oracle_run" in opts.extra:  # the oracle run is its check + warm-up
                pre = opts.extra["oracle_run"]
                row["notes"].append("is the oracle (checked by the autograd rows)")
        measure(row=row, run=run, compare=lambda o: _cmp_full(o, ref), batch=batch, precomputed=pre,
                consistency=lambda o, c: max(stats_rel_err(o[n][: c[n].shape[0]], c[n]) for n in names), **common)
        row["backend"], row["strategy"] = info.get("backend"), info.get("strategy")
        if algo is not None:
            row["conv_algorithm"] = info.get("conv_algorithm")
            ops = info.get("conv_algorithms") or {}
            if ops:  # the op each convolution ran (gather falls back to direct where it does not pay)
                row["conv_algorithms"] = ops
                counts = {k: list(ops.values()).count(k) for k in dict.fromkeys(ops.values())}
                if set(counts) != {row["conv_algorithm"]}:
                    row["notes"].append("convs: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    elif method == "dense":
        batch = opts.dense_batch or Bc
        budget = int(0.35 * _free_bytes(dev)) if dev == "cuda" else (512 << 20 if opts.quick else 1 << 30)
        m = BL.DenseForward(model, names, x[:batch], chunk=opts.dense_chunk, budget_bytes=budget)
        row["notes"] += m.notes
        measure(row=row, run=m.run, compare=lambda o: _cmp_full(o, ref), batch=batch,
                consistency=lambda o, c: max(stats_rel_err(o[n][: c[n].shape[0]], c[n]) for n in names), **common)
    elif method == "vjp":
        batch = Bc if dev != "cuda" else B
        rows_ = _vjp_rows(opts, graph, names, batch, dev)
        m = BL.ReverseVJP(model, names, x[:batch], rows=rows_, chunks=opts.vjp_chunks, mode="neurons")
        row["notes"] += m.notes
        row["sample"] = {"chunks_timed": len(m.chunk_ids), "chunks": m.n_chunks, "rows": m.k * batch}
        measure(row=row, run=m.run, compare=lambda o: _cmp_sampled(o, ref), batch=batch,
                extrapolate=m.extrapolate, **common)
    elif method == "captum":
        why = BL.captum_available()
        if why:
            raise Skip(why)
        batch = Bc if dev != "cuda" else B
        m = BL.CaptumLoop(model, names, x[:batch], n_sample=opts.captum_neurons, seed=opts.seed)
        row["notes"] += m.notes
        row["sample"] = {"neurons": int(m.sample.numel()), "of": m.units.total}
        measure(row=row, run=m.run, compare=lambda o: _cmp_sampled(o, ref), batch=batch,
                extrapolate=m.extrapolate, **common)
    else:
        raise ValueError(f"unknown method {method!r}; known: {ALL_METHODS}")
