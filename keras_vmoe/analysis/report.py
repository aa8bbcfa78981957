"""A routing report: every statistic and plot of a model, in one folder."""

import json
import os
import re


from keras_vmoe.analysis import plots
from keras_vmoe.analysis import statistics
from keras_vmoe.analysis.collect import TOP_K_ONLY_NOTE
from keras_vmoe.analysis.collect import collect_routing
from keras_vmoe.models.stats import layer_stats
from keras_vmoe.models.stats import model_stats
from keras_vmoe.training.metrics import top_k_layers
from keras_vmoe.utils.io import atomic_file

_BLOCK = re.compile(r"^(.*?(?:^|/)(?:stage_\d+_)?block_\d+)(?:/|$)")


def _block_of(path):
    """The block a layer belongs to (`.../block_3`, `stage_1_block_0`), or
    the layer's own path outside blocks."""
    match = _BLOCK.match(path)
    return match.group(1) if match else path


def _soft_lines(layers):
    """The markdown section of the Soft MoE layers."""
    rows = []
    for r in layers:
        summary = r.summary()
        dispatch_max = sum(summary["dispatch_weights_max"]) / r.num_experts
        rows.append(
            [
                r.index,
                r.name,
                r.num_experts,
                r.slots_per_expert,
                _format(max(summary["load"]) * r.num_experts, 2),
                _format(min(summary["load"]) * r.num_experts, 2),
                f"{_format(min(summary['slot_entropy']), 2)} – "
                f"{_format(max(summary['slot_entropy']), 2)} "
                f"(uniform {_format(summary['slot_entropy_uniform'], 2)})",
                f"{_format(dispatch_max)}"
                f" (uniform {_format(summary['dispatch_weights_uniform'])})",
                f"{_format(summary['combine_entropy'], 2)} "
                f"(uniform {_format(summary['combine_entropy_uniform'], 2)})",
                _format(summary["combine_weights_max"]),
            ]
        )
    return [
        "## Soft MoE layers",
        "",
        _markdown_table(
            [
                "#",
                "layer",
                "E",
                "slots / expert",
                "max combine load x E",
                "min combine load x E",
                "slot entropy (nats, min – max over experts)",
                "max dispatch weight",
                "combine entropy (nats)",
                "max combine weight",
            ],
            rows,
        ),
        "",
        "Combine load: each expert's share of all tokens' combine weights "
        "(1.0 x E is balanced). Slot entropy: entropy of a slot's dispatch "
        "weights over the tokens of its image (log T: the slot averages "
        "all tokens; 0: it copies one token). Per-expert values are in "
        "`report.json`. Not shown for Soft MoE (no discrete expert choice): "
        + TOP_K_ONLY_NOTE.replace("skipped for this router: ", "")
        + ".",
        "",
    ]


def _expert_choice_lines(layers):
    """The markdown section of the Expert Choice layers."""
    rows = []
    for r in layers:
        summary = r.summary()
        per_image = summary["tokens_per_expert_per_image"]
        low, high = min(per_image), max(per_image)
        spread = f"{_format(low, 1)} – {_format(high, 1)}"
        rows.append(
            [
                r.index,
                r.name,
                r.num_experts,
                spread,
                _format(summary["unrouted_fraction"]),
                _format(summary["experts_per_token_mean"], 2),
                _format(summary["gate_entropy"]),
            ]
        )
    return [
        "## Expert Choice layers",
        "",
        _markdown_table(
            [
                "#",
                "layer",
                "E",
                "tokens / expert / image (min – max)",
                "tokens with no expert",
                "experts / token",
                "gate entropy",
            ],
            rows,
        ),
        "",
        "Every expert picks the same number of tokens per routing group, "
        "so its load is balanced by construction; what varies is how many "
        "experts each token gets (0 = the token only keeps its residual). "
        "Not shown for Expert Choice: "
        + TOP_K_ONLY_NOTE.replace("skipped for this router: ", "")
        + ".",
        "",
    ]


