"""``nns merge``: merge the block files of a data-set scan (after ``--shard`` runs)."""
from __future__ import annotations

import argparse
import sys
import textwrap

from nns_cuda.app._common import guarded

HELP = "merge the blocks of a sharded data-set scan into result.safetensors"
DESCRIPTION = textwrap.dedent("""\
    Merge the finished blocks of `nns scan-dataset --shard i/n` runs, in block order, into
    OUT/result.safetensors (the same file a single run writes). Every block file is checked
    against the checksum in OUT/manifest.json; a missing block is reported.
    """)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns merge`` arguments to ``p`` (returns it)."""
    p.add_argument("out", metavar="OUT", help="the scan's output folder")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``nns merge``. Returns the exit status."""
    def go():
        from nns_cuda.engine.dataset_scan import merge_scan

        res = merge_scan(args.out)
        print(f"nns merge: wrote {args.out}/result.safetensors ({res.samples} samples, "
              f"{len(res.manifest['blocks_done'])} blocks)", file=sys.stderr)
        return 0
    return guarded("merge", args, go)
