import keras
import numpy as np
import pytest

from keras_vmoe.converters.vit import upcycle_vit
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import resolve_moe_layers
from keras_vmoe.models.vit_moe.layers import ViTBlock
from keras_vmoe.models.vit_moe.layers import bicubic_resize_matrix
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

TINY = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=4,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
)
# One small config per preset family, plus the optional features.
FAMILIES = {
    "dense": {},
    "vimoe_image_top1_shared": dict(
        moe_layers="last-2",
        num_experts=4,
        routing="image",
        shared_expert=True,
        capacity_factor=None,
        eval_capacity_factor=None,
        layer_scale_init_value=1e-5,
        position_embedding_shape=(48, 48),
    ),
    "sweet_spot_token_top2": dict(
        moe_layers="every-2", num_experts=4, top_k=2, routing="token"
    ),
    "registers_cosine_router": dict(
        moe_layers=[0, 2], num_experts=2, router="cosine", num_register_tokens=3
    ),
}


def images(batch=2, size=32, seed=0):
    return (
        np.random.default_rng(seed)
        .normal(size=(batch, size, size, 3))
        .astype("float32")
    )


@pytest.mark.parametrize(
    "moe_layers, num_layers, expected",
    [
        (None, 12, ()),
        ([], 12, ()),
        (0, 12, ()),
        ("last-2", 12, (10, 11)),
        ("last-3", 12, (9, 10, 11)),
        (5, 12, (7, 8, 9, 10, 11)),
        (12, 12, tuple(range(12))),
        ("every-2", 12, (1, 3, 5, 7, 9, 11)),
        ("every-2", 5, (0, 2, 4)),
        ("every-3", 7, (0, 3, 6)),
        ([4, 0, 2], 6, (0, 2, 4)),
    ],
)
def test_resolve_moe_layers_places_blocks(moe_layers, num_layers, expected):
    assert resolve_moe_layers(moe_layers, num_layers) == expected


@pytest.mark.parametrize(
    "moe_layers",
    ["first-2", "last-0", "every2", 13, -1, [12], [1, 1], True, 2.0],
)
def test_resolve_moe_layers_rejects_bad_specs(moe_layers):
    with pytest.raises(ValueError, match=r"moe_layers=") as info:
        resolve_moe_layers(moe_layers, 12)
    assert repr(moe_layers) in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(moe_layers="last-9"), "moe_layers='last-9'"),
        (dict(moe_layers=[4]), r"moe_layers=\[4\]"),
        (dict(moe_layers="last-1", num_experts=0), "num_experts=0"),
        (dict(moe_layers="last-1", num_experts=2, top_k=3), "top_k=3"),
        (dict(moe_layers="last-1", routing="pixel"), "routing='pixel'"),
        (dict(moe_layers="last-1", router="softmax"), "router='softmax'"),
        (dict(router=keras.layers.Dense(2)), "router=<Dense"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(image_shape=(30, 30, 3)), r"image_shape=\(30, 30, 3\)"),
        (dict(image_shape=(None, None, 3)), "image_shape="),
        (dict(drop_path_rate=1.0), "drop_path_rate=1.0"),
        (dict(num_register_tokens=-1), "num_register_tokens=-1"),
        (dict(position_embedding_shape=(4, 4)), "position_embedding_shape="),
    ],
)
def test_bad_config_raises_naming_the_argument(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTMoEBackbone(**dict(TINY, **overrides))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_is_cls_registers_and_patch_tokens(family):
    config = dict(TINY, **FAMILIES[family])
    backbone = ViTMoEBackbone(**config)
    outputs = backbone(images())
    registers = config.get("num_register_tokens", 0)
    assert tuple(outputs.shape) == (2, 1 + registers + 16, 16)
    moe_blocks = [b.name for b in backbone.transformer_layers if b.is_moe]
    expected = [
        f"block_{i}" for i in resolve_moe_layers(config.get("moe_layers"), 4)
    ]
    assert moe_blocks == expected


def test_get_config_rebuilds_the_same_backbone():
    backbone = ViTMoEBackbone(
        **dict(TINY, **FAMILIES["vimoe_image_top1_shared"])
    )
    config = backbone.get_config()
    assert ViTMoEBackbone.from_config(config).get_config() == config


@pytest.mark.parametrize("routing", ["image", "token"])
def test_one_expert_moe_equals_dense(routing):
    dense = ViTMoEBackbone(**TINY)
    moe = ViTMoEBackbone(
        **TINY, moe_layers=4, num_experts=1, routing=routing, top_k=1
    )
    upcycle_vit(dense, moe)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(moe(images())),
        keras.ops.convert_to_numpy(dense(images())),
        atol=1e-5,
    )


def test_bicubic_resize_matrix_hand_values():
    # Shrinking 4 -> 2: the kernel is stretched by 2; cubic(0.25) =
    # 0.8671875, cubic(0.75) = 0.2265625, cubic(1.25) = -0.0703125.
    row = np.array([0.8671875, 0.8671875, 0.2265625, -0.0703125]) / 1.890625
    np.testing.assert_allclose(
        bicubic_resize_matrix(4, 2), np.stack([row, row[::-1]]), atol=1e-12
    )
    # Growing 2 -> 3: the middle output sits half-way between the inputs.
    np.testing.assert_allclose(bicubic_resize_matrix(2, 3)[1], [0.5, 0.5])
    np.testing.assert_array_equal(bicubic_resize_matrix(5, 5), np.eye(5))
    np.testing.assert_allclose(bicubic_resize_matrix(37, 16).sum(axis=1), 1.0)


