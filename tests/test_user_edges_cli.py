"""Rough edges of the ``nns`` command line and its analyses, as a user meets them: progress bars
that ``--no-progress`` really turns off (also in ``nns fq --findings``), one name for each option
(``--samples``; ``--out`` is a folder), damaged ``--weights`` files as one line of ours that says
how to make a good one, what an interrupted ``nns train --overwrite`` should be rerun with, and
the time ``nns scan`` prints counting from the start of the process.

Related checks live beside the code they test: ``tests/test_cli.py`` (help text of every option,
random weights, image folders, the scan's time in-process), ``tests/test_cli_fq.py`` /
``test_cli_tip.py`` / ``test_cli_gmm.py`` (progress bars of each estimator),
``tests/test_report.py`` / ``test_viz.py`` (figures) and ``tests/test_readme.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from nns_cuda.app import cli
from nns_cuda.app._common import DeprecatedAlias

ROOT = Path(__file__).resolve().parent.parent
BAR = re.compile(r"\d+%\||\d+it \[|batch/s|s/batch")


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _subparsers():
    p = cli.build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _digit_batches(n_batches=1, bs=4):
    from nns_cuda import data

    ds = data.cluttered_digits("test")
    return [tuple(torch.stack(t) if isinstance(t[0], torch.Tensor) else torch.tensor(t)
                  for t in zip(*[ds[i] for i in range(s, s + bs)])) for s in range(0, n_batches * bs, bs)]


# ----------------------------------------------------------------------------- progress bars
def test_thesis_findings_take_progress(capsys):
    """``chapter4.findings`` and ``chapter5.findings`` pass ``progress`` to every analysis they
    run: bars on stderr with True, none at all with False."""
    from nns_cuda import models
    from nns_cuda.analysis.thesis import chapter4, chapter5

    model = models.build("simple_cnn", 10, seed=0).eval()
    batches = _digit_batches(bs=2)
    labels4 = ("FeatureMapCorrelation", "Top2IoU", "FQ", "loss", "localisation IoU")
    labels5 = ("TIP properties", "AVoU", "SoU (taylor)", "fg_bg_types")
    for progress in (True, False):
        capsys.readouterr()
        chapter4.findings(model, batches, fq_layers=["features.relu3"],
                          depth_layers=["features.relu3"], diversity_layer="features.relu3",
                          n_mask=2, ablation=False, progress=progress)
        chapter5.findings(model, batches, "features.relu3", progress=progress)
        err = capsys.readouterr().err
        for label in labels4 + labels5:
            assert (label in err) == progress, (label, progress, err[-2000:])
        assert bool(BAR.search(err)) == progress, err[-2000:]


def test_fq_findings_passes_no_progress_on(tmp_path, capsys, monkeypatch):
    """``nns fq --findings --no-progress`` turns the bars of the findings off (the flag reached
    only the plain FQ run before)."""
    from nns_cuda import models
    from nns_cuda.analysis.thesis import chapter4

    w = tmp_path / "w.pt"
    torch.save(models.build("simple_cnn", 10, seed=0).state_dict(), w)
    seen = []
    monkeypatch.setattr(chapter4, "findings", lambda *a, **k: seen.append(k.get("progress", "not passed")) or {})
    base = ["fq", "--findings", "--model", "simple_cnn", "--weights", str(w), "--samples", "4", "--out",
            str(tmp_path / "fq")]
    for extra, want in (([], True), (["--no-progress"], False)):
        rc, _, err = _run(base + extra, capsys)
        assert rc == 0, err
        assert seen.pop() is want, extra
    helps = {a.dest: a.help for a in _subparsers()["fq"]._actions}
    assert "(FQ without --findings)" not in helps["no_progress"]


# ----------------------------------------------------------------------------- option names
def test_one_name_for_the_sample_count():
    """Every command that takes a number of samples calls it ``--samples``; the other names
    (``--max-samples``, ``--limit``) are deprecated aliases that store into ``samples``."""
    old_names = {"--max-samples", "--limit", "--n-samples", "--num-samples"}
    with_samples = []
    for name, sp in _subparsers().items():
        for a in sp._actions:
            olds = old_names & set(a.option_strings)
            if olds:
                assert isinstance(a, DeprecatedAlias) and a.dest == "samples" and a.new == "--samples", \
                    (name, a.option_strings)
            if a.dest == "samples" and not isinstance(a, DeprecatedAlias):
                assert a.option_strings == ["--samples"], (name, a.option_strings)
                with_samples.append(name)
    assert {"scan", "scan-dataset", "fq", "tip", "gmm", "demo"} <= set(with_samples)


def test_scan_dataset_samples_and_its_old_name(tmp_path, capsys):
    """``nns scan-dataset --samples N`` scans N samples; ``--limit N`` still works and says it
    is deprecated; the random weights are said once."""
    from nns_cuda.engine.dataset_scan import load_scan

    base = ["scan-dataset", "--model", "simple_cnn", "--layers", "features.relu1", "--block-size", "4",
            "--batch-size", "4", "--no-progress"]
    rc, _, err = _run(base + ["--samples", "4", "--out", str(tmp_path / "a")], capsys)
    assert rc == 0, err
    assert load_scan(str(tmp_path / "a")).samples == 4
    assert err.count("has random weights") == 1, err
    rc, _, err = _run(base + ["--limit", "4", "--out", str(tmp_path / "b")], capsys)
    assert rc == 0, err
    assert "nns scan-dataset: --limit is deprecated; use --samples" in err, err
    assert load_scan(str(tmp_path / "b")).samples == 4
    rc, _, err = _run(base + ["--samples", "0", "--out", str(tmp_path / "c")], capsys)
    assert rc == 2 and "--samples must be at least 1" in err, err


def test_fq_out_is_a_folder_and_says_what_to_pass(tmp_path, capsys):
    """``nns fq --out x.json`` is refused at once with the fix (a folder); the help says so."""
    rc, _, err = _run(["fq", "--out", str(tmp_path / "result.json")], capsys)
    assert rc == 2
    assert err.strip() == (f"nns fq: error: --out names a folder (nns fq writes OUT/fq.json); got "
                           f"{str(tmp_path / 'result.json')!r}, a file name: pass a folder, e.g. --out "
                           f"{tmp_path / 'result'}"), err
    out_help = next(a.help for a in _subparsers()["fq"]._actions if "--out" in a.option_strings)
    assert "folder" in out_help and "fq.json" in out_help and ".json is refused" in out_help


# ----------------------------------------------------------------------------- damaged weights
def _damaged_files(tmp_path):
    """``{what: path}`` of files that are not loadable state dicts."""
    files = {}
    (tmp_path / "tiny.pt").write_bytes(b"junk")                        # shorter than torch's header
    files["four bytes"] = tmp_path / "tiny.pt"
    (tmp_path / "empty.pt").write_bytes(b"")
    files["empty"] = tmp_path / "empty.pt"
    with zipfile.ZipFile(tmp_path / "other.zip.pt", "w") as z:         # a zip, but not torch.save's
        z.writestr("notes.txt", "hello")
    files["zip"] = tmp_path / "other.zip.pt"
    with open(tmp_path / "pickled.pt", "wb") as f:                     # plain pickle (torch warns about it)
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=4)
    files["pickle"] = tmp_path / "pickled.pt"
    torch.save([torch.zeros(2)], tmp_path / "list.pt")                 # torch.save'd, but not a state dict
    files["list"] = tmp_path / "list.pt"
    return files


def test_damaged_weights_are_one_line_that_says_how_to_make_one(tmp_path, capsys):
    for what, f in _damaged_files(tmp_path).items():
        rc, _, err = _run(["scan", "--model", "simple_cnn", "--weights", str(f), "--out", str(tmp_path / "o")],
                          capsys)
        assert rc == 2, (what, err)
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1, (what, err)
        line = lines[0]
        assert line.startswith("nns scan: error: ") and str(f) in line, (what, line)
        assert "torch.save(model.state_dict(), PATH)" in line and "nns train" in line, (what, line)
        assert "Traceback" not in line and "weights_only" not in line and "(run with --debug" not in line, line
        if what != "list":
            assert "not a file written by torch.save, or it is damaged" in line, (what, line)


def test_damaged_images_file_is_not_called_python_objects(tmp_path, capsys):
    """``nns gmm --images`` on a zip that ``torch.save`` did not write: "damaged", not "holds
    Python objects"; torch's warnings do not reach the terminal."""
    files = _damaged_files(tmp_path)
    for what in ("four bytes", "zip", "pickle"):
        rc, _, err = _run(["gmm", "--images", str(files[what]), "--out", str(tmp_path / "o")], capsys)
        assert rc == 2
        assert err.strip() == (f"nns gmm: error: --images {files[what]}: cannot read it: not a file written by "
                               "torch.save, or it is damaged"), (what, err)


