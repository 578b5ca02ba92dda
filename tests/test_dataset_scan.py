"""Data-set scans: exact accumulators, bitwise-equal results for 1, 2 and 3 processes (gloo),
resuming after a killed rank, checksums, refused folders, shards and merge.

The reference for every accumulator is a plain loop: forward hooks for the activations and the
reference engine (pure PyTorch) for the statistics and filter images.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import _scan_worker as W
from nns_cuda._modules import layer_outputs
from nns_cuda.engine import _scan_store
from nns_cuda.engine.dataset_scan import DatasetScan, ScanDirError, load_scan, merge_scan
from nns_cuda.engine.scanner import Scanner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_scan_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_procs(out, world, *extra, kill_at=-1, timeout=240):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, WORKER, str(out), "--rank", str(r), "--world", str(world), "--port",
                               str(port), *extra] + (["--kill-at", str(kill_at)] if kill_at >= 0 and r == 1 else []),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    return procs


def _result_bytes(out) -> bytes:
    with open(os.path.join(out, "result.safetensors"), "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The uninterrupted one-process scan every other run must reproduce bitwise."""
    out = tmp_path_factory.mktemp("scan1")
    W.wait(_run_procs(out, 1))
    return out


def test_accumulators_equal_a_plain_loop(tmp_path):
    n = 203
    model, ds = W.make_model(), W.Digits(n)
    res = DatasetScan(model, W.LAYERS, block_size=64, batch_size=16, top_k=4, progress=False, backend="cpu",
                      filter_images=True).run(ds, str(tmp_path / "s"))
    xs = torch.stack([ds[i][0] for i in range(n)]).double()
    fg = torch.stack([ds[i][2] for i in range(n)])
    m64 = W.make_model().double()
    with torch.no_grad():
        _, acts = layer_outputs(m64, xs, W.LAYERS)
    ref = Scanner(m64, W.LAYERS, backend="reference", stats=True, filter_images=True).scan(xs, fg)
    for L in W.LAYERS:
        a = acts[L]
        assert res.count(L) == n
        torch.testing.assert_close(res.get(L, "act_sum"), a.sum(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res.get(L, "act_sq_sum"), (a * a).sum(0), rtol=1e-6, atol=1e-6)
        assert torch.equal(res.get(L, "act_pos_count"), (a > 0).sum(0))
        a32 = W.make_model()
        with torch.no_grad():
            _, acts32 = layer_outputs(a32, xs.float(), [L])
        v = acts32[L]
        mx = v.max(0).values
        assert torch.equal(res.get(L, "act_max"), mx)
        hit = (v == mx.unsqueeze(0)).to(torch.int64)
        assert torch.equal(res.get(L, "act_argmax"), torch.argmax(hit, 0))  # first sample reaching the max
        top = torch.sort(v, dim=0, descending=True, stable=True)
        assert torch.equal(res.get(L, "topk_values"), top.values[:4].movedim(0, -1))
        assert torch.equal(res.get(L, "topk_index"), top.indices[:4].movedim(0, -1))
        torch.testing.assert_close(res.get(L, "stats_sum"), ref[L].stats.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.get(L, "filter_image_sum"), ref[L].filter_images.sum(0), rtol=1e-5, atol=1e-5)
    # the file layout users' scripts rely on
    m = _scan_store.read_manifest(str(tmp_path / "s"))
    assert m["samples"] == n and m["layers"] == W.LAYERS and m["blocks_done"] == [0, 1, 2, 3]
    assert res.get("1", "count").dtype == torch.int64 and res.get("1", "act_sum").dtype == torch.float64
    assert res.get("1", "act_max").dtype == torch.float32 and res.get("1", "topk_index").shape == (4, 8, 8, 4)
    assert res.get("1", "stats_sum").shape == (4, 8, 8, 11) and res.get("1", "filter_image_sum").shape == (4, 2, 8, 8)


def test_measures_sum_max_and_first_argmax(tmp_path):
    n = 70
    ds = W.Digits(n)

    def energy(layer, lr, x, fg):
        return None if layer != "4" else (lr.activations ** 2).flatten(1).sum(1)

    res = DatasetScan(W.make_model(), W.LAYERS, block_size=32, batch_size=8, progress=False, backend="cpu",
                      measures={"energy": energy}).run(ds, str(tmp_path / "m"))
    xs = torch.stack([ds[i][0] for i in range(n)])
    with torch.no_grad():
        _, acts = layer_outputs(W.make_model(), xs, ["4"])
    e = (acts["4"] ** 2).flatten(1).sum(1).double()
    torch.testing.assert_close(res.measure_mean("4", "energy"), e.mean(), rtol=1e-12, atol=0)
    assert float(res.measure_max("4", "energy")) == float(e.max()) and int(res.measure_argmax("4", "energy")) == int(e.argmax())
    with pytest.raises(KeyError, match="no accumulator"):
        res.measure_mean("1", "energy")


@pytest.mark.parametrize("world", [2, 3])
def test_result_is_bitwise_the_same_for_1_2_3_processes(tmp_path, single_run, world):
    out = tmp_path / f"w{world}"
    W.wait(_run_procs(out, world))
    assert _result_bytes(out) == _result_bytes(single_run)
    r = load_scan(str(out))
    assert r.count("1") == 1001 and r.manifest["blocks_done"] == list(range(16))


def test_killed_rank_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, single_run):
    out = tmp_path / "killed"
    procs = _run_procs(out, 2, kill_at=11 * 64 + 5)  # rank 1 takes the odd blocks; it dies in block 11
    deadline = time.time() + 240
    while procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert procs[1].returncode == -9, "rank 1 should have been killed by SIGKILL"
    time.sleep(1.0)
    procs[0].kill()  # the survivor waits for the dead rank in a collective
    procs[0].communicate()
    done = _scan_store.read_manifest(str(out))["blocks_done"]
    assert 0 < len(done) < 16 and not os.path.exists(out / "result.safetensors")
    (o,) = W.wait([subprocess.Popen([sys.executable, WORKER, str(out)], env=dict(os.environ, PYTHONPATH=ROOT),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)])
    assert f"skipped={len(done)}" in o and f"computed={16 - len(done)}" in o
    assert _result_bytes(out) == _result_bytes(single_run)


