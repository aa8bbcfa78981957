"""timm / DINOv2 ViT checkpoints -> `ViTMoEBackbone`, and ViT upcycling.

Source names (timm `VisionTransformer` and the original DINOv2 release):
`cls_token`, `reg_token` (timm) or `register_tokens` (DINOv2), `pos_embed`,
`patch_embed.proj.{weight,bias}`, `blocks.N.{norm1,norm2}.{weight,bias}`,
`blocks.N.attn.{qkv,proj}.{weight,bias}`, `blocks.N.{ls1,ls2}.gamma`,
`blocks.N.mlp.{fc1,fc2}.{weight,bias}`, `norm.{weight,bias}`; `mask_token`
(DINOv2's masked-image-modelling token, unused at inference) is skipped,
`head.{weight,bias}` is loaded into a classifier's output layer or skipped
for a backbone.

Position embeddings: a position embedding entry of the CLS (and register)
tokens is folded into the token itself (the backbone gives prefix tokens
none); the patch grid is resampled to the backbone's
`position_embedding_grid` when they differ, with the same antialiased
bicubic filter as timm.
"""

import math

import numpy as np

from keras_vmoe.converters.common import WeightAssigner
from keras_vmoe.converters.common import load_state_dict
from keras_vmoe.converters.upcycle import upcycle_feed_forward
from keras_vmoe.models.vit_moe.layers import bicubic_resize_matrix
from keras_vmoe.validation import deprecated_alias

_SKIPPED_KEYS = ("mask_token",)


def _linear(weight):
    """PyTorch Linear weight [out, in] -> Keras Dense kernel [in, out]."""
    return np.transpose(weight)


def _patch_kernel(weight):
    """PyTorch Conv2d weight [out, in, kh, kw] -> Keras [kh, kw, in, out]."""
    return np.transpose(weight, (2, 3, 1, 0))


def _split_position_embedding(pos_embed, num_registers, grid):
    """Splits a [1, N, d] timm position embedding.

    Returns `(prefix, patches)`: the entries of the CLS (and register)
    tokens, [P, d] with P in {0, 1, 1 + R}, and the patch grid
    [rows, columns, d], resampled to `grid` if needed.
    """
    pos_embed = pos_embed.reshape(-1, pos_embed.shape[-1])
    total = pos_embed.shape[0]
    for num_prefix in (0, 1, 1 + num_registers):
        side = math.isqrt(total - num_prefix)
        if side * side == total - num_prefix:
            break
    else:
        raise ValueError(
            "Cannot read 'pos_embed' as prefix entries plus a square patch "
            f"grid: it has {total} entries (registers: {num_registers})."
        )
    prefix = pos_embed[:num_prefix]
    patches = pos_embed[num_prefix:].reshape(side, side, -1)
    rows, columns = grid
    if (side, side) != (rows, columns):
        patches = np.einsum(
            "ri,ijd->rjd", bicubic_resize_matrix(side, rows), patches
        )
        patches = np.einsum(
            "cj,rjd->rcd", bicubic_resize_matrix(side, columns), patches
        )
    return prefix, patches


def _assign_norm(assigner, layer, key):
    assigner.assign(layer.gamma, f"{key}.weight")
    assigner.assign(layer.beta, f"{key}.bias")


def _assign_dense(assigner, layer, key):
    assigner.assign(layer.kernel, f"{key}.weight", _linear)
    assigner.assign(layer.bias, f"{key}.bias")


