"""A small scan through the CUDA backend, for ``compute-sanitizer`` (memcheck, racecheck).

    compute-sanitizer --tool memcheck python3 -m benchmarks.sanitize_scan

A tiny CNN with every construct (conv with stride / padding, BN, ReLU, max-pool, average pool,
a residual block with a 1×1 shortcut, adaptive pool, linear) is scanned with the ``cuda``
backend with each conv algorithm (``direct``: the CUDA conv kernel; ``gather`` — what ``auto``
runs on CUDA — and ``gemm``: ATen / cuBLAS): statistics, filter images and dense images of every
layer, plus the learned images of the linear output; each is compared with the reference backend (so an out-of-bounds read that
happens to return garbage also fails). Exit status: 0 ok, 1 mismatch, 3 no CUDA kernels.
Set ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` under memcheck so that the caching allocator does not
hide out-of-bounds accesses inside its pooled blocks (device_check.sh does).
"""
from __future__ import annotations

import sys
import time

import torch

import nns_cuda

from .common import WORKLOADS, build_model, make_inputs


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.sanitize_scan")
    p.add_argument("--algorithms", default="direct,gather,gemm",
                   help="conv algorithms to scan with (comma-separated; default: all three)")
    algos = [a for a in p.parse_args(argv).algorithms.split(",") if a]
    if not torch.cuda.is_available() or not nns_cuda.ext_info().get("cuda"):
        print(f"sanitize_scan: no CUDA device or kernels ({nns_cuda.ext_info()})")
        return 3
    t0 = time.perf_counter()
    wl = WORKLOADS["tiny"]
    worst = 0.0
    for dtype in (torch.float32, torch.float64):
        model = build_model(wl, "cuda").to(dtype)
        x, fg = make_inputs(wl, 3, "cuda")
        x = x.to(dtype)
        kw = dict(strategy="forward", stats=True, filter_images=True, keep_images=True)
        want = nns_cuda.Scanner(model, None, backend="reference", **kw).scan(x, fg)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        for algo in algos:
            got = nns_cuda.Scanner(model, None, backend="cuda", conv_algorithm=algo, **kw).scan(x, fg)
            for name in want:
                for attr in ("stats", "filter_images", "images"):
                    a, b = getattr(got[name], attr), getattr(want[name], attr)
                    if b is None:
                        continue
                    e = _err(a, b)
                    worst = max(worst, e)
                    if not e <= tol:
                        print(f"sanitize_scan: MISMATCH {dtype} {algo} {name}.{attr}: rel. err {e:.2e} > {tol:.0e}")
                        return 1
        li = nns_cuda.learned_images(model, x, "fc", backend="cuda", strategy="forward")
        li_ref = nns_cuda.learned_images(model, x, "fc", backend="reference", strategy="forward")
        e = _err(li, li_ref)
        worst = max(worst, e)
        if not e <= tol:
            print(f"sanitize_scan: MISMATCH {dtype} learned_images(fc): rel. err {e:.2e}")
            return 1
    torch.cuda.synchronize()
    print(f"sanitize_scan: ok ({len(want.layers)} layers, float32 + float64, conv algorithms {' / '.join(algos)}, "
          f"worst rel. err {worst:.1e}, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
