"""Exporting classifiers for serving: TF SavedModel, ONNX and LiteRT.

`export_classifier(model, path, format)` (also `model.export(path, format)`
on `ViTMoEImageClassifier` and `ConvNeXtMoEImageClassifier`) writes an
artifact that its own runtime loads and runs with any batch size:

| format | TensorFlow | JAX | torch |
|---|---|---|---|
| "tf_saved_model" (`tf.saved_model.load`, TF Serving) | yes | yes (jax2tf) | no |
| "onnx" (ONNX Runtime) | yes (tf2onnx) | no | no |
| "litert" (the LiteRT interpreter, builtin ops only) | yes | no | no |

A model trained on any backend exports on TensorFlow: save it
(`save_to_preset` or `.keras`), load it with `KERAS_BACKEND=tensorflow`
and export there.

A format a backend cannot export raises a `ValueError` naming the backend
to use. By default the artifact includes the classifier's preprocessing:
it takes what `predict` takes (RGB images in [0, 255], float32, of the
model's image size, resized and normalised inside) and returns what
`predict` returns (logits, or probabilities with
`outputs="probabilities"`). At inference every MoE layer routes each
image on its own (`eval_group_size="image"`, the default), so no shape in
the artifact depends on the batch and an image's output does not depend
on the other images of a request.
"""

import contextlib

import keras
import numpy as np

from keras_vmoe.layers.moe_types import find_moe_layers

FORMATS = ("tf_saved_model", "onnx", "litert")
OUTPUTS = ("logits", "probabilities")

# format -> backend -> why it cannot be exported there (None: it can).
_UNSUPPORTED = {
    "tf_saved_model": {
        "torch": (
            "a TF SavedModel of a torch model needs torch_xla; save the "
            "model (`save_to_preset` or `.keras`) and export it with "
            "KERAS_BACKEND=tensorflow or jax"
        ),
    },
    "onnx": {
        "jax": (
            "jax2onnx cannot trace a dynamic batch size through the "
            "routing; save the model (`save_to_preset` or `.keras`) and "
            "export it with KERAS_BACKEND=tensorflow"
        ),
        "torch": (
            "with a dynamic batch size Keras uses torch's TorchScript ONNX "
            "exporter, which cannot trace Keras' LayerNormalization with a "
            "dynamic batch; save the model (`save_to_preset` or `.keras`) "
            "and export it with KERAS_BACKEND=tensorflow"
        ),
    },
    "litert": {
        "jax": (
            "Keras converts TensorFlow graphs to LiteRT; save the model "
            "(`save_to_preset` or `.keras`) and export it with "
            "KERAS_BACKEND=tensorflow"
        ),
        "torch": (
            "Keras' torch LiteRT path fixes every dynamic dimension (the "
            "batch size) to 1 and needs litert-torch; save the model "
            "(`save_to_preset` or `.keras`) and export it with "
            "KERAS_BACKEND=tensorflow"
        ),
    },
}


def check_export_format(format, backend=None):
    """Raises a `ValueError` naming the backend to use where `format`
    cannot be exported on `backend` (default: the current one)."""
    backend = backend or keras.backend.backend()
    if format not in FORMATS:
        raise ValueError(
            f"`format` must be one of {FORMATS} for a keras-vmoe classifier "
            f"export. Received: format={format!r}"
        )
    reason = _UNSUPPORTED[format].get(backend)
    if reason:
        raise ValueError(
            f"format={format!r} cannot be exported on the {backend} "
            f"backend: {reason}."
        )


def serving_model(
    model, include_preprocessing=True, outputs="logits", image_size=None
):
    """A functional `keras.Model` that serves `model` at inference.

    Args:
        model: a keras-vmoe image classifier.
        include_preprocessing: True: the inputs are raw RGB images in
            [0, 255] (what `predict` takes), resized and normalised by the
            classifier's preprocessor inside; False: the inputs are what
            the classifier's `call` takes (preprocessed).
        outputs: "logits" (what `predict` returns) or "probabilities"
            (softmax over the classes).
        image_size: (height, width) of the raw input images with
            preprocessing (resized inside to the model's size); default:
            the model's image size.

    Returns:
        A `keras.Model` from float32 [batch, height, width, 3] images to
        float32 [batch, num_classes].
    """
    if outputs not in OUTPUTS:
        raise ValueError(
            f"`outputs` must be one of {OUTPUTS}. Received: outputs={outputs!r}"
        )
    height, width, channels = model.backbone.image_shape
    converter = None
    if include_preprocessing:
        preprocessor = getattr(model, "preprocessor", None)
        converter = getattr(preprocessor, "image_converter", None)
        if converter is None:
            raise ValueError(
                "`include_preprocessing=True` needs a classifier with a "
                "preprocessor (`model.preprocessor.image_converter`); "
                f"{type(model).__name__} {model.name!r} has none. Pass "
                "include_preprocessing=False to export the model's `call` "
                "on preprocessed images."
            )
        if image_size is not None:
            height, width = _image_size(image_size)
    elif image_size is not None:
        raise ValueError(
            "`image_size` resizes raw images inside the artifact and needs "
            f"include_preprocessing=True. Received: image_size={image_size}"
        )
    images = keras.Input((height, width, channels), dtype="float32")
    x = images
    if converter is not None:
        x = _preprocess(converter, x, model.backbone.image_shape[:2])
    logits = model(x, training=False)
    logits = keras.ops.cast(logits, "float32")
    if outputs == "probabilities":
        logits = keras.ops.softmax(logits, axis=-1)
    return keras.Model(images, logits, name=f"{model.name}_serving")


