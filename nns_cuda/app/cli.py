"""``nns`` — the command line of the Neural Network Scanner (also ``python -m nns_cuda``).

    nns demo                      everything on the embedded default data, then an HTML report
    nns scan  --model NAME ...    learned images + statistics of chosen layers
    nns fq | tip | gmm ...        the thesis's analyses (Chapters 4, 5, 6)
    nns train ...                 train a zoo model with per-epoch checkpoints
    nns bench ...                 the benchmark suite (benchmarks/run.py)

Errors print one line (``nns <command>: error: …``) and exit with a non-zero status (2 for bad
input, 1 for other failures); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser"]

PROG = "nns"

#: Exceptions that mean "the input was wrong" (exit status 2); anything else exits with 1.
_BAD_INPUT = (ValueError, KeyError, TypeError, FileNotFoundError, IndexError, NotImplementedError, ImportError)

_EPILOG = textwrap.dedent("""\
    Start with `nns demo` (or `make demo`): it trains a small CNN on the embedded "cluttered
    digits" data (once; cached afterwards), runs every analysis and writes
    nns_output/demo/report.html. `nns <command> --help` explains each command.
    """)


class _Fmt(argparse.RawDescriptionHelpFormatter):
    """Keep the descriptions' line breaks; show a default when it says something (not None / False)
    and the help text does not already mention one."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if ("default" in h.lower() or d is None or d is False or d == argparse.SUPPRESS or action.nargs == 0
                or not action.option_strings):
            return h
        return h + " (default: %(default)s)"


class CLIError(Exception):
    """A user-facing error (printed as one line, exit status 2)."""


# ============================================================================================
# parser
# ============================================================================================
def _debug_flag(p: argparse.ArgumentParser, top: bool) -> None:
    # the sub-command copy must not overwrite a --debug given before the sub-command
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show the full traceback on errors")


def _engine_options(p: argparse.ArgumentParser, *, batch: int = 64) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"],
                   help="learned-image backend: auto = fastest available (CUDA kernels for GPU inputs, "
                        "C++ kernels on the CPU, else pure PyTorch)")
    g.add_argument("--batch-size", type=int, default=batch, help="samples per batch (default %(default)s)")
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the engine, e.g. 2G or 512M (default: 25%% of RAM up to 8 GiB, "
                        "or 60%% of free GPU memory); larger work is chunked")


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", formatter_class=_Fmt, help="run every analysis on the embedded default and write an HTML report",
        description=textwrap.dedent("""\
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
            """),
        epilog="Example: nns demo --out nns_output/demo   (open nns_output/demo/report.html)")
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
    _engine_options(p, batch=None)
    _set_help(p, "batch_size", "samples per batch (default 64; 16 with --quick)")
    _debug_flag(p, False)
    p.set_defaults(func=_cmd_demo)


