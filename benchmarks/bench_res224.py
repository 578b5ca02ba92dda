"""ResNet-18 and VGG-16 at 224 × 224 on the CPU: the per-layer plan of :class:`nns_cuda.Scanner`
against the batched VJP users write themselves.

    python -m benchmarks.bench_res224 [--quick] [--json PATH] [--workloads resnet18_filters,...]
                                      [--vjp-chunks N] [--stats-layers 5] [--max-memory 3G] [--repeats N]

Workloads (one image ``torch.rand(1, 3, S, S)``, torchvision models with random weights, seed 0,
float32, torch's default threads):

* ``resnet18_filters``: the filter images ``L^k`` (docs/spec.md §1) of every channel of the 9
  ReLU-output layers of ResNet-18 (``relu``, ``layer{1..4}.{0,1}.relu:1``): 1,984 filters;
* ``vgg16_filters``: the same for the 13 ReLU layers of VGG-16 (``features.{1,3,6,...,29}``):
  4,224 filters;
* ``resnet18_stats``: every neuron's statistics (docs/spec.md §2) of ResNet-18's first
  ``--stats-layers`` ReLU-output layers, in one scan.

Methods:

* ``user_vjp`` — as users write it: forward hooks keep the layers' outputs ``a`` of one forward
  pass; per layer, chunks of 64 filters, cotangent = ``a`` restricted to the filter (zero
  elsewhere), ``torch.autograd.grad(a, x, cot, retain_graph=True, is_grads_batched=True)``,
  image = ``x * grad``. For statistics: 64 neurons per call, one-hot cotangents, the statistics
  of ``g_n · x * grad`` (``g_n`` the gate of a directly following ReLU, 1 here). With
  ``--vjp-chunks N`` (the default for VGG-16 and the statistics) only ``N`` evenly spaced chunks
  per layer run; their time is extrapolated to every chunk (the one forward pass counted once).
* ``scanner`` — ``Scanner(layers, stats=..., filter_images=..., strategy="auto").scan(x)``; its
  plan (:meth:`nns_cuda.Scanner.plan`) is recorded in the row.

Each method runs in a fresh interpreter (``--worker``): after building the model and one
untimed warm-up at 32 × 32 (kernel loading), the call is timed once (``time.perf_counter``) and
its peak memory is the growth of the resident set: the process's high-water mark after the call
(``VmHWM``, reset just before it; ``ru_maxrss`` where it cannot be reset — Linux carries the
forking parent's peak into ``ru_maxrss`` across exec) minus the RSS just before it. Correctness: the baseline's worker writes what it computed (every filter image,
or the sampled filters / neurons' statistics) to a scratch folder; the scanner's worker compares
its own output with it before reporting — ``torch.allclose(ours, theirs, rtol=0, atol=1e-4 ·
max|theirs|)`` per layer for filter images, :func:`benchmarks.common.stats_errors` ≤ 1e-4 for
statistics — and a row that fails is marked ``verified: false`` (its time is then not used for
the ratio). ``uptime`` is recorded before and after the run (the machine is shared). With
``--repeats N`` the two methods run N times each, alternating; a row's time is the median of its
runs (all recorded, with each run's ratio) and its peak the largest.

``--quick`` runs the same code on ResNet-18 at 32 × 32 (every workload but VGG-16; three filter
layers, two statistics layers, one baseline chunk per layer) in seconds (``tests/test_benchmarks.py``). Nothing here asserts a speed: figures are measured and reported.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see common.py)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "nns_cuda.bench_res224/1"
FILTERS_PER_CALL = 64
TOL = 1e-4
WORKLOADS = ("resnet18_filters", "vgg16_filters", "resnet18_stats")
#: the reported goal: the scanner at least this many times faster than the users' batched VJP
GOAL = 2.0


def resnet18_relu_layers() -> List[str]:
    """The 9 ReLU-output layers of torchvision's ResNet-18: the stem ReLU and each block's output."""
    return ["relu"] + [f"layer{i}.{j}.relu:1" for i in range(1, 5) for j in range(2)]


def vgg16_relu_layers() -> List[str]:
    """The 13 ReLU layers of torchvision's VGG-16 (``features.k``)."""
    return [f"features.{k}" for k in (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)]


