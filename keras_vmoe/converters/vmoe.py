"""google-research/vmoe checkpoints -> `ViTMoEBackbone` / classifier.

vmoe's `VisionTransformerMoe` (Riquelme et al., 2021, "Scaling Vision with
Sparse Mixture of Experts") and `VisionTransformerMoeEnsemble` (E^3,
Allingham et al., 2022, "Sparse MoEs meet Efficient Ensembles") map onto
`ViTMoEBackbone` with these options: tanh GELU (flax's default), no
LayerScale, LayerNorm epsilon 1e-6, token routing with a bias-free linear
router, softmax gates that are not renormalised, capacity
`ceil(K S cf / E)` rounded up to a multiple of 4, routing groups of
`group_size` tokens, batch-prioritized routing as configured (off in the
published configurations), and `ViTMoEImageClassifier` with
`pooling="cls"` and an optional `pre_logits` Dense + tanh
(`representation_size`).

Source names (the flax parameter tree, '/'-joined; a leading `params/`,
as in a training checkpoint, is taken as the parameter tree and everything
else — optimizer state, step, random keys — is reported and not loaded):
`embedding/{kernel,bias}` (patch Conv, [p, p, 3, d]), `cls` ([1, 1, d]),
`Encoder/posembed_input/pos_embedding` ([1, 1 + g*g, d], the CLS entry
first), `Encoder/encoderblock_N/{LayerNorm_0,LayerNorm_1}/{scale,bias}`,
`Encoder/encoderblock_N/SelfAttention/{query,key,value}/{kernel,bias}`
([d, H, d/H] and [H, d/H]), `.../SelfAttention/out/{kernel,bias}`
([H, d/H, d]), `Encoder/encoderblock_N/Mlp/Dense_{0,1}/{kernel,bias}`
(dense blocks), `Encoder/encoderblock_N/Moe/Mlp/Dense_{0,1}/{kernel,bias}`
([E, d, h], [E, h], [E, h, d], [E, d]) and
`Encoder/encoderblock_N/Moe/Router/dense/kernel` ([d, E], or [d, M, E/M]
for an E^3 ensemble of M members), `Encoder/encoder_norm/{scale,bias}`,
`pre_logits/{kernel,bias}`, `head/{kernel,bias}`.

The CLS token's position embedding is folded into the token (the backbone
gives prefix tokens none; exact). The patch grid is kept at the size it was
stored (`position_embedding_shape`); a backbone built for other images
resamples it (class token kept) in `ViTEmbedding`.
"""

import math
import os

import numpy as np

from keras_vmoe.converters.common import WeightAssigner

PARAMS_PREFIX = "params/"
MODEL_NAMES = ("VisionTransformerMoe", "VisionTransformerMoeEnsemble")
# vmoe's `compute_capacity` default.
VMOE_CAPACITY_MULTIPLE = 4


def _get(config, path, default=KeyError):
    """`config[a][b]...` for path "a/b/..."; `default` if absent (a
    KeyError naming the path if no default)."""
    node = config
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            if default is KeyError:
                raise ValueError(
                    f"The vmoe model config has no {path!r}. Received keys "
                    f"at that level: {sorted(node) if isinstance(node, dict) else node!r}"
                )
            return default
        node = node[key]
    return node


