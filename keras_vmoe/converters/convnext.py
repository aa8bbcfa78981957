"""ConvNeXt weights: keras.applications and timm checkpoints, and upcycling.

Every converter fills a *dense* ConvNeXt by name through a
`WeightAssigner` (every source tensor used, every weight set, shapes
checked); a MoE target is filled by converting into its dense twin (the
same config with `moe_layers=None`) and upcycling that
(`upcycle_convnext`), so the two steps are tested separately and the
upcycled model computes what the checkpoint computes.

Our weights have canonical names, mapped to each source's names below:
`stem_conv.kernel`, `stem_norm.gamma`, `stages.{i}.downsample_norm.beta`,
`stages.{i}.downsample_conv.kernel`, `stages.{i}.blocks.{j}.{part}.{param}`
(part: depthwise_conv, norm, fc1, fc2; or `layer_scale`), `head_norm.gamma`,
`head_dense.bias`, ...
"""

import os

import keras
import numpy as np

from keras_vmoe.converters.common import WeightAssigner
from keras_vmoe.converters.common import check_h5_file
from keras_vmoe.converters.common import load_state_dict
from keras_vmoe.converters.upcycle import upcycle_feed_forward
from keras_vmoe.validation import deprecated_alias

KERAS_APPLICATIONS_VARIANTS = {
    "ConvNeXtTiny": ([3, 3, 9, 3], [96, 192, 384, 768]),
    "ConvNeXtSmall": ([3, 3, 27, 3], [96, 192, 384, 768]),
    "ConvNeXtBase": ([3, 3, 27, 3], [128, 256, 512, 1024]),
    "ConvNeXtLarge": ([3, 3, 27, 3], [192, 384, 768, 1536]),
    "ConvNeXtXLarge": ([3, 3, 27, 3], [256, 512, 1024, 2048]),
}


# === Our canonical weight names ===
def _split_model(model):
    """(backbone, classifier or None) of a backbone or a classifier."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        return model, None
    return backbone, model


def _layer_weights(prefix, layer, names):
    return [(f"{prefix}.{name}", getattr(layer, name)) for name in names]


def _dense_targets(model):
    """[(canonical name, variable)] for every weight of a dense ConvNeXt."""
    backbone, classifier = _split_model(model)
    targets = _layer_weights(
        "stem_conv", backbone.stem_conv, ("kernel", "bias")
    )
    if backbone.stem_norm is not None:
        targets += _layer_weights(
            "stem_norm", backbone.stem_norm, ("gamma", "beta")
        )
    for stage, blocks in enumerate(backbone.stage_blocks):
        if stage > 0:
            targets += _layer_weights(
                f"stages.{stage}.downsample_norm",
                backbone.downsample_norms[stage - 1],
                ("gamma", "beta"),
            )
            targets += _layer_weights(
                f"stages.{stage}.downsample_conv",
                backbone.downsample_convs[stage - 1],
                ("kernel", "bias"),
            )
        for index, block in enumerate(blocks):
            if block.is_moe:
                raise ValueError(
                    "Checkpoints load into dense blocks; MoE blocks are "
                    f"upcycled from them. Received a MoE block: {block.name}"
                )
            prefix = f"stages.{stage}.blocks.{index}"
            targets += _layer_weights(
                f"{prefix}.depthwise_conv",
                block.depthwise_conv,
                ("kernel", "bias"),
            )
            targets += _layer_weights(
                f"{prefix}.norm", block.norm, ("gamma", "beta")
            )
            targets += _layer_weights(
                f"{prefix}.fc1", block.mlp.fc1, ("kernel", "bias")
            )
            targets += _layer_weights(
                f"{prefix}.fc2", block.mlp.fc2, ("kernel", "bias")
            )
            if block.layer_scale is not None:
                targets.append((f"{prefix}.layer_scale", block.layer_scale))
    if classifier is not None:
        targets += _layer_weights(
            "head_norm", classifier.head_norm, ("gamma", "beta")
        )
        targets += _layer_weights(
            "head_dense", classifier.output_dense, ("kernel", "bias")
        )
    return targets


def _dense_twin(model):
    """A dense model with `model`'s config (itself if already dense)."""
    backbone, classifier = _split_model(model)
    if not backbone.moe_positions:
        return model
    config = dict(backbone.get_config(), moe_layers=None)
    config.pop("name", None)
    dense_backbone = type(backbone).from_config(config)
    if classifier is None:
        return dense_backbone
    return type(classifier)(
        dense_backbone,
        num_classes=classifier.num_classes,
        activation=classifier.activation,
        layer_norm_epsilon=classifier.layer_norm_epsilon,
    )