def workload_spec(name: str, quick: bool, stats_layers: int, vjp_chunks: Optional[int]) -> Dict[str, Any]:
    """Model, input size, layers, task and baseline sampling of one workload."""
    size = 32 if quick else 224
    if name == "resnet18_filters":
        spec = dict(model="resnet18", layers=resnet18_relu_layers(), task="filters", chunks=0)
    elif name == "vgg16_filters":
        spec = dict(model="vgg16", layers=vgg16_relu_layers(), task="filters", chunks=2)
    elif name == "resnet18_stats":
        spec = dict(model="resnet18", layers=resnet18_relu_layers()[:stats_layers], task="stats", chunks=2)
    else:
        raise SystemExit(f"unknown workload {name!r}; known: {list(WORKLOADS)}")
    if vjp_chunks is not None:
        spec["chunks"] = vjp_chunks
    if quick:  # the same code on a few layers at 32 x 32, one baseline chunk per layer
        spec["layers"] = spec["layers"][:2] + spec["layers"][-1:] if spec["task"] == "filters" else spec["layers"][:2]
        spec["chunks"] = 1
    return dict(spec, name=name, size=size)


# ----------------------------------------------------------------------------- the worker
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(key + ":")[1].split()[0]) * 1024


class PeakRSS:
    """Growth of the resident set over a block: its high-water mark after the block minus its
    size before. The mark is reset first (``/proc/self/clear_refs``): ``ru_maxrss`` alone would
    start from the peak of the parent that forked this interpreter (Linux keeps it across
    exec); where the reset is not allowed, ``ru_maxrss`` is used and ``exact`` is False."""

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.before = _status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        peak = _status("VmHWM") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.growth = max(0, peak - self.before)


def _model(name: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)().eval()


def _input(size: int):
    import torch

    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def _capture(model, layers: Sequence[str]):
    """Forward hooks that keep the outputs of ``layers`` (``name:k``: the k-th call), as users write them."""
    outs: Dict[str, Any] = {}
    counts: Dict[str, int] = {}
    hooks = []
    mods = dict(model.named_modules())
    for layer in layers:
        base, _, call = layer.partition(":")
        want = int(call) if call else 0

        def hook(m, i, o, layer=layer, base=base, want=want):
            k = counts.get(base + "#" + layer, 0)
            counts[base + "#" + layer] = k + 1
            if k == want:
                outs[layer] = o
        hooks.append(mods[base].register_forward_hook(hook))
    return outs, counts, hooks


