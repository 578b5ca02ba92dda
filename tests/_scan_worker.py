"""One process of a data-set scan test (run as a script, one per rank or shard).

    python tests/_scan_worker.py OUT_DIR [--rank R --world W --port P] [--shard i/n]
                                 [--kill-at SAMPLE] [--no-resume] [--samples N]

The model and the data set are made from fixed seeds here, so every process sees the same
ones. ``--kill-at`` makes the process kill itself (SIGKILL) when it loads that sample: a rank
dying in the middle of a run.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn

LAYERS = ["1", "4", "6"]
BLOCK_SIZE = 64
BATCH_SIZE = 32


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
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.world > 1:
        os.environ.update(RANK=str(a.rank), WORLD_SIZE=str(a.world), LOCAL_RANK=str(a.rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port), NNS_DIST_TIMEOUT_S="120")
    shard = tuple(int(v) for v in a.shard.split("/")) if a.shard else None
    r = scan(a.out, n=a.samples, kill_at=a.kill_at, resume=not a.no_resume, shard=shard)
    if r is not None:
        print(f"computed={r.blocks_computed} skipped={r.blocks_skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
