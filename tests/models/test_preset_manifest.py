"""A preset folder loads whole or not at all: `manifest.json` written by
`save_to_preset`, and the folder checks through every entry point
(KerasHub's generic `from_preset`, our classes' `from_preset`, the CLI).
Backend independent: run on TensorFlow only (.ci/run)."""

import json
import os
import shutil

import h5py
import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe import cli
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.models import check_manifest
from keras_vmoe.models import load_classifier
from keras_vmoe.models import shipped_preset_dir
from keras_vmoe.models.convnext_moe.image_classifier_preprocessor import (
    ConvNeXtMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.convnext_moe.image_converter import (
    ConvNeXtMoEImageConverter,
)
from keras_vmoe.models.preset_io import MANIFEST_FILE
from keras_vmoe.models.vit_moe.image_classifier import (
    ViTMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vit_moe.image_classifier import ViTMoEImageConverter
from tests.helpers import TINY_VIT

CLASSES = {"vit": ViTMoEImageClassifier, "convnext": ConvNeXtMoEImageClassifier}
BACKBONES = {"vit": ViTMoEBackbone, "convnext": ConvNeXtMoEBackbone}


def _tiny(family, seed):
    keras.utils.set_random_seed(seed)
    if family == "vit":
        backbone = ViTMoEBackbone(**dict(TINY_VIT, num_experts=2))
        preprocessor = ViTMoEImageClassifierPreprocessor(
            ViTMoEImageConverter.imagenet((16, 16))
        )
    else:
        backbone = ConvNeXtMoEBackbone(
            depths=[1, 1],
            hidden_dims=[8, 16],
            image_shape=(16, 16, 3),
            moe_layers="last-2",
            num_experts=2,
        )
        preprocessor = ConvNeXtMoEImageClassifierPreprocessor(
            ConvNeXtMoEImageConverter(image_size=(16, 16), scale=1 / 255)
        )
    return CLASSES[family](backbone, num_classes=3, preprocessor=preprocessor)


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """Two saves (seeds 0 and 1) of each family's tiny classifier."""
    root = tmp_path_factory.mktemp("saves")
    folders = {}
    for family in CLASSES:
        for seed in (0, 1):
            folder = str(root / f"{family}_{seed}")
            _tiny(family, seed).save_to_preset(folder)
            folders[family, seed] = folder
    return folders


@pytest.fixture(params=sorted(CLASSES))
def family(request):
    return request.param


@pytest.fixture
def folder(saves, family, tmp_path):
    copy = str(tmp_path / "preset")
    shutil.copytree(saves[family, 0], copy)
    return copy


def _classifier_loaders(family):
    return {
        "keras_hub.ImageClassifier": keras_hub.models.ImageClassifier.from_preset,
        "class": CLASSES[family].from_preset,
        "load_classifier": load_classifier,
    }


def _backbone_loaders(family):
    return {
        "keras_hub.Backbone": keras_hub.models.Backbone.from_preset,
        "class": BACKBONES[family].from_preset,
    }


def _cli_message(folder):
    with pytest.raises(SystemExit) as info:
        cli.main(["evaluate", folder])
    return str(info.value.code)


def _assert_refused(loaders, folder, error, path):
    for name, load in loaders.items():
        with pytest.raises(error) as info:
            load(folder)
        assert repr(path) in str(info.value), name


# === Damage ===
def _remove(folder, name):
    os.remove(os.path.join(folder, name))


def _garbage(folder, name):
    with open(os.path.join(folder, name), "w") as file:
        file.write("{not json")


def _truncate(folder, name):
    path = os.path.join(folder, name)
    data = open(path, "rb").read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])


def _edit_config(folder):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["config"]["drop_path_rate"] = 0.3
    json.dump(config, open(path, "w"))


# === The manifest ===
def test_save_writes_a_manifest_of_what_it_wrote(saves, family):
    folder = saves[family, 0]
    manifest = json.load(open(os.path.join(folder, MANIFEST_FILE)))
    files = manifest["files"]
    on_disk = sorted(set(os.listdir(folder)) - {MANIFEST_FILE})
    assert sorted(files) == on_disk
    for name in ("config.json", "task.json", "task.weights.h5"):
        path = os.path.join(folder, name)
        assert files[name]["size"] == os.path.getsize(path)
        assert len(files[name]["sha256"]) == 64
    assert check_manifest(folder)


def test_untouched_folder_loads_through_every_entry_point(saves, family):
    folder = saves[family, 0]
    expected = _tiny(family, 0).get_weights()
    for name, load in _classifier_loaders(family).items():
        weights = load(folder).get_weights()
        assert len(weights) == len(expected), name
        for got, want in zip(weights, expected):
            np.testing.assert_array_equal(got, want, err_msg=name)
    for load in _backbone_loaders(family).values():
        load(folder)


def test_resave_with_labels_keeps_a_valid_manifest(folder, family):
    with open(os.path.join(folder, "labels.json"), "w") as file:
        json.dump(["a", "b", "c"], file)
    _tiny(family, 1).save_to_preset(folder)
    assert (
        "labels.json"
        not in json.load(open(os.path.join(folder, MANIFEST_FILE)))["files"]
    )
    assert check_manifest(folder)
    CLASSES[family].from_preset(folder)


