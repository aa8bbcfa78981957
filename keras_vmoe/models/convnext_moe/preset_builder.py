"""Builds MoE-ConvNeXt models from the names of the preset table.

`keras_vmoe.models.convnext_moe.presets` is the table (data only); this
module turns a name into a model: it builds the architecture and converts
and upcycles the dense checkpoint. The family's `__init__.py` registers
`build_model` (`keras_vmoe.models.registry`), which
`ConvNeXtMoEBackbone.from_preset` and `ConvNeXtMoEImageClassifier.
from_preset` call for table names, so the model classes never import this
module.
"""

import keras

from keras_vmoe.models import registry
from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe.image_classifier import (
    ConvNeXtMoEImageClassifier,
)
from keras_vmoe.models.convnext_moe.image_classifier_preprocessor import (
    ConvNeXtMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.convnext_moe.image_converter import (
    ConvNeXtMoEImageConverter,
)
from keras_vmoe.models.convnext_moe.presets import PRESETS
from keras_vmoe.validation import deprecated_alias


def build_model(
    name,
    num_classes=None,
    load_weights=True,
    weights_path=None,
    upcycle_noise_std=0.0,
    upcycle_seed=None,
    seed=None,
    **overrides,
):
    """Builds preset `name`: a backbone, or a classifier with `num_classes`.

    Args:
        name: a key of `PRESETS`.
        num_classes: None for a `ConvNeXtMoEBackbone`, else the classes of
            a `ConvNeXtMoEImageClassifier` (with 1000 and loaded weights,
            the ImageNet head is loaded too; otherwise the head is new).
        load_weights: load the dense checkpoint (`weights_path`, or the
            keras.applications ImageNet weights, downloaded by Keras) and
            upcycle it; False keeps the random initialisation (the paper
            trains from scratch). Upcycling needs experts as wide as the
            dense MLP: the `_mlp4` and isotropic presets, or any preset
            with `expert_mlp_ratio=4`.
        weights_path: a local dense checkpoint: a timm `.safetensors` /
            `.npz`, or a keras.applications `.weights.h5`.
        upcycle_noise_std, upcycle_seed: noise of the expert copies.
        seed: deprecated alias of `upcycle_seed` (a `DeprecationWarning`;
            removed in 0.3, after which `seed` will override the MoE
            blocks' gating-noise `seed` like any backbone argument).
        **overrides: `ConvNeXtMoEBackbone` arguments replacing the preset's
            (e.g. `image_shape`, `dtype`, `normalize_gates`).
    """
    # Imported here: `keras_vmoe.converters` imports the model families.
    from keras_vmoe.converters import convnext as converters

    upcycle_seed = deprecated_alias(
        "seed", seed, "upcycle_seed", upcycle_seed, None
    )
    if weights_path is not None and not load_weights:
        raise ValueError(
            "`weights_path` is only read with `load_weights=True`. Received: "
            f"weights_path={weights_path!r}, load_weights={load_weights!r}"
        )
    if weights_path is not None and not str(weights_path).endswith(
        (".safetensors", ".npz", ".h5")
    ):
        raise ValueError(
            "`weights_path` must be a timm `.safetensors` / `.npz` or a "
            "keras.applications `.weights.h5` file. Received: "
            f"weights_path={weights_path!r}"
        )
    preset = PRESETS[name]
    backbone = ConvNeXtMoEBackbone(**dict(preset["config"], **overrides))
    model = backbone
    if num_classes is not None:
        image_size = tuple(size or 224 for size in backbone.image_shape[:2])
        model = ConvNeXtMoEImageClassifier(
            backbone,
            num_classes=num_classes,
            preprocessor=ConvNeXtMoEImageClassifierPreprocessor(
                ConvNeXtMoEImageConverter.normalized(
                    image_size, mean=preset["mean"], std=preset["std"]
                )
            ),
        )
    if not load_weights:
        return model
    # The ImageNet head is loaded for 1000 classes; otherwise it is new.
    target = model if num_classes == 1000 else backbone
    upcycling = {
        "upcycle_noise_std": upcycle_noise_std,
        "upcycle_seed": upcycle_seed,
    }
    if weights_path is not None and str(weights_path).endswith(
        (".safetensors", ".npz")
    ):
        converters.convert_timm_weights(weights_path, target, **upcycling)
    elif weights_path is not None:
        converters.convert_keras_applications_weights(
            str(weights_path), target, **upcycling
        )
    elif preset["source"] is None:
        raise ValueError(
            f"The preset {name!r} has no dense checkpoint to load (no "
            "safe-format isotropic ConvNeXt weights exist). Pass "
            "`load_weights=False`, or `weights_path` to a converted "
            "checkpoint."
        )
    else:
        variant = preset["source"].rsplit(".", 1)[-1]
        source = getattr(keras.applications, variant)(
            weights="imagenet", include_top=target is not backbone
        )
        converters.convert_keras_applications_weights(
            source, target, **upcycling
        )
    return model


def _build_backbone(cls, name, load_weights=True, **kwargs):
    return build_model(name, None, load_weights, **kwargs)


def _build_classifier(cls, name, load_weights=True, **kwargs):
    return build_model(name, load_weights=load_weights, **kwargs)


def register():
    """Registers the builders of this family (see `registry`)."""
    registry.register_family(
        "ConvNeXtMoE",
        backbone=ConvNeXtMoEBackbone,
        classifier=ConvNeXtMoEImageClassifier,
    )
    registry.register_preset_builder(ConvNeXtMoEBackbone, _build_backbone)
    registry.register_preset_builder(
        ConvNeXtMoEImageClassifier, _build_classifier
    )
