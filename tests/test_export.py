"""Exported classifiers run in their own runtimes and equal `predict`.

Every router type of both families, each format its backend exports
(TensorFlow: SavedModel, ONNX, LiteRT; JAX: SavedModel), loaded by
`tf.saved_model.load`, ONNX Runtime and the LiteRT interpreter without the
Flex delegate, on batches of 1 and 8 (a dynamic batch size), with the
preprocessing inside: raw [0, 255] images in, `predict`'s logits out.
"""

import keras
import numpy as np
import pytest

from keras_vmoe.export import check_export_format
from keras_vmoe.export import export_classifier
from keras_vmoe.export import serving_model
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.models.convnext_moe.image_classifier_preprocessor import (
    ConvNeXtMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.convnext_moe.image_converter import (
    ConvNeXtMoEImageConverter,
)
from keras_vmoe.models.vit_moe.image_classifier_preprocessor import (
    ViTMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vit_moe.image_converter import ViTMoEImageConverter
from tests.helpers import TINY_VIT

BACKEND = keras.backend.backend()
SUPPORTED = {
    "tensorflow": ("tf_saved_model", "onnx", "litert"),
    "jax": ("tf_saved_model",),
    "torch": (),
}[BACKEND]
VIT = TINY_VIT
CONVNEXT = dict(
    image_shape=(16, 16, 3),
    depths=[1, 2],
    hidden_dims=[8, 16],
    moe_layers="last-2",
    num_experts=4,
    layer_scale_init_value=1.0,
)
CASES = {
    "vit-image-top1": ("vit", dict(eval_capacity_factor=0.5)),
    "vit-token-cosine-top2": (
        "vit",
        dict(routing="token", top_k=2, router="cosine", router_dim=8),
    ),
    "vit-soft": ("vit", dict(router_type="soft")),
    "vit-expert-choice": ("vit", dict(router_type="expert_choice")),
    "convnext-token-shared": (
        "convnext",
        dict(shared_expert=True, eval_capacity_factor=0.5),
    ),
    "convnext-expert-choice": ("convnext", dict(router_type="expert_choice")),
}
IMAGES = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3))
IMAGES = IMAGES.astype("float32")
EXTENSION = {"tf_saved_model": "", "onnx": ".onnx", "litert": ".tflite"}


def _classifier(name):
    family, moe = CASES[name]
    if family == "vit":
        converter = ViTMoEImageConverter.normalized(
            (16, 16), [0.5] * 3, [0.25] * 3
        )
        backbone = ViTMoEBackbone(**VIT, **moe, seed=2)
        return ViTMoEImageClassifier(
            backbone,
            num_classes=5,
            preprocessor=ViTMoEImageClassifierPreprocessor(converter),
        )
    converter = ConvNeXtMoEImageConverter.imagenet((16, 16))
    backbone = ConvNeXtMoEBackbone(**CONVNEXT, **moe, seed=2)
    return ConvNeXtMoEImageClassifier(
        backbone,
        num_classes=5,
        preprocessor=ConvNeXtMoEImageClassifierPreprocessor(converter),
    )


def _run(format, path, images):
    if format == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)  # holds the variables
        return loaded.serve(images).numpy()
    if format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path)
        name = session.get_inputs()[0].name
        return session.run(None, {name: images})[0]
    from ai_edge_litert.interpreter import Interpreter

    # The interpreter of the ai-edge-litert wheel has no Flex delegate: a
    # model that needs TensorFlow ops fails to allocate here.
    interpreter = Interpreter(model_path=path)
    (inputs,), (outputs,) = (
        interpreter.get_input_details(),
        interpreter.get_output_details(),
    )
    interpreter.resize_tensor_input(inputs["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inputs["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(outputs["index"])


# Every case on TensorFlow; on JAX (a slow jax2tf conversion) the token
# top-k and Expert Choice cases, the others in the slow set.
JAX_CASES = ("vit-token-cosine-top2", "convnext-expert-choice")


def _case(name):
    slow = BACKEND == "jax" and name not in JAX_CASES
    return pytest.param(name, marks=pytest.mark.slow) if slow else name


@pytest.mark.parametrize("format", SUPPORTED)
@pytest.mark.parametrize("name", [_case(name) for name in sorted(CASES)])
def test_export_runs_in_its_runtime_and_equals_predict(name, format, tmp_path):
    model = _classifier(name)
    expected = model.predict(IMAGES, batch_size=8, verbose=0)
    path = str(tmp_path / f"model{EXTENSION[format]}")
    model.export(path, format=format)
    for images, logits in ((IMAGES[:1], expected[:1]), (IMAGES, expected)):
        np.testing.assert_allclose(
            _run(format, path, images), logits, rtol=1e-4, atol=1e-4
        )


@pytest.mark.skipif(not SUPPORTED, reason=f"no export format on {BACKEND}")
def test_probabilities_and_the_call_without_preprocessing(tmp_path):
    model = _classifier("vit-token-cosine-top2")
    format = SUPPORTED[0]
    path = str(tmp_path / f"probs{EXTENSION[format]}")
    export_classifier(model, path, format, outputs="probabilities")
    logits = model.predict(IMAGES, verbose=0)
    np.testing.assert_allclose(
        _run(format, path, IMAGES),
        keras.ops.convert_to_numpy(keras.ops.softmax(logits)),
        rtol=1e-4,
        atol=1e-5,
    )
    path = str(tmp_path / f"call{EXTENSION[format]}")
    export_classifier(model, path, format, include_preprocessing=False)
    preprocessed = keras.ops.convert_to_numpy(
        model.preprocessor.image_converter(IMAGES)
    )
    np.testing.assert_allclose(
        _run(format, path, preprocessed), logits, rtol=1e-4, atol=1e-4
    )
    assert np.abs(_run(format, path, IMAGES) - logits).max() > 1e-2


@pytest.mark.parametrize(
    "format, backend, message",
    [
        ("tf_saved_model", "torch", "KERAS_BACKEND=tensorflow or jax"),
        ("onnx", "jax", "KERAS_BACKEND=tensorflow"),
        ("onnx", "torch", "KERAS_BACKEND=tensorflow"),
        ("litert", "jax", "KERAS_BACKEND=tensorflow"),
        ("litert", "torch", "KERAS_BACKEND=tensorflow"),
        ("openvino", "tensorflow", "format='openvino'"),
    ],
)
def test_unsupported_formats_name_the_backend_to_use(format, backend, message):
    with pytest.raises(ValueError, match=message):
        check_export_format(format, backend)


@pytest.mark.parametrize(
    "format",
    [f for f in ("tf_saved_model", "onnx", "litert") if f not in SUPPORTED],
)
def test_export_on_this_backend_refuses_what_it_cannot_write(format, tmp_path):
    with pytest.raises(
        ValueError, match=f"cannot be exported on the {BACKEND}"
    ):
        _classifier("vit-soft").export(
            str(tmp_path / f"m{EXTENSION[format]}"), format=format
        )


def test_bad_export_arguments_are_named(tmp_path):
    model = _classifier("vit-soft")
    with pytest.raises(ValueError, match="outputs='probs'"):
        serving_model(model, outputs="probs")
    with pytest.raises(ValueError, match="image_size=0"):
        serving_model(model, image_size=0)
    if "onnx" in SUPPORTED:
        with pytest.raises(ValueError, match=r"'\.onnx'"):
            export_classifier(model, str(tmp_path / "m.tflite"), "onnx")
    backbone_only = ViTMoEImageClassifier(ViTMoEBackbone(**VIT), num_classes=5)
    with pytest.raises(ValueError, match="include_preprocessing=False"):
        serving_model(backbone_only)
