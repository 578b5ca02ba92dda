"""Data-set scans: samples per second on 1 and 2 ranks, bookkeeping cost, memory flat in samples.

Rows (each in fresh processes, one thread per rank, gloo):

* ``scanner``: :meth:`Scanner.scan` over the same batches in one process (the work alone);
* ``dataset_r<k>``: :class:`nns_cuda.DatasetScan` under ``k`` ranks on a fresh folder
  (process-group start-up, block files, manifest and the merge included; interpreter start-up
  excluded: timed from just before ``run`` to its return on rank 0);
* ``memory_<n>``: one rank on ``n`` samples: peak RSS (``ru_maxrss``) per rank.

The scan is of every ReLU layer of ``--model`` (random weights, seed 0) with the fused
statistics, over the embedded cluttered-digits training split (repeated when more samples are
asked for than it has). Correctness first: the 1-rank result's per-neuron activation sums are
compared with the ``scanner`` row's before any figure is written.

    python -m benchmarks.bench_dataset --model vgg16_cifar --samples 512 --json benchmarks/results/dataset_cpu.json
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see common.py)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, List  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, ds, n):
        self.ds, self.n = ds, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i % len(self.ds)]


def _setup(model_name: str, samples: int):
    from nns_cuda import data, models
    from nns_cuda.engine.graph import build_graph

    torch.manual_seed(0)
    model = models.build(model_name, num_classes=10).eval()
    ds = _Repeat(data.cluttered_digits("train"), samples)
    g = build_graph(model, ds[0][0].unsqueeze(0), None)
    layers = [n.name for n in g.nodes if n.kind == "relu"] if hasattr(g, "nodes") else []
    if not layers:
        layers = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
    return model, ds, layers


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(a) -> Dict[str, Any]:
    torch.set_num_threads(1)
    model, ds, layers = _setup(a.model, a.samples)
    if a.mode == "scanner":
        from nns_cuda.engine.scanner import Scanner

        sc = Scanner(model, layers, stats=True)
        sums = {L: torch.zeros((), dtype=torch.float64) for L in layers}
        t = time.perf_counter()
        for s in range(0, a.samples, a.batch_size):
            items = [ds[i] for i in range(s, min(a.samples, s + a.batch_size))]
            x = torch.stack([it[0] for it in items])
            fg = torch.stack([it[2] for it in items])
            r = sc.scan(x, fg)
            for L in layers:
                sums[L] += r[L].activations.double().sum()
        dt = time.perf_counter() - t
        return {"seconds": dt, "act_sums": {L: float(v) for L, v in sums.items()}, "peak_rss_mib": _peak_mib()}
    from nns_cuda.engine.dataset_scan import DatasetScan

    scan = DatasetScan(model, layers, block_size=a.block_size, batch_size=a.batch_size, progress=False)
    t = time.perf_counter()
    res = scan.run(ds, a.out)
    dt = time.perf_counter() - t
    out = {"seconds": dt, "peak_rss_mib": _peak_mib(), "rank": int(os.environ.get("RANK", 0))}
    if res is not None:
        out["act_sums"] = {L: float(res.get(L, "act_sum").sum()) for L in layers}
    return out


def _launch(a, mode: str, ranks: int, samples: int) -> List[Dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mkdtemp(prefix="nns-bench-dataset-")
    procs = []
    for r in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        if ranks > 1:
            env.update(RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "benchmarks.bench_dataset", "--worker", mode, "--model", a.model,
               "--samples", str(samples), "--batch-size", str(a.batch_size), "--block-size", str(a.block_size),
               "--out", out]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        o, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"bench_dataset: a {mode} worker failed ({p.returncode})")
        rows.append(json.loads(o.strip().splitlines()[-1]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg16_cifar")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--memory-samples", default="512,2048", help="sample counts of the memory rows")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.mode = a.worker
        print(json.dumps(worker(a)))
        return 0
    from .common import env_info, write_json

    load_at_start = os.getloadavg()
    base = _launch(a, "scanner", 1, a.samples)[0]
    rows: Dict[str, Any] = {"scanner": {"seconds": base["seconds"], "samples_per_s": a.samples / base["seconds"]}}
    for k in [int(v) for v in a.ranks.split(",")]:
        got = _launch(a, "dataset", k, a.samples)
        root = next(r for r in got if r["rank"] == 0)
        for L, v in base["act_sums"].items():  # correctness before any figure
            if abs(root["act_sums"][L] - v) > 1e-6 * max(1.0, abs(v)):
                raise SystemExit(f"bench_dataset: {k}-rank scan disagrees with Scanner on {L}: {root['act_sums'][L]} vs {v}")
        rows[f"dataset_r{k}"] = {"seconds": root["seconds"], "samples_per_s": a.samples / root["seconds"],
                                 "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in got]}
    if "dataset_r1" in rows:
        rows["bookkeeping_overhead"] = rows["dataset_r1"]["seconds"] / rows["scanner"]["seconds"] - 1
    if "dataset_r1" in rows and "dataset_r2" in rows:
        rows["speedup_1_to_2"] = rows["dataset_r2"]["samples_per_s"] / rows["dataset_r1"]["samples_per_s"]
    for n in [int(v) for v in a.memory_samples.split(",") if v]:
        r = _launch(a, "dataset", 1, n)[0]
        rows[f"memory_{n}"] = {"peak_rss_mib": r["peak_rss_mib"], "seconds": r["seconds"]}
    out = {"benchmark": "dataset_scan", "model": a.model, "samples": a.samples, "batch_size": a.batch_size,
           "block_size": a.block_size, "env": env_info("cpu"), "load_average_at_start": load_at_start,
           "load_average_at_end": os.getloadavg(), "rows": rows}
    print(json.dumps(rows, indent=1))
    if a.json:
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