def test_corrupt_or_truncated_block_is_recomputed(tmp_path, single_run):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(single_run, out)
    p3, p7 = _scan_store.block_path(str(out), 3), _scan_store.block_path(str(out), 7)
    with open(p3, "r+b") as fh:
        fh.truncate(100)
    with open(p7, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    torch.set_num_threads(1)
    try:
        with pytest.warns(RuntimeWarning, match=r"\[3, 7\].*checksum"):
            r = W.scan(str(out))
    finally:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    assert (r.blocks_computed, r.blocks_skipped) == (2, 14)
    assert _result_bytes(out) == _result_bytes(single_run)


def test_shards_then_merge_equal_the_single_run(tmp_path, single_run):
    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(out), "--shard", f"{i}/2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    W.wait(procs)
    os.unlink(out / "result.safetensors")  # the last shard to finish merged; merge again by hand
    merge_scan(str(out))
    assert _result_bytes(out) == _result_bytes(single_run)


def test_refused_folders_and_bad_items(tmp_path, single_run):
    import shutil

    out = str(tmp_path / "other")
    shutil.copytree(single_run, out)
    model = W.make_model()
    with pytest.raises(ScanDirError, match="another layers"):
        DatasetScan(model, ["1"], block_size=64, batch_size=32, top_k=4, backend="cpu", progress=False).run(
            W.Digits(), out)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1
    with pytest.raises(ScanDirError, match="another model hash"):
        DatasetScan(model, W.LAYERS, block_size=64, batch_size=32, top_k=4, backend="cpu", progress=False).run(
            W.Digits(), out)
    with pytest.raises(ScanDirError, match="another dataset.*length"):
        W.scan(out, n=1000)
    with pytest.raises(ScanDirError, match="another options.*top_k"):
        W.scan(out, top_k=3)
    with pytest.raises(ScanDirError, match="already holds a scan.*resume"):
        W.scan(out, resume=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ScanDirError, match="not a folder"):
        W.scan(str(blocker))
    with pytest.raises(ScanDirError, match="cannot write"):
        W.scan(str(blocker / "sub"))
    with pytest.raises(ValueError, match="sample 37: x has shape \\[2, 9, 8\\]"):
        DatasetScan(W.make_model(), W.LAYERS, block_size=16, batch_size=8, progress=False).run(
            W.Digits(50, bad_at=37), str(tmp_path / "bad"))
    with pytest.raises(KeyError):
        DatasetScan(W.make_model(), ["nope"], progress=False).run(W.Digits(10), str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        DatasetScan(W.make_model(), W.LAYERS, block_size=0).run(W.Digits(10), str(tmp_path / "z"))
    with pytest.raises(ScanDirError, match="no data-set scan"):
        load_scan(str(tmp_path / "missing"))
