"""Presets: per-preset normalisation, unknown names, checked folders,
atomic saving without optimizer state, independence from the global image
data format."""

import json
import os
import shutil
import warnings

import h5py
import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.models import list_presets
from keras_vmoe.models import load_classifier
from keras_vmoe.models import preset_normalization
from keras_vmoe.models import shipped_preset_dir
from keras_vmoe.models.convnext_moe.presets import PRESETS as CONVNEXT
from keras_vmoe.models.vit_moe.image_classifier import (
    ViTMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vit_moe.image_classifier import ViTMoEImageConverter
from keras_vmoe.models.vit_moe.presets import PRESETS as VIT
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS
from keras_vmoe.utils import atomic_directory
from keras_vmoe.utils import atomic_file

# Installed with the package, loadable by name (keras_vmoe/presets_data/).
SHIPPED = ("vimoe_mnist", "convnext_moe_mnist")
TABLE_NAMES = sorted(set(VIT) | set(CONVNEXT))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# === Normalisation per preset ===
def _expected_statistics(name):
    """By hand: which checkpoint each preset name upcycles."""
    if name.startswith(("vit_small_patch16", "vit_base_patch16")):
        return HALF  # timm AugReg ViT-S/16, ViT-B/16
    if name.startswith(("vit_moe_small_patch16_", "vit_moe_base_patch16_")):
        return HALF
    if name.startswith(("soft_moe_", "expert_choice_vit_")):
        return HALF  # upcycled from the same AugReg ViTs
    if name.startswith(("vimoe_small_patch14_", "vit_small_patch14_dinov2")):
        return IMAGENET  # DINOv2
    if name.startswith("convnext_"):
        return IMAGENET  # keras.applications / timm ConvNeXt
    raise AssertionError(f"no expectation for {name}")


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_every_preset_records_the_statistics_of_its_checkpoint(name):
    mean, std = _expected_statistics(name)
    statistics = preset_normalization(name)
    assert statistics == {"mean": mean, "std": std}


def test_the_table_has_both_kinds():
    assert set(TABLE_NAMES) | set(SHIPPED) | set(VMOE_PRESETS) == set(
        list_presets()
    )
    for name in VMOE_PRESETS:  # vmoe's value_range(-1, 1)
        assert preset_normalization(name) == {"mean": HALF[0], "std": HALF[1]}
    kinds = {_expected_statistics(name) for name in TABLE_NAMES}
    assert kinds == {IMAGENET, HALF}
    # 2 dense, 2 x 9 Sweet-spot, 2 Soft MoE, 4 Expert Choice.
    assert sum(_expected_statistics(n) == HALF for n in VIT) == 2 + 2 * 9 + 6
    assert all(CONVNEXT[n]["mean"] == IMAGENET[0] for n in CONVNEXT)


def _converter(classifier):
    converter = classifier.preprocessor.image_converter
    return np.asarray(converter.scale), np.asarray(converter.offset)


@pytest.mark.parametrize(
    "name", ["vit_small_patch16", "vit_moe_base_patch16_e4_last2_top2"]
)
def test_augreg_vit_presets_map_pixels_to_minus_one_one(name):
    classifier = ViTMoEImageClassifier.from_preset(
        name, load_weights=False, num_classes=2, num_layers=2
    )
    scale, offset = _converter(classifier)
    # (x / 255 - 0.5) / 0.5 = x * 2/255 - 1.
    np.testing.assert_allclose(scale, [2 / 255] * 3, rtol=1e-7)
    np.testing.assert_allclose(offset, [-1.0] * 3, rtol=1e-7)
    converter = classifier.preprocessor.image_converter
    pixels = np.array([[[[0.0, 127.5, 255.0]]]], "float32")
    # A one-pixel image, resized to 224x224: every pixel is the same.
    outputs = keras.ops.convert_to_numpy(converter(pixels)).reshape(-1, 3)
    np.testing.assert_allclose(
        outputs, np.broadcast_to([-1.0, 0.0, 1.0], outputs.shape), atol=1e-5
    )


def test_dinov2_and_convnext_presets_use_imagenet_statistics():
    vimoe = ViTMoEImageClassifier.from_preset(
        "vimoe_small_patch14_e2_last1", load_weights=False, num_classes=2,
        num_layers=1,
    )
    convnext = ConvNeXtMoEImageClassifier.from_preset(
        "convnext_moe_tiny_e4_last2", load_weights=False, num_classes=2,
        depths=[1, 1, 2, 1],
    )
    for classifier in (vimoe, convnext):
        scale, offset = _converter(classifier)
        # Red channel by hand: 1 / (255 * 0.229), -0.485 / 0.229.
        np.testing.assert_allclose(scale[0], 0.0171248, rtol=1e-5)
        np.testing.assert_allclose(offset[0], -2.1179039, rtol=1e-6)
        np.testing.assert_allclose(offset[2], -0.406 / 0.225, rtol=1e-6)


def test_preset_folder_normalization_is_read_back(tmp_path):
    classifier = ViTMoEImageClassifier.from_preset(
        "vit_small_patch16", load_weights=False, num_classes=2, num_layers=1
    )
    classifier.save_to_preset(str(tmp_path / "p"))
    statistics = preset_normalization(str(tmp_path / "p"))
    np.testing.assert_allclose(statistics["mean"], HALF[0], rtol=1e-6)
    np.testing.assert_allclose(statistics["std"], HALF[1], rtol=1e-6)


def test_tf_data_applies_a_preset_s_statistics():
    from keras_vmoe.training import tf_data

    images = np.array([[[0, 255], [51, 102]]], "uint8")
    data = tf_data.array_dataset(
        images,
        np.array([0]),
        image_size=2,
        batch_size=1,
        num_classes=2,
        training=False,
        crop_fraction=1.0,
        normalize=preset_normalization("vit_small_patch16"),
    )
    batch = next(iter(data))[0].numpy()
    np.testing.assert_allclose(
        batch[0, :, :, 0], [[-1.0, 1.0], [-0.6, -0.2]], atol=1e-5
    )
    with pytest.raises(ValueError, match="normalize="):
        tf_data.array_dataset(
            images, np.array([0]), image_size=2, batch_size=1,
            num_classes=2, normalize={"mean": (0.5,) * 3},
        )


@pytest.mark.parametrize(
    "mean, std, word",
    [((0.5, 0.5), (0.5,) * 3, "mean"), ((0.5,) * 3, (0.5, 0.0, 0.5), "std"),
     ((float("nan"),) * 3, (0.5,) * 3, "nan")],
)
def test_bad_statistics_are_refused(mean, std, word):
    with pytest.raises(ValueError, match=word):
        ViTMoEImageConverter.normalized((8, 8), mean=mean, std=std)


# === Unknown names ===
@pytest.mark.parametrize(
    "cls", [ViTMoEBackbone, ViTMoEImageClassifier]
)
def test_misspelt_name_gets_close_matches(cls):
    with pytest.raises(ValueError) as info:
        cls.from_preset("vit_smal_patch16", num_classes=3)
    message = str(info.value)
    assert "preset='vit_smal_patch16'" in message
    assert "'vit_small_patch16'" in message
    assert "list_presets()" in message
    assert "bert" not in message


@pytest.mark.parametrize(
    "cls, name, other",
    [
        (ViTMoEImageClassifier, "convnext_tiny", "ConvNeXtMoEImageClassifier"),
        (ViTMoEBackbone, "convnext_moe_tiny_e4_last2", "ConvNeXtMoE"),
        (ConvNeXtMoEImageClassifier, "vit_small_patch16", "ViTMoEImage"),
        (ConvNeXtMoEBackbone, "vimoe_small_patch14_e2_last1", "ViTMoE"),
    ],
)
def test_name_of_the_other_family_names_the_right_class(cls, name, other):
    with pytest.raises(ValueError) as info:
        cls.from_preset(name, num_classes=3)
    assert other in str(info.value) and repr(name) in str(info.value)


def test_missing_folder_is_named():
    with pytest.raises(ValueError, match="folder not found.*no/such/dir"):
        ConvNeXtMoEImageClassifier.from_preset("./no/such/dir")


def test_preset_normalization_of_an_unknown_name():
    with pytest.raises(ValueError, match="preset='convnext_tiyn'"):
        preset_normalization("convnext_tiyn")


@pytest.mark.parametrize(
    "cls, name",
    [(ViTMoEBackbone, "vit_small_patch16"),
     (ConvNeXtMoEBackbone, "convnext_tiny")],
)
def test_weights_path_without_load_weights_is_refused(cls, name):
    with pytest.raises(ValueError, match="weights_path='x.safetensors'"):
        cls.from_preset(name, load_weights=False, weights_path="x.safetensors")


# === Preset folders ===
def _tiny_classifier(num_classes=3):
    backbone = ViTMoEBackbone(
        image_shape=(16, 16, 3), patch_size=8, num_layers=2, num_heads=2,
        hidden_dim=16, mlp_dim=32, moe_layers="last-1", num_experts=2,
    )
    preprocessor = ViTMoEImageClassifierPreprocessor(
        ViTMoEImageConverter.imagenet((16, 16))
    )
    return ViTMoEImageClassifier(
        backbone, num_classes=num_classes, preprocessor=preprocessor
    )


@pytest.fixture(scope="module")
def saved_preset(tmp_path_factory):
    model = _tiny_classifier()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(np.ones((4, 16, 16, 3)), np.arange(4) % 3, verbose=0)
    folder = str(tmp_path_factory.mktemp("presets") / "tiny")
    model.save_to_preset(folder)
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3))
    return folder, images, model.predict(images, verbose=0)