# ----------------------------------------------------------------------------- nns train
def test_interrupted_overwrite_run_says_resume_in_place_of_overwrite(tmp_path, capsys, monkeypatch):
    """A run started with ``--overwrite`` would start afresh again if rerun with both flags: the
    message says to put ``--resume`` in place of ``--overwrite``."""
    from nns_cuda.app.commands import train as train_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "_run", interrupted)
    base = ["train", "--checkpoint-dir", str(tmp_path / "run"), "--no-progress"]
    rc, _, err = _run(base + ["--overwrite"], capsys)
    assert rc == 130
    assert err.strip() == (f"nns train: interrupted; rerun the same command with --resume in place of --overwrite "
                           f"to continue from the last finished epoch (checkpoints in {tmp_path / 'run'})"), err
    rc, _, err = _run(base, capsys)
    assert rc == 130 and "rerun the same command with --resume to continue" in err, err


# ----------------------------------------------------------------------------- the time nns scan prints
def test_process_started_is_before_now():
    import time

    t = cli.process_started()
    if not os.path.exists("/proc/self/stat"):
        assert t is None
        return
    assert t is not None and t <= time.perf_counter()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process start is read from /proc")
def test_scan_time_counts_from_the_start_of_the_process(tmp_path):
    """Run as a program, ``nns scan`` prints the time since the process started: interpreter
    start-up and imports included (here, a 2-second pause before the imports)."""
    child = textwrap.dedent(f"""\
        import sys, time
        t0 = time.perf_counter()
        time.sleep(2.0)
        from nns_cuda.app.cli import main
        sys.argv = ["nns", "scan", "--model", "simple_cnn", "--samples", "2", "--layers", "features.relu1",
                    "--images", "0", "--no-progress", "--out", {str(tmp_path)!r}]
        rc = main()
        print(f"CHILD_ELAPSED {{time.perf_counter() - t0:.3f}}", file=sys.stderr)
        sys.exit(rc)
        """)
    r = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"in ([0-9.]+) s \(start-up and loading ([0-9.]+) s, ", r.stdout)
    assert m, r.stdout
    total, startup = float(m.group(1)), float(m.group(2))
    child_elapsed = float(re.search(r"CHILD_ELAPSED ([0-9.]+)", r.stderr).group(1))
    # everything the child did after its first line is in the printed total (plus the interpreter's start)
    assert total >= child_elapsed - 0.15, (total, child_elapsed)
    assert startup >= 2.0, startup
    total_json = json.loads((tmp_path / "scan.json").read_text())["seconds"]["total"]
    assert total_json >= 2.0 and abs(total_json - total) < 0.2, (total_json, total)
