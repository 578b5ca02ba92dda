"""Batched GMM model selection (nns_cuda.gmm.select_k) vs a scikit-learn loop over filters.

The goal's configuration: one 512-filter layer, 1,000 samples, K_max = 10 (mixtures with
k = 2 … 10 for every filter, CH index, best k). Goal: the batched torch EM at least 20× faster
than looping ``sklearn.mixture.GaussianMixture`` over the filters on the 2-core CPU machine.

    python -m benchmarks.bench_gmm [--quick] [--json out.json] [--device cuda]

The scikit-learn loop is timed on a random subset of ``--sk-filters`` filters and extrapolated
linearly to all filters (each filter is an independent loop body; the subset size is printed).
scikit-learn runs with one BLAS thread (threadpoolctl), its fastest setting for these tiny
arrays. Correctness is checked before timing: on the subset, the batched result is compared to
scikit-learn's (chosen k, labels, per-fit mean log-likelihood).

The machine may be shared: the load average before and after is printed, with wall and CPU
(process) times, for torch's default thread count and for one thread. ``OMP_WAIT_POLICY``
defaults to ``PASSIVE`` here (set before torch is imported): with the default active
spin-waiting, torch's two OpenMP threads on a busy 2-core machine make small operations up
to ~50× slower.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared 2-core machine, spin-waiting worker threads make small
# batched operations many times slower when another process holds a core (measured here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import platform
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Dict, List  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .common import write_json  # noqa: E402


def make_points(f_n: int, s: int, seed: int = 0) -> torch.Tensor:
    """``[F, S, 2]`` PCA-like points: per filter 2–6 Gaussian clusters of random shape, size
    and separation, plus a few far outliers in one filter out of eight."""
    rng = np.random.default_rng(seed)
    out = np.empty((f_n, s, 2))
    for f in range(f_n):
        k = int(rng.integers(2, 7))
        w = rng.dirichlet(np.full(k, 2.0))
        lab = rng.choice(k, size=s, p=w)
        centres = rng.normal(0, rng.uniform(3, 10), (k, 2))
        shape = rng.normal(0, 0.6, (k, 2, 2)) + np.eye(2)
        x = centres[lab] + np.einsum("sij,sj->si", shape[lab], rng.normal(0, 1, (s, 2)))
        if f % 8 == 0:
            x[rng.choice(s, 5, replace=False)] += rng.normal(0, 60, 2)
        out[f] = x * rng.uniform(0.01, 10)
    return torch.tensor(out)


def load_average() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def time_torch(points: torch.Tensor, k_max: int, repeat: int, device: str, strategy: str) -> Dict[str, float]:
    from nns_cuda.analysis import gmm

    pts = points.to(device)
    gmm.select_k(pts[:8], k_max=k_max, strategy=strategy, warn=False)  # warm-up
    walls, cpus = [], []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        c0, t0 = time.process_time(), time.perf_counter()
        res = gmm.select_k(pts, k_max=k_max, strategy=strategy, warn=False)
        if device.startswith("cuda"):
            end.record()
            torch.cuda.synchronize()
            walls.append(start.elapsed_time(end) / 1e3)
        else:
            walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "walls": walls, "mean_iter": float(res.n_iter_per_k.double().mean()),
            "result": res}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run (128 filters, 8 scikit-learn filters)")
    p.add_argument("--filters", type=int, default=None, help="filters in the layer (default 512)")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--k-max", type=int, default=10)
    p.add_argument("--sk-filters", type=int, default=None, help="filters timed with scikit-learn (default 32)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--strategy", default="auto", choices=["auto", "per_k", "stacked"])
    p.add_argument("--estep", default="auto,torch",
                   help="E-step implementations to time on the CPU, comma-separated: auto (the fused C++ "
                        "kernel when built), fused, torch (batched torch ops); default 'auto,torch'")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    f_n = a.filters or (128 if a.quick else 512)
    sk_n = min(f_n, a.sk_filters or (8 if a.quick else 32))
    repeat = 1 if a.quick else a.repeat

    try:
        from sklearn import __version__ as skv
    except ImportError:  # e.g. a GPU machine without scikit-learn: compare with torch on the CPU
        skv = None

    from nns_cuda.analysis import gmm

    load0 = load_average()
    points = make_points(f_n, a.samples, seed=0)
    rng = np.random.default_rng(1)
    subset = np.sort(rng.choice(f_n, sk_n, replace=False))

    # ---- correctness first: batched vs scikit-learn on the subset
    t0 = time.perf_counter()
    c0 = time.process_time()
    ref = gmm.select_k(points[subset], k_max=a.k_max, backend="sklearn" if skv else "torch", warn=False)
    sk_wall = time.perf_counter() - t0
    sk_cpu = time.process_time() - c0
    if skv is None:
        print("# scikit-learn is not installed: correctness vs the torch CPU backend, no speed-up")
    got = gmm.select_k(points[subset].to(a.device), k_max=a.k_max, strategy=a.strategy, warn=False)
    same_k = float((got.k == ref.k).double().mean())
    same_labels = float((got.labels == ref.labels).all(1).double().mean())
    rel_ll = float(((got.loglik_per_k - ref.loglik_per_k) / ref.loglik_per_k).abs().max())
    if same_k < 0.95 or rel_ll > 1e-3:
        print(f"CORRECTNESS FAILED: same k {same_k:.3f}, max rel loglik diff {rel_ll:.2e}")
        return 1

    # ---- timing
    from nns_cuda.analysis import _gmm_em

    rows = []
    threads0 = torch.get_num_threads()
    thread_cfgs = [threads0] if a.device != "cpu" or threads0 == 1 else [threads0, 1]
    esteps = [e.strip() for e in a.estep.split(",") if e.strip()] if a.device == "cpu" else ["torch"]
    estep0 = _gmm_em.ESTEP
    seen = set()
    for est in esteps:
        _gmm_em.ESTEP = est
        impl = "fused" if _gmm_em.use_fused(points) else "torch"
        if impl in seen:  # "auto" without the extension is the torch E-step again
            continue
        seen.add(impl)
        for th in thread_cfgs:
            torch.set_num_threads(th)
            r = time_torch(points, a.k_max, repeat, a.device, a.strategy)
            rows.append({"impl": f"batched, {impl} E-step ({a.device}, {th} thread{'s' * (th > 1)})",
                         "estep": impl, "threads": th,
                         "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "walls": r["walls"],
                         "mean_em_iterations": r["mean_iter"]})
        torch.set_num_threads(threads0)
    _gmm_em.ESTEP = estep0
    sk_full_wall = sk_wall / sk_n * f_n if skv else float("nan")
    sk_full_cpu = sk_cpu / sk_n * f_n if skv else float("nan")
    load1 = load_average()

    env = {"python": platform.python_version(), "torch": torch.__version__, "sklearn": skv,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "load_average_before": load0, "load_average_after": load1}
    print(f"# bench_gmm: {f_n} filters x {a.samples} samples, k = 2..{a.k_max}; {env}")
    print(f"# correctness on {sk_n} filters: same k {same_k:.1%}, identical labels {same_labels:.1%}, "
          f"max rel. mean-log-likelihood diff {rel_ll:.1e}")
    print(f"# scikit-learn loop timed on {sk_n} random filters ({sk_wall:.2f} s wall, {sk_cpu:.2f} s CPU), "
          f"extrapolated x{f_n / sk_n:.1f}")
    print(f"{'implementation':48s} {'wall s':>9s} {'CPU s':>9s} {'speed-up (wall)':>16s}")
    print(f"{'sklearn GaussianMixture loop (extrapolated)':48s} {sk_full_wall:9.2f} {sk_full_cpu:9.2f} {1.0:16.1f}")
    for r in rows:
        r["speedup_wall"] = sk_full_wall / r["wall_s"]
        r["speedup_cpu"] = sk_full_cpu / r["cpu_s"]
        print(f"{r['impl']:48s} {r['wall_s']:9.2f} {r['cpu_s']:9.2f} {r['speedup_wall']:16.1f}")
    result = {
        "config": {"filters": f_n, "samples": a.samples, "k_max": a.k_max, "sk_filters": sk_n,
                   "repeat": repeat, "strategy": a.strategy, "quick": a.quick},
        "env": env,
        "correctness": {"same_k": same_k, "identical_labels": same_labels, "max_rel_loglik_diff": rel_ll},
        "sklearn": {"subset_wall_s": sk_wall, "subset_cpu_s": sk_cpu,
                    "extrapolated_wall_s": sk_full_wall, "extrapolated_cpu_s": sk_full_cpu},
        "torch": rows,
    }
    if a.json:
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
