"""Plots write non-empty PNGs of the requested size."""

import matplotlib.image
import numpy as np
import pytest

from keras_vmoe.analysis import plots


def read_png(path):
    image = matplotlib.image.imread(path)
    assert image.std() > 0, "the PNG is blank"
    return image


def test_routing_heatmap_png_size(tmp_path):
    counts = np.array([[5, 0, 1], [0, 4, 0], [2, 2, 2], [0, 0, 6]])
    path = plots.plot_routing_heatmap(
        counts, tmp_path / "heatmap.png", title="layer", figsize=(4, 2), dpi=50
    )
    assert read_png(path).shape[:2] == (100, 200)


def test_gating_maps_png_size(tmp_path):
    images = np.random.default_rng(0).random((3, 16, 16, 3))
    maps = np.array([np.arange(16).reshape(4, 4) % 4] * 3)
    path = plots.plot_gating_maps(
        images, maps, 4, tmp_path / "gating.png", dpi=50, panel_size=2.0
    )
    assert read_png(path).shape[:2] == (100, 350)  # (3 * 2 + 1) * 50 wide


def test_gating_overlay_colours_each_patch_by_its_expert():
    image = np.zeros((4, 4, 3))
    expert_map = np.array([[0, 1], [2, 3]])
    overlay = plots.gating_overlay(image, expert_map, 4, alpha=1.0)
    colors = plots.expert_colors(4)
    np.testing.assert_allclose(overlay[0, 0], colors[0])
    np.testing.assert_allclose(overlay[0, 3], colors[1])
    np.testing.assert_allclose(overlay[3, 0], colors[2])
    np.testing.assert_allclose(overlay[3, 3], colors[3])


@pytest.mark.parametrize("num_experts", [4, 16, 32])
def test_expert_colors_are_distinct(num_experts):
    colors = plots.expert_colors(num_experts)
    assert colors.shape == (num_experts, 3)
    assert len({tuple(c) for c in np.round(colors, 4)}) == num_experts


def test_cdf_similarity_and_load_pngs(tmp_path):
    cdf = plots.plot_patches_per_expert_cdf(
        {"a": (np.array([1, 3, 4]), np.array([1 / 3, 2 / 3, 1.0]))},
        tmp_path / "cdf.png",
        figsize=(3, 2),
        dpi=50,
    )
    assert read_png(cdf).shape[:2] == (100, 150)
    similarity = plots.plot_expert_similarity(
        np.eye(3), tmp_path / "similarity.png", figsize=(3, 3), dpi=50
    )
    assert read_png(similarity).shape[:2] == (150, 150)
    load = plots.plot_expert_load(
        {"a": np.array([0.5, 0.25, 0.25])},
        tmp_path / "load.png",
        figsize=(3, 2),
        dpi=50,
    )
    assert read_png(load).shape[:2] == (100, 150)
