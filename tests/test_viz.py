"""Heat maps follow docs/spec.md §1 Display: diverging colours centred at zero, positive red,
negative blue; ``cmap="jet"`` gives the thesis's look; figures render to valid PNGs without pyplot."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nns_cuda.app import viz


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _draw_one(img, **kw):
    fig = viz.new_figure(2, 2, dpi=50)
    ax = fig.add_axes([0, 0, 1, 1])
    im = viz.heatmap(ax, img, **kw)
    return fig, im


def test_heat_reductions():
    L = torch.tensor([[[1.0, -2.0]], [[3.0, 1.0]]])       # [D=2, H=1, W=2]
    np.testing.assert_allclose(viz.heat(L), [[4.0, -1.0]])
    np.testing.assert_allclose(viz.heat(L, "abs"), [[4.0, 3.0]])
    np.testing.assert_allclose(viz.heat(L[:1], None), [[1.0, -2.0]])
    with pytest.raises(ValueError, match="single-channel"):
        viz.heat(L, None)
    with pytest.raises(ValueError, match="reduce"):
        viz.heat(L, "max")
    assert viz.heat(torch.arange(5.0)).shape == (1, 5)


def test_positive_red_negative_blue_zero_white():
    img = torch.zeros(1, 4, 4)
    img[0, :, :2] = 1.0      # left half positive
    img[0, :, 2:] = -0.5     # right half negative (smaller magnitude)
    fig, im = _draw_one(img)
    assert im.get_cmap().name == viz.DEFAULT_CMAP
    vmin, vmax = im.get_clim()
    assert vmin == -vmax == -1.0, "limits must be symmetric around zero"
    px = _pixels(fig)
    h, w = px.shape[:2]
    left, right = px[h // 2, w // 8], px[h // 2, w - w // 8]
    assert left[0] > left[2] + 50 and left[0] > left[1] + 50, f"positive should be red, got {left}"
    assert right[2] > right[0] + 40, f"negative should be blue, got {right}"
    fig, _ = _draw_one(torch.zeros(1, 4, 4) + torch.tensor([[[0.0, 1.0, -1.0, 0.0]]]))
    px = _pixels(fig)
    zero = px[px.shape[0] // 2, 2]
    assert (zero > 235).all(), f"zero should be white, got {zero}"


def test_jet_is_min_max_scaled_unless_centred():
    img = torch.tensor([[[2.0, 3.0], [4.0, 5.0]]])
    _, im = _draw_one(img, cmap="jet")
    assert im.get_cmap().name == "jet" and im.get_clim() == (2.0, 5.0)
    _, im = _draw_one(img, cmap="jet", center=True)
    assert im.get_clim() == (-5.0, 5.0)
    fig, _ = _draw_one(img, cmap="jet")
    px = _pixels(fig)
    hi, lo = px[-2, -2], px[1, 1]                       # largest value bottom-right, smallest top-left
    assert hi[0] > hi[2] and lo[2] > lo[0], (hi, lo)  # larger red, smaller blue


def test_constant_and_nonfinite_images_do_not_crash():
    for img in (torch.zeros(3, 5, 5), torch.full((1, 3, 3), float("nan"))):
        fig, im = _draw_one(img)
        _pixels(fig)


def test_grids_have_the_right_panels(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(3, 8, 8, generator=g) for _ in range(2)]
    rows = [{"a": torch.randn(3, 8, 8, generator=g), "b": torch.randn(3, 8, 8, generator=g)} for _ in range(2)]
    fig = viz.layer_grid(xs, rows, row_titles=["s0", "s1"])
    assert len(fig.axes) == 2 * 3
    assert [fig.axes[1].get_title(), fig.axes[2].get_title()] == ["a", "b"]
    L = torch.randn(5, 3, 8, 8, generator=g)
    fig = viz.filter_grid(xs[0], L, indices=[4, 1], ncols=4)
    assert [a.get_title() for a in fig.axes[:3]] == ["input", "k=4", "k=1"]
    fig = viz.filter_rows(xs[0], {"a": (L[:2], ["k=0", "k=1"]), "b": (L[:3], ["x", "y", "z"])})
    assert len(fig.axes) == 2 * 4
    fig = viz.learned_image_figure(xs[0], {"conv1": L[0], "conv2": L[1]}, cmap="jet")
    p = viz.save(fig, tmp_path / "sub" / "f.png")
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        viz.layer_grid(xs, rows[:1])


def test_no_pyplot_state():
    import sys

    viz.line_plot([1, 2], {"a": [1.0, None]})
    viz.bar_plot(["x", "y"], {"a": [1.0, 2.0], "b": [None, 1.0]})
    viz.scatter_clusters([{"points": torch.randn(10, 2), "labels": torch.zeros(10), "outliers": [1], "title": "t"}])
    if "matplotlib.pyplot" in sys.modules:  # imported by someone else: we must not have opened figures
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


def test_heat_maps_have_a_colour_scale():
    """``colorbar=True`` puts a colour scale beside every heat map (not beside the inputs), with
    ticks at the limits and at zero, so each panel's values can be read off."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(3, 8, 8, generator=g) for _ in range(2)]
    rows = [{"a": torch.randn(3, 8, 8, generator=g), "b": 5 * torch.randn(3, 8, 8, generator=g)} for _ in range(2)]
    fig = viz.layer_grid(xs, rows, colorbar=True)
    bars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(fig.axes) == 2 * 3 + len(bars) and len(bars) == 2 * 2
    im = fig.axes[1].images[0]
    vmin, vmax = im.get_clim()
    ticks = sorted(bars[0].get_yticks())
    np.testing.assert_allclose(ticks, [vmin, 0.0, vmax])
    assert [t.get_text() for t in bars[0].get_yticklabels()][1] == "0"
    L = torch.randn(5, 3, 8, 8, generator=g)
    for fig in (viz.filter_rows(xs[0], {"a": (L[:2], ["k=0", "k=1"])}, colorbar=True),
                viz.filter_grid(xs[0], L, indices=[0, 3], colorbar=True),
                viz.learned_image_figure(xs[0], {"conv1": L[0]}, colorbar=True)):
        n_maps = sum(1 for a in fig.axes if a.images and a.images[0].get_cmap().name == viz.DEFAULT_CMAP)
        assert sum(a.get_label() == "<colorbar>" for a in fig.axes) == n_maps > 0
    assert not any(a.get_label() == "<colorbar>" for a in viz.layer_grid(xs, rows).axes)