def _chunk_ids(n_chunks: int, sample: int) -> List[int]:
    if not sample or sample >= n_chunks:
        return list(range(n_chunks))
    if sample == 1:
        return [n_chunks // 2]
    return sorted({round(i * (n_chunks - 1) / (sample - 1)) for i in range(sample)})


def user_vjp(model, x, layers: Sequence[str], task: str, sample: int) -> Dict[str, Any]:
    """The users' batched VJP (see the module notes). Returns the timings and what it computed:
    ``{layer: (index, tensor)}`` with filter images ``[n, 3, S, S]`` or statistics ``[n, 11]``."""
    import torch

    from nns_cuda.ops.reference.stats import li_stats_dense

    t0 = time.perf_counter()
    outs, counts, hooks = _capture(model, layers)
    xx = x.clone().requires_grad_(True)
    try:
        model(xx)
    finally:
        for h in hooks:
            h.remove()
    t_fwd = time.perf_counter() - t0
    got: Dict[str, Any] = {}
    t_chunks, n_run, n_all = 0.0, 0, 0
    for layer in layers:
        a = outs[layer]
        units = a.shape[1] if task == "filters" else a[0].numel()
        n_chunks = math.ceil(units / FILTERS_PER_CALL)
        n_all += n_chunks
        idx_all, res_all = [], []
        for c in _chunk_ids(n_chunks, sample):
            t1 = time.perf_counter()
            idx = torch.arange(c * FILTERS_PER_CALL, min(units, (c + 1) * FILTERS_PER_CALL))
            k = idx.numel()
            cot = torch.zeros(k, *a.shape)
            if task == "filters":
                cot[torch.arange(k), :, idx] = a.detach()[:, idx].transpose(0, 1)
            else:
                cot.view(k, 1, -1)[torch.arange(k), 0, idx] = 1
            (g,) = torch.autograd.grad(a, xx, cot, retain_graph=True, is_grads_batched=True)
            img = g[:, 0] * x[0]                                           # [k, 3, S, S]
            res = img if task == "filters" else li_stats_dense(img.unsqueeze(0), x, None)[0]
            t_chunks += time.perf_counter() - t1
            n_run += 1
            idx_all.append(idx)
            res_all.append(res.detach())
        got[layer] = (torch.cat(idx_all), torch.cat(res_all))
    measured = t_fwd + t_chunks
    total = t_fwd + (t_chunks * n_all / n_run if n_run else 0.0)
    return {"measured_s": measured, "total_s": total, "forward_s": t_fwd, "chunks_run": n_run, "chunks_all": n_all,
            "extrapolated": n_run < n_all, "got": got}


def _compare(task: str, layers: Sequence[str], res, ref_dir: str) -> Dict[str, Any]:
    """Our output against what the baseline computed (saved in ``ref_dir``)."""
    import torch

    from .common import stats_errors

    per_layer, ok = {}, True
    for i, layer in enumerate(layers):
        idx, want = torch.load(os.path.join(ref_dir, f"{i}.pt"))
        if task == "filters":
            ours = res[layer].filter_images[0, idx]
            tol = TOL * float(want.abs().max())
            close = bool(torch.allclose(ours, want, rtol=0.0, atol=tol))
            err = float((ours - want).abs().max()) / max(float(want.abs().max()), 1e-30)
        else:
            ours = res[layer].stats[0].reshape(-1, want.shape[-1])[idx]
            err = stats_errors(ours, want)["rel_err"]
            close = err <= TOL
        per_layer[layer] = {"rel_err": err, "allclose": close, "checked": int(idx.numel())}
        ok = ok and close
    return {"verified": ok, "rel_err": max(v["rel_err"] for v in per_layer.values()), "layers": per_layer}


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    import nns_cuda as nns

    model = _model(spec["model"])
    x = _input(spec["size"])
    layers, task = spec["layers"], spec["task"]
    out: Dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if spec["method"] == "user_vjp":
        user_vjp(model, _input(32), layers[:1], task, 1)                       # warm-up (kernels)
        with PeakRSS() as pm:
            r = user_vjp(model, x, layers, task, spec["chunks"])
        out["peak_growth_bytes"], out["peak_exact"] = pm.growth, pm.exact
        got = r.pop("got")
        for i, layer in enumerate(layers):
            torch.save(got[layer], os.path.join(spec["ref_dir"], f"{i}.pt"))
        out.update(r)
        out["units_checked"] = sum(int(v[0].numel()) for v in got.values())
        return out
    kw = dict(stats=task == "stats", filter_images=task == "filters", strategy="auto",
              max_memory=spec.get("max_memory"))
    nns.Scanner(model, layers, **kw).scan(_input(32))                          # warm-up (kernels)
    sc = nns.Scanner(model, layers, **kw)
    with PeakRSS() as pm:
        t0 = time.perf_counter()
        res = sc.scan(x)
        out["total_s"] = out["measured_s"] = time.perf_counter() - t0
    out["peak_growth_bytes"], out["peak_exact"] = pm.growth, pm.exact
    out["extrapolated"] = False
    out["plan"] = res.plan.to_dict()
    out["plan_text"] = str(res.plan)
    out["strategy"] = res.strategy
    out["check"] = _compare(task, layers, res, spec["ref_dir"])
    return out


# ----------------------------------------------------------------------------- the driver
def _uptime() -> Dict[str, Any]:
    try:
        text = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        text = None
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "uptime": text,
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def _run_worker(spec: Dict[str, Any], timeout: Optional[float]) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "benchmarks.bench_res224", "--worker", json.dumps(spec)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if p.returncode != 0:
        return {"error": f"worker exited {p.returncode}: {p.stderr.strip()[-1500:]}", "wall_s": time.time() - t0}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1])
    res["wall_s"] = time.time() - t0
    return res


