"""The ``nns`` command line: help texts, error paths (one line, non-zero exit, traceback only with
--debug), and ``nns scan`` writing its outputs for a zoo model on the embedded data and for a saved
model on a folder of images."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nns_cuda.app import cli

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["demo", "scan", "fq", "tip", "gmm", "train", "bench"]


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: nns {cmd}"), out[:200]
    assert "not available" not in out
    assert len(out) > 300, "help should explain the command"


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"\n    {cmd} " in out, cmd
    assert "make demo" in out


def test_no_command_prints_help_and_fails(capsys):
    rc, out, _ = _run([], capsys)
    assert rc == 2 and "usage: nns" in out


def test_bad_input_is_one_line_with_exit_2(capsys):
    rc, out, err = _run(["scan", "--model", "no_such_model", "--out", "unused"], capsys)
    assert rc == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("nns scan: error: unknown model 'no_such_model'"), err
    assert "Traceback" not in err
    rc, _, err = _run(["scan", "--model", "simple_cnn", "--data", "/no/such/folder"], capsys)
    assert rc == 2 and "neither 'digits' nor an existing folder" in err


def test_unavailable_command_says_so(monkeypatch, capsys):
    """A command whose module lacks ``add_arguments`` is listed, and says it is not available."""
    from nns_cuda.app.commands import fq

    monkeypatch.delattr(fq, "add_arguments")
    rc, _, err = _run(["fq"], capsys)
    assert rc == 2
    assert "nns fq: error" in err and "not available" in err and "add_arguments" in err


def test_python_m_error_path_and_debug(tmp_path):
    """``python -m nns_cuda`` exits non-zero with one line; ``--debug`` adds the traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "nns_cuda", "scan", "--model", "pkg_that_does_not_exist:make", "--out", str(tmp_path)]
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "nns scan: error: cannot load 'pkg_that_does_not_exist:make'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "nns_cuda", "--debug", *base[3:]], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr, r.stderr


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_scan_zoo_model_on_embedded_digits(tmp_path, capsys):
    from nns_cuda import data, models

    m = models.build("simple_cnn", 10, seed=3).eval()
    weights = tmp_path / "w.pt"
    torch.save(m.state_dict(), weights)
    out = tmp_path / "scan"
    rc, stdout, err = _run(["scan", "--model", "simple_cnn", "--weights", str(weights), "--samples", "5", "--batch-size", "2", "--images", "2",
                            "--filters", "3", "--layers", "features.relu1", "features.pool2", "classifier.fc2",
                            "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    meta = json.loads((out / "scan.json").read_text())
    assert meta["samples"] == 5 and [l["layer"] for l in meta["layers"]] == ["features.relu1", "features.pool2",
                                                                             "classifier.fc2"]
    for f in meta["files"]:
        assert (out / f).is_file(), f
    _png(out / "learned_images.png")
    _png(out / "filters_features_relu1.png")
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert [r["neurons"] for r in rows] == ["9000", "360", "10"]     # 10x30x30, 10x6x6, 10
    # the per-neuron CSV: one row per neuron; mean activations equal the model's own
    rows = list(csv.DictReader(open(out / "neurons_classifier_fc2.csv")))
    assert len(rows) == 10
    ds = data.cluttered_digits("test", seed=0)
    x = torch.stack([ds[i][0] for i in range(5)])
    with torch.no_grad():
        ref = m(x).double().mean(0)
    got = torch.tensor([float(r["mean_activation"]) for r in rows], dtype=torch.float64)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (got, ref)
    # completeness (docs/spec.md §1, identity 2): with zero biases a logit's learned image sums to the logit itself
    assert all(float(p.detach().abs().max()) == 0 for n, p in m.named_parameters() if n.endswith("bias"))
    lisum = torch.tensor([float(r["mean_li_sum"]) for r in rows], dtype=torch.float64)
    assert torch.allclose(lisum, ref, rtol=1e-4, atol=1e-5), (lisum, ref)
    assert "wrote" in stdout


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def test_scan_precision_and_conv_algorithm(tmp_path, capsys):
    """--precision / --conv-algorithm reach the engine and are recorded in scan.json (with the
    op each conv ran); the gather's statistics equal the default scan's; a bad combination is
    an error that names the option."""
    from nns_cuda import models

    weights = tmp_path / "w.pt"
    torch.save(models.build("simple_cnn", 10, seed=4).state_dict(), weights)
    args = ["scan", "--model", "simple_cnn", "--weights", str(weights), "--samples", "3", "--images", "0",
            "--layers", "features.relu1", "features.relu2", "--no-progress"]
    rc, _, err = _run(args + ["--out", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    rc, _, err = _run(args + ["--out", str(tmp_path / "b"), "--conv-algorithm", "gather", "--precision", "fp32"],
                      capsys)
    assert rc == 0, err
    a = json.loads((tmp_path / "a" / "scan.json").read_text())
    b = json.loads((tmp_path / "b" / "scan.json").read_text())
    assert (a["precision"], a["conv_algorithm"]) == ("fp32", "direct")
    assert (b["precision"], b["conv_algorithm"]) == ("fp32", "gather")
    assert set(b["conv_algorithms"].values()) == {"gather"} and set(a["conv_algorithms"].values()) == {"direct"}
    for ra, rb in zip(csv.DictReader(open(tmp_path / "a" / "layers.csv")),
                      csv.DictReader(open(tmp_path / "b" / "layers.csv"))):
        for k in ("mean_activation", "count_ratio", "strength_ratio"):
            assert float(ra[k]) == pytest.approx(float(rb[k]), rel=1e-4), k
    rc, _, err = _run(args + ["--out", str(tmp_path / "c"), "--precision", "tf32"], capsys)
    assert rc != 0 and "tf32" in err and "CUDA" in err


def test_scan_saved_model_on_an_image_folder(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    model_file = tmp_path / "tiny.pt"
    torch.save(_Tiny().eval(), model_file)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        arr = (torch.rand(10, 12) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr, mode="L").save(folder / f"im{i}.png")
    out = tmp_path / "out"
    rc, _, err = _run(["scan", "--model", str(model_file), "--data", str(folder), "--in-channels", "1",
                       "--input-size", "8", "--layers", "relu", "fc", "--out", str(out), "--no-progress",
                       "--backend", "reference"], capsys)
    assert rc == 0, err
    meta = json.loads((out / "scan.json").read_text())
    assert meta["samples"] == 3 and meta["backend"] == "reference"
    assert "3 image(s)" in meta["data"] and "8x8" in meta["data"]
    rows = list(csv.DictReader(open(out / "neurons_relu.csv")))
    assert len(rows) == 3 * 6 * 6 and rows[7]["index"] == "0:1:1"
    _png(out / "learned_images.png")


def test_train_command(tmp_path, capsys):
    """``nns train`` trains a zoo model with per-epoch checkpoints; a bad model name is one line, exit 2."""
    import argparse

    from nns_cuda.app.commands import train as train_cmd

    cache = tmp_path / "cache"
    parser = train_cmd.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--n-train", "20", "--epochs", "2", "--model", "lenet5",
                              "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "10",
                              "--checkpoint-dir", str(tmp_path / "run"), "--cache-dir",
                              str(cache), "--no-progress", "--num-threads", "1"])
    assert train_cmd.run(args) == 0
    out = capsys.readouterr().out
    assert "well-trained (best val acc)" in out and str(tmp_path / "run" / "epoch_002.pt") in out
    assert (tmp_path / "run" / "curve.png").is_file()
    args = parser.parse_args(["--model", "resnet19", "--checkpoint-dir", str(tmp_path / "x"),
                              "--cache-dir", str(cache), "--n-train", "20"])
    assert train_cmd.run(args) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet19'" in err and "resnet18_cifar" in err
    assert err.startswith("nns train: error:") and err.strip().count("\n") == 0, err


def test_bench_runs_the_suite_as_a_process(capfd):
    """``nns bench`` passes its options to ``python -m benchmarks.run`` in a separate process (the
    package does not import the benchmarks) and returns its exit status."""
    imported = "benchmarks.run" in sys.modules
    assert cli.main(["bench", "--", "--list"]) == 0
    out = capfd.readouterr().out
    assert "vgg16_32" in out and "tiny" in out
    assert ("benchmarks.run" in sys.modules) == imported


def test_bench_without_a_checkout_says_so(tmp_path, monkeypatch, capsys):
    from nns_cuda.app.commands import bench

    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site" / "nns_cuda" / "app" / "commands" / "bench.py"))
    rc, _, err = _run(["bench", "--quick"], capsys)
    assert rc == 2 and err.startswith("nns bench: error: nns bench needs a source checkout"), err


# ----------------------------------------------------------------------------- consistency of the commands
def _subparsers():
    import argparse

    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_help_and_out_is_a_folder():
    import argparse
    import re

    for name, sp in _subparsers().items():
        for a in sp._actions:
            assert a.help and a.help != argparse.SUPPRESS, (name, a.option_strings)
            words = set(re.findall(r"[a-z0-9]+", a.help.lower()))
            assert words - set(re.findall(r"[a-z0-9]+", " ".join(a.option_strings + [a.dest]).lower())), \
                f"nns {name} {a.option_strings}: the help only repeats the name: {a.help!r}"
            if "--out" in a.option_strings:
                assert "folder" in a.help and not str(a.default).endswith(".json"), (name, a.help, a.default)
            if "--max-samples" in a.option_strings:  # one name for the sample count: --samples
                assert a.dest == "samples" and "deprecated" in a.help and "--samples" in a.help, name


@pytest.mark.parametrize("cmd", ["fq", "gmm"])
def test_max_samples_is_a_deprecated_alias_of_samples(cmd, capsys):
    sp = _subparsers()[cmd]
    a = sp.parse_args(["--max-samples", "12"])
    assert a.samples == 12 and not hasattr(a, "max_samples")
    err = capsys.readouterr().err
    assert f"nns {cmd}: --max-samples is deprecated; use --samples" in err
    assert sp.parse_args(["--samples", "7"]).samples == 7 and capsys.readouterr().err == ""


def test_scan_without_weights_says_the_weights_are_random(tmp_path, capsys):
    args = ["scan", "--model", "simple_cnn", "--samples", "2", "--images", "0", "--layers", "features.relu1",
            "--no-progress", "--out", str(tmp_path / "a")]
    rc, _, err = _run(args, capsys)
    assert rc == 0, err
    assert "nns scan: no --weights given: simple_cnn has random weights" in err
    weights = tmp_path / "w.pt"
    from nns_cuda import models

    torch.save(models.build("simple_cnn", 10, seed=0).state_dict(), weights)
    rc, _, err = _run(args[:-1] + [str(tmp_path / "b"), "--weights", str(weights)], capsys)
    assert rc == 0 and "random" not in err, err


def test_scan_folder_reports_skipped_files_and_resized_images(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(8, 8), (8, 8), (14, 12)]):
        Image.fromarray((torch.rand(h, w) * 255).to(torch.uint8).numpy(), mode="L").save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "labels.csv").write_text("a,b")
    model_file = tmp_path / "tiny.pt"
    torch.save(_Tiny().eval(), model_file)
    out = tmp_path / "out"
    rc, _, err = _run(["scan", "--model", str(model_file), "--data", str(folder), "--in-channels", "1",
                       "--layers", "relu", "--images", "0", "--out", str(out), "--no-progress"], capsys)
    assert rc == 0, err
    assert "skipped 2 file(s) that are not images: labels.csv, notes.txt" in err, err
    assert "resized 1 of 3 image(s) to 8x8: im2.png (14x12)" in err, err
    meta = json.loads((out / "scan.json").read_text())
    assert "1 resized" in meta["data"] and "2 non-image file(s) skipped" in meta["data"]


def _one_line_error(err: str, start: str) -> None:
    lines = [l for l in err.splitlines() if l.strip() and "%|" not in l and "batch/s" not in l
             and "not given, using" not in l and "random weights" not in l]
    assert len(lines) == 1 and lines[0].startswith(start), err
    assert len(lines[0]) < 250 and "weights_only" not in lines[0] and "miniz" not in lines[0], lines[0]


def test_damaged_files_give_one_line_of_ours(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    trunc = tmp_path / "trunc.pt"
    torch.save({"w": torch.zeros(3)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:100])
    objects = tmp_path / "objects.pt"
    torch.save({"m": _Tiny()}, objects)
    for f in (bad, trunc, objects):
        rc, _, err = _run(["scan", "--model", "simple_cnn", "--weights", str(f), "--out", str(tmp_path / "o")], capsys)
        assert rc == 2
        _one_line_error(err, f"nns scan: error: cannot read weights file {f}")
        rc, _, err = _run(["gmm", "--images", str(f), "--out", str(tmp_path / "o")], capsys)
        assert rc == 2
        _one_line_error(err, f"nns gmm: error: --images {f}: cannot read it")
        rc, _, err = _run(["tip", "--model", "simple_cnn", "--checkpoints", str(f), "--samples", "4", "--no-aipc",
                           "--no-progress", "--out", str(tmp_path / "o")], capsys)
        assert rc == 2
        _one_line_error(err, f"nns tip: error: --checkpoints {f}: cannot read it")


def test_scan_prints_the_time_the_user_waited(tmp_path, capsys, monkeypatch):
    """The time printed covers the whole command (figures included) and names its parts."""
    import re
    import time

    from nns_cuda.app.commands import scan

    def slow_figures(*a, **k):
        time.sleep(1.0)
        return []

    monkeypatch.setattr(scan, "_scan_figures", slow_figures)
    t0 = time.perf_counter()
    rc, out, err = _run(["scan", "--model", "simple_cnn", "--samples", "2", "--layers", "features.relu1",
                         "--no-progress", "--out", str(tmp_path)], capsys)
    wall = time.perf_counter() - t0
    assert rc == 0, err
    m = re.search(r"in ([0-9.]+) s \(start-up and loading ([0-9.]+) s, scan ([0-9.]+) s, tables and figures ([0-9.]+) s\)",
                  out)
    assert m, out
    total, parts = float(m.group(1)), [float(v) for v in m.groups()[1:]]
    assert wall - 0.3 <= total <= wall + 0.1, (total, wall)
    assert parts[2] >= 0.95 and abs(sum(parts) - total) <= 0.3, (parts, total)
    secs = json.loads((tmp_path / "scan.json").read_text())["seconds"]
    assert set(secs) == {"start-up and loading", "scan", "tables and figures", "total"}


def _train_args(tmp_path, *extra):
    return ["train", "--n-train", "20", "--epochs", "1", "--model", "lenet5", "--optimizer", "adam", "--lr", "1e-3",
            "--batch-size", "10", "--checkpoint-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", "--num-threads", "1", *extra]


def test_train_messages_speak_the_command_line(tmp_path, capsys):
    rc, _, err = _run(_train_args(tmp_path), capsys)
    assert rc == 0, err
    rc, _, err = _run(_train_args(tmp_path), capsys)          # the folder holds checkpoints now
    assert rc == 2 and err.startswith("nns train: error:") and err.strip().count("\n") == 0, err
    assert "--resume" in err and "--overwrite" in err and "--checkpoint-dir" in err, err
    assert "=True" not in err and "checkpoint_dir" not in err, err
    rc, _, err = _run(_train_args(tmp_path, "--resume", "--epochs", "2", "--batch-size", "5"), capsys)
    assert rc == 2 and "--batch-size was 10, now 5" in err and "--overwrite" in err and "=True" not in err, err


def test_interrupted_training_says_to_rerun_with_resume(tmp_path, capsys, monkeypatch):
    from nns_cuda.app.commands import train as train_cmd

    real = train_cmd._datasets

    class Interrupted:
        """The training set, interrupted (Ctrl-C) when the training loop reads it."""

        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            if i == 0:  # the first sample gives the model's input shape
                return self.ds[0]
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "_datasets", lambda args: (Interrupted(real(args)[0]),) + real(args)[1:])
    rc, _, err = _run(_train_args(tmp_path), capsys)
    assert rc == 130
    assert "nns train: interrupted; rerun the same command with --resume" in err, err
    assert str(tmp_path / "run") in err