def export_classifier(
    model,
    filepath,
    format="tf_saved_model",
    include_preprocessing=True,
    outputs="logits",
    image_size=None,
    verbose=False,
    **kwargs,
):
    """Exports a classifier for serving (see the module docstring).

    Args:
        model: a keras-vmoe image classifier.
        filepath: a folder for "tf_saved_model", a `.onnx` file for
            "onnx", a `.tflite` file for "litert".
        format: "tf_saved_model", "onnx" or "litert".
        include_preprocessing, outputs, image_size: see `serving_model`.
        verbose: print Keras' export messages.
        **kwargs: passed to `keras.Model.export` (e.g. `opset_version`).

    Returns:
        The serving `keras.Model` that was exported.

    Raises:
        ValueError: for a format the current backend cannot export (naming
            the backend to use), a bad argument, or a file name without the
            format's extension.
    """
    check_export_format(format)
    filepath = str(filepath)
    extension = {"onnx": ".onnx", "litert": ".tflite"}.get(format)
    if extension and not filepath.endswith(extension):
        raise ValueError(
            f"format={format!r} writes one file whose name ends with "
            f"{extension!r}. Received: filepath={filepath!r}"
        )
    serving = serving_model(model, include_preprocessing, outputs, image_size)
    spec = keras.InputSpec(
        shape=(None,) + tuple(serving.inputs[0].shape[1:]), dtype="float32"
    )
    if format == "onnx" and keras.backend.backend() == "tensorflow":
        _register_tf2onnx_erfc()
    with _slot_dispatch(model):
        serving.export(
            filepath,
            format=format,
            verbose=verbose,
            input_signature=[spec],
            **kwargs,
        )
    return serving


@contextlib.contextmanager
def _slot_dispatch(model):
    """Top-k MoE layers trace the capacity-slot dispatch: static shapes
    (per-image capacity) and only gathers, scatters and batched matmuls,
    which every export format has. The paths that read segment sizes back
    to the host, or need a grouped matmul kernel, do not export."""
    layers = [
        layer
        for layer in find_moe_layers(model)
        if getattr(layer, "dispatch", None) is not None
        and layer.router_type == "top_k"
    ]
    saved = [layer.dispatch for layer in layers]
    for layer in layers:
        layer.dispatch = "slots"
    try:
        yield
    finally:
        for layer, dispatch in zip(layers, saved):
            layer.dispatch = dispatch


def _preprocess(converter, images, model_size):
    """The image converter's resize (only where the sizes differ: a resize
    to the same size is the identity, and LiteRT has no builtin bicubic
    resize), then its `x * scale + offset` per channel."""
    x = images
    if tuple(x.shape[1:3]) != tuple(model_size):
        x = converter.resizing(x)
    for name, op in (("scale", keras.ops.multiply), ("offset", keras.ops.add)):
        value = getattr(converter, name)
        if value is not None:
            x = op(x, np.asarray(value, "float32"))
    return x


def _image_size(image_size):
    if (
        isinstance(image_size, int)
        and not isinstance(image_size, bool)
        and image_size > 0
    ):
        return image_size, image_size
    if (
        isinstance(image_size, (list, tuple))
        and len(image_size) == 2
        and all(isinstance(v, int) and v > 0 for v in image_size)
    ):
        return tuple(image_size)
    raise ValueError(
        "`image_size` must be a positive int or (height, width). Received: "
        f"image_size={image_size!r}"
    )


_ERFC_REGISTERED = False


def _register_tf2onnx_erfc():
    """Teaches tf2onnx TensorFlow's `Erfc` (the exact GELU of
    `tf.nn.gelu`): `erfc(x) = 1 - erf(x)`, with ONNX's `Erf`."""
    global _ERFC_REGISTERED
    if _ERFC_REGISTERED:
        return
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 (registered by the decorator)
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            node.type = "Erf"
            one = ctx.make_const(utils.make_name("one"), np.array(1, dtype))
            minus = ctx.insert_new_node_on_output(
                "Sub", node.output[0], name=utils.make_name(node.name)
            )
            ctx.replace_inputs(minus, [one.output[0], node.output[0]])

    _ERFC_REGISTERED = True


class ServingExportMixin:
    """`export` of the keras-vmoe classifiers: `export_classifier`, with
    the preprocessing inside by default (the artifact takes what `predict`
    takes)."""

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=None,
        input_signature=None,
        include_preprocessing=True,
        outputs="logits",
        image_size=None,
        **kwargs,
    ):
        """Exports the classifier for serving, with its preprocessing.

        See `keras_vmoe.export.export_classifier`: "tf_saved_model",
        "onnx" and "litert", dynamic batch size; by default raw RGB images
        in [0, 255] in, `predict`'s logits out. Other Keras formats and an
        explicit `input_signature` go to `keras.Model.export` unchanged
        (the classifier's `call`, preprocessed inputs).
        """
        if format not in FORMATS or input_signature is not None:
            return super().export(
                filepath,
                format=format,
                verbose=verbose,
                input_signature=input_signature,
                **kwargs,
            )
        return export_classifier(
            self,
            filepath,
            format=format,
            include_preprocessing=include_preprocessing,
            outputs=outputs,
            image_size=image_size,
            verbose=bool(verbose),
            **kwargs,
        )