def vmoe_model_kwargs(
    model_config,
    image_size,
    eval_capacity_factor=None,
    position_grid=None,
):
    """`ViTMoEBackbone` and `ViTMoEImageClassifier` arguments of a vmoe model.

    Args:
        model_config: vmoe's `config.model` as a dict (`name`,
            `num_classes`, `patch_size`, `hidden_size`, `classifier`,
            `representation_size`, `encoder` with `num_layers`, `mlp_dim`,
            `num_heads`, and `moe` with `layers`, `num_experts`,
            `group_size`, optional `ensemble_size`, and `router`:
            `num_selected_experts`, `noise_std`, loss weights and
            `dispatcher` with `capacity_factor`, `batch_priority`,
            optional `capacity_multiple_of` / `capacity_ceil_or_round`).
        image_size: side of the (square) input images.
        eval_capacity_factor: capacity factor at inference (vmoe's
            `evaluate.model_overrides`); default: the training one.
        position_grid: side g of the stored position grid; default
            `image_size // patch`.

    vmoe's dropout rates (`encoder.dropout_rate`,
    `attention_dropout_rate`, `moe.dropout_rate`) act in training only and
    are not carried over; `ViTMoEBackbone` has no attention or MLP dropout
    (its regulariser is `drop_path_rate`).

    Returns:
        `(backbone_kwargs, classifier_kwargs)`; the classifier kwargs hold
        `num_classes` (None for a model without head) and
        `representation_size`.

    Raises:
        ValueError: naming the config entry, for what the backbone cannot
            express (a non-square patch, `classifier` other than "token",
            `capacity_ceil_or_round="round"`, position embeddings other than
            learned).
    """
    name = model_config.get("name", "VisionTransformerMoe")
    if name not in MODEL_NAMES:
        raise ValueError(
            f"Unsupported vmoe model {name!r}; supported: {MODEL_NAMES}."
        )
    patch = tuple(_get(model_config, "patch_size"))
    if len(patch) != 2 or patch[0] != patch[1]:
        raise ValueError(
            "Only square patches are supported. Received: patch_size="
            f"{patch!r}"
        )
    classifier = model_config.get("classifier", "token")
    if classifier != "token":
        raise ValueError(
            "Only vmoe models with classifier='token' are supported (CLS "
            f"pooling). Received: classifier={classifier!r}"
        )
    encoder = _get(model_config, "encoder")
    position = encoder.get("position_emb") or {}
    if position.get("name", "learned") != "learned":
        raise ValueError(
            "Only learned position embeddings are supported. Received: "
            f"encoder.position_emb={position!r}"
        )
    moe = _get(model_config, "encoder/moe")
    router = _get(moe, "router")
    dispatcher = _get(router, "dispatcher")
    rounding = dispatcher.get("capacity_ceil_or_round", "ceil")
    if rounding != "ceil":
        raise ValueError(
            "Only capacity_ceil_or_round='ceil' is supported. Received: "
            f"dispatcher.capacity_ceil_or_round={rounding!r}"
        )
    if dispatcher.get("capacity") is not None:
        raise ValueError(
            "A fixed dispatcher `capacity` is not supported; vmoe's "
            "published models set `capacity_factor`. Received: "
            f"dispatcher.capacity={dispatcher['capacity']!r}"
        )
    num_experts = _get(moe, "num_experts")
    ensemble_size = moe.get("ensemble_size") or 1
    if name == "VisionTransformerMoeEnsemble" and ensemble_size < 1:
        raise ValueError(
            "A VisionTransformerMoeEnsemble needs moe.ensemble_size >= 1. "
            f"Received: {ensemble_size!r}"
        )
    capacity_factor = _get(dispatcher, "capacity_factor")
    noise = router.get("noise_std", 1.0)
    patch_size = patch[0]
    grid = position_grid or image_size // patch_size
    backbone = {
        "image_shape": (image_size, image_size, 3),
        "patch_size": patch_size,
        "num_layers": _get(encoder, "num_layers"),
        "num_heads": _get(encoder, "num_heads"),
        "hidden_dim": _get(model_config, "hidden_size"),
        "mlp_dim": _get(encoder, "mlp_dim"),
        "position_embedding_shape": (grid * patch_size, grid * patch_size),
        "layer_scale_init_value": None,
        "layer_norm_epsilon": 1e-6,
        "activation": "gelu_tanh",
        "moe_layers": [int(i) for i in _get(moe, "layers")],
        "ensemble_size": ensemble_size,
        "num_experts": num_experts,
        "top_k": router.get("num_selected_experts", 1),
        "routing": "token",
        "router": "linear",
        "capacity_factor": capacity_factor,
        "eval_capacity_factor": eval_capacity_factor or capacity_factor,
        "capacity_multiple_of": dispatcher.get(
            "capacity_multiple_of", VMOE_CAPACITY_MULTIPLE
        ),
        "group_size": _get(moe, "group_size"),
        "partial_groups": "pad",
        "batch_prioritized_routing": bool(
            dispatcher.get("batch_priority", False)
        ),
        "normalize_gates": False,
        # vmoe scales `noise_std` by 1 / (experts an item chooses from).
        "noisy_gating": noise > 0,
        "noise_std": noise * ensemble_size / num_experts if noise > 0 else None,
        "load_balance_loss_weight": router.get("gshard_loss_weight", 0.0),
        "importance_loss_weight": router.get("importance_loss_weight", 1.0),
        "load_loss_weight": (
            router.get("load_loss_weight", 1.0) if noise > 0 else 0.0
        ),
    }
    classifier_kwargs = {
        "num_classes": model_config.get("num_classes"),
        "representation_size": model_config.get("representation_size"),
    }
    return backbone, classifier_kwargs