def parameter_breakdown(model, image_size=None):
    """Parameters, active parameters and FLOPs per block and for the model.

    Reuses `keras_vmoe.models.stats` (see its docstring for what is
    counted). Rows group the counted layers by block (`block_i`,
    `stage_s_block_b`); layers outside blocks (patch embedding, final
    norm, head) have their own row. Parameters that no counted layer owns
    (CLS / register tokens, position embedding, LayerScale) are in the row
    "other", so the rows add up to the totals.

    Args:
        model: a keras-vmoe backbone or classifier.
        image_size: int or (height, width); default: the model's input
            size, or 224 when it is not fixed.

    Returns:
        `{"rows": [{"name", "params", "active_params", "flops"}, ...],
        "total": {"params", "active_params", "flops"}}`; FLOPs are MACs of
        one image.

    Example:
    >>> parameter_breakdown(backbone)["total"]["active_params"]
    """
    if image_size is None:
        height, width = model.input.shape[1:3]
        image_size = (height, width) if height and width else 224
    sparsity = {
        layer.path: layer.top_k / layer.num_experts
        for layer in top_k_layers(model)
    }
    rows = {}
    for record in layer_stats(model, image_size):
        row = rows.setdefault(
            _block_of(record["path"]),
            {"params": 0, "active_params": 0, "flops": 0},
        )
        active = record["params"] * sparsity.get(record["path"], 1.0)
        row["params"] += record["params"]
        row["active_params"] += int(round(active))
        row["flops"] += record["flops"]
    total = model_stats(model, image_size)
    other_params = total["params"] - sum(row["params"] for row in rows.values())
    rows["other"] = {
        "params": other_params,
        "active_params": other_params,
        "flops": 0,
    }
    return {
        "rows": [{"name": name, **row} for name, row in rows.items()],
        "total": total,
    }


def _markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]
    return "\n".join(lines)


