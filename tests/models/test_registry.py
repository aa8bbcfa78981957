"""The family registry behind `from_preset(name)`, and the names that saved
models and presets are loaded by."""

import json
import os

import keras
import pytest

from keras_vmoe.models import registry
from keras_vmoe.models import shipped
from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.models.convnext_moe import preset_builder as convnext_builder
from keras_vmoe.models.convnext_moe.presets import PRESETS as CONVNEXT
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier
from keras_vmoe.models.vit_moe import preset_builder as vit_builder
from keras_vmoe.models.vit_moe.presets import PRESETS as VIT


def test_families_are_registered():
    assert registry.family_class("ViTMoE", "backbone") is ViTMoEBackbone
    assert (
        registry.family_class("ViTMoE", "classifier") is ViTMoEImageClassifier
    )
    assert (
        registry.family_class("ConvNeXtMoE", "backbone") is ConvNeXtMoEBackbone
    )
    assert (
        registry.family_class("ConvNeXtMoE", "classifier")
        is ConvNeXtMoEImageClassifier
    )


def test_family_class_names_bad_arguments():
    with pytest.raises(ValueError, match="family='Nope'"):
        registry.family_class("Nope", "backbone")
    with pytest.raises(ValueError, match="role='head'"):
        registry.family_class("ViTMoE", "head")


def test_register_preset_builder_needs_a_callable():
    with pytest.raises(TypeError, match="builder=3"):
        registry.register_preset_builder(ViTMoEBackbone, 3)


def test_from_preset_calls_the_builder_of_the_nearest_registered_base(
    monkeypatch,
):
    calls = []

    def builder(cls, name, load_weights, **kwargs):
        calls.append((cls, name, load_weights, kwargs))
        return "built"

    class MyBackbone(ViTMoEBackbone):
        pass

    class MyOtherBackbone(MyBackbone):
        pass

    monkeypatch.setitem(registry._PRESET_BUILDERS, MyBackbone, builder)
    name = sorted(VIT)[0]
    assert MyOtherBackbone.from_preset(name, False, seed=3) == "built"
    assert calls == [(MyOtherBackbone, name, False, {"seed": 3})]


def test_build_preset_names_a_class_without_builder():
    class Lonely:
        pass

    with pytest.raises(ValueError, match="Lonely"):
        registry.build_preset(Lonely, "vit_small_patch14_dinov2")


def test_family_builders_are_the_registered_ones(monkeypatch):
    calls = []
    monkeypatch.setattr(
        vit_builder,
        "build_backbone",
        lambda name, load_weights, **kwargs: calls.append(("vit", name)),
    )
    monkeypatch.setattr(
        convnext_builder,
        "build_model",
        lambda name, *args, **kwargs: calls.append(("convnext", name, args)),
    )
    vit_name, convnext_name = sorted(VIT)[0], sorted(CONVNEXT)[0]
    ViTMoEBackbone.from_preset(vit_name, load_weights=False)
    ConvNeXtMoEBackbone.from_preset(convnext_name, load_weights=False)
    assert calls == [
        ("vit", vit_name),
        ("convnext", convnext_name, (None, False)),
    ]


def test_vit_classifier_from_table_name_still_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        ViTMoEImageClassifier.from_preset(sorted(VIT)[0], load_weights=False)


# === Names saved models and presets are loaded by ===
def test_split_vit_classes_keep_their_registered_names_and_old_path():
    from keras_vmoe.models import vit_moe
    from keras_vmoe.models.vit_moe import image_classifier

    for name in (
        "ViTMoEImageConverter",
        "ViTMoEImageClassifierPreprocessor",
        "ViTMoEImageClassifier",
    ):
        cls = getattr(vit_moe, name)
        assert getattr(image_classifier, name) is cls
        assert keras.saving.get_registered_name(cls) == f"keras_vmoe>{name}"


def _registered_names(config):
    if isinstance(config, dict):
        if config.get("registered_name"):
            yield config["registered_name"]
        for value in config.values():
            yield from _registered_names(value)
    elif isinstance(config, list):
        for value in config:
            yield from _registered_names(value)


@pytest.mark.parametrize("preset", sorted(shipped.SHIPPED_PRESETS))
def test_shipped_preset_files_name_registered_classes(preset):
    folder = shipped.shipped_preset_dir(preset)
    names = set()
    for file_name in sorted(os.listdir(folder)):
        if file_name.endswith(".json") and file_name != "labels.json":
            with open(os.path.join(folder, file_name)) as file:
                names.update(_registered_names(json.load(file)))
    assert names, "no registered name in the preset files"
    for name in sorted(names):
        assert keras.saving.get_registered_object(name) is not None, name
