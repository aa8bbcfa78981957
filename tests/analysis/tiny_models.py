"""Tiny ViT-MoE models and data shared by the analysis tests."""

import keras
import numpy as np

from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier

IMAGE_SHAPE = (16, 16, 3)
NUM_CLASSES = 3


def tiny_classifier(identical_experts=False, seed=0, **moe_kwargs):
    """A 3-block ViT (4x4 patches, width 16) with MoE in the last two
    blocks and a 3-class head. `moe_kwargs` override the MoE arguments."""
    keras.utils.set_random_seed(seed)
    config = dict(
        moe_layers="last-2",
        num_experts=4,
        top_k=1,
        routing="image",
        eval_capacity_factor=None,
    )
    config.update(moe_kwargs)
    backbone = ViTMoEBackbone(
        image_shape=IMAGE_SHAPE,
        patch_size=4,
        num_layers=3,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        **config,
    )
    if identical_experts:
        for index in backbone.moe_layer_indices:
            make_experts_identical(backbone.get_layer(f"block_{index}").mlp)
    return ViTMoEImageClassifier(backbone, num_classes=NUM_CLASSES)


def make_experts_identical(layer):
    """Copies expert 0 of a `MoEFeedForward` into all its experts (with a
    non-zero bias, so biases are tested too)."""
    rng = np.random.default_rng(1)
    for weight in (
        layer.expert_kernel_1,
        layer.expert_bias_1,
        layer.expert_kernel_2,
        layer.expert_bias_2,
    ):
        first = keras.ops.convert_to_numpy(weight)[0]
        first = first + 0.1 * rng.standard_normal(first.shape)
        weight.assign(np.broadcast_to(first, weight.shape).astype("float32"))


def tiny_data(num_images=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((num_images, *IMAGE_SHAPE)).astype("float32")
    labels = np.arange(num_images) % NUM_CLASSES
    return images, labels
