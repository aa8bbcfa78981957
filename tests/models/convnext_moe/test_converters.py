"""ConvNeXt converters (keras.applications, timm), upcycling: parity, errors."""

import os
import re

import keras
import numpy as np
import pytest

from keras_vmoe.converters import convnext as converters
from keras_vmoe.converters.common import load_state_dict
from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures")
TIMM_WEIGHTS = os.path.join(FIXTURES, "convnext_tiny_random.safetensors")
TIMM_REFERENCE = os.path.join(FIXTURES, "convnext_tiny_random_reference.npz")
# Upcycled MoE forms: renormalised gates, nothing dropped.
UPCYCLED = dict(normalize_gates=True, eval_capacity_factor=None, num_experts=4)


def numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def keras_application():
    """ConvNeXtTiny with random weights of a realistic scale, 32x32 input."""
    model = keras.applications.ConvNeXtTiny(
        weights=None,
        input_shape=(32, 32, 3),
        include_preprocessing=False,
        classes=7,
        classifier_activation=None,
    )
    rng = np.random.default_rng(0)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if len(shape) > 1:
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        else:
            value = 1.0 + 0.2 * rng.normal(size=shape)
        variable.assign(value.astype("float32"))
    return model


@pytest.fixture(scope="module")
def images():
    return (
        np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    )


def keras_application_classifier(keras_application, **kwargs):
    config = converters.keras_applications_backbone_config(keras_application)
    backbone = ConvNeXtMoEBackbone(**config, image_shape=(32, 32, 3), **kwargs)
    return ConvNeXtMoEImageClassifier(backbone, num_classes=7)


def test_keras_applications_parity(keras_application, images):
    classifier = keras_application_classifier(keras_application)
    converters.convert_keras_applications_weights(keras_application, classifier)
    np.testing.assert_allclose(
        numpy(classifier(images)), numpy(keras_application(images)), atol=1e-4
    )
    backbone = ConvNeXtMoEBackbone.from_config(classifier.backbone.get_config())
    converters.convert_keras_applications_weights(keras_application, backbone)
    features = keras.Model(
        keras_application.input,
        keras_application.get_layer("convnext_tiny_head_gap").input,
    )
    np.testing.assert_allclose(
        numpy(backbone(images)), numpy(features(images)), atol=1e-4
    )


def test_keras_applications_weights_file_upcycled(
    keras_application, images, tmp_path
):
    path = str(tmp_path / "convnext_tiny.weights.h5")
    keras_application.save_weights(path)
    classifier = keras_application_classifier(
        keras_application,
        moe_layers="last-3",
        shared_expert=True,
        **UPCYCLED,
    )
    converters.convert_keras_applications_weights(path, classifier)
    np.testing.assert_allclose(
        numpy(classifier(images)), numpy(keras_application(images)), atol=1e-4
    )


@pytest.fixture(scope="module")
def timm_reference():
    with np.load(TIMM_REFERENCE) as data:
        return {key: data[key] for key in data.files}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(moe_layers="every-2", **UPCYCLED),
        dict(
            moe_layers="stage",
            router="cosine",
            shared_expert=True,
            **UPCYCLED,
        ),
    ],
    ids=["dense", "upcycled", "upcycled-shared-cosine"],
)
def test_timm_parity(timm_reference, kwargs):
    config = converters.timm_backbone_config(TIMM_WEIGHTS)
    assert config == {
        "depths": [1, 1, 2, 1],
        "hidden_dims": [8, 16, 24, 32],
        "patch_size": 4,
    }
    backbone = ConvNeXtMoEBackbone(**config, image_shape=(64, 64, 3), **kwargs)
    classifier = ConvNeXtMoEImageClassifier(backbone, num_classes=5)
    converters.convert_timm_weights(TIMM_WEIGHTS, classifier)
    images = timm_reference["images"]
    tolerance = 1e-5 if kwargs else 1e-4
    np.testing.assert_allclose(
        numpy(backbone(images)),
        timm_reference["features"],
        atol=tolerance,
        rtol=tolerance,
    )
    np.testing.assert_allclose(
        numpy(classifier(images)), timm_reference["logits"], atol=1e-4
    )