def _assign_backbone(assigner, backbone):
    state = assigner.state_dict
    embedding = backbone.get_layer("embedding")
    projection = embedding.patch_projection
    assigner.assign(projection.kernel, "patch_embed.proj.weight", _patch_kernel)
    assigner.assign(projection.bias, "patch_embed.proj.bias")

    num_registers = backbone.num_register_tokens
    prefix, patches = _split_position_embedding(
        assigner.take("pos_embed"),
        num_registers,
        embedding.position_embedding_grid,
    )
    assigner.set(embedding.position_embedding, patches, "pos_embed")
    cls_token = assigner.take("cls_token").reshape(1, 1, -1)
    if len(prefix):
        cls_token = cls_token + prefix[None, :1]
    assigner.set(embedding.cls_token, cls_token, "cls_token")
    if num_registers:
        register_key = (
            "reg_token" if "reg_token" in state else "register_tokens"
        )
        registers = assigner.take(register_key).reshape(1, num_registers, -1)
        if len(prefix) > 1:
            registers = registers + prefix[None, 1:]
        assigner.set(embedding.register_tokens, registers, register_key)

    for index, block in enumerate(backbone.transformer_layers):
        key = f"blocks.{index}"
        _assign_norm(assigner, block.norm1, f"{key}.norm1")
        _assign_dense(assigner, block.attention.qkv, f"{key}.attn.qkv")
        _assign_dense(assigner, block.attention.proj, f"{key}.attn.proj")
        _assign_norm(assigner, block.norm2, f"{key}.norm2")
        _assign_dense(assigner, block.mlp.fc1, f"{key}.mlp.fc1")
        _assign_dense(assigner, block.mlp.fc2, f"{key}.mlp.fc2")
        for name in ("ls1", "ls2"):
            scale = getattr(block, name)
            if scale is not None:
                assigner.assign(scale.gamma, f"{key}.{name}.gamma")
    _assign_norm(assigner, backbone.get_layer("norm"), "norm")
    for key in _SKIPPED_KEYS:
        if key in state:
            assigner.skip(key)


def convert_vit_checkpoint(source, model):
    """Loads a timm / DINOv2 ViT checkpoint into a dense model, by name.

    Args:
        source: a `.safetensors` / `.npz` file or a `{name: array}` dict with
            timm or original DINOv2 key names.
        model: a dense `ViTMoEBackbone` (`moe_layers=None`) of the same
            architecture, or a `ViTMoEImageClassifier` on one (its output
            layer is then loaded from `head.*`, and `pooling` must match
            the checkpoint's).

    Raises:
        ValueError: on a missing, unused or wrongly shaped tensor (the
            message names the key), or for a backbone with MoE blocks (use
            `load_vit_checkpoint`, which upcycles).
    """
    backbone = getattr(model, "backbone", model)
    from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone

    if not isinstance(backbone, ViTMoEBackbone):
        raise TypeError(
            "`model` must be a `ViTMoEBackbone` or a `ViTMoEImageClassifier`. "
            f"Received: model={type(model).__name__}"
        )
    if backbone.moe_layer_indices:
        raise ValueError(
            "`convert_vit_checkpoint` loads dense checkpoints into dense "
            "backbones; use `load_vit_checkpoint` to upcycle into MoE blocks. "
            f"Received: a backbone with moe_layers={backbone.moe_layers!r}"
        )
    assigner = WeightAssigner(load_state_dict(source), model.weights)
    _assign_backbone(assigner, backbone)
    if model is backbone:
        for key in ("head.weight", "head.bias"):
            if key in assigner.state_dict:
                assigner.skip(key)
    else:
        _assign_dense(assigner, model.output_dense, "head")
    assigner.finish()


def dense_twin(backbone):
    """A dense `ViTMoEBackbone` with the architecture of `backbone`."""
    config = backbone.get_config()
    config.update(moe_layers=None, name=None, trainable=True)
    return type(backbone).from_config(config)