def load_vmoe_params(source):
    """The parameter tree of a vmoe checkpoint as `{path: np.ndarray}`.

    Args:
        source: a checkpoint prefix (`<prefix>.index` and its shards, read
            with `read_vmoe_checkpoint`; nothing is unpickled or executed),
            or a dict of arrays with '/'-joined flax paths.

    Returns:
        `(params, skipped)`: the parameters (a leading `params/` stripped;
        bfloat16 and float16 arrays as float32, exactly) and the sorted
        paths that are not parameters (optimizer state,
        step, random keys of a training checkpoint).
    """
    if isinstance(source, dict):
        arrays = {key: np.asarray(value) for key, value in source.items()}
    else:
        from keras_vmoe.converters.vmoe_format import read_vmoe_checkpoint

        arrays = read_vmoe_checkpoint(os.fspath(source))
    # bfloat16 / float16 -> float32 is exact; sums such as the folded CLS
    # position are then computed in float32, not rounded to 8 bits.
    arrays = {
        key: (
            value.astype(np.float32)
            if value.dtype.name in ("bfloat16", "float16")
            else value
        )
        for key, value in arrays.items()
    }
    if not any(key.startswith(PARAMS_PREFIX) for key in arrays):
        return arrays, []
    params = {
        key[len(PARAMS_PREFIX) :]: value
        for key, value in arrays.items()
        if key.startswith(PARAMS_PREFIX)
    }
    skipped = sorted(key for key in arrays if not key.startswith(PARAMS_PREFIX))
    return params, skipped


def position_grid_of(params):
    """Side g of the stored position grid ([1, 1 + g*g, d])."""
    key = "Encoder/posembed_input/pos_embedding"
    if key not in params:
        raise ValueError(f"The checkpoint has no {key!r}.")
    tokens = params[key].shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(
            f"{key!r} has {tokens + 1} entries: not a CLS entry plus a "
            f"square grid. Received shape: {params[key].shape}"
        )
    return side


def _heads_to_matrix(name):
    def transform(value):
        value = np.asarray(value)
        return value.reshape(value.shape[0], -1)

    transform.__name__ = name
    return transform


def _assign_norm(assigner, layer, key):
    assigner.assign(layer.gamma, f"{key}/scale")
    assigner.assign(layer.beta, f"{key}/bias")


def _assign_dense(assigner, layer, key):
    assigner.assign(layer.kernel, f"{key}/kernel")
    assigner.assign(layer.bias, f"{key}/bias")


