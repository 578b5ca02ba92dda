"""``nns demo``: the whole pipeline on the embedded default, then the HTML report."""
from __future__ import annotations

import argparse
import sys
import textwrap
import time

from nns_cuda.app._common import engine_options, guarded

HELP = "run every analysis on the embedded default and write an HTML report"
DESCRIPTION = textwrap.dedent("""\
    Run the whole Neural Network Scanner on the embedded default:

      1. data   "cluttered digits": scikit-learn's handwritten digits placed on 32x32 colour
                clutter (made by code; the digit's bounding box is the foreground)
      2. model  the thesis's Chapter 6 CNN (conv 32-64-64), trained once (a few minutes on
                a CPU) and cached; later runs reuse it
      3. scan   learned images of every layer (Fig. 3-7)
      4. Chapter 3 knowledge quantity, Chapter 4 FQ, Chapter 5 TIP, Chapter 6 GMM
      5. report report.html + PNGs + metrics.json in --out, with a Findings table that
                compares this run with the thesis's seven directional findings

    A stage that cannot run is reported as "not computed: <reason>" in the report.
    """)
EPILOG = "Example: nns demo --out nns_output/demo   (open nns_output/demo/report.html)"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns demo`` options to ``p`` (returns it)."""
    p.add_argument("--out", default="nns_output/demo", help="output folder")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (a few-epoch model, a handful of samples, < 1 minute): checks the pipeline, "
                        "the numbers mean nothing")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="test samples for Chapters 3-5 (default 100; 16 with --quick)")
    p.add_argument("--gmm-samples", type=int, default=None, metavar="N",
                   help="training samples clustered in Chapter 6 (default 200; 24 with --quick)")
    p.add_argument("--cache-dir", default=None, help="cache of data and model (default $NNS_CACHE_DIR or "
                                                     "~/.cache/nns_cuda)")
    p.add_argument("--retrain", action="store_true", help="train the demo model again even if it is cached")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    engine_options(p, batch=None, batch_help="samples per batch (default 64; 16 with --quick)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``nns demo``; prints the findings and where the report is. Returns the exit status."""
    return guarded("demo", args, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from nns_cuda.app.demo import run_demo

    t0 = getattr(args, "started", None) or time.perf_counter()  # from the start of `nns demo`
    out = run_demo(args.out, quick=args.quick, device=args.device, backend=args.backend, batch_size=args.batch_size,
                   max_memory=args.max_memory, samples=args.samples, gmm_samples=args.gmm_samples,
                   cache_dir=args.cache_dir, retrain=args.retrain, progress=not args.no_progress,
                   debug=getattr(args, "debug", False))
    dt = time.perf_counter() - t0
    for f in out.get("findings") or []:
        print(f"  [{f['reproduced']:>12s}] {f['claim']}")
    if out.get("findings"):
        print("nns demo: findings judged on one model and one seed; the declared five-seed protocol is "
              "`nns reproduce` (docs/reproduction.md)")
    if out["errors"]:
        print(f"nns demo: {len(out['errors'])} section(s) not computed: {', '.join(sorted(out['errors']))} "
              "(see the report)", file=sys.stderr)
    print(f"nns demo: wrote {out['report']} and {out['metrics']} in {dt:.0f} s")
    return 0 if out.get("report") else 1
