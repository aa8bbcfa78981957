import keras
import numpy as np
import pytest

from keras_vmoe.converters import load_state_dict
from keras_vmoe.converters.vit import convert_vit_checkpoint
from keras_vmoe.converters.vit import dense_twin
from keras_vmoe.converters.vit import load_vit_checkpoint
from keras_vmoe.converters.vit import upcycle_vit
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier

FIXTURES = "tests/fixtures"
# The timm models of tests/fixtures/make_vit_fixtures.py, as backbone
# configs, with the image sizes their references were computed at.
MODELS = {
    "vit_tiny_dinov2": (
        dict(
            patch_size=14,
            num_layers=4,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=128,
            position_embedding_shape=(56, 56),
            layer_scale_init_value=1e-5,
        ),
        (56, 42, 70),
    ),
    "vit_tiny_registers": (
        dict(
            patch_size=8,
            num_layers=3,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=128,
            position_embedding_shape=(32, 32),
            num_register_tokens=2,
        ),
        (32, 48),
    ),
}
CASES = [(name, size) for name, (_, sizes) in MODELS.items() for size in sizes]


def backbone_for(name, size, **overrides):
    config = dict(MODELS[name][0], image_shape=(size, size, 3), **overrides)
    return ViTMoEBackbone(**config)


def checkpoint(name):
    return f"{FIXTURES}/{name}.safetensors"


def reference(name):
    return np.load(f"{FIXTURES}/{name}_reference.npz")


def features(model, inputs):
    return keras.ops.convert_to_numpy(model(inputs))


@pytest.mark.parametrize("name, size", CASES)
def test_features_and_logits_match_timm(name, size):
    classifier = ViTMoEImageClassifier(backbone_for(name, size), num_classes=5)
    convert_vit_checkpoint(checkpoint(name), classifier)
    expected = reference(name)
    inputs = expected[f"images_{size}"]
    np.testing.assert_allclose(
        features(classifier.backbone, inputs),
        expected[f"features_{size}"],
        atol=1e-4,
    )
    np.testing.assert_allclose(
        features(classifier, inputs), expected[f"logits_{size}"], atol=1e-4
    )


def test_original_dinov2_names_load_like_timm_names():
    # DINOv2's release names registers `register_tokens`, gives CLS (only) a
    # position-embedding entry and keeps its `mask_token`.
    state = load_state_dict(checkpoint("vit_tiny_registers"))
    cls_position = np.random.default_rng(0).normal(size=(1, 1, 32))
    state["cls_token"] = state["cls_token"] - cls_position
    state["pos_embed"] = np.concatenate(
        [cls_position, state["pos_embed"]], axis=1
    )
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = np.zeros((1, 32), "float32")
    backbone = backbone_for("vit_tiny_registers", 32)
    convert_vit_checkpoint(state, backbone)
    expected = reference("vit_tiny_registers")
    np.testing.assert_allclose(
        features(backbone, expected["images_32"]),
        expected["features_32"],
        atol=1e-4,
    )


def test_position_embedding_is_resampled_when_the_stored_grid_differs():
    # A 4x4 position grid converted into a backbone that stores 6x6 gives
    # what timm computes by resampling at run time (both antialiased bicubic).
    resampled = backbone_for(
        "vit_tiny_registers", 48, position_embedding_shape=(48, 48)
    )
    convert_vit_checkpoint(checkpoint("vit_tiny_registers"), resampled)
    expected = reference("vit_tiny_registers")
    np.testing.assert_allclose(
        features(resampled, expected["images_48"]),
        expected["features_48"],
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s.pop("blocks.1.attn.proj.bias"), "blocks.1.attn.proj.bias"),
        (
            lambda s: s.update({"blocks.7.mlp.fc1.weight": np.zeros((4, 4))}),
            "blocks.7.mlp.fc1.weight",
        ),
        (
            lambda s: s.update(
                {"blocks.0.mlp.fc1.weight": np.zeros((32, 128))}
            ),
            "blocks.0.mlp.fc1.weight",
        ),
    ],
    ids=["missing_key", "extra_key", "wrong_shape"],
)
def test_incomplete_or_mismatched_checkpoint_names_the_key(edit, key):
    state = load_state_dict(checkpoint("vit_tiny_dinov2"))
    edit(state)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_vit_checkpoint(state, backbone_for("vit_tiny_dinov2", 56))


def test_convert_refuses_moe_backbones():
    with pytest.raises(ValueError, match="moe_layers='last-1'"):
        convert_vit_checkpoint(
            checkpoint("vit_tiny_dinov2"),
            backbone_for("vit_tiny_dinov2", 56, moe_layers="last-1"),
        )


@pytest.mark.parametrize(
    "moe",
    [
        dict(routing="image", num_experts=4, shared_expert=True),
        dict(routing="token", num_experts=3, top_k=2),
        dict(routing="token", num_experts=4, top_k=2, shared_expert=True),
    ],
)
def test_upcycled_checkpoint_keeps_the_dense_features(moe):
    backbone = backbone_for(
        "vit_tiny_dinov2",
        56,
        moe_layers="every-2",
        normalize_gates=True,
        capacity_factor=None,
        eval_capacity_factor=None,
        **moe,
    )
    load_vit_checkpoint(checkpoint("vit_tiny_dinov2"), backbone)
    dense = backbone_for("vit_tiny_dinov2", 56)
    convert_vit_checkpoint(checkpoint("vit_tiny_dinov2"), dense)
    inputs = reference("vit_tiny_dinov2")["images_56"]
    np.testing.assert_allclose(
        features(backbone, inputs), features(dense, inputs), atol=1e-5
    )


def test_upcycling_noise_makes_experts_differ_reproducibly():
    dense = backbone_for("vit_tiny_dinov2", 56)
    convert_vit_checkpoint(checkpoint("vit_tiny_dinov2"), dense)

    def expert_noise(seed):
        moe = backbone_for(
            "vit_tiny_dinov2", 56, moe_layers="last-2", num_experts=2
        )
        upcycle_vit(dense, moe, noise_std=0.1, seed=seed)
        return [
            keras.ops.convert_to_numpy(target.mlp.expert_kernel_1)
            - keras.ops.convert_to_numpy(source.mlp.fc1.kernel)
            for source, target in zip(
                dense.transformer_layers[2:], moe.transformer_layers[2:]
            )
        ]

    first, again = expert_noise(seed=3), expert_noise(seed=3)
    for noise, same in zip(first, again):
        np.testing.assert_array_equal(noise, same)
        assert np.any(noise[0]) and not np.allclose(noise[0], noise[1])
    # Each block has its own noise stream.
    assert not np.allclose(first[0], first[1])


def test_upcycle_vit_refuses_different_architectures():
    dense = backbone_for("vit_tiny_dinov2", 56)
    moe = backbone_for("vit_tiny_dinov2", 56, moe_layers="last-1", mlp_dim=64)
    with pytest.raises(ValueError, match="mlp_dim"):
        upcycle_vit(dense, moe)


def test_dense_twin_drops_only_the_moe_blocks():
    moe = backbone_for(
        "vit_tiny_registers", 32, moe_layers="every-2", num_experts=2
    )
    twin = dense_twin(moe)
    assert twin.moe_layer_indices == () and moe.moe_layer_indices == (0, 2)
    expected = dict(moe.get_config(), moe_layers=None)
    actual = twin.get_config()
    assert {k: v for k, v in actual.items() if k != "name"} == {
        k: v for k, v in expected.items() if k != "name"
    }
