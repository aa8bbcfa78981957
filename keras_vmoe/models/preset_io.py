"""Checked preset loading and atomic preset saving for both model families.

- Names: an unknown preset name gets a ValueError naming it, its close
  matches, `keras_vmoe.models.list_presets()` and, for a name of the other
  family, the class to use (instead of KerasHub's generic message).
- Folders (`check_preset_dir`): every JSON file must parse, every `.h5`
  must be a readable HDF5 file (a Git-LFS pointer or a truncated copy is
  named), a classifier preset whose head would be loaded must have
  `task.weights.h5`, and the backbone config in `task.json` must equal
  `config.json`. Every error names the file.
- Saving (`PresetSavingMixin`): `save_to_preset` writes into a temporary
  sibling folder that replaces the destination only once complete, and
  never writes optimizer state.
"""

import contextlib
import difflib
import json
import os

import keras

from keras_vmoe.models import registry
from keras_vmoe.models.shipped import SHIPPED_PRESETS
from keras_vmoe.models.shipped import shipped_preset_dir
from keras_vmoe.utils.io import atomic_directory

CONFIG_FILE = "config.json"
TASK_CONFIG_FILE = "task.json"
TASK_WEIGHTS_FILE = "task.weights.h5"
MODEL_WEIGHTS_FILE = "model.weights.h5"


# === Names ===
def _families():
    from keras_vmoe.models.convnext_moe import presets as convnext_presets
    from keras_vmoe.models.vit_moe import presets as vit_presets

    return {
        "ViTMoE": (vit_presets.PRESETS, "ViTMoEImageClassifier"),
        "ConvNeXtMoE": (convnext_presets.PRESETS, "ConvNeXtMoEImageClassifier"),
    }


def _is_handle_or_path(preset):
    return "://" in preset or os.path.exists(preset)


def check_preset_name(preset, family, cls_name):
    """Raises a ValueError for a string that is no preset of `family`.

    Strings that name an existing path or a hub handle ("hf://...",
    "kaggle://...") pass; so do the names of `family`'s table.

    Args:
        preset: what the user passed to `from_preset`.
        family: "ViTMoE" or "ConvNeXtMoE".
        cls_name: the class whose `from_preset` was called (for messages).
    """
    if not isinstance(preset, str) or _is_handle_or_path(preset):
        return
    families = _families()
    table, _ = families[family]
    if preset in table:
        return
    if preset in SHIPPED_PRESETS:
        other = SHIPPED_PRESETS[preset][0]
        if other == family:
            return
        raise ValueError(
            f"{preset!r} is a shipped {other} preset, not a {family} one: "
            f"use `keras_vmoe.models.{families[other][1]}.from_preset("
            f"{preset!r})` or `keras_hub.models.ImageClassifier.from_preset("
            f"{preset!r})`. Received: preset={preset!r} for {cls_name}"
        )
    for other, (other_table, other_cls) in families.items():
        if other != family and preset in other_table:
            raise ValueError(
                f"{preset!r} is a {other} preset, not a {family} one: use "
                f"`keras_vmoe.models.{other_cls}.from_preset({preset!r}, "
                f"...)`. Received: preset={preset!r} for {cls_name}"
            )
    if os.sep in preset or preset.startswith("."):
        raise ValueError(
            f"Preset folder not found. Received: preset={preset!r} for "
            f"{cls_name}"
        )
    names = sorted(table)
    close = difflib.get_close_matches(preset, names, n=3)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"Unknown {family} preset name.{hint} Valid names: "
        f"`keras_vmoe.models.list_presets()` ({len(names)} {family} names, "
        "e.g. "
        f"{names[:3]}), or a preset folder, or a hub handle ('hf://...'). "
        f"Received: preset={preset!r}"
    )


def preset_table_entry(preset):
    """The table entry of a preset name from either family."""
    for table, _ in _families().values():
        if preset in table:
            return table[preset]
    everything = sorted(name for t, _ in _families().values() for name in t)
    close = difflib.get_close_matches(str(preset), everything, n=3)
    hint = f" Close matches: {close}." if close else ""
    raise ValueError(
        f"Unknown preset name.{hint} See `keras_vmoe.models.list_presets()`. "
        f"Received: preset={preset!r}"
    )


