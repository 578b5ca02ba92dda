"""``nns gmm``: anomaly filters by Gaussian-mixture clustering (thesis Chapter 6).

Three ways in:

* ``--images FILE`` — a ``torch.save``'d dict with ``"filter_images"`` (``[S, C, ...]``, the
  engine's layout, or ``"features"`` ``[C, S, P]``) and ``"mean_activation"`` (``[C]``); or
  ``"points"`` ``[C, S, 2]`` (already projected) with ``"mean_activation"``.
* a model and data given by the caller: ``run(args, model=model, data=data)`` with
  ``args.layer``.
* ``--model MODEL`` (zoo name with ``--weights``, ``package.module:factory`` or a saved model)
  and the embedded digits (``--split``, ``--samples``); on the ``nns`` command line without
  ``--model``, the demo model's over-fitted checkpoint. Without ``--layer``: the last conv
  activation.

``--samples N`` is the number of samples clustered in each case (default: 200 of the embedded
digits, every sample of ``--images`` or of the caller's data); ``--max-samples`` is its
deprecated alias.

Writes ``<out>/gmm.json`` (or ``--json``) and, with ``--plot``, one scatter figure per anomaly
filter (Fig. 6-1/6-2 style) into ``<out>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any, Optional, Sequence

from nns_cuda.app._common import DeprecatedAlias, batches, guarded, load_data, load_model, read_torch_file, take

#: Samples of the embedded digits clustered when ``--samples`` is not given.
DEFAULT_SAMPLES = 200

HELP = "anomaly filters by Gaussian-mixture clustering (Chapter 6)"
DESCRIPTION = textwrap.dedent("""\
    Cluster each filter's learned images over samples (top-2 PCA, Gaussian mixtures, k by
    Calinski-Harabasz) and flag anomaly filters (Table 6-1 criteria). Input: --images FILE, or
    a model (default: the demo model's over-fitted checkpoint) and the embedded data.
    Writes <out>/gmm.json (and scatter plots with --plot).""")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns gmm`` options to ``parser`` (returns it).

    Options the parser already has (e.g. a common ``--layer``, ``--seed``, ``--device``,
    ``--out`` or ``--json``) are left as they are and reused.
    """
    g = parser.add_argument_group("GMM anomaly filters (thesis Chapter 6)")

    def add(group, *flags, **kw):
        if not any(f in parser._option_string_actions for f in flags):
            group.add_argument(*flags, **kw)

    add(g, "--images", default=None, help="torch.save'd dict with filter_images [S,C,...] "
        "(or features [C,S,P], or points [C,S,2]) and mean_activation [C]")
    add(g, "--layer", default=None, help="layer name (model.named_modules()), for model input "
                                         "(default: the last conv activation)")
    add(g, "--k-max", type=int, default=10, help="largest number of mixture components (default 10)")
    add(g, "--preset", choices=["small", "large"], default="small",
        help="Table 6-1 preset (lam, alpha, beta, theta): small=(50,0.2,1,0.1), large=(10,0.2,1,0.1)")
    add(g, "--lam", type=float, default=None, help="largest size of a small cluster (λ)")
    add(g, "--alpha", type=float, default=None, help="imbalance fraction α in [0,1]")
    add(g, "--beta", type=float, default=None, help="CH factor β over the layer mean")
    add(g, "--theta", type=float, default=None, help="activation factor θ over the layer mean")
    add(g, "--seed", type=int, default=0, help="random_state of the mixtures")
    add(g, "--gmm-backend", choices=["torch", "sklearn"], default="torch",
        help="batched torch EM (default) or the scikit-learn reference loop")
    add(g, "--samples", type=int, default=None, metavar="N",
        help=f"samples to cluster (default: {DEFAULT_SAMPLES} of the embedded digits; all of --images or of the "
             "caller's data)")
    add(g, "--max-samples", type=int, action=DeprecatedAlias, dest="samples", new="--samples",
        default=argparse.SUPPRESS, metavar="N")
    add(g, "--device", default=None, help="cpu, cuda, ... (default: the model's / cpu)")
    add(g, "--out", default="nns_output/gmm", help="output folder")
    add(g, "--json", default=None, help="write the result here (default <out>/gmm.json)")
    add(g, "--include-labels", action="store_true", help="store per-sample labels and points")
    add(g, "--plot", action="store_true", help="scatter plots of the anomaly filters' clusters")
    add(g, "--no-progress", action="store_true", help="no progress bar")
    m = parser.add_argument_group("model and data")
    add(m, "--model", default=None, help="zoo name, package.module:factory or a torch.save'd model "
                                         "(default on the command line: the demo model, over-fitted checkpoint)")
    add(m, "--weights", default=None, help="state dict / checkpoint for --model")
    add(m, "--split", default="train", choices=["train", "val", "test"],
        help="split of the embedded digits whose samples are clustered")
    add(m, "--batch-size", type=int, default=50, help="samples per batch")
    return parser


def _analysis_kwargs(args) -> dict:
    return dict(k_max=args.k_max, preset=args.preset, lam=args.lam, alpha=args.alpha, beta=args.beta,
                theta=args.theta, seed=getattr(args, "seed", 0))


def plot_clusters(points, labels, filters: Sequence[int], out_dir: str, outliers: Optional[Sequence[Any]] = None,
                  prefix: str = "gmm_filter") -> list:
    """Scatter each filter's 2-D points coloured by cluster (outliers circled).

    Parameters
    ----------
    points : Tensor [C, S, 2]
    labels : Tensor [C, S] — cluster of each sample, per filter
    filters : filter indices to draw
    out_dir : folder of the PNG files ``<prefix>_<filter>.png``
    outliers : per filter, a Tensor of outlier sample indices (optional)

    Returns
    -------
    list of str — the paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for f in filters:
        fig, ax = plt.subplots(figsize=(4, 4))
        p = points[f].double().cpu()
        ax.scatter(p[:, 0], p[:, 1], c=labels[f].cpu(), cmap="tab10", s=6)
        if outliers is not None and outliers[f].numel():
            o = p[outliers[f]]
            ax.scatter(o[:, 0], o[:, 1], facecolors="none", edgecolors="k", s=40, linewidths=0.8,
                       label="outlier samples")
            ax.legend(loc="best", fontsize=7)
        ax.set_title(f"filter {f}")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        path = os.path.join(out_dir, f"{prefix}_{f}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def run(args: argparse.Namespace, *, model: Any = None, data: Any = None) -> int:
    """Run ``nns gmm`` (see the module docstring for the inputs); write ``gmm.json``.

    Parameters
    ----------
    args : parsed options (:func:`add_arguments`); ``args.command == "gmm"`` (set by the ``nns``
        parser) lets a run without any input use the demo model
    model : nn.Module, optional
    data : re-iterable of ``(x, y, fg_mask)`` batches, optional (with ``model``)

    Returns
    -------
    int
        The exit status: 0, or 2 on bad input (one line on stderr).
    """
    return guarded("gmm", args, lambda: _run(args, model, data))


def _samples(args: argparse.Namespace) -> Optional[int]:
    """``--samples`` (a namespace made by hand may still call it ``max_samples``)."""
    n = getattr(args, "samples", None)
    return getattr(args, "max_samples", None) if n is None else n


def _from_images(args: argparse.Namespace):
    """``(payload, points, labels, outliers, anomaly filters)`` of ``--images``."""
    import torch

    from nns_cuda.analysis import gmm

    blob = read_torch_file(args.images, "--images")
    if isinstance(blob, torch.Tensor):
        blob = {"filter_images": blob}
    if "mean_activation" not in blob:
        raise ValueError(f"{args.images}: needs a 'mean_activation' [C] entry beside the images.")
    if "points" in blob:
        pts = blob["points"]
    else:
        if "features" in blob:
            feats = blob["features"]
        elif "filter_images" in blob:
            feats = blob["filter_images"].flatten(2).transpose(0, 1)
        else:
            raise ValueError(f"{args.images}: needs 'filter_images', 'features' or 'points'.")
        if _samples(args) is not None:
            feats = feats[:, : _samples(args)]
        dev = getattr(args, "device", None) or "cpu"
        pts = gmm.pca2(feats.to(dev), seed=getattr(args, "seed", 0)).cpu()
    kw = _analysis_kwargs(args)
    res = gmm.anomaly_filters(pts, blob["mean_activation"], lam=kw["lam"], alpha=kw["alpha"], beta=kw["beta"],
                              theta=kw["theta"], preset=kw["preset"], k_max=kw["k_max"], seed=kw["seed"],
                              backend=getattr(args, "gmm_backend", "torch"))
    payload = {"source": args.images, **res.to_dict(include_labels=getattr(args, "include_labels", False))}
    return payload, pts, res.labels, res.outlier_samples, res.anomaly_filters


def _default_inputs(args: argparse.Namespace):
    """``(model, data)`` from ``--model`` (or the demo model's over-fitted checkpoint) and the
    embedded digits; sets ``args.layer`` to the last conv activation when it is not given."""
    spec = getattr(args, "model", None)
    model, desc = load_model(spec, getattr(args, "weights", None), which="last", who="nns gmm")
    n = _samples(args) or DEFAULT_SAMPLES
    if spec is None and args.split == "train":  # the demo model's own training samples
        from nns_cuda import data as nns_data
        from nns_cuda import train as nns_train

        ds = nns_data.cluttered_digits("train", seed=0, n_train=nns_train.DEMO_CONFIG.get("n_train"))
        x, y, m = take(ds, range(min(n, len(ds))))
    else:
        x, y, m, _ = load_data("digits", split=args.split, samples=n, who="nns gmm")
    if not getattr(args, "layer", None):
        from nns_cuda.app.demo import last_conv_activation

        args.layer = last_conv_activation(model, x[:1])
        print(f"nns gmm: --layer not given, using {args.layer}", file=sys.stderr)
    print(f"nns gmm: {desc}, {x.shape[0]} samples", file=sys.stderr)
    return model, batches(x, y, m, args.batch_size)


def _run(args: argparse.Namespace, model: Any, data: Any) -> int:
    from nns_cuda.analysis import gmm

    if getattr(args, "images", None):
        payload, points, labels, outl, filters = _from_images(args)
    else:
        from_cli = getattr(args, "command", None) == "gmm"
        if model is None and data is None and (getattr(args, "model", None) or from_cli):
            model, data = _default_inputs(args)
        if model is None or data is None:
            raise ValueError("pass --images FILE, --model MODEL, or a model and data")
        layer = getattr(args, "layer", None)
        if not layer:
            raise ValueError("--layer is required with a model")
        an = gmm.GMMAnalysis(**_analysis_kwargs(args), backend=getattr(args, "gmm_backend", "torch"),
                             max_samples=_samples(args), device=getattr(args, "device", None),
                             progress=not getattr(args, "no_progress", False))
        r = an.fit(model, data, layer).result_
        payload = r.to_dict(include_labels=getattr(args, "include_labels", False))
        points, labels, outl = r.points, r.anomaly.labels, r.anomaly.outlier_samples
        filters = r.anomaly.anomaly_filters
    out_dir = getattr(args, "out", None) or "nns_output/gmm"
    os.makedirs(out_dir, exist_ok=True)
    path = getattr(args, "json", None) or os.path.join(out_dir, "gmm.json")
    if getattr(args, "plot", False) and filters:
        payload["figures"] = plot_clusters(points, labels, filters, out_dir, outl)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, allow_nan=False)
    print(f"nns gmm: {payload['n_anomalous']} anomaly filters of {payload['n_filters']} "
          f"(λ={payload['params']['lam']:g}, α={payload['params']['alpha']:g}, "
          f"β={payload['params']['beta']:g}, θ={payload['params']['theta']:g}); wrote {path}")
    return 0
