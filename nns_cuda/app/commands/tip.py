"""``nns tip``: interpretable properties of filters, AIPC, saliency and fg/bg filter types
(thesis Chapter 5); writes ``<out>/tip.json``."""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import textwrap
from typing import Any, Dict, List, Optional

from nns_cuda.app._common import CLIError, batches, guarded, load_data, load_model, read_torch_file

HELP = "interpretable properties of filters, AIPC, saliency (Chapter 5)"
DESCRIPTION = textwrap.dedent("""\
    Interpretable properties T of each filter's learned image (mean, variance, covariance and
    correlation with the input), AIPC curves (accuracy drop when the highest-T filters are
    masked), AVoU/SoU saliency and their Spearman correlation with T, and foreground/background
    filter types per training phase. Writes <out>/tip.json.""")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns tip`` options to ``parser`` (returns it)."""
    g = parser.add_argument_group("TIP (thesis Chapter 5)")
    g.add_argument("--model", help="model: a zoo name (with --weights), 'package.module:factory' or a torch.save'd "
                                   "nn.Module file (default: the demo model's well-trained checkpoint)")
    g.add_argument("--data", help="data: 'package.module:factory' returning a re-iterable of (x, y, fg_mask) batches, "
                                  "or a torch.save'd list of batches (default: the embedded test split)")
    g.add_argument("--layer", required=False, help="layer to analyse (module name, e.g. features.9; default: the "
                                                   "last conv activation)")
    g.add_argument("--properties", default=None, help="comma-separated property names (default: all registered)")
    g.add_argument("--ratios", default=None, help="AIPC mask ratios as fractions: 'start:stop:step' or a comma list "
                                                  "(default 0:1:0.01)")
    g.add_argument("--per", type=float, default=30.0, help="high/low percentage for fg/bg filter types (default 30)")
    g.add_argument("--sou-method", choices=("taylor", "exact"), default="taylor", help="SoU estimate (default taylor)")
    g.add_argument("--checkpoints", nargs="*", default=None, help="state-dict files, one per training phase "
                                                                  "(default with the demo model: its phases)")
    g.add_argument("--out", default="nns_output/tip", help="output folder (tip.json is written there)")
    g.add_argument("--no-aipc", action="store_true", help="skip the AIPC curves")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    s = parser.add_argument_group("model and data shortcuts")
    s.add_argument("--weights", default=None, help="state dict / checkpoint when --model is a zoo name")
    s.add_argument("--samples", type=int, default=100, metavar="N",
                   help="embedded-data samples when --data is not given")
    s.add_argument("--batch-size", type=int, default=64, help="samples per batch of the embedded data")
    return parser


def run(args: argparse.Namespace, *, model: Any = None, data: Any = None, filter_fn: Any = None) -> int:
    """Run T, AIPC, saliency, fg/bg types and the Chapter-5 findings; write ``<out>/tip.json``.

    Parameters
    ----------
    args : parsed options (:func:`add_arguments`)
    model : nn.Module, optional
        Instead of ``--model`` (``args.model`` may also be an ``nn.Module``).
    data : re-iterable of ``(x, y, fg_mask)`` batches, optional
        Instead of ``--data`` (``args.data`` may also be such an object).
    filter_fn : callable ``(model, x, layer) -> [B, C, D, H, W]``, optional
        Source of the filter learned images (default: the engine; also read from ``args.filter_fn``).

    Returns
    -------
    int
        The exit status: 0, or 2 on bad input (one line on stderr).
    """
    return guarded("tip", args, lambda: _run(args, model, data, filter_fn))


def _parse_ratios(s: Optional[str]) -> Optional[List[float]]:
    """``"0:1:0.01"`` (start:stop:step, stop included) or ``"0,0.05,0.1"`` -> fractions."""
    if s is None:
        return None
    s = s.strip()
    if ":" in s:
        parts = [float(p) for p in s.split(":")]
        if len(parts) != 3 or parts[2] <= 0:
            raise ValueError(f"--ratios: expected start:stop:step with step > 0, got {s!r}.")
        a, b, st = parts
        n = int(math.floor(round((b - a) / st, 9)))
        return [round(a + i * st, 12) for i in range(n + 1)]
    return [float(p) for p in s.split(",") if p.strip()]


def _load_data_object(spec: Any) -> Any:
    """``--data``: an object, ``"package.module:factory"`` (called with no arguments) or a ``torch.save``'d file."""
    if not isinstance(spec, str):
        return spec
    if ":" in spec and not os.path.exists(spec):
        mod, _, fn = spec.partition(":")
        obj = getattr(importlib.import_module(mod), fn)
        return obj() if callable(obj) else obj
    if os.path.exists(spec):
        return read_torch_file(spec, "--data", weights_only=False)
    raise ValueError(f"--data: {spec!r} is neither 'module:factory' nor an existing file.")


