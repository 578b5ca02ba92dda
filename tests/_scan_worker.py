"""One process of a data-set scan test (run as a script, one per rank or shard).

    python tests/_scan_worker.py OUT_DIR [--rank R --world W --port P] [--shard i/n]
                                 [--kill-at SAMPLE] [--no-resume] [--samples N] [--gmm FILE]

The model and the data set are made from fixed seeds here, so every process sees the same
ones. ``--kill-at`` makes the process kill itself (SIGKILL) when it loads that sample: a rank
dying in the middle of a run. ``--gmm FILE`` runs the GMM analysis as a data-set scan
(:func:`gmm_analysis`) instead of the plain scan and, where the process gets the result
(rank 0, or the shard that completes the folder), writes its arrays (:func:`gmm_arrays`) to
``FILE`` as safetensors. ``{rank}`` in ``OUT_DIR`` gives each rank its own folder (no shared
file system).

:func:`spawn` and :func:`wait` start and collect such processes from a test.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

import torch
from torch import nn

LAYERS = ["1", "4", "6"]
BLOCK_SIZE = 64
BATCH_SIZE = 32
GMM_LAYER = "1"
GMM_K_MAX = 4
GMM_SCAN = dict(block_size=32, batch_size=16, backend="cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 2 * 2, 5)).eval()


class Digits(torch.utils.data.Dataset):
    """Deterministic random 2×8×8 samples with a box foreground; optional self-kill at one index."""

    def __init__(self, n: int = 1001, kill_at: int = -1, bad_at: int = -1):
        self.n, self.kill_at, self.bad_at = n, kill_at, bad_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        g = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(2, 8, 8, generator=g)
        if i == self.bad_at:
            x = torch.randn(2, 9, 8, generator=g)
        fg = torch.zeros(8, 8, dtype=torch.bool)
        fg[1 + i % 3: 6, 2: 7 - i % 2] = True
        return x, i % 5, fg


def scan(out_dir: str, *, n: int = 1001, kill_at: int = -1, resume: bool = True, shard=None, **kw):
    from nns_cuda.engine.dataset_scan import DatasetScan

    kw = dict(dict(block_size=BLOCK_SIZE, batch_size=BATCH_SIZE, top_k=4, progress=False, backend="cpu"), **kw)
    return DatasetScan(make_model(), LAYERS, **kw).run(Digits(n, kill_at), out_dir, resume=resume, shard=shard)


def gmm_analysis(out_dir: str, **scan_kw):
    """The GMM analysis of the multi-process tests, as a data-set scan into ``out_dir``."""
    from nns_cuda.analysis.gmm import GMMAnalysis

    return GMMAnalysis(k_max=GMM_K_MAX, progress=False, out_dir=out_dir, scan_options=dict(GMM_SCAN, **scan_kw))


def gmm_arrays(result) -> dict:
    """Every array of a :class:`GMMAnalysisResult` that must be equal between runs."""
    a = result.anomaly
    return {"points": result.points, "mean_activation": result.mean_activation, "targets": result.targets,
            "k": a.k, "labels": a.labels, "ch": a.ch, "anomalous": a.anomalous.to(torch.uint8)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out, world: int = 1, *extra: str, shards: int = 0):
    """Start ``world`` ranks of a process group (gloo), or ``shards`` shard processes, on ``out``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if shards:
        argvs = [["--shard", f"{i}/{shards}"] for i in range(shards)]
    else:
        port = _free_port()
        argvs = [["--rank", str(r), "--world", str(world), "--port", str(port)] for r in range(world)]
    return [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out), *a, *extra], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]


def wait(procs, timeout: float = 240):
    """Wait for the processes; fail with a worker's stderr if it failed. Returns their stdouts."""
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"worker failed ({p.returncode}):\n{e[-3000:]}"
        outs.append(o)
    return outs


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--shard", default=None)
    p.add_argument("--kill-at", type=int, default=-1)
    p.add_argument("--samples", type=int, default=1001)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--gmm", default=None, metavar="FILE")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.world > 1:
        os.environ.update(RANK=str(a.rank), WORLD_SIZE=str(a.world), LOCAL_RANK=str(a.rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port), NNS_DIST_TIMEOUT_S="120")
    shard = tuple(int(v) for v in a.shard.split("/")) if a.shard else None
    a.out = a.out.replace("{rank}", str(a.rank))
    if a.gmm:
        from safetensors.torch import save_file

        kw = {} if shard is None else {"shard": shard}
        res = gmm_analysis(a.out, **kw).fit(make_model(), Digits(a.samples), GMM_LAYER).result_
        if res is not None:
            save_file({k: v.contiguous() for k, v in gmm_arrays(res).items()}, a.gmm)
            print(f"gmm samples={res.n_samples} anomalous={res.anomaly.anomaly_filters}")
        return 0
    r = scan(a.out, n=a.samples, kill_at=a.kill_at, resume=not a.no_resume, shard=shard)
    if r is not None:
        print(f"computed={r.blocks_computed} skipped={r.blocks_skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
