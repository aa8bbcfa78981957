"""Bad input to the models, the training code and the data helpers: each
case asserts the error type and that the message names the argument and
the value received."""

import math
import re

import numpy as np
import pytest

from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier
from keras_vmoe.training import optimizer
from keras_vmoe.training.recipes import build_classifier

NAN, INF = math.nan, math.inf

VIT = dict(
    image_shape=(8, 8, 3),
    patch_size=4,
    num_layers=2,
    num_heads=2,
    hidden_dim=8,
    mlp_dim=16,
)
CONVNEXT = dict(
    depths=[1, 1], hidden_dims=[8, 16], patch_size=2, image_shape=(8, 8, 3)
)


def check(error, expected, call):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


VIT_CASES = [
    (dict(num_expert=8), ["num_expert", "num_expert=8"]),
    (dict(droput=0.5), ["droput", "droput=0.5"]),
    (dict(image_shape=(9, 8, 3)), ["image_shape", "(9, 8, 3)"]),
    (dict(image_shape=(None, 8, 3)), ["image_shape", "(None, 8, 3)"]),
    (dict(image_shape=(8, 8, 0)), ["image_shape", "(8, 8, 0)"]),
    (dict(patch_size=0), ["patch_size", "patch_size=0"]),
    (dict(num_layers=-1), ["num_layers", "num_layers=-1"]),
    (dict(hidden_dim=9), ["hidden_dim", "num_heads", "hidden_dim=9"]),
    (dict(drop_path_rate=NAN), ["drop_path_rate", "nan"]),
    (dict(drop_path_rate=1.0), ["drop_path_rate", "1.0"]),
    (dict(layer_norm_epsilon=0.0), ["layer_norm_epsilon", "0.0"]),
    (dict(layer_scale_init_value=INF), ["layer_scale_init_value", "inf"]),
    (dict(moe_layers=[5]), ["moe_layers", "[5]"]),
    (dict(moe_layers="last-3"), ["moe_layers", "last-3"]),
    (dict(num_register_tokens=-1), ["num_register_tokens", "-1"]),
]


@pytest.mark.parametrize("kwargs, expected", VIT_CASES)
def test_vit_backbone_rejects(kwargs, expected):
    check(ValueError, expected, lambda: ViTMoEBackbone(**{**VIT, **kwargs}))


def test_unknown_kwargs_are_type_errors_too():
    check(TypeError, ["num_expert=8"], lambda: ViTMoEBackbone(**VIT, num_expert=8))


CONVNEXT_CASES = [
    (dict(num_expert=8), ["num_expert", "num_expert=8"]),
    (dict(image_shape=(3, 3, 3)), ["image_shape", "(3, 3, 3)", "at least 4"]),
    (
        dict(depths=[1, 1, 1], hidden_dims=[8, 8, 8], image_shape=(4, 64, 3)),
        ["image_shape", "(4, 64, 3)", "at least 8"],
    ),
    (dict(image_shape=(8, 8)), ["image_shape", "(8, 8)"]),
    (dict(patch_size=0), ["patch_size", "patch_size=0"]),
    (dict(mlp_ratio=NAN), ["mlp_ratio", "nan"]),
    (dict(expert_mlp_ratio=-2), ["expert_mlp_ratio", "-2"]),
    (dict(drop_path_rate=INF), ["drop_path_rate", "inf"]),
    (dict(layer_norm_epsilon=-1e-6), ["layer_norm_epsilon", "-1e-06"]),
    (
        dict(moe_layers="last-2", group_size=0),
        ["group_size", "group_size=0"],
    ),
    (dict(moe_layers="last-2", dispatch="fast"), ["dispatch", "'fast'"]),
]


@pytest.mark.parametrize("kwargs, expected", CONVNEXT_CASES)
def test_convnext_backbone_rejects(kwargs, expected):
    check(
        ValueError,
        expected,
        lambda: ConvNeXtMoEBackbone(**{**CONVNEXT, **kwargs}),
    )


@pytest.fixture(scope="module")
def vit_backbone():
    return ViTMoEBackbone(**VIT)


@pytest.fixture(scope="module")
def convnext_backbone():
    return ConvNeXtMoEBackbone(**CONVNEXT)


HEAD_CASES = [
    (dict(droput=0.5), TypeError, ["droput", "droput=0.5"]),
    (dict(num_classes=0), ValueError, ["num_classes", "num_classes=0"]),
    (dict(num_classes=2.5), ValueError, ["num_classes", "2.5"]),
    (dict(dropout=NAN), ValueError, ["dropout", "nan"]),
    (dict(dropout=1.5), ValueError, ["dropout", "1.5"]),
]


@pytest.mark.parametrize("kwargs, error, expected", HEAD_CASES)
def test_vit_classifier_rejects(vit_backbone, kwargs, error, expected):
    check(
        error,
        expected,
        lambda: ViTMoEImageClassifier(
            vit_backbone, **{"num_classes": 3, **kwargs}
        ),
    )


@pytest.mark.parametrize("kwargs, error, expected", HEAD_CASES)
def test_convnext_classifier_rejects(
    convnext_backbone, kwargs, error, expected
):
    check(
        error,
        expected,
        lambda: ConvNeXtMoEImageClassifier(
            convnext_backbone, **{"num_classes": 3, **kwargs}
        ),
    )


