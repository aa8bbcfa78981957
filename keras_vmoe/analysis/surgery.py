"""Model surgery: replace MoE layers by one dense FFN.

- `prune_moe_layers` replaces chosen MoE layers (or those whose routing
  does not specialise, ViMoE Sec. 4.2) by their most used expert or the
  load-weighted average of their experts.
- `merge_experts` folds the gate-weighted average of the experts into one
  FFN (structural reparameterisation, as RepMoE-style work merges
  branches).

Both rebuild the model from its config with the chosen blocks dense and
copy every other weight by its path, so the result is an ordinary
`ViTMoEBackbone` / `ViTMoEImageClassifier` (or `ConvNeXtMoEBackbone` /
`ConvNeXtMoEImageClassifier`) that saves, loads and runs like any other.

MoE-ConvNeXt blocks (token routing, Sweet-spot skip `s * u` around the
MoE, experts often narrower than the dense MLP): the folded block becomes
a dense block with its own MLP width (`block_mlp_dims`, the experts'
width) that keeps the skip (`dense_skip_blocks`):
`y = x + gamma * (FFN(u) + s * u)`.

How an MoE layer becomes one FFN. The layer computes
`y = E_s(x) + sum_{i in top-k} g_i(x) E_i(x)` with
`E_i(x) = W2_i act(W1_i x + b1_i) + b2_i`. The folded FFN is
`W2 act(W1 x + b1) + b2` with

    W1 = sum_i a_i W1_i,  b1 = sum_i a_i b1_i        (sum_i a_i = 1)
    W2 = sum_i o_i W2_i,  b2 = sum_i o_i b2_i

where `a` mixes the experts' first layers and `o` carries the gates into
the output layer (the gate scales the expert's output, so it folds into
W2 and b2). This is exact when every expert is the same FFN and every item
has the same total gate `sum_i o_i` (e.g. renormalised gates and no
dropped tokens); otherwise averaging weights through the nonlinearity is
an approximation whose cost must be measured (`accuracy`).

The shared expert is always on, so it would have to sit beside the folded
FFN (`E_s(x) + FFN(x)`, an exact fold into one FFN of hidden width 2h by
concatenating hidden units). MoE-ConvNeXt blocks set their own MLP width,
so there the folding strategies do exactly that. The ViT blocks' dense
MLP has width `mlp_dim`, so on ViT-MoE the folding strategies refuse
layers with a shared expert with a clear error rather than approximate
them; `prune_moe_layers(..., strategy="shared_expert")` instead keeps the
shared expert alone, dropping the routed experts of a layer that does not
specialise (ViMoE's shared expert carries what is common to all images).
"""

import keras
import numpy as np

from keras_vmoe.analysis.collect import _resolve_layer_index
from keras_vmoe.analysis.collect import collect_routing
from keras_vmoe.analysis.statistics import to_numpy
from keras_vmoe.training.metrics import moe_layers

STRATEGIES = ("most_used", "load_weighted", "shared_expert")


def fold_expert_weights(
    kernel_1, bias_1, kernel_2, bias_2, input_mix, output_mix
):
    """Folds stacked expert weights into the weights of one dense FFN.

    Args:
        kernel_1: [E, d, h]; bias_1: [E, h]; kernel_2: [E, h, d];
            bias_2: [E, d] — the experts of a `MoEFeedForward`.
        input_mix: [E] weights `a` of the first layers (sum to 1).
        output_mix: [E] weights `o` of the second layers (the gates).

    Returns:
        dict with numpy `fc1_kernel` [d, h], `fc1_bias` [h], `fc2_kernel`
        [h, d] and `fc2_bias` [d] (see the module docstring).
    """
    input_mix = to_numpy(input_mix, dtype="float64")
    output_mix = to_numpy(output_mix, dtype="float64")
    num_experts = np.shape(kernel_1)[0]
    for name, mix in (("input_mix", input_mix), ("output_mix", output_mix)):
        if mix.shape != (num_experts,):
            raise ValueError(
                f"`{name}` must have one weight per expert ({num_experts}). "
                f"Received: {name}.shape={mix.shape}"
            )

    def mix(weights, coefficients):
        weights = to_numpy(weights, dtype="float64")
        return np.tensordot(coefficients, weights, axes=1).astype("float32")

    return {
        "fc1_kernel": mix(kernel_1, input_mix),
        "fc1_bias": mix(bias_1, input_mix),
        "fc2_kernel": mix(kernel_2, output_mix),
        "fc2_bias": mix(bias_2, output_mix),
    }


