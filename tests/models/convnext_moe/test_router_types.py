"""MoE-ConvNeXt with Soft MoE and Expert Choice blocks (`router_type`)."""

import keras
import numpy as np
import pytest

from keras_vmoe.analysis import collect_routing
from keras_vmoe.analysis.collect import SoftLayerRouting
from keras_vmoe.layers import ExpertChoiceFeedForward
from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import SoftMoEFeedForward
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

TINY = dict(
    depths=[1, 2],
    hidden_dims=[8, 16],
    image_shape=(16, 16, 3),
    moe_layers="every-2",
    num_experts=4,
)
ROUTER_TYPES = {
    "soft": dict(router_type="soft", slots_per_expert=2, shared_expert=True),
    "expert_choice": dict(
        router_type="expert_choice", capacity_factor=2.0, router="cosine"
    ),
}
IMAGES = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")


def _backbone(router_type, **overrides):
    keras.utils.set_random_seed(0)
    config = dict(TINY, **ROUTER_TYPES[router_type])
    config.update(overrides)
    return ConvNeXtMoEBackbone(**config)


def _moe_blocks(backbone):
    return [block for block in backbone.blocks if block.is_moe]


@pytest.mark.parametrize(
    "router_type, layer_class",
    [("soft", SoftMoEFeedForward), ("expert_choice", ExpertChoiceFeedForward)],
)
def test_moe_blocks_use_the_router_type_layer(router_type, layer_class):
    backbone = _backbone(router_type)
    blocks = _moe_blocks(backbone)
    assert blocks
    for block in backbone.blocks:
        assert isinstance(block.mlp, layer_class) == block.is_moe
        assert not isinstance(block.mlp, MoEFeedForward)
    mlp = blocks[-1].mlp
    assert mlp.num_experts == 4 and mlp.shared_expert is (router_type == "soft")
    if router_type == "soft":
        assert mlp.slots_per_expert == 2
        # Experts are the blocks' expert MLP width (mlp_ratio 4 x d).
        assert tuple(mlp.expert_kernel_1.shape) == (4, 16, 64)
    else:
        assert mlp.capacity_factor == 2.0 and mlp.router_name == "cosine"
    assert backbone(IMAGES).shape == (2, 2, 2, 16)


def test_default_router_type_is_top_k():
    backbone = ConvNeXtMoEBackbone(**TINY)
    assert backbone.router_type == "top_k"
    assert backbone.get_config()["router_type"] == "top_k"
    assert all(
        isinstance(block.mlp, MoEFeedForward) for block in _moe_blocks(backbone)
    )


def test_soft_moe_block_is_batch_independent():
    # Soft MoE routes every image's positions on their own: an image's
    # features do not change with the rest of the batch.
    backbone = _backbone("soft")
    both = keras.ops.convert_to_numpy(backbone(IMAGES))
    first = keras.ops.convert_to_numpy(backbone(IMAGES[:1]))
    np.testing.assert_allclose(first[0], both[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router_type", sorted(ROUTER_TYPES))
def test_config_and_keras_round_trips_are_identical(router_type, tmp_path):
    backbone = _backbone(router_type)
    config = backbone.get_config()
    assert config["router_type"] == router_type
    clone = ConvNeXtMoEBackbone.from_config(config)
    assert clone.get_config() == config
    assert_keras_round_trip(backbone, IMAGES, tmp_path)


@pytest.mark.parametrize("router_type", sorted(ROUTER_TYPES))
def test_gradient_reaches_every_weight(router_type):
    assert_every_weight_has_gradient(_backbone(router_type), IMAGES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(router_type="hash"), "router_type='hash'"),
        (dict(router_type="soft", top_k=2), "top_k=2"),
        (dict(router_type="soft", router="cosine"), "router='cosine'"),
        (dict(router_type="soft", capacity_factor=2.0), "capacity_factor"),
        (dict(router_type="expert_choice", routing="image"), "routing"),
        (
            dict(router_type="expert_choice", eval_capacity_factor=None),
            "eval_capacity_factor",
        ),
        (dict(router_type="top_k", slots_per_expert=2), "slots_per_expert=2"),
        (dict(router_type="soft", slots_per_expert=0), "slots_per_expert=0"),
        (
            dict(
                router_type="soft",
                load_balance_loss_weight=0.1,
            ),
            "load_balance_loss_weight",
        ),
    ],
)
def test_bad_router_type_arguments_raise_naming_them(overrides, message):
    config = dict(TINY)
    config.update(overrides)
    with pytest.raises((ValueError, TypeError), match=message):
        ConvNeXtMoEBackbone(**config)


def test_normalize_reaches_the_soft_moe_layer():
    backbone = _backbone("soft", normalize=False)
    assert all(not block.mlp.normalize for block in _moe_blocks(backbone))


def test_soft_moe_classifier_fits_and_its_routing_is_analysed():
    backbone = _backbone("soft")
    model = ConvNeXtMoEImageClassifier(backbone, num_classes=3)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    images = np.concatenate([IMAGES] * 2)
    labels = np.array([0, 1, 0, 1])
    history = model.fit(images, labels, batch_size=4, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    assert any(key.endswith("max_load") for key in history.history)
    result = collect_routing(model, (images, labels))
    assert all(isinstance(r, SoftLayerRouting) for r in result.layers)
    # Feature maps: every position of an image is a token (2x2 or 4x4).
    assert {r.num_tokens for r in result.layers} <= {4, 16}
    for r in result.layers:
        np.testing.assert_allclose(r.combine_mass.sum(axis=-1), 1, atol=1e-5)
