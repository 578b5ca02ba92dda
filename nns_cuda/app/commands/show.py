"""``nns show``: a summary of a data-set scan, and one CSV of the neurons per layer."""
from __future__ import annotations

import argparse
import os
import textwrap

from nns_cuda.app._common import guarded

HELP = "summarise a data-set scan (table per layer, neuron CSVs)"
DESCRIPTION = textwrap.dedent("""\
    Print one row per layer of the scan in OUT (neurons, samples, mean activation, fraction of
    active neurons, largest activation) and write OUT/neurons_<layer>.csv with one row per
    neuron (mean, standard deviation, active fraction, maximum and its sample, mean fused
    statistics).
    """)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns show`` arguments to ``p`` (returns it)."""
    p.add_argument("out", metavar="OUT", help="the scan's output folder")
    p.add_argument("--no-csv", action="store_true", help="print the table only")
    return p


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def run(args: argparse.Namespace) -> int:
    """Run ``nns show``. Returns the exit status."""
    def go():
        from nns_cuda.engine.dataset_scan import load_scan

        res = load_scan(args.out)
        rows = res.summary()
        head = f"{'layer':<28} {'shape':<14} {'neurons':>9} {'samples':>8} {'mean act':>10} {'active':>7} {'max act':>10}"
        print(head)
        for r in rows:
            print(f"{r['layer']:<28} {'x'.join(map(str, r['shape'])):<14} {r['neurons']:>9} {r['samples']:>8} "
                  f"{r['mean_activation']:>10.4g} {r['active_fraction']:>7.1%} {r['max_activation']:>10.4g}")
        if not args.no_csv:
            for r in rows:
                path = res.write_neuron_csv(r["layer"], os.path.join(args.out, f"neurons_{_safe(r['layer'])}.csv"))
                print(f"wrote {path}")
        return 0
    return guarded("show", args, go)