def _scan_parser(sub) -> None:
    p = sub.add_parser(
        "scan", formatter_class=_Fmt, help="learned images and per-neuron statistics of chosen layers",
        description=textwrap.dedent("""\
            Scan layers of a model on images: the learned image of every neuron (SPEC §1), reduced
            to per-neuron statistics, plus heat maps of the layer and filter learned images.

            Writes into --out:
              learned_images.png         inputs and the layer learned image of each layer
              filters_<layer>.png        filter learned images of the most active filters
              layers.csv, scan.json      per-layer summary (active neurons, knowledge quantity, ...)
              neurons_<layer>.csv        per-neuron means over the samples

            Models: a zoo name (`nns scan --list-models`), `package.module:factory` (called with
            no arguments, must return an nn.Module), or a file saved with torch.save(model).
            Weights (--weights) are a state dict or a `nns train` checkpoint.
            Data: `digits` (the embedded default; --split) or a folder of image files.
            """),
        epilog="Example: nns scan --model simple_cnn --layers features.relu1 features.relu3 --samples 8")
    p.add_argument("--model", default=None, help="zoo name, package.module:factory, or a torch.save'd model file "
                                                "(default: the demo model, well-trained checkpoint)")
    p.add_argument("--weights", default=None, help="state dict / checkpoint for the model")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a zoo model")
    p.add_argument("--in-channels", type=int, default=3, help="input channels of a zoo model / folder images")
    p.add_argument("--input-size", type=int, default=None, help="input side (folder images are resized to it)")
    p.add_argument("--data", default="digits", help="'digits' (embedded default) or a folder of images")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of the digits")
    p.add_argument("--samples", type=int, default=16, metavar="N", help="samples to scan")
    p.add_argument("--layers", nargs="+", default=None,
                   help="layer names from model.named_modules() (default: every ReLU and the output layer)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp64", "tf32", "bf16", "fp16"],
                   help="learned-image precision: auto = the input's dtype; bf16 / fp16 store the patches in 16 "
                        "bits (counts become unreliable); tf32 = TF32 tensor-core GEMMs (CUDA only)")
    p.add_argument("--conv-algorithm", default="auto", choices=["auto", "direct", "gemm", "gather", "implicit"],
                   help="conv propagation: direct gated kernels, one dense GEMM per image, GEMMs over the active "
                        "(input, tap) pairs (gather), or those as one Triton kernel (implicit, CUDA); auto = direct "
                        "on the CPU, gather on CUDA")
    p.add_argument("--strategy", default="auto", choices=["auto", "forward", "reverse"],
                   help="forward: all neurons in one sweep; reverse: one backward pass per neuron/filter")
    p.add_argument("--images", type=int, default=4, metavar="N", help="samples drawn in learned_images.png")
    p.add_argument("--filters", type=int, default=8, metavar="K", help="filter images drawn per layer")
    p.add_argument("--cmap", default="RdBu_r", help="heat-map colours: RdBu_r (red +, blue -) or jet (thesis look)")
    p.add_argument("--gate-outputs", action="store_true", help="gate the output layer by S(z) too")
    p.add_argument("--list-models", action="store_true", help="print the zoo's model names and exit")
    p.add_argument("--out", default="nns_output/scan", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _engine_options(p, batch=32)
    _debug_flag(p, False)
    p.set_defaults(func=_cmd_scan)


def _delegate_parser(sub, name: str, help_: str, description: str, module: str, add: str, run: str,
                     extra: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                     runner: Optional[Callable] = None) -> None:
    p = sub.add_parser(name, formatter_class=_Fmt, help=help_, description=description)
    note = None
    try:
        mod = importlib.import_module(f"nns_cuda.{module}")
        adder = getattr(mod, add, None)
        if adder is None:
            note = f"nns_cuda.{module}.{add} is not available in this build"
        else:
            adder(p)
    except Exception as e:  # a broken module must not break `nns --help`
        note = f"nns_cuda.{module} could not be imported: {type(e).__name__}: {e}"
    if note is None and extra is not None:
        extra(p)
    _debug_flag(p, False)
    p.set_defaults(func=runner or _cmd_delegate, _module=module, _run=run, _unavailable=note)


def _tip_extra(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data shortcuts (nns CLI)")
    if not _has(p, "weights"):
        g.add_argument("--weights", default=None, help="state dict / checkpoint when --model is a zoo name")
    if not _has(p, "samples"):
        g.add_argument("--samples", type=int, default=100, metavar="N",
                       help="embedded-data samples when --data is not given")
    if not _has(p, "batch_size"):
        g.add_argument("--batch-size", type=int, default=64)
    g.description = ("--model may also be a zoo name (with --weights); without --model the demo model's "
                     "well-trained checkpoint and its training phases are used; without --data the "
                     "embedded test split; without --layer the last conv activation.")


def _gmm_extra(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data (nns CLI)")
    if not _has(p, "model"):
        g.add_argument("--model", default=None, help="zoo name, package.module:factory or a torch.save'd model "
                                                     "(default: the demo model, over-fitted checkpoint)")
    if not _has(p, "weights"):
        g.add_argument("--weights", default=None, help="state dict / checkpoint for --model")
    if not _has(p, "split"):
        g.add_argument("--split", default="train", choices=["train", "val", "test"],
                       help="split of the embedded digits whose samples are clustered")
    if not _has(p, "samples"):
        g.add_argument("--samples", type=int, default=200, metavar="N", help="samples to cluster")
    if not _has(p, "batch_size"):
        g.add_argument("--batch-size", type=int, default=50)


def _set_help(p: argparse.ArgumentParser, dest: str, text: str) -> None:
    for a in p._actions:
        if a.dest == dest:
            a.help = text


def _has(p: argparse.ArgumentParser, dest: str) -> bool:
    return any(a.dest == dest for a in p._actions)


def _bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", formatter_class=_Fmt, help="benchmarks (correctness first, then timing)", add_help=True,
        description=textwrap.dedent("""\
            Run the benchmark suite (benchmarks/run.py, in a source checkout). Every option after
            `bench` is passed on; `nns bench -- --help` shows them. Example: nns bench --quick
            """))
    p.add_argument("bench_args", nargs="*", metavar="OPTION", help="options of benchmarks/run.py (passed on as given)")
    _debug_flag(p, False)
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``nns`` argument parser (sub-commands demo, scan, fq, tip, gmm, train, bench)."""
    from nns_cuda._version import __version__

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Fmt,
        description="Neural Network Scanner: the exact learned image of every neuron of a CNN, and the "
                    "thesis's analyses built on them (knowledge quantity, FQ, TIP, GMM anomaly filters).",
        epilog=_EPILOG)
    p.add_argument("--version", action="version", version=f"nns_cuda {__version__}")
    _debug_flag(p, True)
    sub = p.add_subparsers(dest="command", metavar="<command>")
    _demo_parser(sub)
    _scan_parser(sub)
    _delegate_parser(sub, "fq", "feature quantity FQ of neurons (thesis Chapter 4)", textwrap.dedent("""\
        Feature quantity (SPEC §3): how much of the object (foreground box) versus the background a
        neuron's learned image keeps. --findings runs the Chapter 3/4 analyses and compares them with
        the thesis (Pearson r per layer, FQ mean/variance per layer, masking diverse filters, ...).
        Writes JSON."""), "fq", "add_fq_arguments", "run_fq")
    _delegate_parser(sub, "tip", "interpretable properties of filters, AIPC, saliency (Chapter 5)", textwrap.dedent("""\
        Interpretable properties T of each filter's learned image (mean, variance, covariance and
        correlation with the input), AIPC curves (accuracy drop when the highest-T filters are
        masked), AVoU/SoU saliency and their Spearman correlation with T, and foreground/background
        filter types per training phase. Writes <out>/tip.json."""), "tip", "add_tip_arguments", "run_tip",
                     extra=_tip_extra, runner=_cmd_tip)
    _delegate_parser(sub, "gmm", "anomaly filters by Gaussian-mixture clustering (Chapter 6)", textwrap.dedent("""\
        Cluster each filter's learned images over samples (top-2 PCA, Gaussian mixtures, k by
        Calinski-Harabasz) and flag anomaly filters (Table 6-1 criteria). Input: --images FILE, or
        a model (default: the demo model's over-fitted checkpoint) and the embedded data.
        Writes <out>/gmm.json (and scatter plots with --plot)."""), "app._gmm_cli", "add_gmm_arguments", "run_gmm",
                     extra=_gmm_extra, runner=_cmd_gmm)
    _delegate_parser(sub, "train", "train a zoo model with per-epoch checkpoints", textwrap.dedent("""\
        Train a model of the zoo on the embedded digits or your data (ImageFolder + VOC boxes, COCO
        JSON, CIFAR pickles), with a checkpoint per epoch, the well-trained (best validation
        accuracy) and over-fitted (last) checkpoints, and the loss/accuracy curve.
        `nns train --demo` trains (or reuses) the demo's model."""), "train", "add_train_arguments", "run_train")
    _bench_parser(sub)
    return p


# ============================================================================================
# shared helpers
# ============================================================================================
def _progress(total: Optional[int], desc: str, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=disable, leave=False)


def load_model(spec: Optional[str], weights: Optional[str] = None, *, num_classes: int = 10, in_channels: int = 3,
               input_size: Optional[int] = None, which: str = "best"):
    """Model from a zoo name, ``package.module:factory``, a ``torch.save``'d model file, or (``spec``
    None) the demo model (``which`` = "best" or "last" checkpoint). Returns ``(model, description)``."""
    import torch
    from torch import nn

    from nns_cuda import models

    if spec is None:
        from nns_cuda import train as nns_train

        demo = nns_train.default_demo_model(progress=sys.stderr.isatty())
        ck = demo.history.best_checkpoint if which == "best" else demo.history.last_checkpoint
        m = models.load_model(demo.name, weights=weights or ck)
        return m, f"demo model {demo.name} ({'well-trained' if which == 'best' else 'over-fitted'}: {ck})"
    if spec in models.available():
        kw = {"in_channels": in_channels}
        if input_size:
            kw["input_size"] = input_size
        m = models.load_model(spec, weights=weights, num_classes=num_classes, **kw)
        return m, f"zoo model {spec}" + (f" with weights {weights}" if weights else " (random weights)")
    if os.path.isfile(spec):
        obj = torch.load(spec, map_location="cpu", weights_only=False)
        if not isinstance(obj, nn.Module):
            raise CLIError(f"{spec} holds a {type(obj).__name__}, not a model; for a state dict pass "
                           "--model <zoo name> --weights FILE")
        m = obj
        desc = f"model file {spec}"
    elif ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise CLIError(f"cannot load {spec!r}: {e}") from None
        m = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
        if not isinstance(m, nn.Module):
            raise CLIError(f"{spec} returned a {type(m).__name__}, not an nn.Module")
        desc = f"factory {spec}"
    else:
        import difflib

        close = difflib.get_close_matches(spec, models.available(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CLIError(f"unknown model {spec!r}: not a zoo name, not 'package.module:factory', not a file.{hint} "
                       "Zoo names: nns scan --list-models")
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = models.extract_state_dict(state, weights) if hasattr(models, "extract_state_dict") else state
        m.load_state_dict(state)
        desc += f" with weights {weights}"
    return m.eval(), desc


_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def load_data(spec: str, *, split: str = "test", samples: int = 16, in_channels: int = 3,
              input_size: Optional[int] = None, progress: bool = False):
    """``(x [N, D, H, W], y [N] or None, fg_mask [N, H, W] bool, description)`` from the embedded digits
    (``spec="digits"``) or a folder of image files (whole image = foreground, no labels)."""
    import torch
    import torch.nn.functional as F

    if samples < 1:
        raise CLIError(f"--samples must be at least 1, got {samples}")
    if spec == "digits":
        from nns_cuda import data as nns_data

        ds = nns_data.cluttered_digits(split, seed=0)
        n = min(samples, len(ds))
        items = [ds[i] for i in range(n)]
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        m = torch.stack([torch.as_tensor(it[2]) for it in items]).bool()
        return x, y, m, f"cluttered digits, split {split!r}, first {n} samples"
    if not os.path.isdir(spec):
        raise CLIError(f"--data {spec!r}: neither 'digits' nor an existing folder of images")
    from nns_cuda.data import load_image

    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(spec) for f in fs if f.lower().endswith(_IMG_EXT))
    if not files:
        raise CLIError(f"--data {spec!r}: no image files ({', '.join(_IMG_EXT)}) in the folder")
    files = files[:samples]
    imgs = [load_image(f, channels=in_channels) for f in files]
    size = (input_size, input_size) if input_size else tuple(imgs[0].shape[-2:])
    imgs = [im if tuple(im.shape[-2:]) == size else
            F.interpolate(im[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
            for im in imgs]
    x = torch.stack(imgs)
    m = torch.ones(x.shape[0], *size, dtype=torch.bool)
    return x, None, m, f"{len(files)} image(s) from {spec} at {size[0]}x{size[1]} (whole image = foreground)"


# ============================================================================================
# commands
# ============================================================================================
def _cmd_demo(args: argparse.Namespace) -> int:
    from nns_cuda.app.demo import run_demo

    t0 = time.perf_counter()
    out = run_demo(args.out, quick=args.quick, device=args.device, backend=args.backend, batch_size=args.batch_size,
                   max_memory=args.max_memory, samples=args.samples, gmm_samples=args.gmm_samples,
                   cache_dir=args.cache_dir, retrain=args.retrain, progress=not args.no_progress,
                   debug=getattr(args, "debug", False))
    dt = time.perf_counter() - t0
    for f in out.get("findings") or []:
        print(f"  [{f['reproduced']:>12s}] {f['claim']}")
    if out["errors"]:
        print(f"nns demo: {len(out['errors'])} section(s) not computed: {', '.join(sorted(out['errors']))} "
              "(see the report)", file=sys.stderr)
    print(f"nns demo: wrote {out['report']} and {out['metrics']} in {dt:.0f} s")
    return 0 if out.get("report") else 1


def _cmd_delegate(args: argparse.Namespace) -> int:
    if args._unavailable:
        raise NotImplementedError(f"nns {args.command} is not available: {args._unavailable}")
    mod = importlib.import_module(f"nns_cuda.{args._module}")
    run = getattr(mod, args._run, None)
    if run is None:
        raise NotImplementedError(f"nns {args.command} is not available: nns_cuda.{args._module}.{args._run} is missing")
    return int(run(args) or 0)


def _cmd_tip(args: argparse.Namespace) -> int:
    if args._unavailable:
        raise NotImplementedError(f"nns tip is not available: {args._unavailable}")
    from nns_cuda.analysis import tip

    spec = getattr(args, "model", None)
    if spec is None or (isinstance(spec, str) and _is_zoo(spec)):
        model, _ = load_model(spec, getattr(args, "weights", None), which="best")
        args.model = model
        if spec is None and getattr(args, "checkpoints", None) is None:
            from nns_cuda import train as nns_train

            hist = nns_train.default_demo_model(progress=False).history
            args.checkpoints = list(hist.phase_checkpoints().values())
    if getattr(args, "data", None) is None:
        x, y, m, _ = load_data("digits", split="test", samples=args.samples)
        bs = args.batch_size
        args.data = [(x[i:i + bs], y[i:i + bs], m[i:i + bs]) for i in range(0, x.shape[0], bs)]
    if not getattr(args, "layer", None) and not isinstance(args.model, str):
        from nns_cuda.app.demo import last_conv_activation

        first = args.data[0][0] if isinstance(args.data, list) else None
        if first is not None:
            args.layer = last_conv_activation(args.model, first)
            print(f"nns tip: --layer not given, using {args.layer}", file=sys.stderr)
    return int(tip.run_tip(args) or 0)


def _is_zoo(spec: str) -> bool:
    from nns_cuda import models

    return spec in models.available()


def _cmd_gmm(args: argparse.Namespace) -> int:
    if args._unavailable:
        raise NotImplementedError(f"nns gmm is not available: {args._unavailable}")
    from nns_cuda.app import _gmm_cli

    if getattr(args, "images", None):
        return int(_gmm_cli.run_gmm(args) or 0)
    model, desc = load_model(getattr(args, "model", None), getattr(args, "weights", None), which="last")
    if getattr(args, "model", None) is None and getattr(args, "split", "train") == "train":
        from nns_cuda import data as nns_data
        from nns_cuda import train as nns_train

        cfg = getattr(nns_train, "DEMO_CONFIG", {})
        ds = nns_data.cluttered_digits("train", seed=0, n_train=cfg.get("n_train"))
        n = min(args.samples, len(ds))
        import torch

        items = [ds[i] for i in range(n)]
        x = torch.stack([it[0] for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
        m = torch.stack([torch.as_tensor(it[2]) for it in items])
    else:
        x, y, m, _ = load_data("digits", split=args.split, samples=args.samples)
    bs = args.batch_size
    data = [(x[i:i + bs], y[i:i + bs], m[i:i + bs]) for i in range(0, x.shape[0], bs)]
    if not getattr(args, "layer", None):
        from nns_cuda.app.demo import last_conv_activation

        args.layer = last_conv_activation(model, x[:1])
        print(f"nns gmm: --layer not given, using {args.layer}", file=sys.stderr)
    print(f"nns gmm: {desc}, {x.shape[0]} samples", file=sys.stderr)
    return int(_gmm_cli.run_gmm(args, model=model, data=data) or 0)


def _cmd_bench(args: argparse.Namespace) -> int:
    rest = list(args.bench_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    try:
        run = importlib.import_module("benchmarks.run")
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
            raise NotImplementedError("nns bench needs a source checkout with benchmarks/run.py "
                                      "(the benchmarks are not part of the installed package)") from None
        sys.path.insert(0, root)
        run = importlib.import_module("benchmarks.run")
    main_fn = getattr(run, "main", None)
    if main_fn is None:
        raise NotImplementedError("benchmarks/run.py has no main(argv)")
    return int(main_fn(rest) or 0)


def _cmd_scan(args: argparse.Namespace) -> int:
    import torch

    from nns_cuda import models
    from nns_cuda.app.demo import parse_bytes, scan_layers
    from nns_cuda.engine.scanner import Scanner
    from nns_cuda.ops.reference.stats import STAT_INDEX

    if args.list_models:
        for n in models.available():
            try:
                d = models.describe(n)
            except Exception:
                d = ""
            print(f"{n:20s} {d}")
        return 0
    for name, v in (("--batch-size", args.batch_size), ("--images", args.images), ("--filters", args.filters)):
        if v < 0 or (name == "--batch-size" and v < 1):
            raise CLIError(f"{name} must be positive, got {v}")
    t0 = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    model, mdesc = load_model(args.model, args.weights, num_classes=args.num_classes, in_channels=args.in_channels,
                              input_size=args.input_size)
    model = model.to(dev).eval()
    x, y, fg, ddesc = load_data(args.data, split=args.split, samples=args.samples, in_channels=args.in_channels,
                                input_size=args.input_size)
    layers = args.layers or scan_layers(model, x[:1].to(dev))
    scanner = Scanner(model, layers, backend=args.backend, strategy=args.strategy, max_memory=parse_bytes(args.max_memory),
                      stats=True, gate_outputs=args.gate_outputs, precision=args.precision,
                      conv_algorithm=args.conv_algorithm)
    os.makedirs(args.out, exist_ok=True)
    n = x.shape[0]
    acc: Dict[str, Dict[str, Any]] = {}
    first = None
    backend = strategy = None
    numerics: Dict[str, Any] = {}
    bar = _progress((n + args.batch_size - 1) // args.batch_size, "nns scan", args.no_progress)
    try:
        for s in range(0, n, args.batch_size):
            xb, fb = x[s:s + args.batch_size].to(dev), fg[s:s + args.batch_size].to(dev)
            res = scanner.scan(xb, fb)
            backend, strategy = res.backend, res.strategy
            numerics = {"precision": res.precision, "conv_algorithm": res.conv_algorithm,
                        "conv_algorithms": dict(res.conv_algorithms)}
            cx = (xb != 0).flatten(1).sum(1).double()
            sx = xb.abs().flatten(1).sum(1).double()
            for l in layers:
                r = res[l]
                st = r.stats.double().reshape(xb.shape[0], -1, r.stats.shape[-1])
                a = r.activations.double().reshape(xb.shape[0], -1)
                cnt = st[..., STAT_INDEX["nz_fg"]] + st[..., STAT_INDEX["nz_bg"]]
                stren = st[..., STAT_INDEX["abs_sum"]]
                li_sum = st[..., STAT_INDEX["sum"]]
                active = cnt > 0
                d = acc.setdefault(l, {"shape": list(r.activations.shape[1:]), "act": 0, "active": 0, "count": 0,
                                       "strength": 0, "li_sum": 0, "count_ratio": 0.0, "strength_ratio": 0.0,
                                       "n": 0})
                d["act"] = d["act"] + a.sum(0).cpu()
                d["active"] = d["active"] + active.double().sum(0).cpu()
                d["count"] = d["count"] + cnt.sum(0).cpu()
                d["strength"] = d["strength"] + stren.sum(0).cpu()
                d["li_sum"] = d["li_sum"] + li_sum.sum(0).cpu()
                d["count_ratio"] += float((cnt.mean(1) / cx.clamp_min(1)).sum())
                d["strength_ratio"] += float((stren.mean(1) / sx.clamp_min(1e-300)).sum())
                d["n"] += xb.shape[0]
            bar.update(1)
    finally:
        bar.close()
    t_scan = time.perf_counter() - t0
    # per-layer summary + per-neuron CSVs
    rows = []
    files = []
    for l in layers:
        d = acc[l]
        N = d["n"]
        act, active = d["act"] / N, d["active"] / N
        row = {"layer": l, "shape": "x".join(map(str, d["shape"])), "neurons": int(act.numel()),
               "active_fraction": float(active.mean()), "mean_activation": float(act.mean()),
               "count_ratio": d["count_ratio"] / N, "strength_ratio": d["strength_ratio"] / N}
        rows.append(row)
        fname = f"neurons_{_safe(l)}.csv"
        with open(os.path.join(args.out, fname), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["neuron", "index", "mean_activation", "active_fraction", "mean_count", "mean_strength",
                        "mean_li_sum"])
            idx = _unravel_all(d["shape"])
            cols = [act, active, d["count"] / N, d["strength"] / N, d["li_sum"] / N]
            cols = [c.tolist() for c in cols]
            for i in range(len(idx)):
                w.writerow([i, idx[i]] + [f"{c[i]:.6g}" for c in cols])
        files.append(fname)
    with open(os.path.join(args.out, "layers.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r_ in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r_.items()})
    files.append("layers.csv")
    # figures
    if args.images > 0:
        files += _scan_figures(model, x, layers, args, dev)
    meta = {"model": mdesc, "data": ddesc, "samples": n, "layers": rows, "backend": backend, "strategy": strategy,
            **numerics, "device": str(dev), "seconds": {"scan": round(t_scan, 3), "total": round(time.perf_counter() - t0, 3)},
            "files": files + ["scan.json"],
            "notes": "count = non-zero entries of a learned image, strength = sum of |values| (SPEC §2); ratios are "
                     "relative to the input's; neurons_<layer>.csv index = position in the layer output"}
    with open(os.path.join(args.out, "scan.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    print(f"nns scan: {n} samples, {len(layers)} layers ({backend}, {strategy}) in {t_scan:.1f} s; "
          f"wrote {len(meta['files'])} files to {args.out}")
    return 0


def _scan_figures(model, x, layers, args, dev) -> List[str]:
    import torch

    from nns_cuda.app import viz
    from nns_cuda.engine.scanner import Scanner

    k = min(args.images, x.shape[0])
    xb = x[:k].to(dev)
    res = Scanner(model, layers, backend=args.backend, strategy=args.strategy, stats=False, filter_images=True,
                  gate_outputs=args.gate_outputs, precision=args.precision,
                  conv_algorithm=args.conv_algorithm).scan(xb)
    rows = [{l: res[l].filter_images[b].sum(0) for l in layers} for b in range(k)]
    files = []
    fig = viz.layer_grid([xb[b] for b in range(k)], rows, cmap=args.cmap)
    viz.save(fig, os.path.join(args.out, "learned_images.png"))
    files.append("learned_images.png")
    if args.filters > 0:
        for l in layers:
            L = res[l].filter_images[0]
            a = res[l].activations[0]
            score = a.reshape(a.shape[0], -1).sum(1) if a.dim() > 1 else a
            top = torch.argsort(score, descending=True, stable=True)[: args.filters].tolist()
            fig = viz.filter_grid(xb[0], L, indices=top, cmap=args.cmap, title=f"{l}: most active filters")
            name = f"filters_{_safe(l)}.png"
            viz.save(fig, os.path.join(args.out, name))
            files.append(name)
    return files


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _unravel_all(shape: Sequence[int]) -> List[str]:
    import itertools

    return [":".join(map(str, t)) for t in itertools.product(*[range(s) for s in shape])]


# ============================================================================================
# entry point
# ============================================================================================
def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        msg = " ".join(e.args[0].split())
    return msg or type(e).__name__


def _split_bench(argv: List[str]) -> Optional[Tuple[List[str], List[str]]]:
    """``(argv up to and including 'bench', the rest)`` when the command is ``bench`` and the rest is
    not just a request for ``nns bench``'s own help; else None."""
    for i, a in enumerate(argv):
        if a == "--":
            return None
        if a.startswith("-"):
            continue
        if a != "bench":
            return None
        rest = argv[i + 1:]
        if rest and all(r in ("-h", "--help") for r in rest):
            return None
        return argv[: i + 1], rest
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``nns`` command line; returns the exit status (also used by ``python -m nns_cuda``)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_rest = _split_bench(argv)
    if bench_rest is not None:  # everything after `bench` belongs to benchmarks/run.py
        head, rest = bench_rest
        args = parser.parse_args(head)
        args.debug = bool(getattr(args, "debug", False)) or "--debug" in rest
        args.bench_args = [a for a in rest if a != "--debug"]
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except CLIError as e:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"{PROG} {args.command}: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 2 if isinstance(e, _BAD_INPUT) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
