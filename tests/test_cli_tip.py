"""``nns tip`` (nns_cuda.app.commands.tip): argument parsing and a run on a small model."""
from __future__ import annotations

import argparse
import json

import torch

from nns_cuda.app.commands import tip as tip_cmd

from test_tip import autograd_filter_images, conv_net, make_data


def _cli_model():
    return conv_net()


def _cli_data():
    return make_data(n_batches=2)


def test_run_tip_cli(tmp_path):
    p = tip_cmd.add_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--model", f"{__name__}:_cli_model", "--data", f"{__name__}:_cli_data", "--layer", "4",
                         "--ratios", "0:1:0.25", "--out", str(tmp_path)])
    args.filter_fn = autograd_filter_images
    assert tip_cmd.run(args) == 0
    out = json.loads((tmp_path / "tip.json").read_text())
    assert set(out) >= {"properties", "aipc", "saliency", "findings"}
    assert out["aipc"]["mean"]["ratios"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    bad = p.parse_args(["--model", f"{__name__}:_cli_model", "--data", f"{__name__}:_cli_data", "--layer", "7",
                        "--out", str(tmp_path)])
    bad.filter_fn = autograd_filter_images
    assert tip_cmd.run(bad) == 2
    bad = p.parse_args(["--model", f"{__name__}:_cli_model", "--data", f"{__name__}:_cli_data", "--layer", "4",
                        "--ratios", "0,150", "--out", str(tmp_path)])
    assert tip_cmd.run(bad) == 2


def test_progress_bars_and_no_progress(tmp_path, capsys):
    """``nns tip`` shows progress bars over the batches of each pass; ``--no-progress`` none; the
    analyses take ``progress=`` (bars on stderr, none with False)."""
    from nns_cuda.analysis import tip

    p = tip_cmd.add_arguments(argparse.ArgumentParser())
    base = ["--model", f"{__name__}:_cli_model", "--data", f"{__name__}:_cli_data", "--layer", "4",
            "--ratios", "0:1:0.5", "--out", str(tmp_path)]
    for extra, shown in (([], True), (["--no-progress"], False)):
        args = p.parse_args(base + extra)
        args.filter_fn = autograd_filter_images
        capsys.readouterr()
        assert tip_cmd.run(args) == 0
        err = capsys.readouterr().err
        for label in ("TIP properties", "aipc: ", "AVoU", "SoU (taylor)"):
            assert (label in err) == shown, (label, extra, err)
    model, data = conv_net(), make_data(n_batches=2)
    for progress in (True, False):
        capsys.readouterr()
        tip.InterpretableProperties("mean", filter_fn=autograd_filter_images, progress=progress).fit(model, data, "4")
        tip.aipc(model, data, "4", torch.arange(6.0), [0, 0.5], progress=progress)
        tip.saliency(model, data, "4", {"mean": torch.arange(6.0)}, progress=progress)
        tip.fg_bg_types(model, data, "4", filter_fn=autograd_filter_images, progress=progress)
        err = capsys.readouterr().err
        for label in ("TIP properties", "aipc: ", "AVoU", "SoU", "fg_bg_types: "):
            assert (label in err) == progress, (label, progress, err)