def preset_normalization(preset):
    """`{"mean": (r, g, b), "std": (r, g, b)}` the preset's inputs expect.

    Images in [0, 255] are normalised as `(x / 255 - mean) / std`, the
    statistics the preset's dense checkpoint was trained with (DINOv2 and
    ConvNeXt: ImageNet's; the timm AugReg ViT-S/16 and ViT-B/16 presets,
    `vit_*_patch16*` and `vit_moe_*_patch16_*`, and the published vmoe
    checkpoints: 0.5 and 0.5, i.e. [-1, 1]). The
    preprocessor built by `from_preset` applies them; pass them to input
    pipelines that normalise outside the model.

    Args:
        preset: a name from `keras_vmoe.models.list_presets()`, or a preset
            folder (its `image_converter.json` is read; so is a shipped
            preset's).

    Raises:
        ValueError: for an unknown name, or a folder without a readable
            image converter (naming the file).
    """
    preset = shipped_preset_dir(preset) or preset
    if isinstance(preset, str) and os.path.isdir(preset):
        return _folder_normalization(preset)
    from keras_vmoe.models.vit_moe import vmoe_presets

    if preset in vmoe_presets.VMOE_PRESETS:
        # vmoe's `value_range(-1, 1)`.
        return {"mean": vmoe_presets.VMOE_MEAN, "std": vmoe_presets.VMOE_STD}
    entry = preset_table_entry(preset)
    return {"mean": tuple(entry["mean"]), "std": tuple(entry["std"])}


def _folder_normalization(folder):
    path = os.path.join(folder, "image_converter.json")
    config = read_json(path)
    try:
        inner = config["config"]
        scale, offset = inner["scale"], inner["offset"]
        if not isinstance(scale, (list, tuple)):
            scale = [scale] * 3
        if not isinstance(offset, (list, tuple)):
            offset = [offset or 0.0] * 3
        std = tuple(1.0 / (255.0 * float(s)) for s in scale)
        mean = tuple(-float(o) * s for o, s in zip(offset, std))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        raise ValueError(
            f"Cannot read a (scale, offset) normalisation from {path!r}: "
            f"{error!r}"
        ) from None
    return {"mean": mean, "std": std}