def _assign_attention(assigner, attention, key):
    kernels, biases = [], []
    for part in ("query", "key", "value"):
        kernel = assigner.take(f"{key}/{part}/kernel")  # [d, H, d/H]
        if kernel.ndim != 3:
            raise ValueError(
                f"Source tensor {key}/{part}/kernel must be [d, heads, "
                f"head_dim]. Received shape: {kernel.shape}"
            )
        kernels.append(kernel.reshape(kernel.shape[0], -1))
        biases.append(assigner.take(f"{key}/{part}/bias").reshape(-1))
    assigner.set(
        attention.qkv.kernel,
        np.concatenate(kernels, axis=1),
        f"{key}/{{query,key,value}}/kernel",
    )
    assigner.set(
        attention.qkv.bias,
        np.concatenate(biases),
        f"{key}/{{query,key,value}}/bias",
    )
    out = assigner.take(f"{key}/out/kernel")  # [H, d/H, d]
    assigner.set(
        attention.proj.kernel,
        out.reshape(-1, out.shape[-1]),
        f"{key}/out/kernel",
    )
    assigner.assign(attention.proj.bias, f"{key}/out/bias")


def _assign_moe(assigner, layer, key):
    for index in (0, 1):
        assigner.assign(
            getattr(layer, f"expert_kernel_{index + 1}"),
            f"{key}/Mlp/Dense_{index}/kernel",
        )
        assigner.assign(
            getattr(layer, f"expert_bias_{index + 1}"),
            f"{key}/Mlp/Dense_{index}/bias",
        )
    router = f"{key}/Router/dense/kernel"
    kernel = assigner.take(router)
    # E^3: [d, M, E/M] -> [d, E], member m's experts contiguous.
    assigner.set(
        layer.router.kernel, kernel.reshape(kernel.shape[0], -1), router
    )


def convert_vmoe_checkpoint(source, model):
    """Loads a vmoe checkpoint into a `ViTMoEBackbone` or classifier.

    Every parameter of the checkpoint is used and every weight of `model`
    set (`WeightAssigner`): a missing or unused tensor, or a shape
    mismatch, raises an error naming the tensor and both shapes.

    Args:
        source: a checkpoint prefix or a `{path: array}` dict (see
            `load_vmoe_params`).
        model: a `ViTMoEBackbone` built with `vmoe_model_kwargs` (or a
            `ViTMoEImageClassifier` on one, whose head and `pre_logits`
            are loaded from `head/*` and `pre_logits/*`; for a backbone
            they are skipped).

    Returns:
        `model`.
    """
    from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone

    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, ViTMoEBackbone):
        raise TypeError(
            "`model` must be a `ViTMoEBackbone` or a `ViTMoEImageClassifier`. "
            f"Received: model={type(model).__name__}"
        )
    if (
        backbone.layer_scale_init_value is not None
        or backbone.num_register_tokens
    ):
        raise ValueError(
            "vmoe models have no LayerScale and no register tokens; build the "
            "backbone with `vmoe_model_kwargs`. Received: "
            f"layer_scale_init_value={backbone.layer_scale_init_value!r}, "
            f"num_register_tokens={backbone.num_register_tokens}"
        )
    params, _ = load_vmoe_params(source)
    assigner = WeightAssigner(params, model.weights)
    embedding = backbone.get_layer("embedding")
    _assign_dense(assigner, embedding.patch_projection, "embedding")
    position_key = "Encoder/posembed_input/pos_embedding"
    side = position_grid_of(params)
    position = assigner.take(position_key)
    grid = position[0, 1:].reshape(side, side, -1)
    if (side, side) != tuple(embedding.position_embedding_grid):
        raise ValueError(
            f"{position_key!r} holds a {side}x{side} grid but the backbone "
            f"stores {embedding.position_embedding_grid}; build it with "
            f"position_embedding_shape=({side * backbone.patch_size}, "
            f"{side * backbone.patch_size}) (`vmoe_model_kwargs` does)."
        )
    assigner.set(embedding.position_embedding, grid, position_key)
    cls_token = assigner.take("cls") + position[:, :1]
    assigner.set(embedding.cls_token, cls_token, "cls + pos_embedding[:, 0]")
    moe_blocks = set(backbone.moe_layer_indices)
    for index, block in enumerate(backbone.transformer_layers):
        key = f"Encoder/encoderblock_{index}"
        _assign_norm(assigner, block.norm1, f"{key}/LayerNorm_0")
        _assign_attention(assigner, block.attention, f"{key}/SelfAttention")
        _assign_norm(assigner, block.norm2, f"{key}/LayerNorm_1")
        if index in moe_blocks:
            _assign_moe(assigner, block.mlp, f"{key}/Moe")
        else:
            _assign_dense(assigner, block.mlp.fc1, f"{key}/Mlp/Dense_0")
            _assign_dense(assigner, block.mlp.fc2, f"{key}/Mlp/Dense_1")
    _assign_norm(assigner, backbone.get_layer("norm"), "Encoder/encoder_norm")
    head_keys = [k for k in params if k.split("/")[0] in ("head", "pre_logits")]
    if model is backbone:
        for key in head_keys:
            assigner.skip(key)
    else:
        if model.pre_logits is not None:
            _assign_dense(assigner, model.pre_logits, "pre_logits")
        _assign_dense(assigner, model.output_dense, "head")
    assigner.finish()
    return model