def test_timm_backbone_skips_the_head(timm_reference):
    backbone = ConvNeXtMoEBackbone(
        **converters.timm_backbone_config(TIMM_WEIGHTS), image_shape=(64, 64, 3)
    )
    converters.convert_timm_weights(TIMM_WEIGHTS, backbone)
    np.testing.assert_allclose(
        numpy(backbone(timm_reference["images"])),
        timm_reference["features"],
        atol=1e-4,
    )


def test_upcycled_skip_connection_starts_closed_and_is_trained():
    dense = ConvNeXtMoEBackbone(depths=[1, 2], hidden_dims=[8, 16])
    moe = ConvNeXtMoEBackbone(
        depths=[1, 2], hidden_dims=[8, 16], moe_layers="last-2", **UPCYCLED
    )
    converters.upcycle_convnext(dense, moe, noise_std=0.01, seed=0)
    block = moe.blocks[-1]
    np.testing.assert_array_equal(numpy(block.skip_scale), np.zeros(16))
    assert block.skip_scale.trainable
    kernels = numpy(block.mlp.expert_kernel_1)
    assert not np.array_equal(kernels[0], kernels[1])


def timm_classifier():
    backbone = ConvNeXtMoEBackbone(
        **converters.timm_backbone_config(TIMM_WEIGHTS), image_shape=(64, 64, 3)
    )
    return ConvNeXtMoEImageClassifier(backbone, num_classes=5)


def test_converter_error_names_a_missing_key():
    state_dict = load_state_dict(TIMM_WEIGHTS)
    del state_dict["stages.2.blocks.1.mlp.fc2.weight"]
    with pytest.raises(
        ValueError, match=re.escape("'stages.2.blocks.1.mlp.fc2.weight'")
    ):
        converters.convert_timm_weights(state_dict, timm_classifier())


def test_converter_error_names_the_key_and_shapes_of_a_mismatch():
    state_dict = load_state_dict(TIMM_WEIGHTS)
    state_dict["stages.3.blocks.0.gamma"] = np.ones((31,), "float32")
    with pytest.raises(
        ValueError, match=r"'stages.3.blocks.0.gamma'.*\(31,\).*\(32,\)"
    ):
        converters.convert_timm_weights(state_dict, timm_classifier())


def test_converter_error_names_an_unused_key():
    state_dict = load_state_dict(TIMM_WEIGHTS)
    state_dict["norm_pre.weight"] = np.ones((32,), "float32")
    with pytest.raises(ValueError, match=re.escape("'norm_pre.weight'")):
        converters.convert_timm_weights(state_dict, timm_classifier())


def test_converter_rejects_a_different_architecture(keras_application):
    backbone = ConvNeXtMoEBackbone(
        depths=[3, 3, 9, 3], hidden_dims=[8, 16, 24, 32]
    )
    with pytest.raises(ValueError, match="stem_conv/kernel"):
        converters.convert_keras_applications_weights(
            keras_application, backbone
        )


def test_timm_config_rejects_other_checkpoints():
    with pytest.raises(ValueError, match="stem.0.weight"):
        converters.timm_backbone_config({"blocks.0.weight": np.ones((2,))})


def test_from_preset_upcycles_a_local_checkpoint(timm_reference):
    backbone = ConvNeXtMoEBackbone.from_preset(
        "convnext_moe_tiny_e8_last2_mlp4",
        weights_path=TIMM_WEIGHTS,
        depths=[1, 1, 2, 1],
        hidden_dims=[8, 16, 24, 32],
        image_shape=(64, 64, 3),
        normalize_gates=True,
        eval_capacity_factor=None,
    )
    assert backbone.moe_positions == [(2, 1), (3, 0)]
    np.testing.assert_allclose(
        numpy(backbone(timm_reference["images"])),
        timm_reference["features"],
        atol=1e-5,
        rtol=1e-5,
    )


def test_upcycling_needs_experts_as_wide_as_the_dense_mlp():
    with pytest.raises(ValueError, match="width 48, dense MLP of width 96"):
        ConvNeXtMoEBackbone.from_preset(
            "convnext_moe_tiny_e4_last2",
            weights_path=TIMM_WEIGHTS,
            depths=[1, 1, 2, 1],
            hidden_dims=[8, 16, 24, 32],
        )