def test_classifier_rejects_the_wrong_backbone(convnext_backbone):
    check(
        ValueError,
        ["backbone", "ConvNeXtMoEBackbone"],
        lambda: ViTMoEImageClassifier(convnext_backbone, num_classes=3),
    )


@pytest.fixture(scope="module")
def classifier(vit_backbone):
    return ViTMoEImageClassifier(vit_backbone, num_classes=3)


OPTIMIZER_CASES = [
    (dict(learning_rate=NAN), ["learning_rate", "nan"]),
    (dict(learning_rate=INF), ["learning_rate", "inf"]),
    (dict(learning_rate=-1e-3), ["learning_rate", "-0.001"]),
    (dict(weight_decay=NAN), ["weight_decay", "nan"]),
    (dict(weight_decay=-0.1), ["weight_decay", "-0.1"]),
    (dict(layer_decay=INF), ["layer_decay", "inf"]),
    (dict(warmup_steps=-1), ["warmup_steps", "-1"]),
    (dict(warmup_steps=2.5), ["warmup_steps", "2.5"]),
    (dict(total_steps=0), ["total_steps", "0"]),
    (dict(min_learning_rate=NAN), ["min_learning_rate", "nan"]),
    (dict(global_clipnorm=INF), ["global_clipnorm", "inf"]),
]


@pytest.mark.parametrize("kwargs, expected", OPTIMIZER_CASES)
def test_create_optimizer_rejects(classifier, kwargs, expected):
    check(
        ValueError,
        expected,
        lambda: optimizer.create_optimizer(
            classifier, **{"total_steps": 10, **kwargs}
        ),
    )


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(learning_rate=NAN), ["learning_rate", "nan"]),
        (dict(learning_rate=-1.0), ["learning_rate", "-1.0"]),
        (dict(weight_decay=INF), ["weight_decay", "inf"]),
        (dict(lr_multipliers={"a/kernel": INF}), ["lr_multipliers", "inf"]),
    ],
)
def test_layer_decay_adamw_rejects(kwargs, expected):
    check(ValueError, expected, lambda: optimizer.LayerDecayAdamW(**kwargs))


def test_schedule_rejects_min_above_peak():
    check(
        ValueError,
        ["min_learning_rate", "0.1"],
        lambda: optimizer.warmup_cosine_schedule(1e-3, 10, 0, 0.1),
    )


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(num_classes=0), ["num_classes", "num_classes=0"]),
        (dict(image_size=-28), ["image_size", "-28"]),
        (dict(name=None), ["model", "None"]),
    ],
)
def test_build_classifier_rejects(kwargs, expected):
    arguments = {"name": "vimoe_mnist", "num_classes": 10, **kwargs}
    check(ValueError, expected, lambda: build_classifier(**arguments))


tf_data = pytest.importorskip("keras_vmoe.training.tf_data")


@pytest.mark.parametrize(
    "labels, num_classes, expected",
    [
        ([0, 1, 10, 2], 10, ["labels", "10", "num_classes=10", "index 2"]),
        ([0, -1, 1, 2], 10, ["labels", "-1", "index 1"]),
        ([0, -1, 1, 2], None, ["labels", "-1"]),
        ([0.0, 1.5, 1, 2], 10, ["labels", "1.5"]),
        (["a", "b", "c", "d"], 10, ["labels", "dtype"]),
        ([0, 1, 2, 3], 0, ["num_classes", "num_classes=0"]),
    ],
)
def test_array_dataset_rejects_labels(labels, num_classes, expected):
    images = np.zeros((4, 8, 8), "uint8")
    check(
        ValueError,
        expected,
        lambda: tf_data.array_dataset(
            images, np.asarray(labels), 8, num_classes=num_classes
        ),
    )


def test_array_dataset_keeps_valid_labels_one_hot():
    images = np.zeros((4, 8, 8), "uint8")
    dataset = tf_data.array_dataset(
        images, np.array([0, 1, 2, 2]), 8, batch_size=4, training=False,
        num_classes=3,
    )
    _, targets = next(iter(dataset))
    np.testing.assert_array_equal(
        targets.numpy(), np.eye(3)[[0, 1, 2, 2]]
    )


def test_collect_routing_does_not_widen_num_classes():
    from keras_vmoe.analysis.collect import collect_routing

    backbone = ViTMoEBackbone(
        **VIT, moe_layers="last-1", num_experts=2, capacity_factor=None,
        eval_capacity_factor=None,
    )
    model = ViTMoEImageClassifier(backbone, num_classes=3)
    images = np.zeros((4, 8, 8, 3), "float32")
    # The model has 3 outputs: a label 5 is a data error, not class 5.
    check(
        ValueError,
        ["num_classes=3", "5", "labels"],
        lambda: collect_routing(model, (images, np.array([0, 1, 5, 2]))),
    )
    check(
        ValueError,
        ["num_classes=2", "labels"],
        lambda: collect_routing(
            model, (images, np.array([0, 1, 2, 1])), num_classes=2
        ),
    )
    check(
        ValueError,
        ["num_classes", "num_classes=-3"],
        lambda: collect_routing(model, images, num_classes=-3),
    )
