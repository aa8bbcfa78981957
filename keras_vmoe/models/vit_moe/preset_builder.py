"""Builds ViT-MoE models from the names of the preset table.

`keras_vmoe.models.vit_moe.presets` is the table (data only); this module
turns a name into a model: it builds the architecture, downloads the dense
checkpoint from the Hugging Face Hub, converts it and upcycles it. The
family's `__init__.py` registers `build_backbone` and `build_classifier`
(`keras_vmoe.models.registry`), which `ViTMoEBackbone.from_preset` and
`ViTMoEImageClassifier.from_preset` call for table names, so the model
classes never import this module.
"""

import os

from keras_vmoe.models import registry
from keras_vmoe.models.vit_moe import presets
from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone
from keras_vmoe.models.vit_moe.image_classifier import ViTMoEImageClassifier
from keras_vmoe.models.vit_moe.image_classifier_preprocessor import (
    ViTMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vit_moe.image_converter import ViTMoEImageConverter
from keras_vmoe.models.vit_moe.vmoe_preset_builder import build_vmoe_preset
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS
from keras_vmoe.validation import deprecated_alias


def download_checkpoint(repo_id, filename="model.safetensors", preset=None):
    """Local path of a dense checkpoint from the Hugging Face Hub (cached).

    Raises:
        ValueError: when the file is neither cached nor downloadable (e.g.
            `HF_HUB_OFFLINE=1`), saying where to put it and how to pass a
            local file instead.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename)
    except LocalEntryNotFoundError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise ValueError(
            f"The dense checkpoint {filename!r} of the Hugging Face repository "
            f"{repo_id!r} is not in the local cache ({constants.HF_HUB_CACHE}) "
            f"and could not be downloaded (HF_HUB_OFFLINE={offline}, or no "
            "network). Either download it where there is network, "
            f"`huggingface-cli download {repo_id} {filename}`, and copy the "
            f"cache to {constants.HF_HUB_CACHE}; or pass the file: "
            f"`from_preset({preset!r}, weights_path='/path/to/{filename}')`; "
            "or build with random weights: `load_weights=False`."
        ) from error


def build_backbone(
    name,
    load_weights=True,
    weights_path=None,
    upcycle_noise_std=0.0,
    upcycle_seed=None,
    seed=None,
    **overrides,
):
    """Builds the backbone of preset `name`, upcycling its dense weights.

    Args:
        name: a key of `presets.PRESETS`.
        load_weights: download (or read `weights_path`), convert and upcycle
            the dense checkpoint; False leaves the random initialisation.
        weights_path: a local copy of the dense checkpoint (`.safetensors`).
        upcycle_noise_std, upcycle_seed: noise of the expert copies.
        seed: deprecated alias of `upcycle_seed` (a `DeprecationWarning`;
            removed in 0.3, after which `seed` will override the MoE
            blocks' gating-noise `seed` like any backbone argument).
        **overrides: `ViTMoEBackbone` arguments replacing the preset's.
    """
    # Imported here: `keras_vmoe.converters` imports this model family.
    from keras_vmoe.converters.vit import load_vit_checkpoint

    upcycle_seed = deprecated_alias(
        "seed", seed, "upcycle_seed", upcycle_seed, None
    )
    if weights_path is not None and not load_weights:
        raise ValueError(
            "`weights_path` is only read with `load_weights=True`. Received: "
            f"weights_path={weights_path!r}, load_weights={load_weights!r}"
        )
    preset = presets.PRESETS[name]
    backbone = ViTMoEBackbone(**dict(preset["config"], **overrides))
    if load_weights:
        source = weights_path or download_checkpoint(
            preset["source"], preset=name
        )
        load_vit_checkpoint(
            source, backbone, upcycle_noise_std, upcycle_seed
        )
    return backbone


def build_classifier(cls, preset, load_weights=True, **kwargs):
    """Builds a classifier of class `cls` from table preset `preset`.

    `num_classes` is required (the dense checkpoints have no head for the
    target task); the head is new; the preprocessor normalises with the
    statistics of the preset's checkpoint; `pooling`, `activation`,
    `dropout`, `head_dtype` and `preprocessor` go to the classifier, the
    other keyword arguments to `build_backbone`.
    """
    if "num_classes" not in kwargs:
        raise ValueError(
            f"`num_classes` is required to build a classifier from the "
            f"preset {preset!r}, whose checkpoint has no head for your "
            "task. Received: no num_classes"
        )
    head_kwargs = {
        name: kwargs.pop(name)
        for name in (
            "num_classes",
            "pooling",
            "activation",
            "dropout",
            "head_dtype",
            "preprocessor",
        )
        if name in kwargs
    }
    backbone = ViTMoEBackbone.from_preset(preset, load_weights, **kwargs)
    if "preprocessor" not in head_kwargs:
        statistics = presets.PRESETS[preset]
        head_kwargs["preprocessor"] = ViTMoEImageClassifierPreprocessor(
            ViTMoEImageConverter.normalized(
                backbone.image_shape[:2],
                mean=statistics["mean"],
                std=statistics["std"],
            )
        )
    return cls(backbone=backbone, **head_kwargs)


def _build_backbone_preset(cls, name, load_weights, **kwargs):
    if name in VMOE_PRESETS:
        return build_vmoe_preset(cls, name, load_weights, **kwargs)
    return build_backbone(name, load_weights, **kwargs)


def _build_classifier_preset(cls, name, load_weights, **kwargs):
    if name in VMOE_PRESETS:
        return build_vmoe_preset(cls, name, load_weights, **kwargs)
    return build_classifier(cls, name, load_weights, **kwargs)


def register():
    """Registers the builders of this family (see `registry`): the
    upcycled architecture presets (`presets.PRESETS`) and the published
    V-MoE / E^3 checkpoints (`vmoe_presets.VMOE_PRESETS`)."""
    registry.register_family(
        "ViTMoE", backbone=ViTMoEBackbone, classifier=ViTMoEImageClassifier
    )
    registry.register_preset_builder(ViTMoEBackbone, _build_backbone_preset)
    registry.register_preset_builder(
        ViTMoEImageClassifier, _build_classifier_preset
    )
