"""The GMM analysis as a data-set scan (``GMMAnalysis(out_dir=...)``): per-sample rows in the
block files, assembled in global sample order; equal to the in-memory fit; bitwise the same
for 1 and 2 processes (gloo) and for shards merged afterwards."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import _scan_worker as W
from nns_cuda.analysis import gmm
from nns_cuda.engine import _scan_state, _scan_store
from nns_cuda.engine.dataset_scan import DatasetScan, merge_scan

N = 200  # 7 blocks of 32 (the last one of 8 samples): two ranks get 4 and 3 blocks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The workers run single-threaded; so does the in-process fit compared with them bitwise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _result_bytes(out) -> bytes:
    with open(os.path.join(out, "result.safetensors"), "rb") as fh:
        return fh.read()


def _assert_same_arrays(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k  # NaN-free arrays: equal is bitwise


@pytest.fixture(scope="module")
def single_gmm(tmp_path_factory):
    """The one-process run every other run must reproduce bitwise: (folder, GMM arrays)."""
    root = tmp_path_factory.mktemp("gmm1")
    W.wait(W.spawn(root / "scan", 1, "--samples", str(N), "--gmm", str(root / "gmm.safetensors")))
    return root / "scan", load_file(str(root / "gmm.safetensors"))


def test_per_sample_rows_and_labels_in_global_order(tmp_path):
    """The engine's per-sample values: each block file holds its samples' rows and indices; the
    result holds all rows in sample order, bitwise as computed."""
    n, ds = 45, W.Digits(45)
    scan = DatasetScan(W.make_model(), ["4"], block_size=16, batch_size=8, progress=False, backend="cpu",
                       stats=False, labels=True, per_sample={"x": lambda layer, lr, x, fg: x.flatten(1)})
    res = scan.run(ds, str(tmp_path / "s"))
    xs = torch.stack([ds[i][0] for i in range(n)]).flatten(1)
    assert torch.equal(res.sample_values("4", "x"), xs)
    assert torch.equal(res.sample_index("4", "x"), torch.arange(n))
    assert torch.equal(res.labels(), torch.tensor([ds[i][1] for i in range(n)]))
    block = _scan_store.read_state(_scan_store.block_path(str(tmp_path / "s"), 1))
    assert torch.equal(block["4/sample/x/index"], torch.arange(16, 32))
    assert torch.equal(block["4/sample/x/values"], xs[16:32])
    assert torch.equal(block["sample/label/values"], res.labels()[16:32])
    # rows merged out of sample order are refused, not silently interleaved
    b0 = _scan_store.read_state(_scan_store.block_path(str(tmp_path / "s"), 0))
    with pytest.raises(ValueError, match="merge states in sample order"):
        _scan_state.merge_all([block, b0])
    with pytest.raises(ValueError, match="named both in measures and per_sample"):
        DatasetScan(W.make_model(), ["4"], progress=False, measures={"x": len},
                    per_sample={"x": len}).run(ds, str(tmp_path / "t"))
    with pytest.raises(ValueError, match="sample 0: labels=True keeps integer class labels"):
        DatasetScan(W.make_model(), ["4"], progress=False, labels=True).run(
            [(x, float(y), fg) for x, y, fg in (ds[i] for i in range(4))], str(tmp_path / "u"))


def test_gmm_as_a_dataset_scan_equals_in_memory(tmp_path, capsys):
    ds = W.Digits(150)
    model = W.make_model()
    mem = gmm.GMMAnalysis(k_max=W.GMM_K_MAX, progress=False).fit(model, DataLoader(ds, batch_size=16), W.GMM_LAYER)
    est = W.gmm_analysis(str(tmp_path / "g"))
    assert est.fit(model, ds, W.GMM_LAYER) is est
    got, ref = est.result_, mem.result_
    # the same batches and per-sample computation: the features, hence the points, are bitwise equal
    assert torch.equal(got.points, ref.points) and got.n_samples == 150
    torch.testing.assert_close(got.mean_activation, ref.mean_activation, rtol=1e-12, atol=0)
    assert torch.equal(got.targets, ref.targets)
    assert torch.equal(got.anomaly.k, ref.anomaly.k)
    assert got.anomaly.anomaly_filters == ref.anomaly.anomaly_filters and got.anomaly.n_anomalous > 0
    assert torch.equal(got.anomaly.labels, ref.anomaly.labels)
    assert [o.tolist() for o in got.anomaly.outlier_samples] == [o.tolist() for o in ref.anomaly.outlier_samples]
    assert est.params_ == mem.params_
    # a second fit continues the folder: no block recomputed, the same result
    block0 = tmp_path / "g" / "blocks" / "block_000000.safetensors"
    mtime = os.path.getmtime(block0)
    again = W.gmm_analysis(str(tmp_path / "g")).fit(model, ds, W.GMM_LAYER).result_
    assert os.path.getmtime(block0) == mtime
    _assert_same_arrays(W.gmm_arrays(again), W.gmm_arrays(got))
    # max_samples cuts the data set, as in memory; progress= is the scan's progress bar on stderr
    for progress in (True, False):
        capsys.readouterr()
        cut = gmm.GMMAnalysis(k_max=W.GMM_K_MAX, progress=progress, max_samples=40,
                              out_dir=str(tmp_path / f"c{progress}"), scan_options=W.GMM_SCAN)
        cut = cut.fit(model, ds, W.GMM_LAYER).result_
        assert cut.n_samples == 40 and torch.equal(cut.targets, ref.targets[:40])
        assert ("scan" in capsys.readouterr().err) == progress
    with pytest.raises(ValueError, match="filter_fn does not apply"):
        gmm.GMMAnalysis(filter_fn=lambda m, x, l: x, out_dir=str(tmp_path / "f")).fit(model, ds, W.GMM_LAYER)
    with pytest.raises(ValueError, match=r"may not set \['per_sample'\]"):
        gmm.GMMAnalysis(out_dir=str(tmp_path / "f"), scan_options={"per_sample": {}}).fit(model, ds, W.GMM_LAYER)


def test_two_processes_give_the_single_run_bitwise(tmp_path, single_gmm):
    """Each rank writes its own folder (no shared file system): rank 1's rows reach rank 0 only
    through the gather of its block files."""
    single, arrays = single_gmm
    W.wait(W.spawn(tmp_path / "rank{rank}", 2, "--samples", str(N), "--gmm", str(tmp_path / "gmm.safetensors")))
    out0, out1 = tmp_path / "rank0", tmp_path / "rank1"
    assert _scan_store.read_manifest(str(out0))["blocks_done"] == [0, 2, 4, 6]
    assert _scan_store.read_manifest(str(out1))["blocks_done"] == [1, 3, 5]
    assert not os.path.exists(out1 / "result.safetensors")
    assert _result_bytes(out0) == _result_bytes(single)  # the assembled rows included
    got = load_file(str(tmp_path / "gmm.safetensors"))
    _assert_same_arrays(got, arrays)
    assert got["points"].shape == (4, N, 2) and torch.equal(got["targets"], torch.arange(N) % 5)


def test_shards_then_merge_give_the_single_run(tmp_path, single_gmm):
    single, arrays = single_gmm
    out = tmp_path / "shards"
    W.wait(W.spawn(out, 1, "--samples", str(N), "--gmm", str(tmp_path / "gmm_s.safetensors"), shards=2))
    # the shard that found the folder complete merged and fitted; merge again by hand and refit
    _assert_same_arrays(load_file(str(tmp_path / "gmm_s.safetensors")), arrays)
    os.unlink(out / "result.safetensors")
    merge_scan(str(out))
    assert _result_bytes(out) == _result_bytes(single)
    refit = W.gmm_analysis(str(out)).fit(W.make_model(), W.Digits(N), W.GMM_LAYER).result_
    _assert_same_arrays({k: v.contiguous() for k, v in W.gmm_arrays(refit).items()}, arrays)
