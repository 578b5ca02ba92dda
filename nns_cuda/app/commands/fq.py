"""``nns fq``: feature quantity FQ of neurons (thesis Chapter 4), or with ``--findings`` the
Chapter 3/4 comparison with the thesis; writes ``<out>/fq.json``."""
from __future__ import annotations

import argparse
import json
import os
import textwrap

from nns_cuda.app._common import CLIError, guarded, load_model, samples_option

HELP = "feature quantity FQ of neurons (thesis Chapter 4)"
DESCRIPTION = textwrap.dedent("""\
    Feature quantity (docs/spec.md §3): how much of the object (foreground box) versus the
    background a neuron's learned image keeps. --findings runs the Chapter 3/4 analyses and
    compares them with the thesis (Pearson r per layer, FQ mean/variance per layer, masking
    diverse filters, ...). Writes <out>/fq.json.""")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns fq`` options to ``parser`` (returns it)."""
    parser.add_argument("--model", default=None,
                        help="model-zoo name (nns_cuda.models.build); default: the demo's model, trained and cached "
                             "on first use")
    parser.add_argument("--weights", default=None, help="state-dict file of the trained model (strongly recommended)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of the zoo model")
    parser.add_argument("--split", default="test", help="split of the embedded cluttered-digits data set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the embedded data set")
    samples_option(parser, default=256, help="samples of the embedded data set to analyse")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--layers", nargs="*", default=None, help="FQ layers (default: every conv + activation layer)")
    parser.add_argument("--ablate", choices=["l", "c", "s", "vf", "nf"], default=None,
                        help="leave one component out of F (docs/spec.md §3)")
    parser.add_argument("--findings", action="store_true", help="run all analyses and compare with the thesis")
    parser.add_argument("--no-localisation", action="store_true",
                        help="with --findings: skip the localisation IoU (Table 4-5)")
    parser.add_argument("--arrays", action="store_true", help="include per-neuron arrays in the JSON")
    parser.add_argument("--out", default="nns_output/fq",
                        help="output folder; fq.json is written there (a folder, as for every nns command: a name "
                             "ending in .json is refused)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (shown on stderr over the batches of each analysis otherwise)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run FQ (or ``--findings``) on a zoo model and the embedded data set; write ``<out>/fq.json``.

    Without ``--weights`` and with the demo's model name, the demo's well-trained checkpoint
    (:func:`nns_cuda.train.default_demo_model`, best validation accuracy; trained and cached on
    first use) is analysed; any other model without weights keeps random weights (said on stderr).

    Returns
    -------
    int
        The exit status: 0, or 2 on bad input (one line on stderr).
    """
    return guarded("fq", args, lambda: _run(args))


def _model(args: argparse.Namespace):
    """``(model name, model, where its weights come from)``."""
    from nns_cuda import models
    from nns_cuda import train as nns_train

    demo = nns_train.DEMO_CONFIG
    name = args.model or demo["model"]
    if args.weights:
        model, _ = load_model(name, args.weights, num_classes=args.num_classes, who="nns fq")
        return name, model, "weights file"
    if name == demo["model"] and args.num_classes == demo["num_classes"]:
        trained = nns_train.default_demo_model(progress=False)
        best = trained.history.best_checkpoint
        return name, models.load_model(trained.name, weights=best, num_classes=args.num_classes), \
            f"demo model, well-trained checkpoint {best}"
    model, _ = load_model(name, num_classes=args.num_classes, who="nns fq")
    return name, model, "random weights"


def _run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from nns_cuda import data as nns_data
    from nns_cuda.analysis._toolkit import conv_act_layers, trace_calls
    from nns_cuda.analysis.fq import FeatureQuantity
    from nns_cuda.analysis.thesis import chapter4

    if args.out.lower().endswith(".json"):
        raise CLIError(f"--out names a folder (nns fq writes OUT/fq.json); got {args.out!r}, a file name: "
                       f"pass a folder, e.g. --out {os.path.splitext(args.out)[0] or '.'}")
    name, model, source = _model(args)
    model.eval()
    ds = nns_data.cluttered_digits(split=args.split, seed=args.seed)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    if args.findings:
        result = chapter4.findings(model, loader, fq_layers=args.layers, max_samples=args.samples,
                                   batch_size=args.batch_size, localisation=not args.no_localisation,
                                   progress=not args.no_progress)
    else:
        layers = args.layers
        if not layers:
            x0 = next(iter(loader))[0][:1]
            layers = conv_act_layers(trace_calls(model, x0))
        fitted = FeatureQuantity(ablate=args.ablate, max_samples=args.samples,
                                 progress=not args.no_progress).fit(model, loader, layers)
        result = fitted.result_.to_dict(args.arrays)
    result = {"model": name, "weights": source, "data": f"cluttered_digits(split={args.split!r}, seed={args.seed})",
              "result": result}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fq.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"nns fq: wrote {path}")
    return 0

