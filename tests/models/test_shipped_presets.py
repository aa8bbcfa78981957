"""The shipped presets are package data, loadable by name everywhere."""

import os

import keras_hub
import numpy as np
import pytest

import keras_vmoe
from keras_vmoe import models
from keras_vmoe.models import shipped

NAMES = {
    "vimoe_mnist": (models.ViTMoEImageClassifier, models.ViTMoEBackbone),
    "convnext_moe_mnist": (
        models.ConvNeXtMoEImageClassifier,
        models.ConvNeXtMoEBackbone,
    ),
}
IMAGES = np.random.default_rng(0).uniform(0, 255, (2, 28, 28, 3))


def test_presets_live_inside_the_package():
    package = os.path.dirname(os.path.abspath(keras_vmoe.__file__))
    assert set(shipped.SHIPPED_PRESETS) == set(NAMES)
    for name in NAMES:
        folder = models.shipped_preset_dir(name)
        assert folder == os.path.join(package, "presets_data", name)
        assert {"config.json", "task.json", "task.weights.h5"} <= set(
            os.listdir(folder)
        )
    assert os.path.isfile(os.path.join(package, "presets_data", "MANIFEST.md"))


def test_list_presets_names_them():
    names = models.list_presets()
    assert set(NAMES) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", sorted(NAMES))
@pytest.mark.slow
def test_keras_hub_and_our_classes_load_the_same_model_by_name(name):
    classifier_cls, backbone_cls = NAMES[name]
    by_hub = keras_hub.models.ImageClassifier.from_preset(name)
    ours = classifier_cls.from_preset(name)
    checked = models.load_classifier(name)
    assert type(by_hub) is type(ours) is type(checked) is classifier_cls
    expected = by_hub.predict(IMAGES, verbose=0)
    np.testing.assert_array_equal(ours.predict(IMAGES, verbose=0), expected)
    np.testing.assert_array_equal(checked.predict(IMAGES, verbose=0), expected)
    assert isinstance(backbone_cls.from_preset(name), backbone_cls)
    # Trained on [0, 1] pixels: the converter only rescales by 1/255.
    statistics = models.preset_normalization(name)
    np.testing.assert_allclose(statistics["mean"], 0.0, atol=1e-7)
    np.testing.assert_allclose(statistics["std"], 1.0, rtol=1e-6)


def test_keras_hub_lists_them_for_their_backbone():
    assert "vimoe_mnist" in models.ViTMoEBackbone.presets
    assert "convnext_moe_mnist" in models.ConvNeXtMoEBackbone.presets
    assert "convnext_moe_mnist" not in models.ViTMoEBackbone.presets


def test_a_shipped_name_of_the_other_family_is_named():
    with pytest.raises(ValueError, match="ConvNeXtMoEImageClassifier"):
        models.ViTMoEImageClassifier.from_preset("convnext_moe_mnist")
    with pytest.raises(ValueError, match="shipped ViTMoE preset"):
        models.ConvNeXtMoEBackbone.from_preset("vimoe_mnist")


def test_a_missing_installed_folder_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(shipped, "PRESETS_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vimoe_mnist.*config.json"):
        shipped.shipped_preset_dir("vimoe_mnist")
    assert shipped.shipped_preset_dir("no_such_preset") is None
