"""``nns gmm``: command-line entry of the Chapter-6 analysis (private; wired by ``cli.py``).

Two ways in:

* ``--images FILE`` — a ``torch.save``'d dict with ``"filter_images"`` (``[S, C, ...]``, the
  engine's layout, or ``"features"`` ``[C, S, P]``) and ``"mean_activation"`` (``[C]``); or
  ``"points"`` ``[C, S, 2]`` (already projected) with ``"mean_activation"``.
* a model and data built by the caller: ``run_gmm(args, model=model, data=data)`` with
  ``args.layer`` (the main CLI loads checkpoints and data sets with its common options).

Writes ``<out>/gmm.json`` (or ``--json``) and, with ``--plot``, one scatter figure per anomaly
filter (Fig. 6-1/6-2 style) into ``<out>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

import torch


def add_gmm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``nns gmm`` options to ``parser`` (returns it).

    Options the parser already has (e.g. common ``--layer``, ``--seed``, ``--device``,
    ``--out``, ``--json`` of the main CLI) are left as they are and reused.
    """
    g = parser.add_argument_group("GMM anomaly filters (thesis Chapter 6)")

    def add(*flags, **kw):
        if not any(f in parser._option_string_actions for f in flags):
            g.add_argument(*flags, **kw)

    add("--images", default=None, help="torch.save'd dict with filter_images [S,C,...] "
        "(or features [C,S,P], or points [C,S,2]) and mean_activation [C]")
    add("--layer", default=None, help="layer name (model.named_modules()), for model input")
    add("--k-max", type=int, default=10, help="largest number of mixture components (default 10)")
    add("--preset", choices=["small", "large"], default="small",
        help="Table 6-1 preset (lam, alpha, beta, theta): small=(50,0.2,1,0.1), large=(10,0.2,1,0.1)")
    add("--lam", type=float, default=None, help="largest size of a small cluster (λ)")
    add("--alpha", type=float, default=None, help="imbalance fraction α in [0,1]")
    add("--beta", type=float, default=None, help="CH factor β over the layer mean")
    add("--theta", type=float, default=None, help="activation factor θ over the layer mean")
    add("--seed", type=int, default=0, help="random_state of the mixtures")
    add("--gmm-backend", choices=["torch", "sklearn"], default="torch",
        help="batched torch EM (default) or the scikit-learn reference loop")
    add("--max-samples", type=int, default=None, help="analyse at most this many samples")
    add("--device", default=None, help="cpu, cuda, ... (default: the model's / cpu)")
    add("--out", default="nns_output/gmm", help="output folder")
    add("--json", default=None, help="write the result here (default <out>/gmm.json)")
    add("--include-labels", action="store_true", help="store per-sample labels and points")
    add("--plot", action="store_true", help="scatter plots of the anomaly filters' clusters")
    return parser


def _analysis_kwargs(args) -> dict:
    return dict(k_max=args.k_max, preset=args.preset, lam=args.lam, alpha=args.alpha, beta=args.beta,
                theta=args.theta, seed=getattr(args, "seed", 0))


def plot_clusters(points: torch.Tensor, labels: torch.Tensor, filters: Sequence[int], out_dir: str,
                  outliers: Optional[Sequence[torch.Tensor]] = None, prefix: str = "gmm_filter") -> list:
    """Scatter each filter's 2-D points coloured by cluster (outliers circled); returns paths."""
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


def run_gmm(args: argparse.Namespace, *, model: Any = None, data: Any = None) -> int:
    """Run ``nns gmm``; returns the process exit status (0 = success, 2 = bad input)."""
    from nns_cuda.analysis import gmm

    out_dir = getattr(args, "out", None) or "nns_output/gmm"
    try:
        if getattr(args, "images", None):
            blob = torch.load(args.images, map_location="cpu", weights_only=True)
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
                    fi = blob["filter_images"]
                    feats = fi.flatten(2).transpose(0, 1)
                else:
                    raise ValueError(f"{args.images}: needs 'filter_images', 'features' or 'points'.")
                if getattr(args, 'max_samples', None) is not None:
                    feats = feats[:, : getattr(args, 'max_samples', None)]
                dev = getattr(args, "device", None) or "cpu"
                pts = gmm.pca2(feats.to(dev), seed=getattr(args, "seed", 0)).cpu()
            kw = _analysis_kwargs(args)
            res = gmm.anomaly_filters(pts, blob["mean_activation"], lam=kw["lam"], alpha=kw["alpha"],
                                      beta=kw["beta"], theta=kw["theta"], preset=kw["preset"],
                                      k_max=kw["k_max"], seed=kw["seed"], backend=getattr(args, 'gmm_backend', 'torch'))
            payload = {"source": args.images, **res.to_dict(include_labels=getattr(args, 'include_labels', False))}
            points, labels, outl = pts, res.labels, res.outlier_samples
            filters = res.anomaly_filters
        elif model is not None and data is not None:
            layer = getattr(args, "layer", None)
            if not layer:
                raise ValueError("nns gmm: --layer is required with a model.")
            an = gmm.GMMAnalysis(**_analysis_kwargs(args), backend=getattr(args, 'gmm_backend', 'torch'),
                                 max_samples=getattr(args, 'max_samples', None), device=getattr(args, "device", None))
            r = an.fit(model, data, layer)
            payload = r.to_dict(include_labels=getattr(args, 'include_labels', False))
            points, labels, outl = r.points, r.anomaly.labels, r.anomaly.outlier_samples
            filters = r.anomaly.anomaly_filters
        else:
            raise ValueError("nns gmm: pass --images FILE, or a model and data (--model/--checkpoint/--data).")
    except (ValueError, TypeError, KeyError, FileNotFoundError, IndexError) as e:
        print(f"nns gmm: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(out_dir, exist_ok=True)
    path = getattr(args, "json", None) or os.path.join(out_dir, "gmm.json")
    if getattr(args, 'plot', False) and filters:
        payload["figures"] = plot_clusters(points, labels, filters, out_dir, outl)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, allow_nan=False)
    print(f"nns gmm: {payload['n_anomalous']} anomaly filters of {payload['n_filters']} "
          f"(λ={payload['params']['lam']:g}, α={payload['params']['alpha']:g}, "
          f"β={payload['params']['beta']:g}, θ={payload['params']['theta']:g}); wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - thin wrapper
    p = add_gmm_arguments(argparse.ArgumentParser(prog="nns gmm"))
    return run_gmm(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