def build_vmoe_model(
    source,
    model_config,
    image_size,
    eval_capacity_factor=None,
    num_classes=None,
    dtype=None,
    load_weights=True,
    classifier_cls=None,
    preprocessor=None,
    **overrides,
):
    """Builds the Keras model of a vmoe checkpoint and loads it.

    Args:
        source: checkpoint prefix or `{path: array}` dict.
        model_config: vmoe's `config.model` dict (`vmoe_model_kwargs`).
        image_size: input image side (the position grid is resampled when
            it differs from the stored one).
        eval_capacity_factor: capacity factor at inference.
        num_classes: None keeps the checkpoint's head; another number
            builds a new head (and no `pre_logits`) for fine-tuning, as
            vmoe's fine-tuning configurations do.
        dtype: dtype policy of the model.
        load_weights: False builds the architecture only (`source` may
            then be None, with `position_grid` in `overrides` or the grid of
            `image_size`).
        classifier_cls: the classifier class (default
            `ViTMoEImageClassifier`).
        preprocessor: the classifier's preprocessor (default none).
        **overrides: further `ViTMoEBackbone` arguments (e.g.
            `capacity_factor`, `dispatch`).

    Returns:
        A `ViTMoEImageClassifier` (a `ViTMoEBackbone` when the model has no
        head and `num_classes` is None).
    """
    from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone
    from keras_vmoe.models.vit_moe.image_classifier import ViTMoEImageClassifier

    params = None
    position_grid = overrides.pop("position_grid", None)
    if load_weights:
        params, _ = load_vmoe_params(source)
        position_grid = position_grid_of(params)
    backbone_kwargs, head_kwargs = vmoe_model_kwargs(
        model_config, image_size, eval_capacity_factor, position_grid
    )
    backbone_kwargs.update(overrides)
    backbone = ViTMoEBackbone(**backbone_kwargs, dtype=dtype)
    new_head = (
        num_classes is not None and num_classes != head_kwargs["num_classes"]
    )
    classes = num_classes or head_kwargs["num_classes"]
    if not classes:
        if load_weights:
            convert_vmoe_checkpoint(params, backbone)
        return backbone
    model = (classifier_cls or ViTMoEImageClassifier)(
        backbone,
        num_classes=classes,
        preprocessor=preprocessor,
        representation_size=(
            None if new_head else head_kwargs["representation_size"]
        ),
    )
    if not load_weights:
        return model
    if new_head:
        # Fine-tuning: everything but the head (and pre_logits) is loaded.
        kept = {
            key: value
            for key, value in params.items()
            if key.split("/")[0] not in ("head", "pre_logits")
        }
        convert_vmoe_checkpoint(kept, backbone)
    else:
        convert_vmoe_checkpoint(params, model)
    return model
