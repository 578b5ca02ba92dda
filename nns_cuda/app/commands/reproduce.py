"""``nns reproduce``: the declared multi-seed reproduction of the thesis's seven findings."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from typing import Optional

from nns_cuda.app._common import guarded

HELP = "reproduce the thesis's seven findings: the declared protocol, five seeds, verdicts"
DESCRIPTION = textwrap.dedent("""\
    Run the reproduction protocol declared in nns_cuda/analysis/thesis/protocol.json and
    explained in docs/reproduction.md: the thesis's small models (simple CNN 32-64-64 and
    LeNet-5) trained on the embedded cluttered digits until they over-fit, the well-trained
    (best validation accuracy) and over-fitted (last) checkpoints, the seven findings on
    held-out samples, five seeds, and a verdict per finding by the rule written in the
    protocol: "reproduced", "not reproduced", "opposite" or "not computed".

    The full run takes about half an hour on an idle 2-core CPU (a progress bar shows the
    ETA) and writes docs/results/reproduction.json. --quick runs one seed of a small variant
    in under a minute on an idle machine (it checks the pipeline; its numbers say nothing
    about the thesis) and writes nns_output/reproduction_quick.json unless --out says
    otherwise, so that it never replaces the full run's file.
    """)
EPILOG = ("Example: nns reproduce            (then: python -m nns_cuda.analysis.thesis.reproduce "
          "--write-readme README.md)")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns reproduce`` options to ``p`` (returns it)."""
    p.add_argument("--quick", action="store_true",
                   help="one seed of the protocol's small variant (under a minute): checks the pipeline only")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="folder to write reproduction.json in, or a path ending in .json (default: "
                        "docs/results/reproduction.json; nns_output/reproduction_quick.json with --quick)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run only the protocol's first N seeds (recorded as a deviation; default: all 5)")
    p.add_argument("--config", default=None, metavar="FILE", help="another protocol JSON (default: the committed one)")
    p.add_argument("--cache-dir", default=None, help="cache of the rendered data (default $NNS_CACHE_DIR or "
                                                     "~/.cache/nns_cuda)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="keep the training checkpoints here (default: a temporary folder, removed afterwards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``nns reproduce``; prints the verdicts and where the JSON is. Returns the exit status."""
    return guarded("reproduce", args, lambda: _run(args))


def _out_path(out: Optional[str], quick: bool) -> str:
    """The JSON file: ``out`` when it ends in ``.json``, else ``reproduction.json`` in the folder
    ``out`` (``reproduction_quick.json`` with ``quick``); the defaults without ``out``."""
    from nns_cuda.analysis.thesis import reproduce as rp

    default = rp.QUICK_OUT if quick else rp.DEFAULT_OUT
    if out is None:
        return default
    return out if out.lower().endswith(".json") else os.path.join(out, os.path.basename(default))


def _run(args: argparse.Namespace) -> int:
    from nns_cuda.analysis.thesis import reproduce as rp

    t0 = getattr(args, "started", None) or time.perf_counter()  # from the start of `nns reproduce`
    out = rp.reproduce(args.config, seeds=args.seeds, quick=args.quick, progress=not args.no_progress,
                       cache_dir=args.cache_dir, work_dir=args.work_dir, debug=getattr(args, "debug", False))
    path = rp.write_json(out, _out_path(args.out, args.quick))
    for f in out["findings"]:
        models = ", ".join(f"{b['label']} {b['verdict']} ({b['n_holds']}/{b['n_seeds']} seeds)"
                           for b in f["by_model"].values())
        print(f"  [{f['verdict']:>14s}] {f['claim']} — {models}")
    if out["errors"]:
        print(f"nns reproduce: {len(out['errors'])} stage(s) failed: "
              + "; ".join(f"{k}: {v}" for k, v in sorted(out["errors"].items())), file=sys.stderr)
    if out["deviations"]:
        print("nns reproduce: not the declared protocol: " + "; ".join(out["deviations"]), file=sys.stderr)
    print(f"nns reproduce: wrote {path} in {time.perf_counter() - t0:.0f} s")
    return 0
