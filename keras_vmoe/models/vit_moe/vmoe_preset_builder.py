"""Builds the published V-MoE / E^3 models (`vmoe_presets`) by name.

`ViTMoEImageClassifier.from_preset(name)` and `ViTMoEBackbone.from_preset(
name)` call `build_vmoe_preset` for a name of `VMOE_PRESETS`: the
checkpoint is read from a local copy (`checkpoint=`) or downloaded once
into a cache (`keras_vmoe.utils.download`), converted
(`keras_vmoe.converters.vmoe`) and given a preprocessor that resizes to the
preset's image size (bilinear, as vmoe's `resize`) and scales [0, 255]
pixels to [-1, 1].
"""

import copy
import os

from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_MEAN
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_STD
from keras_vmoe.models.vit_moe.vmoe_presets import checkpoint_url
from keras_vmoe.models.vit_moe.vmoe_presets import group_size_for
from keras_vmoe.validation import check_int
from keras_vmoe.validation import check_number

# vmoe's fine-tuning configurations train (and evaluate) at this capacity.
FINE_TUNE_CAPACITY_FACTOR = 1.5


def resolve_checkpoint(name, checkpoint=None, cache_dir=None, progress=True):
    """The local prefix of preset `name`'s checkpoint.

    Args:
        name: a key of `VMOE_PRESETS`.
        checkpoint: None (download into the cache, or reuse it), a local
            prefix (`<dir>/<name>`, the files `<prefix>.index` and
            `<prefix>.data-*`), or a folder holding them.
        cache_dir: download cache (default `$KERAS_VMOE_CACHE` or
            `~/.cache/keras_vmoe/vmoe_checkpoints`).
        progress: print download progress.

    Raises:
        ValueError: naming the path, for a local checkpoint whose index is
            missing; when the download fails, saying which URLs to fetch
            and where to put them.
    """
    if checkpoint is not None:
        prefix = os.fspath(checkpoint)
        if os.path.isdir(prefix):
            prefix = os.path.join(prefix, name)
        if prefix.endswith(".index"):
            prefix = prefix[: -len(".index")]
        if not os.path.isfile(prefix + ".index"):
            raise ValueError(
                f"No vmoe checkpoint index at {prefix + '.index'!r}. "
                f"`checkpoint` must be the prefix of the files "
                f"'<prefix>.index' and '<prefix>.data-*' or a folder holding "
                f"'{name}.index'. Received: checkpoint={checkpoint!r}"
            )
        return prefix
    from keras_vmoe.utils.download import default_cache_dir
    from keras_vmoe.utils.download import download_vmoe_checkpoint

    base_url = checkpoint_url(name).rsplit("/", 1)[0]
    cache_dir = cache_dir or default_cache_dir()
    try:
        return download_vmoe_checkpoint(
            base_url, name, cache_dir, progress=progress
        )
    except (ConnectionError, ValueError) as error:
        raise ValueError(
            f"Could not download the vmoe checkpoint {name!r} ({error}). "
            f"Offline, download '{checkpoint_url(name)}.index' and every "
            f"'{checkpoint_url(name)}.data-NNNNN-of-MMMMM' shard it lists "
            f"(e.g. `gsutil -m cp 'gs://vmoe_checkpoints/{name}.*' DIR`) "
            f"into {cache_dir!r}, or pass `checkpoint=DIR`."
        ) from error


def vmoe_preprocessor(image_size):
    """The preprocessor of a vmoe model: resize [0, 255] RGB images to
    `image_size` (bilinear, as vmoe's `resize`), then `value_range(-1,
    1)`: x / 127.5 - 1."""
    from keras_vmoe.models.vit_moe.image_classifier_preprocessor import (
        ViTMoEImageClassifierPreprocessor,
    )
    from keras_vmoe.models.vit_moe.image_converter import ViTMoEImageConverter

    return ViTMoEImageClassifierPreprocessor(
        ViTMoEImageConverter.normalized(
            (image_size, image_size),
            mean=VMOE_MEAN,
            std=VMOE_STD,
            interpolation="bilinear",
        )
    )


def build_vmoe_preset(
    cls,
    name,
    load_weights=True,
    num_classes=None,
    image_size=None,
    checkpoint=None,
    cache_dir=None,
    eval_capacity_factor=None,
    capacity_factor=None,
    preprocessor=None,
    dtype=None,
    progress=True,
    **overrides,
):
    """Builds published vmoe model `name` as `cls` (classifier or backbone).

    Args:
        cls: `ViTMoEImageClassifier` (or a subclass), or `ViTMoEBackbone`
            (the classifier's backbone is returned).
        name: a key of `VMOE_PRESETS`.
        load_weights: read the checkpoint; False builds the architecture
            with random weights (no download).
        num_classes: None keeps the checkpoint's head. Another number
            starts a fine-tuning model as vmoe's fine-tuning configurations
            do: a new head, no `pre_logits`, and capacity factor 1.5 in
            training and at inference (unless given).
        image_size: input side; default the preset's. Another size
            resamples the position grid and sizes the routing groups for
            it (same images per group).
        checkpoint, cache_dir: see `resolve_checkpoint`.
        eval_capacity_factor, capacity_factor: override the preset's.
        preprocessor: default: resize to `image_size` and scale to [-1, 1].
        dtype: dtype policy.
        progress: print download progress.
        **overrides: further `ViTMoEBackbone` arguments (`dispatch`,
            `group_size`, ...).
    """
    from keras_vmoe.converters.vmoe import build_vmoe_model
    from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone

    preset = VMOE_PRESETS[name]
    image_size = check_int("image_size", image_size or preset["image_size"])
    check_int("num_classes", num_classes, allow_none=True)
    for argument, value in (
        ("capacity_factor", capacity_factor),
        ("eval_capacity_factor", eval_capacity_factor),
    ):
        check_number(
            argument, value, minimum=0, min_inclusive=False, allow_none=True
        )
    model_config = copy.deepcopy(preset["model"])
    moe = model_config["encoder"]["moe"]
    moe["group_size"] = group_size_for(preset, image_size)
    fine_tune = (
        num_classes is not None
        and num_classes != preset["model"]["num_classes"]
    )
    if fine_tune:
        capacity_factor = capacity_factor or FINE_TUNE_CAPACITY_FACTOR
        eval_capacity_factor = eval_capacity_factor or capacity_factor
    if capacity_factor:
        moe["router"]["dispatcher"]["capacity_factor"] = capacity_factor
    eval_capacity_factor = (
        eval_capacity_factor or preset["eval_capacity_factor"]
    )
    if not load_weights:
        patch = model_config["patch_size"][0]
        overrides.setdefault("position_grid", preset["image_size"] // patch)
    prefix = (
        resolve_checkpoint(name, checkpoint, cache_dir, progress)
        if load_weights
        else None
    )
    wants_backbone = issubclass(cls, ViTMoEBackbone)
    if preprocessor is None and not wants_backbone:
        preprocessor = vmoe_preprocessor(image_size)
    model = build_vmoe_model(
        prefix,
        model_config,
        image_size,
        eval_capacity_factor=eval_capacity_factor,
        num_classes=num_classes,
        dtype=dtype,
        load_weights=load_weights,
        classifier_cls=None if wants_backbone else cls,
        preprocessor=preprocessor,
        **overrides,
    )
    return model.backbone if wants_backbone else model