def _load(model, state_dict, source_key, head_keys, noise_std, seed):
    """Fills `model` (dense or MoE) from `state_dict` by canonical names.

    `source_key(name)` gives (source key, transform) for a canonical name;
    `head_keys` are the source's head tensors, skipped for a backbone.
    """
    dense = _dense_twin(model)
    assigner = WeightAssigner(state_dict, dense.weights)
    for name, variable in _dense_targets(dense):
        key, transform = source_key(name)
        assigner.assign(variable, key, transform)
    if _split_model(dense)[1] is None:
        for key in head_keys:
            if key in state_dict:
                assigner.skip(key)
    assigner.finish()
    if dense is not model:
        upcycle_convnext(dense, model, noise_std=noise_std, seed=seed)
    return model


# === timm ===
def _conv_from_torch(value):
    """[out, in, kh, kw] -> [kh, kw, in, out]."""
    return np.transpose(value, (2, 3, 1, 0))


def _depthwise_from_torch(value):
    """[d, 1, kh, kw] -> [kh, kw, d, 1]."""
    return np.transpose(value, (2, 3, 0, 1))


def _timm_key(name):
    parts = name.split(".")
    param = parts[-1]
    torch_param = {"kernel": "weight", "gamma": "weight", "beta": "bias"}.get(
        param, param
    )
    if name.startswith("stem_"):
        index = 0 if name.startswith("stem_conv") else 1
        transform = _conv_from_torch if param == "kernel" else None
        return f"stem.{index}.{torch_param}", transform
    if name.startswith("head_"):
        layer = "norm" if name.startswith("head_norm") else "fc"
        transform = np.transpose if param == "kernel" else None
        return f"head.{layer}.{torch_param}", transform
    stage = parts[1]
    if parts[2] == "downsample_norm":
        return f"stages.{stage}.downsample.0.{torch_param}", None
    if parts[2] == "downsample_conv":
        transform = _conv_from_torch if param == "kernel" else None
        return f"stages.{stage}.downsample.1.{torch_param}", transform
    block = f"stages.{stage}.blocks.{parts[3]}"
    part = parts[4]
    if part == "layer_scale":
        return f"{block}.gamma", None
    if part == "depthwise_conv":
        transform = _depthwise_from_torch if param == "kernel" else None
        return f"{block}.conv_dw.{torch_param}", transform
    if part == "norm":
        return f"{block}.norm.{torch_param}", None
    transform = np.transpose if param == "kernel" else None
    return f"{block}.mlp.{part}.{torch_param}", transform


def timm_backbone_config(source):
    """Backbone arguments (depths, hidden_dims, patch_size) of a timm ConvNeXt.

    Args:
        source: a timm `convnext_*` state dict, `.safetensors` or `.npz`.
    """
    state_dict = load_state_dict(source)
    if "stem.0.weight" not in state_dict:
        raise ValueError(
            "Not a timm ConvNeXt checkpoint: no tensor 'stem.0.weight'. "
            f"Received keys: {sorted(state_dict)[:8]}"
        )
    depths, hidden_dims = [], []
    stage = 0
    while f"stages.{stage}.blocks.0.conv_dw.weight" in state_dict:
        depth = 0
        while f"stages.{stage}.blocks.{depth}.conv_dw.weight" in state_dict:
            depth += 1
        depths.append(depth)
        hidden_dims.append(
            int(state_dict[f"stages.{stage}.blocks.0.conv_dw.weight"].shape[0])
        )
        stage += 1
    return {
        "depths": depths,
        "hidden_dims": hidden_dims,
        "patch_size": int(state_dict["stem.0.weight"].shape[-1]),
    }


