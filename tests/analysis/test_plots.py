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


@pytest.fixture
def captured_figure(monkeypatch):
    """Keeps the figure a plot function draws instead of closing it."""
    captured = {}

    def keep(figure, path, dpi):
        captured["figure"] = figure
        return str(path)

    monkeypatch.setattr(plots, "_save", keep)
    yield captured
    if "figure" in captured:
        plots._pyplot().close(captured["figure"])


def test_heatmap_ticks_name_the_class_of_each_column(tmp_path, captured_figure):
    # Class 1 goes to expert 0, classes 0 and 2 to expert 1: sorted by top
    # expert the columns show classes 1, 0, 2.
    counts = np.array([[0, 5], [5, 0], [0, 5]])
    np.testing.assert_array_equal(plots.heatmap_class_order(counts), [1, 0, 2])
    plots.plot_routing_heatmap(counts, tmp_path / "h.png")
    axis = captured_figure["figure"].axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["1", "0", "2"]
    plots.plot_routing_heatmap(
        counts, tmp_path / "h.png", class_names=["cat", "dog", "eel"]
    )
    axis = captured_figure["figure"].axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == [
        "dog",
        "cat",
        "eel",
    ]
    plots.plot_routing_heatmap(counts, tmp_path / "h.png", sort_classes=False)
    axis = captured_figure["figure"].axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="class_names"):
        plots.plot_routing_heatmap(
            counts, tmp_path / "h.png", class_names=["a"]
        )


def test_heatmap_labels_every_kth_of_many_classes(tmp_path, captured_figure):
    counts = np.eye(100, 4)[:, ::-1] + 1  # 100 classes
    plots.plot_routing_heatmap(counts, tmp_path / "h.png", sort_classes=False)
    axis = captured_figure["figure"].axes[0]
    labels = [t.get_text() for t in axis.get_xticklabels()]
    assert labels == [str(c) for c in range(0, 100, 3)]
    np.testing.assert_array_equal(axis.get_xticks(), range(0, 100, 3))


def test_load_bars_are_centred_on_their_expert_tick(tmp_path, captured_figure):
    loads = {
        "a": np.array([0.1, 0.2, 0.3, 0.4]),
        "b": np.array([0.4, 0.3, 0.2, 0.1]),
        "c": np.array([0.25] * 4),
    }
    plots.plot_expert_load(loads, tmp_path / "load.png")
    axis = captured_figure["figure"].axes[0]
    np.testing.assert_array_equal(axis.get_xticks(), [0, 1, 2, 3])
    centres = np.array(
        [
            [patch.get_x() + patch.get_width() / 2 for patch in container]
            for container in axis.containers
        ]
    )  # [layers, experts]
    np.testing.assert_allclose(centres.mean(axis=0), [0, 1, 2, 3], atol=1e-9)


def test_gating_overlay_keeps_the_legend_hue_of_every_patch():
    from matplotlib.colors import rgb_to_hsv

    image = np.random.default_rng(0).random((8, 8, 3))  # colourful
    expert_map = np.array([[0, 1], [2, 3]])
    overlay = plots.gating_overlay(image, expert_map, 4, alpha=0.5)
    hues = rgb_to_hsv(np.clip(overlay, 0.0, 1.0))[..., 0]
    expert_hues = rgb_to_hsv(plots.expert_colors(4))[:, 0]
    expected = expert_hues[np.repeat(np.repeat(expert_map, 4, 0), 4, 1)]
    difference = np.abs(hues - expected)
    difference = np.minimum(difference, 1.0 - difference)  # hue is circular
    assert difference.max() < 1e-6
