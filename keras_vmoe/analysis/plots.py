"""Routing plots: heatmaps, gating maps, CDFs, similarity, load.

Every function draws from plain arrays, writes a PNG of exactly
`figsize * dpi` pixels to `path` with matplotlib's Agg backend (no display
needed) and returns the path. matplotlib is imported on first use.
"""

import numpy as np

from keras_vmoe.analysis.statistics import to_numpy


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path, dpi):
    figure.savefig(path, dpi=dpi)
    _pyplot().close(figure)
    return str(path)


def expert_colors(num_experts):
    """[E, 3] RGB colours in [0, 1], one per expert (tab10 / tab20, then
    evenly spaced hues)."""
    plt = _pyplot()
    if num_experts <= 10:
        colors = plt.get_cmap("tab10").colors[:num_experts]
    elif num_experts <= 20:
        colors = plt.get_cmap("tab20").colors[:num_experts]
    else:
        colors = plt.get_cmap("hsv")(
            np.linspace(0, 1, num_experts, endpoint=False)
        )
    return np.asarray(colors)[:, :3]


MAX_CLASS_TICKS = 40


def heatmap_class_order(counts, sort_classes=True):
    """The class shown in each heatmap column, left to right.

    Args:
        counts: array [num_classes, E] from `class_expert_counts`.
        sort_classes: group classes by their most chosen expert (ties in
            the top fraction: the larger fraction first, then the lower
            class id); False keeps class-id order.

    Returns:
        int array [C]: column j shows class `order[j]`.
    """
    counts = to_numpy(counts, dtype="float64")
    if not sort_classes:
        return np.arange(counts.shape[0])
    fractions = _row_fractions(counts)
    return np.lexsort((-fractions.max(axis=1), fractions.argmax(axis=1)))


def _row_fractions(counts):
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(
        counts, totals, out=np.zeros_like(counts), where=totals > 0
    )


def plot_routing_heatmap(
    counts,
    path,
    title=None,
    sort_classes=True,
    figsize=(6, 3),
    dpi=100,
    class_names=None,
):
    """ViMoE routing heatmap: classes (x) against experts (y).

    Each column shows which fraction of a class's routing choices went to
    each expert (darker = more). As in ViMoE's Fig. 5, classes are
    reordered by their most chosen expert for readability; the x ticks
    name the class of each column (its name, or its class id), never the
    column's position. With more than 40 classes every k-th column is
    labelled.

    Args:
        counts: array [num_classes, E] from `class_expert_counts`.
        path: where to write the PNG.
        title: figure title.
        sort_classes: reorder classes by their top expert
            (`heatmap_class_order`).
        figsize: (width, height) in inches.
        dpi: pixels per inch.
        class_names: optional list of C class names for the ticks.

    Returns:
        `path` as a string.
    """
    counts = to_numpy(counts, dtype="float64")
    if class_names is not None and len(class_names) != counts.shape[0]:
        raise ValueError(
            f"`class_names` must name the {counts.shape[0]} classes of "
            f"`counts`. Received {len(class_names)} names"
        )
    order = heatmap_class_order(counts, sort_classes)
    fractions = _row_fractions(counts)[order]
    labels = [
        str(class_names[c]) if class_names is not None else str(c)
        for c in order
    ]
    step = max(1, -(-len(order) // MAX_CLASS_TICKS))
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=figsize)
    image = axis.imshow(
        fractions.T,
        aspect="auto",
        cmap="Blues",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    axis.set_xticks(range(0, len(order), step))
    axis.set_xticklabels(
        labels[::step],
        rotation=90 if class_names is not None or len(order) > 10 else 0,
        fontsize="x-small",
    )
    axis.set_xlabel(
        "class (grouped by top expert)" if sort_classes else "class"
    )
    axis.set_ylabel("expert")
    axis.set_yticks(range(counts.shape[1]))
    if title:
        axis.set_title(title, fontsize="small")
    figure.colorbar(image, ax=axis, fraction=0.05)
    figure.tight_layout()
    return _save(figure, path, dpi)


def gating_overlay(image, expert_map, num_experts, alpha=0.5):
    """The image in grey, blended with one colour per expert over each
    patch.

    The image is turned to grey (its luminance) before blending: mixing a
    colour with a grey keeps the colour's hue, so every patch shows the
    hue of its expert in the legend, only lighter or darker.

    Args:
        image: float array [H, W, C] (any range; grey, rescaled to
            [0, 1]).
        expert_map: int array [rows, columns], the top expert of every
            patch; upsampled (nearest) to the image size.
        num_experts: E, to pick the colours.
        alpha: opacity of the expert colours.

    Returns:
        float array [H, W, 3] in [0, 1].
    """
    image = to_numpy(image, dtype="float64")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3] @ np.array([0.299, 0.587, 0.114])
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    image = np.repeat(image[..., None], 3, axis=-1)
    expert_map = to_numpy(expert_map)
    height, width = image.shape[:2]
    rows = np.arange(height) * expert_map.shape[0] // height
    columns = np.arange(width) * expert_map.shape[1] // width
    upsampled = expert_map[rows[:, None], columns[None, :]]
    colors = expert_colors(num_experts)[upsampled]
    return (1.0 - alpha) * image + alpha * colors


def plot_gating_maps(
    images,
    expert_maps,
    num_experts,
    path,
    title=None,
    alpha=0.5,
    dpi=100,
    panel_size=2.0,
):
    """Sweet-spot gating maps: the top expert of every patch over images.

    Args:
        images: float array [N, H, W, C].
        expert_maps: int array [N, rows, columns] of top-1 experts
            (`LayerRouting.top_expert_map`).
        num_experts: E.
        path: where to write the PNG.
        title: figure title.
        alpha: opacity of the expert colours.
        dpi: pixels per inch.
        panel_size: inches per image; the figure is
            (N * panel_size + 1) x panel_size inches (the extra inch holds
            the legend).

    Returns:
        `path` as a string.
    """
    images = to_numpy(images)
    count = len(images)
    plt = _pyplot()
    figure, axes = plt.subplots(
        1,
        count + 1,
        figsize=(count * panel_size + 1.0, panel_size),
        gridspec_kw={"width_ratios": [panel_size] * count + [1.0]},
        squeeze=False,
    )
    for axis, image, expert_map in zip(axes[0], images, expert_maps):
        axis.imshow(gating_overlay(image, expert_map, num_experts, alpha))
        axis.axis("off")
    legend_axis = axes[0, -1]
    legend_axis.axis("off")
    colors = expert_colors(num_experts)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colors[e]) for e in range(num_experts)
    ]
    legend_axis.legend(
        handles,
        [f"E{e}" for e in range(num_experts)],
        loc="center",
        fontsize="x-small",
        frameon=False,
    )
    if title:
        figure.suptitle(title, fontsize="small")
    return _save(figure, path, dpi)