def convert_timm_weights(
    source, model, upcycle_noise_std=0.0, upcycle_seed=None, seed=None
):
    """Loads a timm `convnext_*` checkpoint into a ConvNeXt-MoE model.

    Keys: `stem.0/1`, `stages.i.downsample.0/1`, `stages.i.blocks.j.conv_dw`,
    `.norm`, `.mlp.fc1/fc2`, `.gamma`, `head.norm`, `head.fc`. MoE blocks
    are upcycled from the checkpoint's dense MLP; routers keep their
    initialisation.

    Args:
        source: a state dict of numpy arrays, a `.safetensors` or `.npz`.
        model: a `ConvNeXtMoEBackbone` (the head tensors are then skipped)
            or a `ConvNeXtMoEImageClassifier`, built with the checkpoint's
            architecture (`timm_backbone_config`).
        upcycle_noise_std: relative noise added to each expert's copy.
        upcycle_seed: seed of that noise.
        seed: deprecated alias of `upcycle_seed` (a `DeprecationWarning`;
            removed in 0.3).

    Returns:
        `model`, with its weights set.

    Raises:
        ValueError: naming the key (and shapes) of any tensor that is
            missing, unused, or of the wrong shape.
    """
    upcycle_seed = deprecated_alias(
        "seed", seed, "upcycle_seed", upcycle_seed, None
    )
    state_dict = load_state_dict(source)
    head_keys = (
        "head.norm.weight",
        "head.norm.bias",
        "head.fc.weight",
        "head.fc.bias",
    )
    return _load(
        model,
        state_dict,
        _timm_key,
        head_keys,
        upcycle_noise_std,
        upcycle_seed,
    )


# === keras.applications ===
def _keras_applications_key(name):
    parts = name.split(".")
    param = parts[-1]
    simple = {
        "stem_conv": "stem_conv",
        "stem_norm": "stem_layernorm",
        "head_norm": "head_layernorm",
        "head_dense": "head_dense",
    }
    if parts[0] in simple:
        return f"{simple[parts[0]]}/{param}", None
    stage = int(parts[1])
    if parts[2] == "downsample_norm":
        return f"downsampling_layernorm_{stage - 1}/{param}", None
    if parts[2] == "downsample_conv":
        return f"downsampling_conv_{stage - 1}/{param}", None
    block = f"stage_{stage}_block_{parts[3]}"
    part = parts[4]
    if part == "layer_scale":
        return f"{block}_layer_scale/gamma", None
    if part == "depthwise_conv":
        # A grouped Conv2D kernel [kh, kw, 1, d] -> [kh, kw, d, 1].
        transform = (
            (lambda value: np.transpose(value, (0, 1, 3, 2)))
            if param == "kernel"
            else None
        )
        return f"{block}_depthwise_conv/{param}", transform
    source_part = {
        "norm": "layernorm",
        "fc1": "pointwise_conv_1",
        "fc2": "pointwise_conv_2",
    }[part]
    return f"{block}_{source_part}/{param}", None


def keras_applications_state_dict(model):
    """`{name: array}` of a keras.applications ConvNeXt model.

    Names drop the model-name prefix: `stage_0_block_0_depthwise_conv/kernel`,
    `stem_conv/bias`, `head_dense/kernel`; the LayerScale weight (an
    auto-named variable) is called `gamma`. Input-normalisation layers
    (`include_preprocessing=True`) have no trainable weights to convert.
    """
    prefix = f"{model.name}_"
    state_dict = {}
    for variable in model.weights:
        layer, param = variable.path.split("/")[-2:]
        if layer.startswith(prefix):
            layer = layer[len(prefix) :]
        if layer.endswith("_layer_scale"):
            param = "gamma"
        state_dict[f"{layer}/{param}"] = np.asarray(variable)
    return state_dict


