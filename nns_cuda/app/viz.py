"""Figures of learned images and analysis results (matplotlib, Agg; no pyplot state).

Display convention (docs/spec.md §1, Fig. 3-6): a learned image is drawn as a heat map in
which larger values are redder and smaller ones bluer. The default is a *diverging* colour map
centred at zero (``"RdBu_r"``: positive red, negative blue, zero white) with symmetric limits,
so the sign of a contribution is visible; ``cmap="jet"`` reproduces the look of the thesis's
figures (min–max scaled unless ``center=True``).

An RGB learned image ``[3, H, W]`` is summed over its channels for the heat map (each channel
of a pixel is its own input neuron, docs/spec.md §1; the sum is the pixel's total
contribution); pass ``reduce="abs"`` for ``Σ_d |LI_d|`` or ``reduce=None`` for a
single-channel image.

Every function draws on a :class:`matplotlib.figure.Figure` built with the Agg canvas, so the
module can be used from threads and never touches the global pyplot state.

>>> from nns_cuda import viz
>>> fig = viz.learned_image_figure(x[0], {"conv1": L1[0], "conv3": L3[0]})   # doctest: +SKIP
>>> viz.save(fig, "li.png")                                                    # doctest: +SKIP
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "DEFAULT_CMAP",
    "to_numpy",
    "heat",
    "heatmap",
    "show_input",
    "new_figure",
    "save",
    "learned_image_figure",
    "layer_grid",
    "filter_grid",
    "filter_rows",
    "line_plot",
    "bar_plot",
    "scatter_clusters",
]

#: Default diverging colour map: positive red, negative blue, zero white.
DEFAULT_CMAP = "RdBu_r"

ArrayLike = Any


def to_numpy(a: ArrayLike) -> np.ndarray:
    """Tensor / array / nested list -> float64 numpy array (CPU, detached)."""
    try:  # torch is optional for this helper
        import torch

        if isinstance(a, torch.Tensor):
            return a.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(a, dtype=np.float64)


def heat(image: ArrayLike, reduce: Optional[str] = "sum") -> np.ndarray:
    """A 2-D array to draw for ``image``.

    Parameters
    ----------
    image : [D, H, W], [H, W] or [N] (an MLP's input vector is drawn as one row)
    reduce : "sum" (Σ_d, default), "abs" (Σ_d |·|) or None (needs a single channel)

    Returns
    -------
    ndarray [H, W]
    """
    a = to_numpy(image)
    if a.ndim == 1:
        return a[None, :]
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise ValueError(f"heat: expected an image [D, H, W] or [H, W], got shape {list(a.shape)}")
    if reduce == "sum":
        return a.sum(0)
    if reduce == "abs":
        return np.abs(a).sum(0)
    if reduce is None:
        if a.shape[0] != 1:
            raise ValueError(f"heat: reduce=None needs a single-channel image, got {a.shape[0]} channels; "
                             "use reduce='sum' or 'abs'")
        return a[0]
    raise ValueError(f"heat: reduce must be 'sum', 'abs' or None, got {reduce!r}")


def _limits(h: np.ndarray, cmap: str, center: Optional[bool]) -> Tuple[float, float]:
    center = (cmap != "jet") if center is None else center
    finite = h[np.isfinite(h)]
    if finite.size == 0:
        return -1.0, 1.0
    if center:
        m = float(np.abs(finite).max())
        m = m if m > 0 else 1.0
        return -m, m
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def heatmap(ax, image: ArrayLike, *, cmap: str = DEFAULT_CMAP, center: Optional[bool] = None,
            reduce: Optional[str] = "sum", title: Optional[str] = None, colorbar: bool = False,
            fontsize: int = 8):
    """Draw a learned image as a heat map on ``ax``.

    Parameters
    ----------
    ax : matplotlib Axes
    image : [D, H, W] or [H, W]
    cmap : colour-map name (default diverging ``"RdBu_r"``; ``"jet"`` for the thesis's look)
    center : symmetric limits around zero (default: True except for ``"jet"``)
    reduce : channel reduction, see :func:`heat`
    title, fontsize : decoration
    colorbar : a colour scale beside the heat map (its limits and zero, if inside them)

    Returns
    -------
    The ``AxesImage``.
    """
    h = heat(image, reduce)
    vmin, vmax = _limits(h, cmap, center)
    im = ax.imshow(h, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        ticks = [vmin, 0.0, vmax] if vmin < 0 < vmax else [vmin, vmax]
        cb.set_ticks(ticks)
        cb.set_ticklabels(["0" if v == 0 else f"{v:.3g}" for v in ticks])
        cb.ax.tick_params(labelsize=max(4, fontsize - 2), length=2, pad=1)
    return im


def show_input(ax, x: ArrayLike, title: Optional[str] = "input", fontsize: int = 8):
    """Draw an input image ``[D, H, W]`` (D = 1 or 3, values in [0, 1] or any range: min–max
    scaled when outside [0, 1])."""
    a = to_numpy(x)
    if a.ndim == 1:
        a = a[None, None, :]
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"show_input: expected [D, H, W], got shape {list(a.shape)}")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        a = (a - lo) / (hi - lo if hi > lo else 1.0)
    if a.shape[0] == 1:
        ax.imshow(a[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    elif a.shape[0] == 3:
        ax.imshow(np.clip(a.transpose(1, 2, 0), 0, 1), interpolation="nearest")
    else:
        ax.imshow(a.mean(0), cmap="gray", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def new_figure(width: float, height: float, dpi: int = 100):
    """A Figure on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Union[str, "os.PathLike[str]"], dpi: Optional[int] = None) -> str:
    """Save ``fig`` as PNG (creating the folder); returns the path."""
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return path


def learned_image_figure(x: ArrayLike, images: Mapping[str, ArrayLike], *, cmap: str = DEFAULT_CMAP,
                         center: Optional[bool] = None, reduce: Optional[str] = "sum", title: Optional[str] = None,
                         size: float = 1.7, colorbar: bool = False):
    """The input beside a row of learned images (Fig. 3-7 style).

    Parameters
    ----------
    x : input [D, H, W]
    images : mapping caption -> learned image [D, H, W] (e.g. layer name -> layer image)
    colorbar : a colour scale beside each heat map (each has its own limits)

    Returns
    -------
    Figure
    """
    n = 1 + len(images)
    fig = new_figure(size * n * (1.25 if colorbar else 1), size * 1.15)
    axes = fig.subplots(1, n, squeeze=False)[0]
    show_input(axes[0], x)
    for ax, (cap, img) in zip(axes[1:], images.items()):
        heatmap(ax, img, cmap=cmap, center=center, reduce=reduce, title=cap, colorbar=colorbar)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def layer_grid(xs: Sequence[ArrayLike], rows: Sequence[Mapping[str, ArrayLike]], *, cmap: str = DEFAULT_CMAP,
               center: Optional[bool] = None, reduce: Optional[str] = "sum",
               row_titles: Optional[Sequence[str]] = None, size: float = 1.7, fontsize: int = 7,
               colorbar: bool = False):
    """Fig. 3-7: one row per sample — its input, then one learned image per layer.

    Parameters
    ----------
    xs : inputs [D, H, W], one per row
    rows : per row, mapping layer name -> learned image [D, H, W] (same keys in every row)
    row_titles : optional caption of each row's input (e.g. "label 3")
    colorbar : a colour scale beside each heat map (each has its own limits)
    """
    if len(xs) != len(rows) or not rows:
        raise ValueError("layer_grid: need one mapping of images per input (and at least one)")
    cols = list(rows[0].keys())
    fig = new_figure(size * (1 + len(cols)) * (1.2 if colorbar else 1), size * 1.1 * len(rows))
    axes = fig.subplots(len(rows), 1 + len(cols), squeeze=False)
    for i, (x, r) in enumerate(zip(xs, rows)):
        show_input(axes[i, 0], x, title=row_titles[i] if row_titles else "input", fontsize=fontsize)
        for j, c in enumerate(cols):
            heatmap(axes[i, j + 1], r[c], cmap=cmap, center=center, reduce=reduce, title=c if i == 0 else None,
                    fontsize=fontsize, colorbar=colorbar)
    return fig


def filter_grid(x: ArrayLike, filter_images: ArrayLike, *, indices: Optional[Sequence[int]] = None,
                captions: Optional[Sequence[str]] = None, cmap: str = DEFAULT_CMAP, center: Optional[bool] = None,
                reduce: Optional[str] = "sum", ncols: int = 8, title: Optional[str] = None, size: float = 1.3,
                colorbar: bool = False):
    """The input and a grid of filter learned images ``L^k`` of one layer.

    Parameters
    ----------
    x : input [D, H, W]
    filter_images : [K, D, H, W]
    indices : which filters to draw (default all, at most 32)
    captions : per drawn filter (default ``"k=<index>"``)
    colorbar : a colour scale beside each heat map (each has its own limits)
    """
    L = to_numpy(filter_images)
    if L.ndim < 2:
        raise ValueError(f"filter_grid: filter_images must be [K, D, H, W], got shape {list(L.shape)}")
    idx = list(range(min(L.shape[0], 32))) if indices is None else [int(i) for i in indices]
    n = 1 + len(idx)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = new_figure(size * ncols * (1.3 if colorbar else 1), size * 1.15 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    show_input(axes[0], x)
    for a, k in enumerate(idx):
        cap = captions[a] if captions else f"k={k}"
        heatmap(axes[a + 1], L[k], cmap=cmap, center=center, reduce=reduce, title=cap, colorbar=colorbar)
    for ax in axes[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def filter_rows(x: ArrayLike, layers: Mapping[str, Tuple[ArrayLike, Sequence[str]]], *, cmap: str = DEFAULT_CMAP,
                center: Optional[bool] = None, reduce: Optional[str] = "sum", size: float = 1.25,
                colorbar: bool = False):
    """One row per layer: the input, then that layer's chosen filter learned images.

    Parameters
    ----------
    x : input [D, H, W]
    layers : mapping layer name -> (filter images [k, D, H, W], captions of the k images)
    colorbar : a colour scale beside each heat map (each has its own limits)
    """
    if not layers:
        raise ValueError("filter_rows: no layers given")
    ncols = 1 + max(len(to_numpy(L)) for L, _ in layers.values())
    fig = new_figure(size * ncols * (1.3 if colorbar else 1), size * 1.2 * len(layers))
    axes = fig.subplots(len(layers), ncols, squeeze=False)
    for i, (name, (L, caps)) in enumerate(layers.items()):
        L = to_numpy(L)
        show_input(axes[i, 0], x, title=None)
        axes[i, 0].set_ylabel(name, fontsize=7)
        for j in range(ncols - 1):
            ax = axes[i, j + 1]
            if j < len(L):
                heatmap(ax, L[j], cmap=cmap, center=center, reduce=reduce, title=caps[j] if caps else None, fontsize=7,
                        colorbar=colorbar)
            else:
                ax.axis("off")
    return fig


def line_plot(x: Sequence[Any], series: Mapping[str, Sequence[Optional[float]]], *, xlabel: str = "",
              ylabel: str = "", title: Optional[str] = None, xticklabels: Optional[Sequence[str]] = None,
              hline: Optional[float] = None, size: Tuple[float, float] = (5.5, 3.4), marker: str = "o"):
    """Line plot of one or more series over ``x`` (``None`` values leave gaps)."""
    fig = new_figure(*size)
    ax = fig.subplots()
    xs = list(range(len(x))) if xticklabels is not None else list(x)
    for name, ys in series.items():
        yv = [np.nan if v is None else float(v) for v in ys]
        ax.plot(xs, yv, marker=marker, ms=3, label=name)
    if xticklabels is not None:
        ax.set_xticks(xs)
        ax.set_xticklabels(list(xticklabels), rotation=30, ha="right", fontsize=8)
    ax.margins(x=0.06)
    if hline is not None:
        ax.axhline(hline, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def bar_plot(labels: Sequence[str], series: Mapping[str, Sequence[Optional[float]]], *, ylabel: str = "",
             title: Optional[str] = None, size: Tuple[float, float] = (5.5, 3.4), log: bool = False):
    """Grouped bars: one group per label, one bar per series (``None`` -> no bar)."""
    fig = new_figure(*size)
    ax = fig.subplots()
    n = max(1, len(series))
    width = 0.8 / n
    pos = np.arange(len(labels))
    for i, (name, ys) in enumerate(series.items()):
        yv = [np.nan if v is None else float(v) for v in ys]
        ax.bar(pos + (i - (n - 1) / 2) * width, yv, width, label=name)
    ax.set_xticks(pos)
    ax.set_xticklabels(list(labels), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def scatter_clusters(panels: Sequence[Dict[str, Any]], *, size: float = 3.6):
    """GMM scatter plots (Fig. 6-2): one panel per filter.

    Each panel: ``{"points": [S, 2], "labels": [S], "outliers": [indices], "title": str}``;
    points coloured by cluster, outlier samples circled.
    """
    fig = new_figure(size * max(1, len(panels)), size)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, p in zip(axes, panels):
        pts = to_numpy(p["points"])
        lab = to_numpy(p.get("labels", np.zeros(len(pts))))
        ax.scatter(pts[:, 0], pts[:, 1], c=lab, cmap="tab10", s=7, vmin=0, vmax=9)
        out = [int(i) for i in (p.get("outliers") or [])]
        if out:
            o = pts[out]
            ax.scatter(o[:, 0], o[:, 1], facecolors="none", edgecolors="k", s=45, linewidths=0.8,
                       label="outlier samples")
            ax.legend(fontsize=7, loc="best")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.set_title(p.get("title", ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
