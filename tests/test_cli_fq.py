"""Tests of the ``nns fq`` command (nns_cuda.app.commands.fq): argument parsing and a run that
writes ``<out>/fq.json``."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from nns_cuda.app.commands import fq as fq_cmd


def test_add_arguments_parses(capsys):
    p = fq_cmd.add_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--findings", "--samples", "10", "--layers", "features.1"])
    assert a.findings and a.samples == 10 and a.layers == ["features.1"]
    assert p.parse_args(["--max-samples", "10"]).samples == 10  # the deprecated name still works, and says so
    assert "--max-samples is deprecated; use --samples" in capsys.readouterr().err


def test_run_writes_json_into_the_out_folder(tmp_path, capsys):
    pytest.importorskip("nns_cuda.models")
    from nns_cuda import models

    w = tmp_path / "w.pt"
    torch.save(models.build("simple_cnn", num_classes=10, seed=0).state_dict(), w)
    out = tmp_path / "fq"
    args = fq_cmd.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "simple_cnn", "--weights", str(w), "--samples", "4", "--batch-size", "4", "--layers", "features.relu3",
         "--out", str(out)])
    assert fq_cmd.run(args) == 0
    d = json.loads((out / "fq.json").read_text())
    assert d["weights"] == "weights file" and d["result"]["n_samples"] == 4
    assert set(d["result"]["layers"]) == {"features.relu3"}
    assert f"nns fq: wrote {out / 'fq.json'}" in capsys.readouterr().out
    # a file name where the folder goes is refused with one line
    args.out = str(tmp_path / "fq.json")
    assert fq_cmd.run(args) == 2
    assert "--out names a folder" in capsys.readouterr().err


def test_progress_bars_and_no_progress(tmp_path, capsys):
    """``nns fq`` shows a progress bar over the batches, ``--no-progress`` none; every estimator of
    Chapters 3 and 4 takes ``progress=`` (a bar on stderr, none with False)."""
    from nns_cuda import data, models
    from nns_cuda.analysis import chapter3, fq

    w = tmp_path / "w.pt"
    model = models.build("simple_cnn", num_classes=10, seed=0).eval()
    torch.save(model.state_dict(), w)
    p = fq_cmd.add_arguments(argparse.ArgumentParser())
    base = ["--model", "simple_cnn", "--weights", str(w), "--samples", "8", "--batch-size", "4", "--layers",
            "features.relu3", "--out", str(tmp_path / "fq")]
    for extra, shown in (([], True), (["--no-progress"], False)):
        capsys.readouterr()
        assert fq_cmd.run(p.parse_args(base + extra)) == 0
        assert ("FQ: " in capsys.readouterr().err) == shown, extra
    ds = data.cluttered_digits("test")
    batches = [tuple(torch.stack(t) if isinstance(t[0], torch.Tensor) else torch.tensor(t)
                     for t in zip(*[ds[i] for i in range(s, s + 4)])) for s in (0, 4)]
    fits = {
        "FQ: ": lambda pr: fq.FeatureQuantity(progress=pr).fit(model, batches, ["features.relu3"]),
        "knowledge quantity": lambda pr: chapter3.KnowledgeQuantity(progress=pr).fit(model, batches, "features.relu3"),
        "distances": lambda pr: chapter3.InputDistance(n_reference=4, max_neurons=4, progress=pr).fit(
            model, batches, "features.relu3"),
        "winner distances": lambda pr: chapter3.WinnerDistance(progress=pr).fit(model, batches),
        "FeatureMapCorrelation": lambda pr: chapter3.FeatureMapCorrelation(progress=pr).fit(model, batches,
                                                                                           "features.relu3"),
        "Top2IoU": lambda pr: chapter3.Top2IoU(progress=pr).fit(model, batches, "features.relu3"),
        "loss": lambda pr: fq.FilterDiversity(n_mask=2, progress=pr).fit(model, torch.rand(10, 4, 4),
                                                                         "features.relu3", batches),
        "localisation IoU": lambda pr: fq.LocalisationIoU(methods=("fq",), progress=pr).fit(model, batches),
    }
    for label, fit in fits.items():
        for progress in (True, False):
            capsys.readouterr()
            fit(progress)
            assert (label in capsys.readouterr().err) == progress, (label, progress)