def keras_applications_backbone_config(model):
    """Backbone arguments (depths, hidden_dims) of a keras.applications model."""
    state_dict = keras_applications_state_dict(model)
    depths, hidden_dims = [], []
    while f"stage_{len(depths)}_block_0_depthwise_conv/kernel" in state_dict:
        stage = len(depths)
        depth = 0
        while (
            f"stage_{stage}_block_{depth}_depthwise_conv/kernel" in state_dict
        ):
            depth += 1
        depths.append(depth)
        hidden_dims.append(
            int(
                state_dict[f"stage_{stage}_block_0_depthwise_conv/bias"].shape[
                    0
                ]
            )
        )
    if not depths:
        raise ValueError(
            "Not a keras.applications ConvNeXt: no `stage_0_block_0` layers. "
            f"Received: model.name={model.name!r}"
        )
    return {"depths": depths, "hidden_dims": hidden_dims}


def convert_keras_applications_weights(
    source,
    model,
    variant=None,
    upcycle_noise_std=0.0,
    upcycle_seed=None,
    seed=None,
):
    """Loads a `keras.applications.ConvNeXt*` model's weights into `model`.

    Args:
        source: a keras.applications ConvNeXt model, or the path of its
            `.weights.h5` file (the matching model is built with
            `weights=None`, then loads the file).
        model: a `ConvNeXtMoEBackbone` (head weights skipped) or a
            `ConvNeXtMoEImageClassifier` with the same architecture. MoE
            blocks are upcycled from the source's dense MLPs.
        variant: for a file source, the keras.applications function name
            ("ConvNeXtTiny", ...); default: the one whose depths and widths
            match `model`.
        upcycle_noise_std: relative noise added to each expert's copy.
        upcycle_seed: seed of that noise.
        seed: deprecated alias of `upcycle_seed` (a `DeprecationWarning`;
            removed in 0.3).

    Returns:
        `model`, with its weights set.
    """
    upcycle_seed = deprecated_alias(
        "seed", seed, "upcycle_seed", upcycle_seed, None
    )
    if isinstance(source, (str, os.PathLike)):
        source = _keras_applications_model(os.fspath(source), model, variant)
    state_dict = keras_applications_state_dict(source)
    # The head, or with `include_top=False` the final LayerNorm.
    head_keys = tuple(
        key
        for key in state_dict
        if not key.startswith(("stem_", "stage_", "downsampling_"))
    )
    return _load(
        model,
        state_dict,
        _keras_applications_key,
        head_keys,
        upcycle_noise_std,
        upcycle_seed,
    )


def _keras_applications_model(path, model, variant):
    if not os.path.exists(path):
        raise ValueError(
            f"Checkpoint file not found. Received: source={path!r}"
        )
    check_h5_file(path)
    backbone, classifier = _split_model(model)
    if variant is None:
        matches = [
            name
            for name, architecture in KERAS_APPLICATIONS_VARIANTS.items()
            if architecture == (backbone.depths, backbone.hidden_dims)
        ]
        if not matches:
            raise ValueError(
                "No keras.applications ConvNeXt has this architecture. "
                f"Received: depths={backbone.depths}, "
                f"hidden_dims={backbone.hidden_dims}"
            )
        variant = matches[0]
    if variant not in KERAS_APPLICATIONS_VARIANTS:
        raise ValueError(
            f"`variant` must be one of {tuple(KERAS_APPLICATIONS_VARIANTS)}. "
            f"Received: variant={variant!r}"
        )
    include_top = classifier is not None
    source = getattr(keras.applications, variant)(
        weights=None,
        include_top=include_top,
        input_shape=(224, 224, 3) if include_top else None,
        classes=classifier.num_classes if include_top else 1000,
    )
    try:
        source.load_weights(path)
    except (OSError, KeyError) as error:
        raise ValueError(
            f"Cannot load {path!r} into keras.applications.{variant}: "
            f"{error!r}"
        ) from None
    return source


