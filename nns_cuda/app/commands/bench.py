"""``nns bench``: the benchmark suite of a source checkout (``python -m benchmarks.run``).

The benchmarks live beside the package, not in it: this command runs them as a separate
process (``python -m benchmarks.run <options>``, with the checkout first on ``PYTHONPATH`` and
the current folder unchanged, so relative output paths mean what they say) and returns its exit
status.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from nns_cuda.app._common import CLIError, guarded

HELP = "benchmarks (correctness first, then timing)"
DESCRIPTION = textwrap.dedent("""\
    Run the benchmark suite (benchmarks/run.py, in a source checkout). Every option after
    `bench` is passed on; `nns bench -- --help` shows them. Example: nns bench --quick
    """)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns bench`` options to ``p``: everything after ``bench``, passed on as given."""
    p.add_argument("bench_args", nargs="*", metavar="OPTION", help="options of benchmarks/run.py (passed on as given)")
    return p


def checkout_root() -> Path:
    """The source checkout that holds this package and ``benchmarks/run.py``.

    Raises
    ------
    CLIError
        The package is installed without its checkout (the benchmarks are not part of it).
    """
    root = Path(__file__).resolve().parents[3]
    if not (root / "benchmarks" / "run.py").is_file():
        raise CLIError("nns bench needs a source checkout with benchmarks/run.py (the benchmarks are not part of "
                       f"the installed package; looked in {root})")
    return root


def run(args: argparse.Namespace) -> int:
    """Run ``python -m benchmarks.run`` with ``args.bench_args``; returns its exit status
    (2 with one line on stderr when there is no source checkout)."""
    return guarded("bench", args, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    rest = list(args.bench_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    root = checkout_root()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *rest], env=env)