@pytest.fixture
def preset_copy(saved_preset, tmp_path):
    folder = str(tmp_path / "copy")
    shutil.copytree(saved_preset[0], folder)
    return folder


def test_saved_preset_has_no_optimizer_and_loads_without_warnings(
    saved_preset,
):
    folder, images, expected = saved_preset
    for name in ("task.weights.h5", "model.weights.h5"):
        with h5py.File(os.path.join(folder, name), "r") as file:
            assert "optimizer" not in file, name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ViTMoEImageClassifier.from_preset(folder)
    np.testing.assert_array_equal(model.predict(images, verbose=0), expected)


@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_presets_carry_no_optimizer_and_load_silently(folder):
    path = os.path.join(shipped_preset_dir(folder), "task.weights.h5")
    with h5py.File(path, "r") as file:
        assert "optimizer" not in file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keras_hub.models.ImageClassifier.from_preset(folder)
        load_classifier(folder)


@pytest.mark.parametrize(
    "name", ["config.json", "task.json", "image_converter.json"]
)
def test_garbage_json_is_named(preset_copy, name):
    path = os.path.join(preset_copy, name)
    with open(path, "w") as file:
        file.write("{not json")
    for load in (ViTMoEImageClassifier.from_preset, load_classifier):
        with pytest.raises(ValueError) as info:
            load(preset_copy)
        assert repr(path) in str(info.value)


