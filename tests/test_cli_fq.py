"""Tests of the ``nns fq`` command (nns_cuda.app.commands.fq): argument parsing and a run that
writes JSON."""
from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch

from nns_cuda.analysis._toolkit import FQWarning
from nns_cuda.app.commands import fq as fq_cmd


def test_add_arguments_parses():
    p = fq_cmd.add_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--findings", "--max-samples", "10", "--layers", "features.1"])
    assert a.findings and a.max_samples == 10 and a.layers == ["features.1"]


def test_run_writes_json(tmp_path):
    pytest.importorskip("nns_cuda.models")
    from nns_cuda import models

    w = tmp_path / "w.pt"
    torch.save(models.build("simple_cnn", num_classes=10, seed=0).state_dict(), w)
    out = tmp_path / "fq.json"
    args = fq_cmd.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "simple_cnn", "--weights", str(w), "--max-samples", "4", "--batch-size", "4", "--layers", "features.relu3", "--out", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FQWarning)
        assert fq_cmd.run(args) == 0
    d = json.loads(out.read_text())
    assert d["weights"] == "weights file" and d["result"]["n_samples"] == 4
    assert set(d["result"]["layers"]) == {"features.relu3"}
