"""``nns gmm`` (nns_cuda.app.commands.gmm): argument parsing and runs on saved filter images."""
from __future__ import annotations

import argparse
import json

import torch

from nns_cuda.app.commands import gmm as gmm_cmd

from test_gmm import autograd_filter_images, image_data, tiny_cnn


def test_gmm_command_on_saved_filter_images(tmp_path):
    wt = tiny_cnn(seed=7)
    # saved filter images ([S, C, ...] as the engine returns them)
    _, x, _ = image_data(n=48, seed=3)
    blob = {"filter_images": autograd_filter_images(wt, x, "relu2").float(),
            "mean_activation": torch.rand(6)}
    torch.save(blob, tmp_path / "imgs.pt")
    parser = gmm_cmd.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--images", str(tmp_path / "imgs.pt"), "--out", str(tmp_path), "--k-max", "3"])
    assert gmm_cmd.run(args) == 0
    d = json.loads((tmp_path / "gmm.json").read_text())
    assert d["n_filters"] == 6 and len(d["k"]) == 6
    args = parser.parse_args(["--out", str(tmp_path)])
    assert gmm_cmd.run(args) == 2  # no input: an error message, not a traceback
    # options the main CLI already defines are reused, not re-added (no argparse conflict)
    main = argparse.ArgumentParser()
    main.add_argument("--out")
    main.add_argument("--seed", type=int, default=3)
    main.add_argument("--layer")
    gmm_cmd.add_arguments(main)
    a = main.parse_args(["--images", str(tmp_path / "imgs.pt"), "--out", str(tmp_path / "o2"), "--k-max", "3",
                         "--plot", "--lam", "40"])
    assert gmm_cmd.run(a) == 0
    d = json.loads((tmp_path / "o2" / "gmm.json").read_text())
    assert d["params"]["seed"] == 3 and d["params"]["lam"] == 40
    assert all((tmp_path / "o2" / f"gmm_filter_{f}.png").exists() for f in d["anomaly_filters"])


def test_gmm_command_on_a_model_and_data(tmp_path):
    model = tiny_cnn(seed=7)
    batches, _, _ = image_data(n=48, bs=16, seed=3)
    args = gmm_cmd.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--layer", "relu2", "--out", str(tmp_path), "--k-max", "3"])
    assert gmm_cmd.run(args, model=model, data=batches) == 0
    d = json.loads((tmp_path / "gmm.json").read_text())
    assert d["layer"] == "relu2" and d["n_filters"] == 6 and d["n_samples"] == 48
    args = gmm_cmd.add_arguments(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path)])
    assert gmm_cmd.run(args, model=model, data=batches) == 2  # no --layer: an error message


def test_progress_bar_and_no_progress(tmp_path, capsys):
    """``nns gmm`` on a model shows a progress bar over the batches; ``--no-progress`` none;
    ``GMMAnalysis(progress=False)`` none."""
    from nns_cuda.analysis import gmm

    model = tiny_cnn(seed=7)
    batches, _, _ = image_data(n=48, bs=16, seed=3)
    p = gmm_cmd.add_arguments(argparse.ArgumentParser())
    for extra, shown in (([], True), (["--no-progress"], False)):
        capsys.readouterr()
        assert gmm_cmd.run(p.parse_args(["--layer", "relu2", "--out", str(tmp_path), "--k-max", "3", *extra]),
                           model=model, data=batches) == 0
        assert ("GMM filter images" in capsys.readouterr().err) == shown, extra
    for progress in (True, False):
        gmm.GMMAnalysis(k_max=3, progress=progress).fit(model, batches, "relu2")
        assert ("GMM filter images" in capsys.readouterr().err) == progress


def test_samples_counts_the_clustered_samples(tmp_path, capsys):
    """``--samples`` (and its deprecated alias ``--max-samples``) cuts the caller's data."""
    model = tiny_cnn(seed=7)
    batches, _, _ = image_data(n=48, bs=16, seed=3)
    p = gmm_cmd.add_arguments(argparse.ArgumentParser())
    for opt in ("--samples", "--max-samples"):
        args = p.parse_args(["--layer", "relu2", "--out", str(tmp_path), "--k-max", "3", opt, "20", "--no-progress"])
        assert gmm_cmd.run(args, model=model, data=batches) == 0
        assert json.loads((tmp_path / "gmm.json").read_text())["n_samples"] == 20