def test_position_embedding_is_resampled_to_the_image_grid():
    # Stored for a 6x6 grid (48x48 images), used on 4x4 (32x32) images.
    backbone = ViTMoEBackbone(**dict(TINY, position_embedding_shape=(48, 48)))
    embedding = backbone.get_layer("embedding")
    assert tuple(embedding.position_embedding.shape) == (6, 6, 16)
    table = np.random.default_rng(1).normal(size=(6, 6, 16)).astype("float32")
    embedding.position_embedding.assign(table)
    expected = np.einsum(
        "ri,cj,ijd->rcd",
        bicubic_resize_matrix(6, 4),
        bicubic_resize_matrix(6, 4),
        table,
    ).reshape(16, 16)
    zero_images = np.zeros((1, 32, 32, 3), "float32")
    tokens = keras.ops.convert_to_numpy(embedding(zero_images))[0]
    bias = keras.ops.convert_to_numpy(embedding.patch_projection.bias)
    np.testing.assert_allclose(tokens[1:] - bias, expected, atol=1e-5)
    np.testing.assert_allclose(
        tokens[0], keras.ops.convert_to_numpy(embedding.cls_token)[0, 0]
    )


def test_moe_blocks_add_their_losses_in_training_only():
    backbone = ViTMoEBackbone(**dict(TINY, **FAMILIES["sweet_spot_token_top2"]))
    backbone(images(), training=False)
    assert not backbone.losses
    backbone(images(), training=True)
    assert len(backbone.losses) == 2  # load balance, in blocks 1 and 3


@pytest.mark.parametrize("routing", ["image", "token"])
def test_gradient_reaches_every_weight(routing):
    backbone = ViTMoEBackbone(
        **TINY,
        moe_layers="last-2",
        num_experts=2,
        top_k=2,
        routing=routing,
        shared_expert=True,
        num_register_tokens=1,
        layer_scale_init_value=0.1,
        position_embedding_shape=(40, 40),
        capacity_factor=None,
    )
    assert_every_weight_has_gradient(backbone, images(batch=4))


def test_keras_round_trip_is_bit_exact(tmp_path):
    backbone = ViTMoEBackbone(
        **dict(TINY, **FAMILIES["vimoe_image_top1_shared"])
    )
    assert_keras_round_trip(backbone, images(), tmp_path)


def test_preset_directory_round_trip_is_bit_exact(tmp_path):
    backbone = ViTMoEBackbone(
        **dict(TINY, **FAMILIES["registers_cosine_router"])
    )
    backbone.save_to_preset(str(tmp_path / "preset"))
    restored = ViTMoEBackbone.from_preset(str(tmp_path / "preset"))
    assert isinstance(restored, ViTMoEBackbone)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored(images())),
        keras.ops.convert_to_numpy(backbone(images())),
    )


def test_mixed_bfloat16_forward_matches_float32():
    config = dict(TINY, **FAMILIES["sweet_spot_token_top2"])
    reference = ViTMoEBackbone(**config)
    mixed = ViTMoEBackbone(**config, dtype="mixed_bfloat16")
    mixed.set_weights(reference.get_weights())
    outputs = mixed(images())
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert all(
        keras.backend.standardize_dtype(w.dtype) == "float32"
        for w in mixed.weights
    )
    expected = keras.ops.convert_to_numpy(reference(images()))
    actual = keras.ops.convert_to_numpy(keras.ops.cast(outputs, "float32"))
    assert np.all(np.isfinite(actual))
    np.testing.assert_allclose(actual, expected, atol=0.1)


def test_preset_directory_loads_with_another_dtype_policy(tmp_path):
    backbone = ViTMoEBackbone(**dict(TINY, **FAMILIES["sweet_spot_token_top2"]))
    backbone.save_to_preset(str(tmp_path / "preset"))
    restored = ViTMoEBackbone.from_preset(
        str(tmp_path / "preset"), dtype="mixed_bfloat16"
    )
    assert restored.dtype_policy.name == "mixed_bfloat16"
    outputs = restored(images())
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"


def test_stochastic_depth_drops_whole_samples_in_training_only():
    block = ViTBlock(num_heads=2, mlp_dim=32, drop_path_rate=0.9)
    reference = ViTBlock(num_heads=2, mlp_dim=32)
    tokens = np.random.default_rng(0).normal(size=(64, 5, 16)).astype("float32")
    block.build(tokens.shape)
    reference.build(tokens.shape)
    reference.set_weights(block.get_weights())
    changed = keras.ops.convert_to_numpy(block(tokens, training=True)) - tokens
    untouched = np.all(changed == 0, axis=(1, 2))
    # Both branches dropped with probability 0.81: some samples pass
    # through unchanged, the others are changed as a whole.
    assert 0 < untouched.sum() < 64
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(block(tokens, training=False)),
        keras.ops.convert_to_numpy(reference(tokens, training=False)),
    )