def _format(value, digits=3):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(
    model,
    data,
    out_dir,
    max_batches=None,
    batch_size=32,
    num_gating_images=4,
    num_classes=None,
    image_size=None,
    dpi=100,
    class_names=None,
):
    """Writes every routing statistic and plot of `model` on `data`.

    `out_dir` receives:
    - `index.md`: the tables below and all the figures;
    - `report.json`: every number (per-layer load, importance, mean gate,
      dropped fraction, gate entropy, specialization (NMI normalised by
      min(H(c), H(e)), and by the arithmetic mean), experts per image,
      class x expert counts, Jaccard similarities and Sweet-spot's
      weighted-Dice similarity; routing degree and
      distinct routes; the parameter / FLOPs breakdown);
    - `load.png`, `patches_per_expert_cdf.png` (token-routed layers
      only) and, for top-k MoE layer `i`,
      `heatmap_layer_{i}.png` (with labels), `gating_layer_{i}.png` and
      `similarity_layer_{i}.png`.

    Soft MoE layers get their own table (combine-mass load, slot entropy,
    dispatch and combine weight statistics) and Expert Choice layers theirs
    (tokens per expert, unrouted tokens, experts per token); they appear in
    `load.png`, and the figures and numbers that need top-k choices
    (heatmaps, gating maps, similarities, CDF, specialization, routing
    degree) are skipped with a note in `index.md` and in each layer's
    `report.json` entry (`"skipped"`).

    Args:
        model: a keras-vmoe model with MoE layers (backbone or classifier).
        data: images, `(images, labels)` numpy arrays, or an iterable of
            batches such as a `tf.data.Dataset` (see `collect_routing`).
            Without labels there are no heatmaps or specialization scores.
        out_dir: folder to write into (created if needed).
        max_batches: analyse at most this many batches.
        batch_size: batch size for numpy inputs.
        num_gating_images: images shown in each gating map.
        num_classes: number of classes (default: from the model or labels).
        image_size: image size of the FLOPs count (default: the model's).
        dpi: resolution of the PNGs.
        class_names: optional class names for the heatmaps' x ticks
            (default: class ids).

    Returns:
        The dict written to `report.json`, plus `"files"`: the paths
        written.

    Example:
    >>> report = write_report(classifier, (images, labels), "routing_report")
    >>> report["routing"]["layers"][-1]["specialization"]
    """
    routing = collect_routing(
        model,
        data,
        max_batches=max_batches,
        batch_size=batch_size,
        num_classes=num_classes,
    )
    os.makedirs(out_dir, exist_ok=True)

    def out(name):
        return os.path.join(out_dir, name)

    files = [
        plots.plot_expert_load(
            {r.name: r.load for r in routing.layers}, out("load.png"), dpi=dpi
        )
    ]
    # With image routing every patch follows its image: the CDF is only
    # informative for token-routed layers.
    top_k_layers = routing.top_k_layers
    soft_layers = [r for r in routing.layers if r.kind == "soft"]
    choice_layers = [r for r in routing.layers if r.kind == "expert_choice"]
    token_layers = [r for r in top_k_layers if r.routing == "token"]
    if token_layers:
        files.append(
            plots.plot_patches_per_expert_cdf(
                {
                    r.name: statistics.patches_per_expert_cdf(r.expert_counts)
                    for r in token_layers
                },
                out("patches_per_expert_cdf.png"),
                dpi=dpi,
            )
        )
    layer_figures = []
    shown = routing.images[:num_gating_images]
    for r in top_k_layers:
        figures = {}
        if r.labels is not None:
            figures["heatmap"] = plots.plot_routing_heatmap(
                r.class_expert_counts,
                out(f"heatmap_layer_{r.index}.png"),
                title=(
                    f"{r.name}: specialization "
                    f"I(c;e)/min(H(c),H(e)) = {r.specialization:.3f}"
                ),
                dpi=dpi,
                class_names=class_names,
            )
        if len(shown):
            figures["gating"] = plots.plot_gating_maps(
                shown,
                r.top_expert_map(routing.image_shape)[: len(shown)],
                r.num_experts,
                out(f"gating_layer_{r.index}.png"),
                title=r.name,
                dpi=dpi,
            )
        figures["similarity"] = plots.plot_expert_similarity(
            statistics.expert_similarity(r.expert_counts, by="images"),
            out(f"similarity_layer_{r.index}.png"),
            title=f"{r.name}: Jaccard (images)",
            dpi=dpi,
        )
        files += list(figures.values())
        layer_figures.append(figures)

    breakdown = parameter_breakdown(model, image_size)
    report = {"routing": routing.summary(), "parameters": breakdown}
    with atomic_file(out("report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    files.append(out("report.json"))

    summaries = [
        s
        for s, r in zip(report["routing"]["layers"], routing.layers)
        if r.kind == "top_k"
    ]
    top_k_lines = (
        [
            "## MoE layers",
            "",
            _markdown_table(
                [
                    "#",
                    "layer",
                    "routing",
                    "E",
                    "K",
                    "max load x E",
                    "dropped",
                    "gate entropy",
                    "experts / image",
                    "specialization (NMI, min)",
                    "NMI, arithmetic",
                ],
                [
                    [
                        s["index"],
                        s["name"],
                        s["routing"],
                        s["num_experts"],
                        s["top_k"],
                        _format(max(s["load"]) * s["num_experts"], 2),
                        _format(s["dropped_fraction"]),
                        _format(s["gate_entropy"]),
                        _format(s["experts_per_image"], 2),
                        _format(s["specialization"]),
                        _format(s["specialization_arithmetic"]),
                    ]
                    for s in summaries
                ],
            ),
            "",
            "Specialization: normalised mutual information between class and "
            "expert, I(c; e) / min(H(c), H(e)) (1: the expert is a function of "
            "the class, or the class of the expert; 0: independent). "
            "\"NMI, arithmetic\" divides by (H(c) + H(e)) / 2 instead "
            "(scikit-learn's default; 1 only when each determines the other). "
            "Expert similarity figures show the Jaccard index over images; "
            "`report.json` also holds the weighted Jaccard over patches and "
            "Sweet-spot's own measure (a weighted Dice coefficient, "
            "`expert_similarity_sweetspot`) to compare with its Fig. 7/8.",
            "",
        ]
        if summaries
        else []
    )
    lines = [
        f"# Routing report: {model.name}",
        "",
        f"{routing.num_images} images. Routing degree D = C(N,K)^L: "
        f"{_format(routing.routing_degree)}; distinct routes observed: "
        f"{_format(routing.distinct_routes)} (top-k image routing "
        "only).",
        "",
        *(_soft_lines(soft_layers) if soft_layers else []),
        *(_expert_choice_lines(choice_layers) if choice_layers else []),
        *top_k_lines,
        "![expert load](load.png)",
        "",
        *(
            ["![patches per expert CDF](patches_per_expert_cdf.png)", ""]
            if token_layers
            else []
        ),
        "## Parameters and FLOPs (MACs, one image)",
        "",
        _markdown_table(
            ["block", "params", "active params", "FLOPs"],
            [
                [row["name"], row["params"], row["active_params"], row["flops"]]
                for row in breakdown["rows"]
            ]
            + [
                [
                    "**total**",
                    breakdown["total"]["params"],
                    breakdown["total"]["active_params"],
                    breakdown["total"]["flops"],
                ]
            ],
        ),
        "",
    ]
    for r, figures in zip(top_k_layers, layer_figures):
        lines += [f"## MoE layer {r.index}: {r.name}", ""]
        lines += [
            f"![{kind}]({os.path.basename(path)})\n"
            for kind, path in figures.items()
        ]
    with atomic_file(out("index.md"), "w") as handle:
        handle.write("\n".join(lines))
    files.append(out("index.md"))
    report["files"] = files
    return report
