"""Block sizes of the Triton implicit-gather conv (``conv_li_implicit``) on CUDA, against the
cuBLAS gather (``conv_li_gather``) on the same layer.

    python -m benchmarks.tune_implicit [--json PATH] [--batch 8] [--time-limit 60]

(``--device cpu`` with small ``--channels / --grid / --image`` runs it under Triton's CPU
interpreter, ``TRITON_INTERPRET=1``: the smoke test of ``tests/test_benchmarks.py``.)

The layer is the shape that carries most of the gated FLOPs of VGG-16 @32 (the floors of
``benchmarks/NOTES.md``): a 3×3 / pad 1 conv on an 8×8 grid, 256 → 256 channels, every window
the whole 3×32×32 image, half of the input neurons active, no output gate (a conv followed by
BN), random values. Per precision (fp32: IEEE products; tf32: torch's TF32 switch on), the
gather is timed, then ``conv_li_implicit`` for each (BM, BN, BK, num_warps, num_stages)
configuration (``nns_cuda.ops._triton_conv.CONFIG_OVERRIDE``), each checked against the gather
first (max relative difference; tf32 rows are compared with the fp32 gather). Times: CUDA events,
one warm-up run (it includes Triton's compilation), median of 3. Useful GFLOP/s count the
active (input, tap) pairs only. Stops starting configurations after ``--time-limit`` seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Dict, List

import torch

from .common import time_runs, write_json

#: configurations tried: the heuristic's picks for this layer first (TF32 / 16-bit: 64, 128, 32, 4 warps;
#: fp32 IEEE: the same on 8 warps, see `_launch_config`), then alternatives
CONFIGS = [(64, 128, 32, 4, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 3), (64, 256, 32, 8, 3),
           (128, 64, 32, 4, 3), (64, 128, 64, 8, 3), (64, 128, 32, 4, 4), (32, 128, 32, 4, 3)]


def make_layer(batch: int, channels: int = 256, grid: int = 8, image: int = 32, D: int = 3,
               active: float = 0.5, device: str = "cuda", seed: int = 0) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    act = torch.rand(batch, channels, grid, grid, generator=g) < active
    patches = torch.randn(batch, channels, grid, grid, D, image, image, generator=g) * act[..., None, None, None]
    weight = torch.randn(channels, channels, 3, 3, generator=g) / (3 * channels ** 0.5)
    zeros = torch.zeros(grid, dtype=torch.long)
    args = dict(patches=patches, ay_in=zeros, ax_in=zeros, in_active=act, weight=weight,
                scale=torch.rand(channels, generator=g) + 0.5, gate=None, ay_out=zeros, ax_out=zeros,
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, rh_out=image, rw_out=image)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def useful_flops(args: Dict[str, Any]) -> int:
    """2 · pe · Σ over output neurons of their active (input, tap) pairs (the floor's count)."""
    a = args["in_active"].to(torch.float64)
    Co, Cig, kh, kw = args["weight"].shape
    pairs = torch.nn.functional.conv2d(a, torch.ones(1, Cig, kh, kw, dtype=torch.float64, device=a.device),
                                       padding=args["padding"])
    pe = args["patches"].shape[4] * args["rh_out"] * args["rw_out"]
    return int(2 * pe * Co * pairs.sum().item())


def _time(fn, device: str, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` runs after one warm-up (:func:`benchmarks.common.time_runs`)."""
    return statistics.median(time_runs(fn, device, repeats)[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_implicit")
    p.add_argument("--json", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--configs", type=int, default=len(CONFIGS), help="try the first N configurations")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("tune_implicit: no CUDA device")
        return 3
    from nns_cuda.ops import _triton_conv as T
    from nns_cuda import ops

    t0 = time.time()
    args = make_layer(a.batch, a.channels, a.grid, a.image, device=a.device)
    flops = useful_flops(args)
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu (Triton interpreter)"
    doc: Dict[str, Any] = {"device": name, "torch": torch.__version__,
                           "triton": getattr(T.triton, "__version__", None), "batch": a.batch,
                           "layer": f"3x3 conv, {a.grid}x{a.grid} grid, {a.channels}->{a.channels}, windows "
                                    f"3x{a.image}x{a.image}, 50% inputs active",
                           "useful_flops": flops, "rows": []}
    rows: List[Dict[str, Any]] = doc["rows"]
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ref = ops.conv_li_gather(**args)
        for prec in ("fp32", "tf32"):
            torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
            tg = _time(lambda: ops.conv_li_gather(**args), a.device)
            rows.append({"precision": prec, "algorithm": "gather", "s": tg, "gflops": flops / tg / 1e9})
            print(f"{prec} gather            {tg * 1e3:8.2f} ms  {flops / tg / 1e12:6.1f} TFLOP/s", flush=True)
            for cfg in CONFIGS[: a.configs]:
                if time.time() - t0 > a.time_limit:
                    print(f"time limit: {cfg} and later not run")
                    break
                T.CONFIG_OVERRIDE = cfg
                row: Dict[str, Any] = {"precision": prec, "algorithm": "implicit", "config": list(cfg)}
                try:
                    out = ops.conv_li_implicit(**args)
                    row["max_rel_diff_vs_fp32_gather"] = float((out - ref).abs().max() / ref.abs().max())
                    del out
                    ti = _time(lambda: ops.conv_li_implicit(**args), a.device)
                    row.update(s=ti, gflops=flops / ti / 1e9, vs_gather=tg / ti)
                    print(f"{prec} implicit {cfg}  {ti * 1e3:8.2f} ms  {flops / ti / 1e12:6.1f} TFLOP/s  "
                          f"x{tg / ti:.2f} vs gather  diff {row['max_rel_diff_vs_fp32_gather']:.1e}", flush=True)
                except Exception as e:  # a configuration that does not compile / fit: recorded
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"{prec} implicit {cfg}  error {row['error']}", flush=True)
                rows.append(row)
    finally:
        T.CONFIG_OVERRIDE = None
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    doc["wall_s"] = time.time() - t0
    if a.json:
        write_json(a.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