# === Upcycling ===
def upcycle_convnext(dense, moe, noise_std=0.0, seed=None):
    """Sparse upcycling of a dense ConvNeXt into its MoE form.

    Every weight is copied; in each MoE block the dense MLP is copied into
    every expert (and the shared expert) with `upcycle_feed_forward`, the
    router keeps its initialisation, and the Sweet-spot skip connection's
    scale is set to 0. With `normalize_gates=True` and no dropped tokens
    (`eval_capacity_factor=None`, or a large one) the upcycled model then
    computes exactly the dense one: `MoE(u) = MLP(u)` and the skip adds
    `0 * u`. Training can open the skip (its scale is a learned weight).

    Args:
        dense: a dense `ConvNeXtMoEBackbone` or `ConvNeXtMoEImageClassifier`.
        moe: the same kind of model with the same architecture and MoE
            blocks whose experts have the dense MLP's width.
        noise_std: relative noise added to each expert's copy.
        seed: seed of that noise; MoE block `i` (counted over all blocks)
            uses `seed + i`, so blocks get different noise.

    Returns:
        `moe`, with its weights set.
    """
    dense_backbone, dense_classifier = _split_model(dense)
    moe_backbone, moe_classifier = _split_model(moe)
    if (dense_classifier is None) != (moe_classifier is None) or (
        dense_backbone.depths,
        dense_backbone.hidden_dims,
    ) != (moe_backbone.depths, moe_backbone.hidden_dims):
        raise ValueError(
            "`dense` and `moe` must be the same kind of model (backbone or "
            "classifier) with the same depths and widths. Received: "
            f"dense depths={dense_backbone.depths}, "
            f"hidden_dims={dense_backbone.hidden_dims}; moe "
            f"depths={moe_backbone.depths}, "
            f"hidden_dims={moe_backbone.hidden_dims}"
        )
    if dense_backbone.moe_positions:
        raise ValueError(
            "`dense` must have no MoE blocks. Received MoE blocks at "
            f"{dense_backbone.moe_positions}"
        )
    pairs = [
        (dense_backbone.stem_conv, moe_backbone.stem_conv),
        (dense_backbone.stem_norm, moe_backbone.stem_norm),
    ]
    pairs += list(
        zip(dense_backbone.downsample_norms, moe_backbone.downsample_norms)
    )
    pairs += list(
        zip(dense_backbone.downsample_convs, moe_backbone.downsample_convs)
    )
    if moe_classifier is not None:
        pairs += [
            (dense_classifier.head_norm, moe_classifier.head_norm),
            (dense_classifier.output_dense, moe_classifier.output_dense),
        ]
    for index, (dense_block, moe_block) in enumerate(
        zip(dense_backbone.blocks, moe_backbone.blocks)
    ):
        pairs += [
            (dense_block.depthwise_conv, moe_block.depthwise_conv),
            (dense_block.norm, moe_block.norm),
        ]
        if moe_block.is_moe:
            if moe_block.mlp.hidden_dim != dense_block.mlp.hidden_dim:
                raise ValueError(
                    "Upcycling copies the dense MLP into every expert, so "
                    "`expert_mlp_ratio` must equal the dense `mlp_ratio`. "
                    f"Received: block {moe_block.name} experts of width "
                    f"{moe_block.mlp.hidden_dim}, dense MLP of width "
                    f"{dense_block.mlp.hidden_dim}"
                )
            upcycle_feed_forward(
                dense_block.mlp,
                moe_block.mlp,
                noise_std=noise_std,
                seed=None if seed is None else seed + index,
            )
            if moe_block.skip_scale is not None:
                moe_block.skip_scale.assign(
                    np.zeros(moe_block.skip_scale.shape)
                )
        else:
            pairs.append((dense_block.mlp, moe_block.mlp))
        if moe_block.layer_scale is not None:
            moe_block.layer_scale.assign(dense_block.layer_scale)
    for source, target in pairs:
        if target is None:
            continue
        for source_variable, target_variable in zip(
            source.weights, target.weights
        ):
            if tuple(source_variable.shape) != tuple(target_variable.shape):
                raise ValueError(
                    f"Shape mismatch copying {source_variable.path!r} "
                    f"{tuple(source_variable.shape)} -> "
                    f"{target_variable.path!r} "
                    f"{tuple(target_variable.shape)}"
                )
            target_variable.assign(source_variable)
    return moe
