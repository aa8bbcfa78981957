import keras
import numpy as np
import pytest

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.models import layer_stats
from keras_vmoe.models import model_stats
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe.presets import analytic_stats


def convolutional_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.Conv2D(4, 1, groups=2, name="grouped")(x)
    x = keras.layers.LayerNormalization(name="layer_norm")(x)
    x = keras.layers.BatchNormalization(name="batch_norm")(x)
    x = keras.layers.EinsumDense("abcd,de->abce", (8, 8, 6), name="einsum")(x)
    outputs = keras.layers.Dense(5, name="dense")(x)
    return keras.Model(inputs, outputs)


def test_layer_flops_are_hand_computed_macs():
    rows = {row["path"]: row for row in layer_stats(convolutional_model(), 8)}
    positions = 8 * 8
    expected = {
        "conv": positions * 4 * (3 * 3 * 3),
        "depthwise": positions * 4 * (3 * 3),
        "grouped": positions * 4 * 2,  # each output sees 4 / 2 channels
        "layer_norm": positions * 4 * 5,
        "batch_norm": positions * 4 * 2,
        "einsum": positions * 4 * 6,
        "dense": positions * 6 * 5,
    }
    assert {path: row["flops"] for path, row in rows.items()} == expected
    assert rows["conv"]["params"] == 3 * 3 * 3 * 4 + 4
    assert rows["depthwise"]["output_shape"] == (1, 8, 8, 4)


def test_model_stats_counts_parameters_not_state():
    model = convolutional_model()
    stats = model_stats(model, image_size=8)
    # BatchNorm moving statistics are state, not parameters.
    assert stats["params"] == model.count_params() - 2 * 4
    assert stats["active_params"] == stats["params"]
    model.trainable = False
    assert model_stats(model, image_size=8)["params"] == stats["params"]


@pytest.mark.parametrize("routing", ["token", "image"])
def test_moe_counts_top_k_experts_router_and_shared_expert(routing):
    tokens, width, hidden, experts, top_k = 5, 8, 16, 4, 2
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(width, 6, strides=6)(inputs)  # 1 position
    x = keras.layers.Reshape((1, width))(x)
    x = keras.layers.Concatenate(axis=1)([x] * tokens)
    outputs = MoEFeedForward(
        experts, hidden, top_k=top_k, routing=routing, shared_expert=True
    )(x)
    model = keras.Model(inputs, outputs)
    stats = model_stats(model, image_size=6)
    conv = 6 * 6 * 3 * width
    expert = width * hidden * 2
    router_rows = tokens if routing == "token" else 1
    assert stats["flops"] == (
        conv
        + tokens * top_k * expert  # routed experts
        + router_rows * width * experts  # linear router
        + tokens * expert  # shared expert
    )
    expert_params = 2 * width * hidden + hidden + width
    assert stats["params"] == (
        conv + width + experts * expert_params + width * experts + expert_params
    )
    assert (
        stats["active_params"]
        == stats["params"] - (experts - top_k) * expert_params
    )


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(num_register_tokens=2, layer_scale_init_value=0.1),
        dict(moe_layers="every-2", num_experts=4, top_k=2, routing="token"),
        dict(moe_layers=1, num_experts=3, shared_expert=True, routing="image"),
        dict(moe_layers=[0], num_experts=2, router="cosine", router_dim=8),
        dict(
            moe_layers=[1],
            num_experts=2,
            router="l2",
            position_embedding_shape=(48, 48),
        ),
    ],
)
@pytest.mark.slow
def test_vit_formula_matches_the_measured_model(config):
    config = dict(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=3,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        **config,
    )
    assert model_stats(ViTMoEBackbone(**config), 32) == analytic_stats(config)


def test_stats_leave_the_model_callable_as_before():
    model = convolutional_model()
    x = np.ones((2, 8, 8, 3), "float32")
    before = keras.ops.convert_to_numpy(model(x))
    layer_stats(model, 8)
    assert all(
        "call" not in layer.__dict__ for layer in model._flatten_layers()
    )
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)