def _backbone(model):
    from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone
    from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone

    families = (ViTMoEBackbone, ConvNeXtMoEBackbone)
    backbone = (
        model
        if isinstance(model, families)
        else getattr(model, "backbone", None)
    )
    if not isinstance(backbone, families):
        raise ValueError(
            "Surgery supports ViTMoEBackbone and ConvNeXtMoEBackbone models "
            "and the classifiers built on one (`model.backbone`). Received: "
            f"model of type {type(model).__name__}"
        )
    return backbone


def _is_convnext(backbone):
    from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone

    return isinstance(backbone, ConvNeXtMoEBackbone)


def _block_mlp(backbone, block_index):
    """The MLP (dense or MoE) of block `block_index` (ViT: the block's
    index; ConvNeXt: its global index over all stages)."""
    if _is_convnext(backbone):
        return backbone.blocks[block_index].mlp
    return backbone.get_layer(f"block_{block_index}").mlp


def _moe_blocks(model):
    """[(block index, MoE layer)] of a model, shallowest first."""
    backbone = _backbone(model)
    if _is_convnext(backbone):
        indices = [i for i, b in enumerate(backbone.blocks) if b.is_moe]
    else:
        indices = backbone.moe_layer_indices
    blocks = [(i, _block_mlp(backbone, i)) for i in indices]
    other = [
        type(layer).__name__
        for _, layer in blocks
        if getattr(layer, "router_type", None) != "top_k"
    ]
    if other:
        # Soft MoE mixes tokens into slots and Expert Choice has no
        # per-token top-k gates: neither folds into one dense MLP this way.
        raise ValueError(
            "Surgery folds top-k MoE layers (MoEFeedForward, "
            "router_type='top_k'); Soft MoE and Expert Choice layers are "
            "not supported. Received: a model with "
            f"router_type={getattr(backbone, 'router_type', None)!r} "
            f"({other[0]})"
        )
    return blocks


def _expert_weights(layer):
    return [
        keras.ops.convert_to_numpy(weight)
        for weight in (
            layer.expert_kernel_1,
            layer.expert_bias_1,
            layer.expert_kernel_2,
            layer.expert_bias_2,
        )
    ]


def _dense_backbone_config(backbone, folded):
    """The backbone's config with the blocks in `folded` dense."""
    config = backbone.get_config()
    if not _is_convnext(backbone):
        config["moe_layers"] = [
            i for i in backbone.moe_layer_indices if i not in folded
        ]
        for i, weights in folded.items():
            width = weights["fc1_kernel"].shape[1]
            if width != backbone.mlp_dim:
                raise ValueError(
                    f"The folded FFN of block {i} has hidden width {width}, "
                    f"the ViT blocks' dense MLP has {backbone.mlp_dim}. "
                    f"Received: mlp_dim={backbone.mlp_dim}"
                )
        return config
    blocks = backbone.blocks
    config["moe_layers"] = [
        i for i, block in enumerate(blocks) if block.is_moe and i not in folded
    ] or None
    widths = list(config["block_mlp_dims"] or [None] * len(blocks))
    skips = set(config["dense_skip_blocks"] or ())
    for i, weights in folded.items():
        widths[i] = int(weights["fc1_kernel"].shape[1])
        if blocks[i].skip_scale is not None:
            skips.add(i)
    config["block_mlp_dims"] = widths
    config["dense_skip_blocks"] = sorted(skips) or None
    return config


def _replace_with_dense(model, folded):
    """Rebuilds `model` with the blocks in `folded` ({block index: dict
    from `fold_expert_weights`}) dense, copying all other weights."""
    backbone = _backbone(model)
    backbone_config = _dense_backbone_config(backbone, folded)
    new_backbone = type(backbone).from_config(backbone_config)
    if model is backbone:
        new_model = new_backbone
    else:
        config = model.get_config()
        config["backbone"] = new_backbone
        config["preprocessor"] = getattr(model, "preprocessor", None)
        new_model = type(model).from_config(config)
    folded_weights = set()
    for i, weights in folded.items():
        mlp = _block_mlp(new_backbone, i)
        old_activation = _block_mlp(backbone, i).activation
        if mlp.activation != old_activation:
            raise ValueError(
                f"Block {i}'s dense MLP uses activation {mlp.activation!r}, "
                "its experts another, so the fold would change the block. "
                f"Received: activation={old_activation!r}"
            )
        for variable, value in (
            (mlp.fc1.kernel, weights["fc1_kernel"]),
            (mlp.fc1.bias, weights["fc1_bias"]),
            (mlp.fc2.kernel, weights["fc2_kernel"]),
            (mlp.fc2.bias, weights["fc2_bias"]),
        ):
            variable.assign(value)
            folded_weights.add(id(variable))
    old_weights = {weight.path: weight for weight in model.weights}
    for weight in new_model.weights:
        if id(weight) in folded_weights:
            continue
        old = old_weights.get(weight.path)
        if old is None or old.shape != weight.shape:
            raise ValueError(
                f"Surgery could not find weights for {weight.path!r} in the "
                "original model; the model's layout is not supported."
            )
        # A copy: JAX may donate (delete) the original's buffers when it
        # later runs under `predict` or `fit`.
        weight.assign(keras.ops.convert_to_numpy(old))
    return new_model