# === Folders ===
def read_json(path):
    """Parses a JSON file; any failure raises a ValueError naming `path`."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"File not found: {path!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path!r} is not a readable JSON file: {error}"
        ) from None


def _task_weights_needed(load_weights, kwargs):
    # KerasHub loads the head only when `num_classes` is not given.
    return load_weights and kwargs.get("num_classes") is None


def check_preset_dir(preset, task, load_weights=True, **kwargs):
    """Checks a local preset folder before KerasHub reads it.

    Args:
        preset: the folder.
        task: True when a task (classifier) is loaded from it.
        load_weights: whether weights will be loaded.
        **kwargs: the `from_preset` keyword arguments (`num_classes` given
            means a new head, so `task.weights.h5` is not needed).

    Raises:
        FileNotFoundError: naming a missing `config.json`, or a missing
            `task.weights.h5` when the head would be loaded from it.
        ValueError: naming a file that is not valid JSON / HDF5, or both
            files when `config.json` and `task.json` describe different
            backbones.
    """
    from keras_vmoe.converters.common import check_h5_file

    preset = shipped_preset_dir(preset) or preset
    if not (isinstance(preset, str) and os.path.isdir(preset)):
        return
    config_path = os.path.join(preset, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{CONFIG_FILE!r} is missing from the preset folder. Received: "
            f"preset={preset!r}"
        )
    for name in sorted(os.listdir(preset)):
        path = os.path.join(preset, name)
        if name.endswith(".json"):
            read_json(path)
        elif name.endswith(".h5") and load_weights:
            check_h5_file(path)
    task_path = os.path.join(preset, TASK_CONFIG_FILE)
    if not (task and os.path.exists(task_path)):
        return
    task_weights = os.path.join(preset, TASK_WEIGHTS_FILE)
    if _task_weights_needed(load_weights, kwargs) and not os.path.exists(
        task_weights
    ):
        raise FileNotFoundError(
            f"{task_weights!r} is missing: the classifier's head would be "
            "left at its random initialisation. Restore the file, or pass "
            "`num_classes=...` to build a new head on purpose (or "
            "`load_weights=False`)."
        )
    _check_backbone_configs(config_path, task_path)


def _check_backbone_configs(config_path, task_path):
    backbone = read_json(config_path)
    task_backbone = read_json(task_path).get("config", {}).get("backbone")
    if not isinstance(task_backbone, dict):
        return
    ours, theirs = backbone.get("config", {}), task_backbone.get("config", {})
    different = sorted(
        key
        for key in set(ours) | set(theirs)
        if key != "name" and ours.get(key) != theirs.get(key)
    )
    if different or backbone.get("class_name") != task_backbone.get(
        "class_name"
    ):
        details = {
            key: (ours.get(key), theirs.get(key)) for key in different[:8]
        }
        raise ValueError(
            f"The backbone in {config_path!r} and in {task_path!r} differ "
            f"(one was edited?): (config.json, task.json) values {details}. "
            "Make both describe the same backbone."
        )


def _wrap_loading_errors(preset, call):
    try:
        return call()
    except OSError as error:
        raise ValueError(
            f"Could not read the preset folder {preset!r}: {error}"
        ) from error


def load_classifier(preset, **kwargs):
    """Loads a keras-vmoe classifier preset folder, with the checks above.

    The checked counterpart of `keras_hub.models.ImageClassifier.
    from_preset(folder)`, for folders written by `save_to_preset` (which
    runs the checks only through our classes' `from_preset`). A shipped
    preset name (`vimoe_mnist`, ...) loads its installed folder; a preset
    name of the architecture tables goes to its family's `from_preset`.
    """
    import keras_hub

    preset = shipped_preset_dir(preset) or preset
    if isinstance(preset, str) and not _is_handle_or_path(preset):
        preset_table_entry(preset)  # raises for an unknown name
        for family, (table, _) in _families().items():
            if preset in table:
                classifier = registry.family_class(family, "classifier")
                return classifier.from_preset(preset, **kwargs)
    check_preset_dir(preset, task=True, **kwargs)
    return _wrap_loading_errors(
        preset,
        lambda: keras_hub.models.ImageClassifier.from_preset(preset, **kwargs),
    )


# === Saving ===
_saving = []


class PresetSavingMixin:
    """Atomic `save_to_preset`, without optimizer state, for our models.

    The preset is written into a temporary sibling folder that replaces
    `preset_dir` once complete: an interrupted save leaves the old preset
    (or nothing), never a mix. Files of an existing preset that the save
    does not write (`CARRIED_FILES`: `labels.json`) are carried over.
    `save_task_weights` leaves the optimizer out (`task.weights.h5` holds
    the head only); `save_weights` is Keras' (it keeps the optimizer state,
    which `BackupAndRestore` relies on).
    """

    def save_to_preset(self, preset_dir, max_shard_size=10):
        if _saving:  # a task saving its backbone into the same folder
            return super().save_to_preset(
                preset_dir, max_shard_size=max_shard_size
            )
        preset_dir = os.fspath(preset_dir)
        _saving.append(preset_dir)
        try:
            with atomic_directory(preset_dir) as folder:
                super().save_to_preset(folder, max_shard_size=max_shard_size)
                _carry_over(preset_dir, folder)
        finally:
            _saving.pop()

    def save_task_weights(self, filepath):
        """Saves the task's own weights; never the optimizer's state."""
        if not str(filepath).endswith(".weights.h5"):
            raise ValueError(
                "The filename must end in `.weights.h5`. Received: "
                f"filepath={filepath}"
            )
        skipped = list(self.backbone._flatten_layers())
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            skipped.append(optimizer)
        keras.saving.save_weights(
            self, filepath=filepath, objects_to_skip=skipped
        )

    def load_task_weights(self, filepath):
        """Loads the task's own weights; an optimizer state in the file
        (older presets) is ignored, the model's optimizer left as is."""
        if not str(filepath).endswith(".weights.h5"):
            raise ValueError(
                "The filename must end in `.weights.h5`. Received: "
                f"filepath={filepath}"
            )
        skipped = list(self.backbone._flatten_layers())
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            skipped.append(optimizer)
        try:
            keras.saving.load_weights(
                self, filepath, objects_to_skip=skipped
            )
        except OSError as error:
            raise ValueError(
                f"Cannot read the task weights {os.fspath(filepath)!r}: "
                f"{error}"
            ) from None


# keras-vmoe files that KerasHub does not write, kept across re-saves.
CARRIED_FILES = ("labels.json",)


def _carry_over(old, new):
    """Copies `CARRIED_FILES` of the old preset that the new save lacks."""
    import shutil

    for name in CARRIED_FILES:
        source, target = os.path.join(old, name), os.path.join(new, name)
        if os.path.isfile(source) and not os.path.exists(target):
            shutil.copy2(source, target)