def plot_patches_per_expert_cdf(cdfs, path, figsize=(5, 3.5), dpi=100):
    """Sweet-spot Fig. 6: CDF of the patches an expert gets per image.

    Args:
        cdfs: dict layer name -> `(values, cdf)` from
            `patches_per_expert_cdf`.
        path: where to write the PNG.
        figsize: (width, height) in inches.
        dpi: pixels per inch.

    Returns:
        `path` as a string.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=figsize)
    for name, (values, cdf) in cdfs.items():
        if len(values):
            axis.step(values, cdf, where="post", label=name)
    axis.set_xlabel("patches routed to an expert, per image")
    axis.set_ylabel("CDF")
    axis.set_ylim(0.0, 1.02)
    if cdfs:
        axis.legend(fontsize="x-small")
    figure.tight_layout()
    return _save(figure, path, dpi)


def plot_expert_similarity(
    similarity, path, title=None, figsize=(4, 3.5), dpi=100
):
    """Expert-by-expert Jaccard similarity matrix (`expert_similarity`).

    Args:
        similarity: array [E, E] in [0, 1].
        path: where to write the PNG.
        title: figure title.
        figsize: (width, height) in inches.
        dpi: pixels per inch.

    Returns:
        `path` as a string.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=figsize)
    image = axis.imshow(similarity, cmap="viridis", vmin=0.0, vmax=1.0)
    axis.set_xlabel("expert")
    axis.set_ylabel("expert")
    axis.set_xticks(range(len(similarity)))
    axis.set_yticks(range(len(similarity)))
    if title:
        axis.set_title(title, fontsize="small")
    figure.colorbar(image, ax=axis, fraction=0.05)
    figure.tight_layout()
    return _save(figure, path, dpi)


def plot_expert_load(loads, path, figsize=(6, 3), dpi=100):
    """Per-layer expert load as grouped bars (dashed line: uniform load).

    Args:
        loads: dict layer name -> array [E] of load fractions.
        path: where to write the PNG.
        figsize: (width, height) in inches.
        dpi: pixels per inch.

    Returns:
        `path` as a string.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=figsize)
    width = 0.8 / max(len(loads), 1)
    num_experts = 0
    for offset, (name, load) in enumerate(loads.items()):
        load = to_numpy(load)
        num_experts = max(num_experts, len(load))
        # Each expert's group of bars is centred on its tick.
        shift = (offset - (len(loads) - 1) / 2) * width
        axis.bar(np.arange(len(load)) + shift, load, width, label=name)
        axis.axhline(
            1.0 / len(load), color="gray", linestyle="--", linewidth=0.8
        )
    axis.set_xticks(range(num_experts))
    axis.set_xlabel("expert")
    axis.set_ylabel("fraction of choices")
    if loads:
        axis.legend(fontsize="x-small")
    figure.tight_layout()
    return _save(figure, path, dpi)