def _inputs(args: argparse.Namespace, model: Any, data: Any):
    """``(model, data, layer)`` with the defaults: the demo model (and its training phases as
    ``--checkpoints``), the embedded test split, the last conv activation."""
    spec = getattr(args, "model", None) if model is None else model
    if spec is None or isinstance(spec, str):
        model, _ = load_model(spec, getattr(args, "weights", None), which="best", who="nns tip")
        if spec is None and getattr(args, "checkpoints", None) is None:
            from nns_cuda import train as nns_train

            hist = nns_train.default_demo_model(progress=False).history
            args.checkpoints = list(hist.phase_checkpoints().values())
    else:
        model = spec
    data = _load_data_object(getattr(args, "data", None) if data is None else data)
    if data is None:
        x, y, m, _ = load_data("digits", split="test", samples=args.samples)
        data = batches(x, y, m, args.batch_size)
    layer = getattr(args, "layer", None)
    if not layer:
        from nns_cuda.analysis._toolkit import unpack_batch
        from nns_cuda.app.demo import last_conv_activation

        layer = last_conv_activation(model, unpack_batch(next(iter(data)), "nns tip")[0])
        print(f"nns tip: --layer not given, using {layer}", file=sys.stderr)
    return model, data, layer


def _check_checkpoints(model: Any, checkpoints: Optional[List[str]]) -> None:
    """Read every ``--checkpoints`` file and check it against ``model`` before any work: a file
    that is missing, damaged or does not fit the model is one line of ours, at once."""
    from nns_cuda.analysis.fgbg import load_checkpoint

    for ck in checkpoints or []:
        if isinstance(ck, str):
            try:
                load_checkpoint(model, read_torch_file(ck, "--checkpoints"))
            except (TypeError, ValueError) as e:
                raise CLIError(f"--checkpoints {ck}: {' '.join(str(e).split())}") from None


def _run(args: argparse.Namespace, model: Any, data: Any, filter_fn: Any) -> int:
    from torch import nn

    from nns_cuda.analysis import tip
    from nns_cuda.analysis._toolkit import check_reiterable, to_jsonable, unpack_batch
    from nns_cuda.analysis.thesis import chapter5

    model, data, layer = _inputs(args, model, data)
    if not isinstance(model, nn.Module):
        raise ValueError("tip: --model must give an nn.Module.")
    _check_checkpoints(model, getattr(args, "checkpoints", None))
    progress = not getattr(args, "no_progress", False)
    fi = filter_fn or getattr(args, "filter_fn", None)
    names = tip.property_names(args.properties.split(",") if getattr(args, "properties", None) else None)
    ratios = tip.check_ratios(_parse_ratios(getattr(args, "ratios", None)))
    check_reiterable(data, "tip")
    has_mask = unpack_batch(next(iter(data)), "tip")[2] is not None
    fit_names = names + ([] if "mean" in names else ["mean"])  # the findings need T_m
    ip = tip.InterpretableProperties(fit_names, "all", filter_fn=fi, progress=progress).fit(model, data, layer)
    T = {n: ip.T(layer, n, "all") for n in fit_names}
    out: Dict[str, Any] = {"layer": layer, "properties": ip.to_dict()}
    if not getattr(args, "no_aipc", False):
        curves = tip.aipc_curves(model, data, layer, {n: T[n] for n in names}, ratios, progress=progress)
        out["aipc"] = {n: c.to_dict() for n, c in curves.items()}
    sal = tip.saliency(model, data, layer, T, sou_method=getattr(args, "sou_method", "taylor"), progress=progress)
    out["saliency"] = sal.to_dict()
    if has_mask:
        types = tip.fg_bg_types(model, data, layer, getattr(args, "checkpoints", None) or None, property="mean",
                                per=getattr(args, "per", 30.0), filter_fn=fi, progress=progress)
        out["fg_bg_types"] = types.to_dict()
        out["findings"] = chapter5.findings_from_results(layer, {n: v.tolist() for n, v in T.items()}, sal, types)
    out_dir = getattr(args, "out", None) or "nns_output/tip"
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tip.json")
    with open(path, "w") as f:
        json.dump(to_jsonable(out), f, indent=1, allow_nan=False)
    print(f"nns tip: wrote {path}")
    return 0
