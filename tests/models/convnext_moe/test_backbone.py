"""ConvNeXtMoEBackbone and ConvNeXtBlock: placements, shapes, parity, saving."""

import re

import keras
import numpy as np
import pytest

from keras_vmoe.converters.convnext import upcycle_convnext
from keras_vmoe.models.convnext_moe import ConvNeXtBlock
from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import moe_block_indices
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

HIERARCHICAL = dict(
    depths=[1, 2, 3, 2], hidden_dims=[8, 16, 24, 32], image_shape=(32, 32, 3)
)
ISOTROPIC = dict(
    depths=[6],
    hidden_dims=[16],
    patch_size=8,
    stem_norm=False,
    layer_scale_init_value=None,
    image_shape=(32, 32, 3),
)
IMAGES = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")


def numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize(
    "depths, placement, expected",
    [
        # ConvNeXt-T: 3-3-9-3.
        (
            [3, 3, 9, 3],
            "every-2",
            [(0, 1), (1, 1), (2, 1), (2, 3), (2, 5), (2, 7), (3, 1)],
        ),
        ([3, 3, 9, 3], "stage", [(0, 2), (1, 2), (2, 8), (3, 2)]),
        ([3, 3, 9, 3], "last-2", [(2, 8), (3, 2)]),
        ([3, 3, 9, 3], "last-3", [(2, 4), (2, 8), (3, 2)]),
        # ConvNeXt-S/B: the middle of a 27-block stage 3 is block 13.
        ([3, 3, 27, 3], "last-3", [(2, 13), (2, 26), (3, 2)]),
        # Isotropic, 18 blocks: V-MoE's "last n even layers" (1-based).
        ([18], "every-2", [(0, j) for j in range(1, 18, 2)]),
        ([18], "last-2", [(0, 15), (0, 17)]),
        ([18], "last-3", [(0, 13), (0, 15), (0, 17)]),
        ([18], "stage", [(0, 17)]),
        ([3, 3, 9, 3], None, []),
        # Explicit: global indices and (stage, block) pairs, deduplicated.
        ([3, 3, 9, 3], [0, 6, (2, 0), [3, 1]], [(0, 0), (2, 0), (3, 1)]),
    ],
)
def test_placements_select_the_papers_blocks(depths, placement, expected):
    assert moe_block_indices(depths, placement) == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(moe_layers="last-4"), "moe_layers='last-4'"),
        (dict(moe_layers=[(4, 0)]), "moe_layers=[(4, 0)]"),
        (dict(moe_layers=[99]), "moe_layers=[99]"),
        (dict(moe_layers=["a"]), "moe_layers=['a']"),
        (dict(moe_layers="last-2", num_experts=0), "num_experts=0"),
        (dict(hidden_dims=[8, 16, 24]), "hidden_dims=[8, 16, 24]"),
        (dict(depths=[1, 0, 1, 1]), "depths=[1, 0, 1, 1]"),
        (dict(moe_layers="last-2", top_k=3, num_experts=2), "top_k=3"),
        (dict(router_dims=8), "router_dims=8"),
    ],
)
def test_bad_configs_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ConvNeXtMoEBackbone(**{**HIERARCHICAL, **kwargs})


def test_isotropic_last_3_needs_enough_blocks():
    with pytest.raises(ValueError, match="moe_layers='last-3'"):
        ConvNeXtMoEBackbone(
            **{**ISOTROPIC, "depths": [4]}, moe_layers="last-3"
        )


@pytest.mark.parametrize(
    "placement", [None, "every-2", "stage", "last-2", "last-3"]
)
@pytest.mark.parametrize(
    "family, expected_shape",
    [(HIERARCHICAL, (2, 1, 1, 32)), (ISOTROPIC, (2, 4, 4, 16))],
    ids=["hierarchical", "isotropic"],
)
@pytest.mark.slow
def test_every_family_builds_with_correct_shapes(
    family, expected_shape, placement
):
    backbone = ConvNeXtMoEBackbone(
        **family, moe_layers=placement, num_experts=4, expert_mlp_ratio=2
    )
    assert backbone(IMAGES).shape == expected_shape
    moe_blocks = [
        (stage, index)
        for stage, blocks in enumerate(backbone.stage_blocks)
        for index, block in enumerate(blocks)
        if block.is_moe
    ]
    assert moe_blocks == moe_block_indices(family["depths"], placement)