def upcycle_vit(dense, moe, noise_std=0.0, seed=None):
    """Copies a dense ViT into a ViT-MoE, upcycling the MLPs of MoE blocks.

    Every weight outside the MoE blocks' MLPs is copied as is; each MoE
    block's experts (and shared expert) become copies of the dense MLP
    (`upcycle_feed_forward`); routers keep their initialisation. With
    `normalize_gates=True` and no dropped tokens (e.g. dropless routing) the
    MoE model's features equal the dense model's.

    Args:
        dense: a dense `ViTMoEBackbone`.
        moe: a `ViTMoEBackbone` with the same architecture apart from its
            MoE arguments.
        noise_std: relative noise added to each routed expert's copy.
        seed: seed of that noise (each block gets its own stream).

    Raises:
        ValueError: if the two architectures differ or `dense` has MoE
            blocks.
    """
    if dense.moe_layer_indices:
        raise ValueError(
            "`dense` must have no MoE blocks. Received: "
            f"moe_layers={dense.moe_layers!r}"
        )
    shared_keys = (
        "image_shape",
        "patch_size",
        "num_layers",
        "num_heads",
        "hidden_dim",
        "mlp_dim",
        "num_register_tokens",
        "position_embedding_shape",
        "layer_scale_init_value",
    )
    dense_config, moe_config = dense.get_config(), moe.get_config()
    different = {
        key: (dense_config[key], moe_config[key])
        for key in shared_keys
        if dense_config[key] != moe_config[key]
    }
    if different:
        raise ValueError(
            "`dense` and `moe` must share their architecture. Received "
            f"(dense, moe) values: {different}"
        )
    pairs = [(dense.get_layer("embedding"), moe.get_layer("embedding"))]
    pairs.append((dense.get_layer("norm"), moe.get_layer("norm")))
    for index, (source, target) in enumerate(
        zip(dense.transformer_layers, moe.transformer_layers)
    ):
        for name in ("norm1", "attention", "norm2", "ls1", "ls2"):
            if getattr(source, name) is not None:
                pairs.append((getattr(source, name), getattr(target, name)))
        if target.is_moe:
            block_seed = None if seed is None else seed + index
            upcycle_feed_forward(source.mlp, target.mlp, noise_std, block_seed)
        else:
            pairs.append((source.mlp, target.mlp))
    for source, target in pairs:
        for source_weight, target_weight in zip(source.weights, target.weights):
            target_weight.assign(source_weight)


def load_vit_checkpoint(
    source,
    model,
    upcycle_noise_std=0.0,
    upcycle_seed=None,
    noise_std=None,
    seed=None,
):
    """Loads a dense timm / DINOv2 checkpoint into any ViT(-MoE) model.

    A dense model is loaded directly (`convert_vit_checkpoint`); a MoE
    model gets the checkpoint through a dense twin and `upcycle_vit`. For a
    `ViTMoEImageClassifier` the checkpoint's head (`head.weight`,
    `head.bias`) is loaded into the output layer, so a timm classifier
    becomes a MoE classifier in one call.

    Args:
        source: checkpoint file or `{name: array}` dict.
        model: the target `ViTMoEBackbone` (a head in the checkpoint is
            skipped) or `ViTMoEImageClassifier` (the checkpoint must have a
            head of `num_classes` outputs and the classifier's `pooling`).
        upcycle_noise_std: relative noise added to each routed expert's
            copy (`noise_std` of `upcycle_vit`).
        upcycle_seed: seed of that noise (`seed` of `upcycle_vit`).
        noise_std, seed: deprecated aliases of `upcycle_noise_std` and
            `upcycle_seed` (a `DeprecationWarning`; removed in 0.3).

    Returns:
        `model`, with its weights set.
    """
    upcycle_noise_std = deprecated_alias(
        "noise_std", noise_std, "upcycle_noise_std", upcycle_noise_std, 0.0
    )
    upcycle_seed = deprecated_alias(
        "seed", seed, "upcycle_seed", upcycle_seed, None
    )
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        backbone = model
    from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone

    if not isinstance(backbone, ViTMoEBackbone):
        raise TypeError(
            "`model` must be a `ViTMoEBackbone` or a `ViTMoEImageClassifier`. "
            f"Received: model={type(model).__name__}"
        )
    if not backbone.moe_layer_indices:
        convert_vit_checkpoint(source, model)
        return model
    dense_backbone = dense_twin(backbone)
    if model is backbone:
        convert_vit_checkpoint(source, dense_backbone)
        upcycle_vit(dense_backbone, backbone, upcycle_noise_std, upcycle_seed)
        return model
    # A classifier: fill a dense classifier (backbone + head, coverage
    # checked), upcycle its backbone, copy its head.
    dense = type(model)(
        dense_backbone,
        num_classes=model.num_classes,
        pooling=model.pooling,
        activation=model.activation,
    )
    convert_vit_checkpoint(source, dense)
    upcycle_vit(dense_backbone, backbone, upcycle_noise_std, upcycle_seed)
    for source_weight, target_weight in zip(
        dense.output_dense.weights, model.output_dense.weights
    ):
        target_weight.assign(source_weight)
    return model