def _check_strategy_fits(layer, strategy, convnext):
    if strategy == "shared_expert" and layer.shared_ffn is None:
        raise ValueError(
            "`strategy='shared_expert'` keeps a layer's shared expert, but "
            f"layer {layer.path!r} has none. Received: shared_expert=False"
        )
    if (
        strategy != "shared_expert"
        and layer.shared_ffn is not None
        and not convnext
    ):
        raise ValueError(
            "Cannot fold an MoE layer with a shared expert into the block's "
            "dense MLP: E_s(x) + FFN(x) needs an MLP of hidden width "
            f"{2 * layer.hidden_dim}, the block's has {layer.hidden_dim} "
            "(use strategy='shared_expert' to keep the shared expert "
            f"alone). Received: layer {layer.path!r} with shared_expert=True"
        )


def _shared_expert_weights(layer):
    shared = layer.shared_ffn
    return {
        name: keras.ops.convert_to_numpy(weight)
        for name, weight in (
            ("fc1_kernel", shared.fc1.kernel),
            ("fc1_bias", shared.fc1.bias),
            ("fc2_kernel", shared.fc2.kernel),
            ("fc2_bias", shared.fc2.bias),
        )
    }


def _beside_shared_expert(layer, weights):
    """`E_s(x) + FFN(x)` as one FFN: the shared expert's hidden units
    followed by the folded FFN's (exact; width h_s + h)."""
    if layer.shared_ffn is None:
        return weights
    shared = _shared_expert_weights(layer)
    return {
        "fc1_kernel": np.concatenate(
            [shared["fc1_kernel"], weights["fc1_kernel"]], axis=1
        ),
        "fc1_bias": np.concatenate([shared["fc1_bias"], weights["fc1_bias"]]),
        "fc2_kernel": np.concatenate(
            [shared["fc2_kernel"], weights["fc2_kernel"]], axis=0
        ),
        "fc2_bias": shared["fc2_bias"] + weights["fc2_bias"],
    }


def _routing_for(model, routing, data, batch_size, max_batches):
    if routing is not None:
        return routing
    if data is None:
        raise ValueError(
            "Pass `data` (or a `routing` result from `collect_routing`) to "
            "measure expert load and gates. Received: data=None, "
            "routing=None"
        )
    return collect_routing(
        model,
        data,
        batch_size=batch_size,
        max_batches=max_batches,
        keep_images=False,
    )


