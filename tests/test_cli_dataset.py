"""``nns scan-dataset``, ``nns merge`` and ``nns show`` end to end on the embedded digits."""
from __future__ import annotations

import csv
import os

import pytest

from nns_cuda.app.cli import main
from nns_cuda.engine.dataset_scan import load_scan

BASE = ["scan-dataset", "--model", "simple_cnn", "--layers", "features.relu1", "features.relu3", "--limit", "40",
        "--block-size", "16", "--batch-size", "8", "--no-progress"]


@pytest.fixture
def base(tmp_path):
    import torch

    from nns_cuda import models

    w = str(tmp_path / "w.pt")
    torch.save(models.build("simple_cnn").state_dict(), w)
    return BASE + ["--weights", w]


def test_random_weights_are_said(tmp_path, capsys):
    assert main(BASE + ["--out", str(tmp_path / "r"), "--limit", "8"]) == 0
    assert "simple_cnn has random weights" in capsys.readouterr().err


def test_scan_resume_show_and_shards_merge(tmp_path, capsys, base):
    BASE = base
    out = str(tmp_path / "scan")
    assert main(BASE + ["--out", out]) == 0
    full = load_scan(out)
    assert full.samples == 40 and full.manifest["blocks_done"] == [0, 1, 2]
    # a second run without --resume is refused; with --resume nothing is recomputed
    assert main(BASE + ["--out", out]) == 2
    assert "already holds a scan" in capsys.readouterr().err
    assert main(BASE + ["--out", out, "--resume"]) == 0
    assert "0 blocks computed, 3 already done" in capsys.readouterr().err
    # --resume into a folder without a scan
    assert main(BASE + ["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no scan to continue" in capsys.readouterr().err
    # shards + merge give the same file
    sh = str(tmp_path / "shards")
    assert main(BASE + ["--out", sh, "--shard", "0/2"]) == 0
    assert "nns merge" in capsys.readouterr().err
    assert main(["merge", sh]) == 2  # shard 1 is missing
    assert "not done" in capsys.readouterr().err
    assert main(BASE + ["--out", sh, "--shard", "1/2"]) == 0
    assert main(["merge", sh]) == 0
    with open(os.path.join(out, "result.safetensors"), "rb") as a, open(os.path.join(sh, "result.safetensors"), "rb") as b:
        assert a.read() == b.read()
    # show: a table per layer and a CSV per layer
    assert main(["show", out]) == 0
    text = capsys.readouterr().out
    assert "features.relu1" in text and "features.relu3" in text
    with open(os.path.join(out, "neurons_features.relu3.csv")) as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:6] == ["neuron", "mean", "std", "active_fraction", "max", "argmax_sample"]
    assert len(rows) - 1 == full.mean_activation("features.relu3").numel()
    assert float(rows[1][1]) == pytest.approx(float(full.mean_activation("features.relu3").reshape(-1)[0]), rel=1e-6)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(BASE + ["--out", str(tmp_path / "x"), "--shard", "3/2"]) == 2
    assert "--shard" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 2
    assert "no data-set scan" in capsys.readouterr().err