def _units(spec: Dict[str, Any]) -> int:
    import nns_cuda as nns

    g = nns.build_graph(_model(spec["model"]), _input(spec["size"]))
    shapes = [g.resolve(n).shape for n in spec["layers"]]
    return sum(s[0] if spec["task"] == "filters" else math.prod(s) for s in shapes)


def _combine(rs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from a method's runs: the first run's record with the median time (and every run's
    time) and the largest peak (and every run's peak)."""
    if any("error" in r for r in rs):
        return next(r for r in rs if "error" in r)
    row = dict(rs[0])
    if len(rs) > 1:
        row["runs_s"] = [r["total_s"] for r in rs]
        row["total_s"] = statistics.median(row["runs_s"])
        row["peak_runs_bytes"] = [r["peak_growth_bytes"] for r in rs]
        row["peak_growth_bytes"] = max(row["peak_runs_bytes"])
    return row


def run(names: Sequence[str], quick: bool, stats_layers: int, vjp_chunks: Optional[int], max_memory: Optional[str],
        timeout: Optional[float], log=print, repeats: int = 1) -> Dict[str, Any]:
    from .common import env_info

    doc: Dict[str, Any] = {"schema": SCHEMA, "env": env_info("cpu"), "uptime_before": _uptime(),
                           "config": {"quick": quick, "workloads": list(names), "stats_layers": stats_layers,
                                      "vjp_chunks": vjp_chunks, "max_memory": max_memory, "repeats": repeats,
                                      "filters_per_call": FILTERS_PER_CALL, "tol": TOL},
                           "workloads": {}, "rows": []}
    t_start = time.time()
    for name in names:
        spec = workload_spec(name, quick, stats_layers, vjp_chunks)
        units = _units(spec)
        unit = "filters" if spec["task"] == "filters" else "neurons"
        doc["workloads"][name] = {"model": spec["model"], "size": spec["size"], "layers": spec["layers"],
                                  "task": spec["task"], unit: units, "vjp_chunks_per_layer": spec["chunks"] or "all"}
        log(f"[{name}] {spec['model']} @{spec['size']}: {len(spec['layers'])} layers, {units:,} {unit}")
        with tempfile.TemporaryDirectory(prefix="nns-res224-") as ref:
            runs: Dict[str, List[Dict[str, Any]]] = {"user_vjp": [], "scanner": []}
            for k in range(repeats):   # the methods alternate: the machine's drift reaches both
                for method in ("user_vjp", "scanner"):
                    w = dict(spec, method=method, ref_dir=ref, max_memory=max_memory)
                    r = _run_worker(w, timeout)
                    runs[method].append(r)
                    if "error" in r:
                        log(f"  {method}: ERROR {r['error'][:400]}")
                        break
                    log(f"  {method}{f' (run {k + 1}/{repeats})' if repeats > 1 else ''}: {r['total_s']:.2f} s"
                        f"{' (extrapolated)' if r.get('extrapolated') else ''}, "
                        f"{units / r['total_s']:,.1f} {unit}/s, peak +{r['peak_growth_bytes'] / 2**20:,.0f} MiB"
                        + (f", check {'ok' if r['check']['verified'] else 'FAILED'} (rel. err "
                           f"{r['check']['rel_err']:.1e})" if method == "scanner" else ""))
                    if method == "scanner" and k == 0:
                        log("    " + r["plan_text"].replace("\n", "\n    "))
                if any("error" in r for rs in runs.values() for r in rs):
                    break
            rows = {}
            for method, rs in runs.items():
                if not rs:
                    continue
                row = {"workload": name, "method": method, "units": units, "unit": unit, **_combine(rs)}
                if "error" not in row:
                    row["units_per_s"] = units / row["total_s"]
                    if method == "scanner":
                        row["verified"] = all(r["check"]["verified"] for r in rs)
                        row["rel_err"] = max(r["check"]["rel_err"] for r in rs)
                    else:
                        row["verified"] = True  # the reference itself
                rows[method] = row
                doc["rows"].append(row)
            b, s = rows.get("user_vjp", {}), rows.get("scanner", {})
            if s.get("verified") and "total_s" in b and "total_s" in s:
                s["speedup_vs_user_vjp"] = b["total_s"] / s["total_s"]
                if repeats > 1:
                    s["speedup_per_run"] = [x / y for x, y in zip(b["runs_s"], s["runs_s"])]
                log(f"  scanner / user_vjp: {s['speedup_vs_user_vjp']:.2f}x"
                    + (f" (medians of {repeats} runs; per run "
                       f"{', '.join(f'{v:.2f}' for v in s['speedup_per_run'])})" if repeats > 1 else ""))
    doc["uptime_after"] = _uptime()
    doc["wall_s"] = time.time() - t_start
    doc["goals"] = [{"goal": f"{r['workload']}: scanner vs users' batched VJP", "target": f">= {GOAL:g}x",
                     "measured": r.get("speedup_vs_user_vjp"),
                     "met": None if r.get("speedup_vs_user_vjp") is None else r["speedup_vs_user_vjp"] >= GOAL}
                    for r in doc["rows"] if r["method"] == "scanner"]
    return doc


def markdown(doc: Dict[str, Any]) -> str:
    """The rows as a table."""
    lines = ["| workload | method | units | s | units/s | peak RSS growth | verified | vs user VJP |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['method']} | – | – | – | – | ERROR | – |")
            continue
        ext = " (extrapolated)" if r.get("extrapolated") else ""
        sp = r.get("speedup_vs_user_vjp")
        lines.append(f"| {r['workload']} | {r['method']} | {r['units']:,} {r['unit']} | {r['total_s']:,.1f}{ext} | "
                     f"{r['units_per_s']:,.1f} | {r['peak_growth_bytes'] / 2**20:,.0f} MiB | "
                     f"{'yes' if r.get('verified') else 'NO'} | {'–' if sp is None else f'{sp:.2f}x'} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_res224", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="ResNet-18 at 32 x 32, no VGG-16: seconds")
    p.add_argument("--json", metavar="PATH", help="write the results")
    p.add_argument("--workloads", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--stats-layers", type=int, default=5, help="ReLU-output layers of the statistics workload")
    p.add_argument("--vjp-chunks", type=int, default=None,
                   help="chunks of 64 per layer the baseline runs (0: all; default: all for ResNet-18 filters, "
                        "2 for VGG-16 and the statistics), extrapolated to all")
    p.add_argument("--max-memory", default=None, help="the scanner's max_memory (default: its own default)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per worker")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of each method, alternating (times: medians; peaks: the largest)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(list(argv) if argv is not None else None)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    names = [n for n in (a.workloads or "").split(",") if n] or \
        [w for w in WORKLOADS if not (a.quick and w == "vgg16_filters")]
    for n in names:
        if n not in WORKLOADS:
            print(f"unknown workload {n!r}; known: {list(WORKLOADS)}", file=sys.stderr)
            return 1
    if a.repeats < 1:
        print(f"--repeats must be at least 1, got {a.repeats}", file=sys.stderr)
        return 1
    doc = run(names, a.quick, a.stats_layers, a.vjp_chunks, a.max_memory, a.timeout,
              log=lambda m: print(m, file=sys.stderr, flush=True), repeats=a.repeats)
    if a.json:
        from .common import write_json

        write_json(a.json, doc)
    print(markdown(doc))
    bad = [r for r in doc["rows"] if "error" in r or r.get("verified") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