@pytest.mark.parametrize("name", ["task.weights.h5", "model.weights.h5"])
@pytest.mark.parametrize("damage", ["truncate", "lfs"])
def test_damaged_weights_are_named(preset_copy, name, damage):
    path = os.path.join(preset_copy, name)
    data = open(path, "rb").read()
    with open(path, "wb") as file:
        if damage == "truncate":
            file.write(data[: len(data) // 2])
        else:
            file.write(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError) as info:
        load_classifier(preset_copy)
    assert repr(path) in str(info.value)


def test_missing_task_weights_are_not_replaced_by_a_random_head(preset_copy):
    path = os.path.join(preset_copy, "task.weights.h5")
    os.remove(path)
    for load in (ViTMoEImageClassifier.from_preset, load_classifier):
        with pytest.raises(FileNotFoundError) as info:
            load(preset_copy)
        assert repr(path) in str(info.value)
    # The explicit opt-in: a new head for a new task.
    model = ViTMoEImageClassifier.from_preset(preset_copy, num_classes=5)
    assert model.output_dense.units == 5


def test_config_json_disagreeing_with_task_json_names_both(preset_copy):
    path = os.path.join(preset_copy, "config.json")
    config = json.load(open(path))
    config["config"]["drop_path_rate"] = 0.3
    json.dump(config, open(path, "w"))
    with pytest.raises(ValueError) as info:
        load_classifier(preset_copy)
    message = str(info.value)
    assert repr(path) in message
    assert repr(os.path.join(preset_copy, "task.json")) in message
    assert "drop_path_rate" in message


# === Atomic saving ===
def _snapshot(folder):
    return {
        name: open(os.path.join(folder, name), "rb").read()
        for name in sorted(os.listdir(folder))
    }


def test_interrupted_save_leaves_the_old_preset(
    preset_copy, saved_preset, monkeypatch
):
    from keras_hub.src.utils import preset_utils

    with open(os.path.join(preset_copy, "labels.json"), "w") as file:
        json.dump(["a", "b", "c"], file)
    before = _snapshot(preset_copy)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    # Fails after task.json and task.weights.h5 are written.
    monkeypatch.setattr(preset_utils.KerasPresetSaver, "save_backbone", fail)
    new_model = _tiny_classifier()
    with pytest.raises(RuntimeError, match="disk full"):
        new_model.save_to_preset(preset_copy)
    assert _snapshot(preset_copy) == before
    parent = os.path.dirname(preset_copy)
    assert sorted(os.listdir(parent)) == ["copy"]  # no temporary left
    monkeypatch.undo()
    _, images, expected = saved_preset
    model = ViTMoEImageClassifier.from_preset(preset_copy)
    np.testing.assert_array_equal(model.predict(images, verbose=0), expected)


def test_resave_replaces_the_preset_and_keeps_labels(preset_copy):
    with open(os.path.join(preset_copy, "labels.json"), "w") as file:
        json.dump(["a", "b", "c"], file)
    new_model = _tiny_classifier()
    new_model.save_to_preset(preset_copy)
    images = np.ones((1, 16, 16, 3))
    loaded = ViTMoEImageClassifier.from_preset(preset_copy)
    np.testing.assert_array_equal(
        loaded.predict(images, verbose=0), new_model.predict(images, verbose=0)
    )
    assert json.load(open(os.path.join(preset_copy, "labels.json"))) == [
        "a", "b", "c",
    ]
    assert sorted(os.listdir(os.path.dirname(preset_copy))) == ["copy"]


def test_atomic_file_keeps_the_old_content_on_failure(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(path)) as file:
            file.write(b"half of the new")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["cache.bin"]
    with atomic_file(str(path), "w") as file:
        file.write("new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["cache.bin"]


def test_atomic_directory_refuses_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="path="):
        with atomic_directory(str(path)):
            pass
    with pytest.raises(ValueError, match="mode="):
        with atomic_file(str(tmp_path / "y"), mode="a"):
            pass


# === Global image data format ===
@pytest.fixture
def channels_first():
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        yield
    finally:
        keras.config.set_image_data_format(previous)


def _models():
    convnext = ConvNeXtMoEImageClassifier(
        ConvNeXtMoEBackbone(
            depths=[1, 2], hidden_dims=[8, 16], image_shape=(32, 32, 3),
            moe_layers="last-2", num_experts=2,
        ),
        num_classes=3,
    )
    vit = ViTMoEImageClassifier(
        ViTMoEBackbone(
            image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
            hidden_dim=16, mlp_dim=32, moe_layers="last-1", num_experts=2,
        ),
        num_classes=3,
    )
    return {"convnext": convnext, "vit": vit}


def test_models_ignore_a_channels_first_global_setting(channels_first):
    keras.config.set_image_data_format("channels_last")
    reference = _models()
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3))
    expected = {
        name: model.predict(images, verbose=0)
        for name, model in reference.items()
    }
    keras.config.set_image_data_format("channels_first")
    for name, model in _models().items():
        model.set_weights(reference[name].get_weights())
        np.testing.assert_allclose(
            model.predict(images, verbose=0), expected[name], atol=1e-5
        )


@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_presets_load_under_channels_first(folder, channels_first):
    images = np.random.default_rng(2).uniform(0, 255, (2, 28, 28, 3))
    keras.config.set_image_data_format("channels_last")
    expected = load_classifier(folder).predict(images, verbose=0)
    keras.config.set_image_data_format("channels_first")
    model = load_classifier(folder)
    np.testing.assert_allclose(
        model.predict(images, verbose=0), expected, atol=1e-5
    )


def test_convnext_weights_path_of_an_unknown_type_is_named():
    with pytest.raises(ValueError, match="weights_path='convnext.pth'"):
        ConvNeXtMoEBackbone.from_preset(
            "convnext_tiny", weights_path="convnext.pth"
        )


def test_load_classifier_dispatches_preset_names():
    model = load_classifier(
        "vit_small_patch16", load_weights=False, num_classes=2, num_layers=1
    )
    assert isinstance(model, ViTMoEImageClassifier)
    with pytest.raises(ValueError, match="preset='vit_small_patch61'"):
        load_classifier("vit_small_patch61")
