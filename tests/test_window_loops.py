"""The per-lane window loops of the CUDA routing and statistics kernels
(``csrc/include/nns_cuda/window_loops.h``: ``place_window`` for maxpool_li / place_li,
``stats_window_lane`` for li_stats) run on the CPU: ``tests/cpp/window_loops_test.cpp`` calls
them for lanes 0..31 in turn, as a warp's 32 lanes would, on 400 random windows each (both sides
of the 16-wide switch between the row loop and the flattened loop, null source, accumulation),
and compares with plain triple loops written from the definitions — exact for the copies,
1e-12 for the sums. The GPU runs the same header (device_check.sh's CUDA tests)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_window_loops_on_the_host(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.fail("no C++ compiler found (the extension's build needs one too)")
    exe = tmp_path / "window_loops_test"
    inc = [f"-I{p}" for p in [os.path.join(ROOT, "csrc", "include")] + cpp.include_paths()]
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", *inc, os.path.join(ROOT, "tests", "cpp", "window_loops_test.cpp"),
                            "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok 800", run.stdout[-3000:]