def test_moe_block_adds_the_skip_connection_around_the_moe():
    block = ConvNeXtBlock(hidden_dim=16, moe_config={"num_experts": 4})
    x = IMAGES[:, :8, :8, :1] * np.ones((1, 1, 1, 16), "float32")
    y = block(x)
    block.layer_scale.assign(np.full((16,), 0.5, "float32"))
    block.skip_scale.assign(np.full((16,), 2.0, "float32"))
    tokens = block.norm(block.depthwise_conv(x))
    expected = x + 0.5 * (numpy(block.mlp(tokens)) + 2.0 * numpy(tokens))
    np.testing.assert_allclose(numpy(block(x)), expected, atol=1e-5)
    assert y.shape == x.shape


def test_moe_with_one_expert_equals_the_dense_convnext():
    dense = ConvNeXtMoEBackbone(**HIERARCHICAL)
    moe = ConvNeXtMoEBackbone(
        **HIERARCHICAL, moe_layers="every-2", num_experts=1
    )
    upcycle_convnext(dense, moe)
    np.testing.assert_allclose(
        numpy(moe(IMAGES)), numpy(dense(IMAGES)), atol=1e-5
    )


def test_gradients_reach_every_weight():
    backbone = ConvNeXtMoEBackbone(
        depths=[1, 2],
        hidden_dims=[8, 16],
        moe_layers=[0, 2],
        num_experts=4,
        shared_expert=True,
        drop_path_rate=0.1,
        layer_scale_init_value=0.5,
    )
    assert_every_weight_has_gradient(backbone, IMAGES)


def test_isotropic_gradients_reach_every_weight():
    backbone = ConvNeXtMoEBackbone(
        **ISOTROPIC, moe_layers="last-2", num_experts=4, router="cosine"
    )
    assert_every_weight_has_gradient(backbone, IMAGES)


def test_training_adds_the_auxiliary_losses():
    backbone = ConvNeXtMoEBackbone(**HIERARCHICAL, moe_layers="last-2")
    backbone(IMAGES, training=True)
    assert len(backbone.losses) == 2


def test_keras_round_trip_is_bit_exact(tmp_path):
    backbone = ConvNeXtMoEBackbone(
        **HIERARCHICAL,
        moe_layers=[(2, 1), 7],
        num_experts=4,
        router="l2",
        routing="image",
        router_dim=8,
        z_loss_weight=1e-3,
    )
    restored = assert_keras_round_trip(backbone, IMAGES, tmp_path)
    assert restored.get_config() == backbone.get_config()


def test_config_round_trip_rebuilds_the_same_model():
    backbone = ConvNeXtMoEBackbone(**ISOTROPIC, moe_layers="every-2")
    clone = ConvNeXtMoEBackbone.from_config(backbone.get_config())
    assert clone.get_config() == backbone.get_config()
    assert clone.count_params() == backbone.count_params()


def test_mixed_bfloat16_forward():
    keras.config.set_dtype_policy("mixed_bfloat16")
    backbone = ConvNeXtMoEBackbone(**HIERARCHICAL, moe_layers="last-3")
    outputs = backbone(IMAGES)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert np.all(np.isfinite(numpy(keras.ops.cast(outputs, "float32"))))
    assert backbone.blocks[-1].mlp.expert_kernel_1.dtype == "float32"


def test_per_block_mlp_width_and_dense_skip(tmp_path):
    # Block 1 (MoE) gets 8-unit experts, block 2 (dense) a 12-unit MLP and
    # the Sweet-spot skip around it; block 0 keeps mlp_ratio 4 (32 units).
    backbone = ConvNeXtMoEBackbone(
        depths=[1, 2],
        hidden_dims=[8, 16],
        moe_layers=[1],
        num_experts=2,
        block_mlp_dims=[None, 8, 12],
        dense_skip_blocks=[2],
        layer_scale_init_value=0.5,
    )
    blocks = backbone.blocks
    assert [b.mlp.hidden_dim for b in blocks] == [32, 8, 12]
    assert blocks[0].skip_scale is None
    assert blocks[2].skip_scale.shape == (16,)
    assert blocks[2].get_config()["dense_skip_connection"] is True
    config = backbone.get_config()
    assert config["block_mlp_dims"] == [None, 8, 12]
    assert config["dense_skip_blocks"] == [2]
    assert_every_weight_has_gradient(backbone, IMAGES)
    assert_keras_round_trip(backbone, IMAGES, tmp_path)


def test_block_mlp_dim_and_dense_skip_are_checked():
    with pytest.raises(ValueError, match="mlp_dim=0"):
        ConvNeXtBlock(hidden_dim=8, mlp_dim=0)
    with pytest.raises(ValueError, match="dense_skip_connection=True"):
        ConvNeXtBlock(
            hidden_dim=8,
            moe_config={"num_experts": 2},
            dense_skip_connection=True,
        )