@pytest.mark.parametrize("name", ["task.weights.h5", "model.weights.h5"])
def test_partial_copy_from_another_save_is_named(saves, folder, family, name):
    shutil.copy(os.path.join(saves[family, 1], name), folder)
    path = os.path.join(folder, name)
    loaders = {**_classifier_loaders(family), **_backbone_loaders(family)}
    _assert_refused(loaders, folder, ValueError, path)
    assert repr(path) in _cli_message(folder)


def test_file_the_save_did_not_write_is_named(folder, family):
    path = os.path.join(folder, "extra.weights.h5")
    shutil.copy(os.path.join(folder, "task.weights.h5"), path)
    _assert_refused(_classifier_loaders(family), folder, ValueError, path)


def test_folder_without_manifest_loads_unchecked(saves, folder, family):
    _remove(folder, MANIFEST_FILE)
    assert not check_manifest(folder)
    # No record to compare with: a partial copy is not detected...
    shutil.copy(os.path.join(saves[family, 1], "task.weights.h5"), folder)
    for load in _classifier_loaders(family).values():
        load(folder)
    # ...but the other checks still run.
    _remove(folder, "task.weights.h5")
    path = os.path.join(folder, "task.weights.h5")
    _assert_refused(
        _classifier_loaders(family), folder, FileNotFoundError, path
    )


def test_garbage_manifest_is_named(folder, family):
    _garbage(folder, MANIFEST_FILE)
    path = os.path.join(folder, MANIFEST_FILE)
    _assert_refused(_classifier_loaders(family), folder, ValueError, path)


@pytest.mark.parametrize("name", ["shipped_vimoe", "shipped_convnext"])
def test_shipped_presets_carry_a_valid_manifest(name):
    preset = {"shipped_vimoe": "vimoe_mnist"}.get(name, "convnext_moe_mnist")
    assert check_manifest(shipped_preset_dir(preset))


# === Missing head ===
def test_missing_task_weights_are_named_everywhere(folder, family):
    _remove(folder, "task.weights.h5")
    path = os.path.join(folder, "task.weights.h5")
    _assert_refused(
        _classifier_loaders(family), folder, FileNotFoundError, path
    )
    assert repr(path) in _cli_message(folder)
    # A new head on purpose; the backbone alone does not need the head.
    for load in _classifier_loaders(family).values():
        assert load(folder, num_classes=5).num_classes == 5
    for load in _backbone_loaders(family).values():
        load(folder)


# === config.json against task.json ===
def test_edited_config_json_is_named_everywhere(folder, family):
    _edit_config(folder)
    path = os.path.join(folder, "config.json")
    loaders = {**_classifier_loaders(family), **_backbone_loaders(family)}
    _assert_refused(loaders, folder, ValueError, path)
    assert repr(path) in _cli_message(folder)


def test_edited_config_json_without_manifest(folder, family):
    _remove(folder, MANIFEST_FILE)
    _edit_config(folder)
    path = os.path.join(folder, "config.json")
    _assert_refused(_classifier_loaders(family), folder, ValueError, path)


# === Garbage JSON, truncated weights ===
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "none"])
@pytest.mark.parametrize(
    "name, damage",
    [
        ("config.json", _garbage),
        ("task.json", _garbage),
        ("preprocessor.json", _garbage),
        ("model.weights.h5", _truncate),
        ("task.weights.h5", _truncate),
    ],
)
def test_garbage_json_and_truncated_weights_are_named(
    folder, family, name, damage, manifest
):
    if not manifest:
        _remove(folder, MANIFEST_FILE)
    damage(folder, name)
    path = os.path.join(folder, name)
    _assert_refused(_classifier_loaders(family), folder, ValueError, path)
    assert repr(path) in _cli_message(folder)
    if name in ("config.json", "model.weights.h5"):
        _assert_refused(_backbone_loaders(family), folder, ValueError, path)


def test_truncated_weights_without_manifest_are_hdf5_errors(folder, family):
    _remove(folder, MANIFEST_FILE)
    _truncate(folder, "model.weights.h5")
    path = os.path.join(folder, "model.weights.h5")
    with pytest.raises(ValueError, match="HDF5"):
        keras_hub.models.ImageClassifier.from_preset(folder)
    with h5py.File(os.path.join(folder, "task.weights.h5"), "r"):
        pass  # the head is intact: the error is about the backbone file
    assert repr(path) in _cli_message(folder)


@pytest.mark.parametrize("command", ["predict", "analyze"])
def test_other_cli_commands_check_the_folder(folder, family, command):
    _remove(folder, "task.weights.h5")
    path = os.path.join(folder, "task.weights.h5")
    argv = [command, folder]
    if command == "predict":
        image = os.path.join(os.path.dirname(folder), "x.png")
        from PIL import Image

        Image.new("RGB", (16, 16)).save(image)
        argv.append(image)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert repr(path) in str(info.value.code)
