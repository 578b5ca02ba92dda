"""``nns`` — the command line of the Neural Network Scanner (also ``python -m nns_cuda``).

    nns demo                      everything on the embedded default data, then an HTML report
    nns scan  --model NAME ...    learned images + statistics of chosen layers
    nns scan-dataset | merge | show   per-neuron statistics of a whole data set (resumable)
    nns fq | tip | gmm ...        the thesis's analyses (Chapters 4, 5, 6)
    nns train ...                 train a zoo model with per-epoch checkpoints
    nns bench ...                 the benchmark suite (benchmarks/run.py)

Each command is a module of :mod:`nns_cuda.app.commands` with ``HELP`` (one line),
``DESCRIPTION``, optionally ``EPILOG``, ``add_arguments(parser)`` and ``run(args) -> int``; this
module holds the top parser, the command table (:data:`COMMANDS`) and the error handling.

Errors print one line (``nns <command>: error: …``) and exit with a non-zero status (2 for bad
input, 1 for other failures); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import time
from typing import List, Optional, Sequence, Tuple

from nns_cuda.app._common import BAD_INPUT, CLIError, error_line

__all__ = ["main", "build_parser", "COMMANDS"]

PROG = "nns"

#: The command table, in the order ``nns --help`` lists them: ``nns <name>`` runs the module
#: ``nns_cuda.app.commands.<name with "-" as "_">``.
COMMANDS: Tuple[str, ...] = ("demo", "reproduce", "scan", "scan-dataset", "merge", "show", "fq", "tip", "gmm", "train", "bench")

#: Commands that pass everything after their name on unparsed (in ``args.bench_args``).
_PASS_THROUGH = ("bench",)

_EPILOG = textwrap.dedent("""\
    Start with `nns demo` (or `make demo`): it trains a small CNN on the embedded "cluttered
    digits" data (once; cached afterwards), runs every analysis and writes
    nns_output/demo/report.html. `nns <command> --help` explains each command.
    """)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the descriptions' line breaks; show a default when it says something (not None / False)
    and the help text does not already mention one."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("default" in h.lower() or d is None or d is False or d == argparse.SUPPRESS or action.nargs == 0
                or not action.option_strings):
            return h
        return h + " (default: %(default)s)"


# ============================================================================================
# parser
# ============================================================================================
def _debug_flag(p: argparse.ArgumentParser, top: bool) -> None:
    # the sub-command copy must not overwrite a --debug given before the sub-command
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show the full traceback on errors")


def _add_command(sub, name: str) -> None:
    """The sub-parser of ``nns <name>`` from its module; a module that cannot be imported or lacks
    ``add_arguments`` still gets a parser, and running it says why it is not available."""
    path = f"nns_cuda.app.commands.{name.replace('-', '_')}"
    note = None
    try:
        mod = importlib.import_module(path)
    except Exception as e:  # a broken command must not break `nns --help`
        mod, note = None, f"{path} could not be imported: {type(e).__name__}: {e}"
    p = sub.add_parser(name, formatter_class=HelpFormatter, help=getattr(mod, "HELP", f"(not available: {note})"),
                       description=getattr(mod, "DESCRIPTION", None), epilog=getattr(mod, "EPILOG", None))
    if mod is not None:
        add = getattr(mod, "add_arguments", None)
        if add is None:
            note = f"{path}.add_arguments is not available in this build"
        else:
            try:
                add(p)
            except Exception as e:
                note = f"{path}.add_arguments failed: {type(e).__name__}: {e}"
    _debug_flag(p, False)
    p.set_defaults(_command_module=mod, _unavailable=note)


def build_parser() -> argparse.ArgumentParser:
    """The ``nns`` argument parser (one sub-command per entry of :data:`COMMANDS`)."""
    from nns_cuda._version import __version__

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=HelpFormatter,
        description="Neural Network Scanner: the exact learned image of every neuron of a CNN, and the "
                    "thesis's analyses built on them (knowledge quantity, FQ, TIP, GMM anomaly filters).",
        epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"nns_cuda {__version__}")
    _debug_flag(p, True)
    sub = p.add_subparsers(dest="command", metavar="<command>", help="the command to run (`nns <command> --help`)")
    for name in COMMANDS:
        _add_command(sub, name)
    return p


# ============================================================================================
# entry point
# ============================================================================================
def _split_pass_through(argv: List[str]) -> Optional[Tuple[List[str], List[str]]]:
    """``(argv up to and including the command, the rest)`` when the command passes its options on
    unparsed and the rest is not just a request for the command's own help; else None."""
    for i, a in enumerate(argv):
        if a == "--":
            return None
        if a.startswith("-"):
            continue
        if a not in _PASS_THROUGH:
            return None
        rest = argv[i + 1:]
        if rest and all(r in ("-h", "--help") for r in rest):
            return None
        return argv[: i + 1], rest
    return None


def _run(args: argparse.Namespace) -> int:
    if args._unavailable:
        raise NotImplementedError(f"nns {args.command} is not available: {args._unavailable}")
    run = getattr(args._command_module, "run", None)
    if run is None:
        raise NotImplementedError(f"nns {args.command} is not available: "
                                  f"{args._command_module.__name__}.run is missing")
    return int(run(args) or 0)


def process_started() -> Optional[float]:
    """The ``time.perf_counter()`` value of this process's start (read from ``/proc``), or None
    where the operating system does not say."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): start time in ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.perf_counter() - age if 0 <= age < 366 * 86400 else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``nns`` command line; returns the exit status (also used by ``python -m nns_cuda``).

    ``args.started`` is a ``time.perf_counter()`` value from which a command times what the user
    waits for: the start of the process when this is the program (``argv`` None: the ``nns``
    command, ``python -m nns_cuda``; interpreter start-up and imports included), else the start
    of this call."""
    started = time.perf_counter()
    if argv is None:
        started = min(started, process_started() or started)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    split = _split_pass_through(argv)
    if split is not None:  # everything after e.g. `bench` belongs to benchmarks/run.py
        head, rest = split
        args = parser.parse_args(head)
        args.debug = bool(getattr(args, "debug", False)) or "--debug" in rest
        args.bench_args = [a for a in rest if a != "--debug"]
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.started = started
    debug = bool(getattr(args, "debug", False))
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:
        if debug:
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 2 if isinstance(e, (CLIError,) + BAD_INPUT) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