def _below_threshold(routing, threshold):
    """Names of the MoE layers whose specialization is below `threshold`."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            "`threshold` must be a specialization score in [0, 1]. "
            f"Received: threshold={threshold!r}"
        )
    routing.specialization_ranking()  # raises without labels
    return {
        record.name
        for record in routing.layers
        if record.specialization < threshold
    }


def prune_moe_layers(
    model,
    data=None,
    layers=None,
    threshold=None,
    strategy="most_used",
    routing=None,
    batch_size=32,
    max_batches=None,
):
    """Replaces chosen MoE layers of a ViT-MoE or MoE-ConvNeXt model by one
    dense FFN.

    ViMoE (Sec. 3.2, 4.2) finds that shallow MoE layers do not specialise:
    their experts do similar work, and one FFN can take their place. The
    chosen layers become:
    - `strategy="most_used"`: the expert with the largest load, its output
      scaled by the layer's mean total gate `g` (1 with renormalised
      gates and no drops): `FFN(x) = g E_j(x)`. Ties: among experts with
      exactly the same load the lowest expert index is kept (`np.argmax`),
      so the choice is deterministic;
    - `strategy="load_weighted"`: the load-weighted average of the
      experts' weights (`a = load`, `o = g * load` in the module
      docstring's fold);
    - `strategy="shared_expert"` (layers with a shared expert): the shared
      expert alone, `FFN(x) = E_s(x)`.

    Both are exact when the layer's experts are identical and every item's
    total gate equals `g`; otherwise measure the accuracy drop and
    fine-tune the pruned model briefly (ViMoE retrains its reduced
    configuration). On ViT-MoE the two folding strategies refuse layers
    with a shared expert; on MoE-ConvNeXt they keep the shared expert
    beside the folded FFN in one wider MLP (see the module docstring).
    A pruned MoE-ConvNeXt block keeps its skip connection and gets its own
    MLP width (the experts' width, or the shared expert's).

    Args:
        model: a `ViTMoEBackbone` / `ConvNeXtMoEBackbone`, or a classifier
            whose `backbone` is one.
        data: data to measure load and gates on (anything
            `collect_routing` takes); needs labels with `threshold`. Not
            needed, and not read, for `strategy="shared_expert"` with
            explicit `layers` and no `threshold`.
        layers: MoE layers to replace: indices among the model's MoE
            layers (0 = shallowest, negative from the deepest) or layer
            names.
        threshold: also replace every MoE layer whose specialization score
            (`statistics.specialization_score`) is below this value.
        strategy: "most_used", "load_weighted" or "shared_expert".
        routing: a `RoutingResult` of this model, instead of `data`.
        batch_size, max_batches: passed to `collect_routing`.

    Returns:
        A new model of the same class with the chosen blocks dense.

    Example:
    >>> pruned = prune_moe_layers(classifier, (images, labels), threshold=0.2)
    >>> pruned.save("pruned.keras")
    """
    if strategy not in STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {STRATEGIES}. Received: "
            f"strategy={strategy!r}"
        )
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError(
            "`model` has no MoE layer to prune. Received: "
            f"model={model.name!r}"
        )
    if layers is None and threshold is None:
        raise ValueError(
            "Choose layers to prune: pass `layers` (MoE layer indices or "
            "names) or a specialization `threshold`. Received: layers=None, "
            "threshold=None"
        )
    names = [layer.path for _, layer in blocks]
    convnext = _is_convnext(_backbone(model))
    chosen = {_resolve_layer_index(index, names) for index in layers or ()}
    for index in chosen:
        _check_strategy_fits(blocks[index][1], strategy, convnext)
    if strategy != "shared_expert" or threshold is not None:
        routing = _routing_for(model, routing, data, batch_size, max_batches)
    if threshold is not None:
        chosen |= {
            names.index(name) for name in _below_threshold(routing, threshold)
        }
    folded = {}
    for index in sorted(chosen):
        block_index, layer = blocks[index]
        _check_strategy_fits(layer, strategy, convnext)
        if strategy == "shared_expert":
            folded[block_index] = _shared_expert_weights(layer)
            continue
        record = routing.layer(layer.path)
        load, scale = record.load, float(record.mean_gate.sum())
        if strategy == "most_used":
            input_mix = np.eye(layer.num_experts)[int(np.argmax(load))]
        else:
            input_mix = load
        folded[block_index] = _beside_shared_expert(
            layer,
            fold_expert_weights(
                *_expert_weights(layer), input_mix, scale * input_mix
            ),
        )
    return _replace_with_dense(model, folded)


def merge_experts(
    model, data=None, layers=None, routing=None, batch_size=32, max_batches=None
):
    """Folds each chosen MoE layer's gate-weighted expert average into one
    FFN (structural reparameterisation).

    With `o_i` the mean gate expert `i` receives per item over `data`
    (`LayerRouting.mean_gate`), the layer becomes the FFN with
    `W1 = sum_i a_i W1_i` (`a = o / sum(o)`) and `W2 = sum_i o_i W2_i`
    (see the module docstring). Averaging weights through the GELU is
    exact only when the experts are equal; otherwise measure the accuracy
    drop, e.g. with `accuracy(merged, data) - accuracy(model, data)`.

    MoE-ConvNeXt blocks keep their skip connection, get the experts' MLP
    width, and keep a shared expert beside the merged FFN (width 2h).

    Args:
        model: a `ViTMoEBackbone` / `ConvNeXtMoEBackbone`, or a classifier
            whose `backbone` is one.
        data: data to measure the gates on (anything `collect_routing`
            takes).
        layers: MoE layer indices or names to merge; default: all.
        routing: a `RoutingResult` of this model, instead of `data`.
        batch_size, max_batches: passed to `collect_routing`.

    Returns:
        A new model of the same class with the chosen blocks dense.
    """
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError(
            "`model` has no MoE layer to merge. Received: "
            f"model={model.name!r}"
        )
    names = [layer.path for _, layer in blocks]
    indices = (
        range(len(blocks))
        if layers is None
        else sorted({_resolve_layer_index(index, names) for index in layers})
    )
    convnext = _is_convnext(_backbone(model))
    for index in indices:
        _check_strategy_fits(blocks[index][1], "gate_weighted", convnext)
    routing = _routing_for(model, routing, data, batch_size, max_batches)
    folded = {}
    for index in indices:
        block_index, layer = blocks[index]
        gates = routing.layer(layer.path).mean_gate
        total = gates.sum()
        input_mix = (
            gates / total if total else np.full_like(gates, 1 / len(gates))
        )
        folded[block_index] = _beside_shared_expert(
            layer,
            fold_expert_weights(*_expert_weights(layer), input_mix, gates),
        )
    return _replace_with_dense(model, folded)
