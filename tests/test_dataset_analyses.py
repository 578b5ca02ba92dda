"""Analyses run as data-set scans (``out_dir=``): the same numbers as in memory, resumable."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

import _scan_worker as W
from nns_cuda.analysis import fq


def test_feature_quantity_as_a_dataset_scan_equals_in_memory(tmp_path):
    ds = W.Digits(150)
    mem = fq.FeatureQuantity().fit(W.make_model(), DataLoader(ds, batch_size=16), W.LAYERS[:2]).result_
    opts = dict(block_size=64, batch_size=16, progress=False, backend="cpu")
    est = fq.FeatureQuantity(out_dir=str(tmp_path / "fq"), scan_options=opts)
    got = est.fit(W.make_model(), ds, W.LAYERS[:2]).result_
    assert got.n_samples == mem.n_samples == 150
    for L in W.LAYERS[:2]:
        a, b = got[L], mem[L]
        torch.testing.assert_close(a.fq, b.fq.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.mean_f, b.mean_f.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.mean_activation, b.mean_activation, rtol=1e-6, atol=1e-7)
        assert torch.equal(a.argmax[a.fq > 1e-3], b.argmax[a.fq > 1e-3])
        assert abs(a.pearson_r - b.pearson_r) < 1e-5
    # a second fit continues the same folder: nothing recomputed, the same result
    mtime = os.path.getmtime(tmp_path / "fq" / "blocks" / "block_000000.safetensors")
    again = fq.FeatureQuantity(out_dir=str(tmp_path / "fq"), scan_options=opts).fit(W.make_model(), ds, W.LAYERS[:2])
    assert os.path.getmtime(tmp_path / "fq" / "blocks" / "block_000000.safetensors") == mtime
    assert torch.equal(again.result_[W.LAYERS[1]].fq, got[W.LAYERS[1]].fq)


def test_knowledge_quantity_as_a_dataset_scan_equals_in_memory(tmp_path):
    from nns_cuda.analysis import chapter3

    ds = W.Digits(90)
    mem = chapter3.KnowledgeQuantity().fit(W.make_model(), DataLoader(ds, batch_size=16), W.LAYERS).result_
    got = chapter3.KnowledgeQuantity(out_dir=str(tmp_path / "kq"), scan_options=dict(
        block_size=32, batch_size=16, progress=False, backend="cpu")).fit(W.make_model(), ds, W.LAYERS).result_
    for L in W.LAYERS:
        a, b = got.layers[L].to_dict(), mem.layers[L].to_dict()
        for k, v in b.items():
            if isinstance(v, float):
                assert abs(a[k] - v) <= 1e-9 * max(1.0, abs(v)), (L, k, a[k], v)
            else:
                assert a[k] == v, (L, k)


def test_tip_property_means_as_a_dataset_scan_equal_in_memory(tmp_path):
    from nns_cuda.analysis import tip

    ds = W.Digits(70)
    regions = ["all", "foreground", "background"]
    mem = tip.InterpretableProperties(region=regions).fit(W.make_model(), DataLoader(ds, batch_size=16), ["1", "4"])
    got = tip.InterpretableProperties(region=regions, out_dir=str(tmp_path / "tip"), scan_options=dict(
        block_size=32, batch_size=16, progress=False, backend="cpu")).fit(W.make_model(), ds, ["1", "4"])
    assert got.channels_ == mem.channels_ and got.n_samples_ == mem.n_samples_
    for L in ["1", "4"]:
        for r in regions:
            for name in got.names_:
                torch.testing.assert_close(got.T(L, name, r), mem.T(L, name, r), rtol=1e-6, atol=1e-9)
