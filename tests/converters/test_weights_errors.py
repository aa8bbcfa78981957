"""Checkpoint files and converters: bad files name themselves, MoE
classifiers load a timm ViT with its head in one call, upcycling noise
differs per block."""

import os
import pickle

import keras
import numpy as np
import pytest

from keras_vmoe.converters import WeightAssigner
from keras_vmoe.converters import load_state_dict

FIXTURES = "tests/fixtures"
VIT = f"{FIXTURES}/vit_tiny_dinov2.safetensors"
VIT_REFERENCE = f"{FIXTURES}/vit_tiny_dinov2_reference.npz"
# tests/fixtures/make_vit_fixtures.py's vit_tiny_dinov2 at 56x56.
VIT_CONFIG = dict(
    image_shape=(56, 56, 3),
    patch_size=14,
    num_layers=4,
    num_heads=2,
    hidden_dim=32,
    mlp_dim=128,
    position_embedding_shape=(56, 56),
    layer_scale_init_value=1e-5,
)


def _bad_files(folder):
    """{description: path} of unreadable checkpoint files."""
    data = open(VIT, "rb").read()
    files = {}

    def write(name, content):
        path = os.path.join(folder, name)
        with open(path, "wb") as file:
            file.write(content)
        files[name] = path

    write("truncated.safetensors", data[: len(data) // 2])
    write("garbage.safetensors", b"\xff" * 64)
    write(
        "pointer.safetensors",
        b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:0123\nsize 1234\n",
    )
    write("pickled.npz", pickle.dumps({"blocks.0.mlp.fc1.weight": [1.0]}))
    np.savez(os.path.join(folder, "plain.npz"), a=np.ones(3))
    zipped = open(os.path.join(folder, "plain.npz"), "rb").read()
    write("truncated.npz", zipped[: len(zipped) - 40])
    np.savez(
        os.path.join(folder, "objects.npz"),
        a=np.array([{"key": 1}], dtype=object),
    )
    files["objects.npz"] = os.path.join(folder, "objects.npz")
    np.save(os.path.join(folder, "array.npy"), np.ones(3))
    os.rename(
        os.path.join(folder, "array.npy"), os.path.join(folder, "array.npz")
    )
    files["array.npz"] = os.path.join(folder, "array.npz")
    return files


@pytest.mark.parametrize(
    "name, words",
    [
        ("truncated.safetensors", "not a readable"),
        ("garbage.safetensors", "not a readable"),
        ("pointer.safetensors", "Git LFS pointer"),
        ("pickled.npz", "pickled"),
        ("objects.npz", "pickled"),
        ("truncated.npz", "not a readable"),
        ("array.npz", "not a `.npz` archive"),
    ],
)
def test_bad_checkpoint_files_raise_naming_the_file(tmp_path, name, words):
    path = _bad_files(str(tmp_path))[name]
    with pytest.raises(ValueError) as info:
        load_state_dict(path)
    assert repr(path) in str(info.value)
    assert words in str(info.value)


def test_pickled_npz_never_runs_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="pickled"):
        load_state_dict(str(path))
    assert not marker.exists()


def test_source_of_the_wrong_type_names_the_argument():
    with pytest.raises(TypeError, match="source=42"):
        load_state_dict(42)


@pytest.mark.parametrize("dtype", ["int64", "int8", "bool", "uint8"])
def test_non_float_tensor_raises_naming_key_and_dtype(dtype):
    variable = keras.Variable(np.zeros((2, 3), "float32"), name="kernel")
    assigner = WeightAssigner({"fc.weight": np.ones((2, 3), dtype)}, [variable])
    with pytest.raises(ValueError) as info:
        assigner.assign(variable, "fc.weight")
    message = str(info.value)
    assert "'fc.weight'" in message and dtype in message
    np.testing.assert_array_equal(np.asarray(variable), 0.0)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_float_tensors_of_other_widths_are_converted(dtype):
    variable = keras.Variable(np.zeros((2,), "float32"))
    values = np.array([0.5, -1.25], dtype)
    assigner = WeightAssigner({"b": values}, [variable])
    assigner.assign(variable, "b")
    np.testing.assert_array_equal(np.asarray(variable), [0.5, -1.25])


def test_integer_tensor_in_a_vit_checkpoint_names_the_key():
    from keras_vmoe.converters import convert_vit_checkpoint
    from keras_vmoe.models import ViTMoEBackbone

    state = load_state_dict(VIT)
    state["blocks.1.mlp.fc1.bias"] = state["blocks.1.mlp.fc1.bias"].astype(
        "int32"
    )
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc1.bias'.*int32"):
        convert_vit_checkpoint(state, ViTMoEBackbone(**VIT_CONFIG))


def test_converters_are_importable_from_the_package():
    from keras_vmoe import converters

    for name in (
        "convert_vit_checkpoint",
        "load_vit_checkpoint",
        "upcycle_vit",
        "convert_timm_weights",
        "convert_keras_applications_weights",
        "upcycle_convnext",
        "timm_backbone_config",
    ):
        assert callable(getattr(converters, name)), name


def test_load_vit_checkpoint_into_a_moe_classifier_keeps_the_timm_logits():
    from keras_vmoe.converters import load_vit_checkpoint
    from keras_vmoe.models import ViTMoEBackbone
    from keras_vmoe.models import ViTMoEImageClassifier

    backbone = ViTMoEBackbone(
        **VIT_CONFIG,
        moe_layers="every-2",
        num_experts=4,
        routing="image",
        shared_expert=True,
        normalize_gates=True,
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    # The fixture's timm head has 5 classes.
    classifier = ViTMoEImageClassifier(backbone, num_classes=5)
    assert load_vit_checkpoint(VIT, classifier) is classifier
    reference = np.load(VIT_REFERENCE)
    # Upcycled with renormalised gates and no drops: timm's own logits.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(classifier(reference["images_56"])),
        reference["logits_56"],
        atol=1e-4,
    )


def test_load_vit_checkpoint_head_of_the_wrong_size_names_the_key():
    from keras_vmoe.converters import load_vit_checkpoint
    from keras_vmoe.models import ViTMoEBackbone
    from keras_vmoe.models import ViTMoEImageClassifier

    backbone = ViTMoEBackbone(**VIT_CONFIG, moe_layers="last-1", num_experts=2)
    classifier = ViTMoEImageClassifier(backbone, num_classes=7)
    with pytest.raises(ValueError, match="'head.weight'"):
        load_vit_checkpoint(VIT, classifier)


def test_load_vit_checkpoint_refuses_other_models():
    from keras_vmoe.converters import load_vit_checkpoint

    with pytest.raises(TypeError, match="model=Dense"):
        load_vit_checkpoint(VIT, keras.layers.Dense(2))


# === Upcycling noise: one stream per MoE block ===
def _relative_noise(dense_mlp, moe_mlp):
    kernel = np.asarray(dense_mlp.fc1.kernel)
    experts = np.asarray(moe_mlp.expert_kernel_1)
    return (experts - kernel[None]) / kernel.std()


def _convnext_pair():
    from keras_vmoe.models import ConvNeXtMoEBackbone

    common = dict(depths=[1, 2], hidden_dims=[8, 16], image_shape=(32, 32, 3))
    dense = ConvNeXtMoEBackbone(**common)
    moe = ConvNeXtMoEBackbone(
        **common,
        moe_layers=[(1, 0), (1, 1)],
        num_experts=2,
        expert_mlp_ratio=4,
    )
    return dense, moe


def test_upcycle_convnext_gives_each_moe_block_its_own_noise():
    from keras_vmoe.converters import upcycle_convnext

    dense, moe = _convnext_pair()
    upcycle_convnext(dense, moe, noise_std=0.1, seed=3)
    (first, second) = [
        (d.mlp, m.mlp)
        for d, m in zip(dense.blocks, moe.blocks)
        if m.is_moe
    ]
    noise_1, noise_2 = _relative_noise(*first), _relative_noise(*second)
    assert noise_1.shape == noise_2.shape
    # Same seed for both blocks would give the same standard-normal draws.
    assert not np.allclose(noise_1, noise_2)
    # Still reproducible: the same seed gives the same experts.
    _, again = _convnext_pair()
    upcycle_convnext(dense, again, noise_std=0.1, seed=3)
    for block, other in zip(moe.blocks, again.blocks):
        if block.is_moe:
            np.testing.assert_array_equal(
                np.asarray(block.mlp.expert_kernel_1),
                np.asarray(other.mlp.expert_kernel_1),
            )


def test_upcycle_vit_gives_each_moe_block_its_own_noise():
    from keras_vmoe.converters import upcycle_vit
    from keras_vmoe.converters.vit import dense_twin
    from keras_vmoe.models import ViTMoEBackbone

    moe = ViTMoEBackbone(**VIT_CONFIG, moe_layers="last-2", num_experts=2)
    dense = dense_twin(moe)
    upcycle_vit(dense, moe, noise_std=0.1, seed=3)
    pairs = [
        (d.mlp, m.mlp)
        for d, m in zip(dense.transformer_layers, moe.transformer_layers)
        if m.is_moe
    ]
    assert not np.allclose(
        _relative_noise(*pairs[0]), _relative_noise(*pairs[1])
    )


def test_convnext_seed_differs_per_block():
    from keras_vmoe.models import ConvNeXtMoEBackbone

    backbone = ConvNeXtMoEBackbone(
        depths=[1, 2],
        hidden_dims=[8, 16],
        image_shape=(32, 32, 3),
        moe_layers="last-2",
        num_experts=2,
        noisy_gating=True,
        seed=5,
    )
    seeds = [block.mlp.seed for block in backbone.blocks if block.is_moe]
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    assert seeds == [5 + 0, 5 + 2]  # seed + global block index (0, 2)
    assert backbone.get_config()["seed"] == 5


def test_truncated_keras_applications_weights_name_the_file(tmp_path):
    from keras_vmoe.converters import convert_keras_applications_weights

    _, moe = _convnext_pair()
    path = tmp_path / "convnext_tiny.weights.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(ValueError) as info:
        convert_keras_applications_weights(str(path), moe)
    assert repr(str(path)) in str(info.value)
    with pytest.raises(ValueError, match="not found"):
        convert_keras_applications_weights(str(tmp_path / "none.h5"), moe)
