"""Checked preset loading and atomic preset saving for both model families.

- Names: an unknown preset name gets a ValueError naming it, its close
  matches, `keras_vmoe.models.list_presets()` and, for a name of the other
  family, the class to use (instead of KerasHub's generic message).
- Folders (`check_preset_dir`): every JSON file must parse, every `.h5`
  must be a readable HDF5 file (a Git-LFS pointer or a truncated copy is
  named), a classifier preset whose head would be loaded must have
  `task.weights.h5`, and the backbone config in `task.json` must equal
  `config.json`. Every error names the file.
- Manifest: `save_to_preset` records every file it wrote (size and
  SHA-256) in `manifest.json`; loading a folder that has one refuses a file
  that differs from the record (a partial copy from another save, a
  truncated or edited file), a recorded file that is missing, and a
  `.json` / `.h5` file the save did not write. `labels.json` is not
  recorded (the CLI writes it after the save). A folder without
  `manifest.json` (saved before manifests) loads with the other checks.
- Through KerasHub (`keras_hub.models.ImageClassifier.from_preset(folder)`,
  `keras_hub.models.Backbone.from_preset(folder)`), which does not call
  our `from_preset`, the same checks run from the methods its loader calls
  on our classes (`PresetLoadingMixin`, `PresetAssetsCheckMixin`), and
  `install_json_error_names` makes its JSON errors name the file.
- Saving (`PresetSavingMixin`): `save_to_preset` writes into a temporary
  sibling folder that replaces the destination only once complete, and
  never writes optimizer state.
"""

import contextlib
import contextvars
import difflib
import hashlib
import json
import os
import re
import weakref

import keras

from keras_vmoe.models import registry
from keras_vmoe.models.shipped import SHIPPED_PRESETS
from keras_vmoe.models.shipped import shipped_preset_dir
from keras_vmoe.utils.io import atomic_directory
from keras_vmoe.utils.io import atomic_file

CONFIG_FILE = "config.json"
TASK_CONFIG_FILE = "task.json"
TASK_WEIGHTS_FILE = "task.weights.h5"
MODEL_WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_CONFIG_FILE = "model.weights.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "keras-vmoe-preset-manifest"
MANIFEST_VERSION = 1


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
        FileNotFoundError: naming a missing `config.json`, a missing
            `task.weights.h5` when the head would be loaded from it, or a
            file that `manifest.json` records and the folder lacks.
        ValueError: naming a file that is not valid JSON / HDF5, both
            files when `config.json` and `task.json` describe different
            backbones, or a file that differs from its `manifest.json`
            record (or is not in it).
    """
    preset = shipped_preset_dir(preset) or preset
    if not (isinstance(preset, str) and os.path.isdir(preset)):
        return
    _check_folder(
        preset,
        task=task,
        load_weights=load_weights,
        head_needed=task and _task_weights_needed(load_weights, kwargs),
    )


def _check_folder(preset, task, load_weights, head_needed):
    from keras_vmoe.converters.common import check_h5_file

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
    if task and os.path.exists(task_path):
        task_weights = os.path.join(preset, TASK_WEIGHTS_FILE)
        if head_needed and not os.path.exists(task_weights):
            raise _missing_head_error(task_weights)
        _check_backbone_configs(config_path, task_path)
    # A missing `task.weights.h5` is an error only when the head would be
    # loaded (above, or `_before_backbone_weights`).
    check_manifest(preset, allow_missing=(TASK_WEIGHTS_FILE,))


def _missing_head_error(task_weights):
    return FileNotFoundError(
        f"{task_weights!r} is missing: the classifier's head would be "
        "left at its random initialisation. Restore the file, or pass "
        "`num_classes=...` to build a new head on purpose (or "
        "`load_weights=False`)."
    )


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
    """Runs `call` (KerasHub's loading of a folder that `check_preset_dir`
    has just checked, so the loader-side checks skip it)."""
    folder = shipped_preset_dir(preset) or preset
    try:
        with _checked_folder(folder):
            return call()
    except OSError as error:
        raise ValueError(
            f"Could not read the preset folder {preset!r}: {error}"
        ) from error


# === Manifest ===
_SHA256 = re.compile(r"[0-9a-f]{64}")
# (path, size, mtime, ctime, inode) -> SHA-256: a file is hashed once while
# it stays unchanged (the loader-side checks may run more than once).
_digests = {}


def _sha256(path):
    stat = os.stat(path)
    key = (
        os.path.abspath(path),
        stat.st_size,
        stat.st_mtime_ns,
        stat.st_ctime_ns,
        stat.st_ino,
    )
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        if len(_digests) > 256:
            _digests.clear()
        _digests[key] = digest.hexdigest()
    return _digests[key]


def _recorded_names(folder):
    """Relative "/"-separated names of the files a manifest records: all
    files under `folder` except the manifest, `CARRIED_FILES` and hidden
    files (temporary files of atomic writes)."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        relative = os.path.relpath(root, folder)
        for name in sorted(files):
            if name.startswith("."):
                continue
            if relative == ".":
                if name == MANIFEST_FILE or name in CARRIED_FILES:
                    continue
                names.append(name)
            else:
                names.append("/".join([*relative.split(os.sep), name]))
    return names


def write_manifest(folder):
    """Writes `folder/manifest.json`: size and SHA-256 of every file.

    `save_to_preset` calls it on the complete preset, before the folder is
    moved into place. Not recorded: `manifest.json` itself,
    `CARRIED_FILES` (`labels.json`) and hidden files.
    """
    files = {}
    for name in _recorded_names(folder):
        path = os.path.join(folder, *name.split("/"))
        files[name] = {
            "size": os.path.getsize(path),
            "sha256": _sha256(path),
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "files": files,
    }
    with atomic_file(os.path.join(folder, MANIFEST_FILE), "w") as file:
        json.dump(manifest, file, indent=2, sort_keys=True)
        file.write("\n")


def read_manifest(folder):
    """The `files` table of `folder/manifest.json`, or None without one.

    Raises:
        ValueError: naming the manifest if it is not valid JSON or not a
            keras-vmoe manifest.
    """
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    manifest = read_json(path)

    def invalid(what):
        return ValueError(
            f"{path!r} is not a valid keras-vmoe preset manifest ({what})."
        )

    if not isinstance(manifest, dict):
        raise invalid("not a JSON object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise invalid(f"format {manifest.get('format')!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise invalid(f"unsupported version {manifest.get('version')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise invalid("no `files` table")
    for name, entry in files.items():
        parts = name.split("/")
        if not name or any(part in ("", ".", "..") for part in parts):
            raise invalid(f"bad file name {name!r}")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        ):
            raise invalid(f"bad entry for {name!r}: {entry!r}")
    return files


def check_manifest(folder, allow_missing=()):
    """Checks `folder` against its `manifest.json` (if it has one).

    Every recorded file must be there (except names in `allow_missing`)
    with the recorded size and SHA-256, and every `.json` / `.h5` file
    that KerasHub could read must be recorded.

    Returns:
        True if the folder has a manifest (and passed), False if not.

    Raises:
        FileNotFoundError: naming a recorded file that is missing.
        ValueError: naming a file that differs from its record, or an
            unrecorded `.json` / `.h5` file.
    """
    files = read_manifest(folder)
    if files is None:
        return False
    manifest = os.path.join(folder, MANIFEST_FILE)
    mixed = (
        "the folder mixes files of different saves (a partial copy over "
        "another preset?) or the file was changed after the save. Copy "
        "the whole preset folder again."
    )
    for name, entry in sorted(files.items()):
        path = os.path.join(folder, *name.split("/"))
        if not os.path.isfile(path):
            if name in allow_missing:
                continue
            raise FileNotFoundError(
                f"{path!r} is missing: {manifest!r} records it as part of "
                "the saved preset. Copy the whole preset folder again."
            )
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise ValueError(
                f"{path!r} has {size} bytes, not the {entry['size']} that "
                f"{manifest!r} records: {mixed}"
            )
        if _sha256(path) != entry["sha256"]:
            raise ValueError(
                f"{path!r} is not the file that {manifest!r} records (its "
                f"SHA-256 differs): {mixed}"
            )
    for name in _recorded_names(folder):
        if name not in files and name.endswith((".json", ".h5")):
            path = os.path.join(folder, *name.split("/"))
            raise ValueError(
                f"{path!r} is not in {manifest!r}: it was not written by "
                "the save that wrote the manifest (copied in from another "
                "preset?). Remove it, or copy the whole preset folder again."
            )
    return True


# === Checks from inside KerasHub's loader ===
# `keras_hub.models.ImageClassifier.from_preset(folder)` and
# `keras_hub.models.Backbone.from_preset(folder)` do not call our
# `from_preset`. Their loader (`KerasPresetLoader` in keras_hub 0.32) builds
# the model with `from_config`, then calls methods of ours with the
# folder's paths: `preprocessor.load_preset_assets(folder)` (a task with a
# preprocessor), `task.load_task_weights(folder/task.weights.h5)` (the head,
# unless `num_classes` is given) and `backbone.load_weights(folder/
# model.weights.h5)`; the checks run there, before any weight is read. A
# folder that `check_preset_dir` has checked (our `from_preset`,
# `load_classifier`) is not checked again.
_checked = contextvars.ContextVar("keras_vmoe_checked_presets", default=())


@contextlib.contextmanager
def _checked_folder(folder):
    if not (isinstance(folder, str) and os.path.isdir(folder)):
        yield
        return
    token = _checked.set(_checked.get() + (os.path.realpath(folder),))
    try:
        yield
    finally:
        _checked.reset(token)


def _is_checked(folder):
    return os.path.realpath(folder) in _checked.get()


def _preset_folder_of(filepath, names):
    """The preset folder holding `filepath` if it is one of `names` there."""
    if not isinstance(filepath, (str, os.PathLike)):
        return None
    filepath = os.fspath(filepath)
    folder = os.path.dirname(filepath) or "."
    if os.path.basename(filepath) not in names:
        return None
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        return None
    return folder


def _loader_check(folder, task, load_weights):
    if folder is None or _is_checked(folder):
        return
    _check_folder(
        folder, task=task, load_weights=load_weights, head_needed=False
    )


def _before_backbone_weights(backbone, filepath):
    """KerasHub is about to load `filepath` into `backbone`.

    For the backbone of a classifier just built by `from_config` (the
    loader's order: config, head weights, backbone weights) whose head was
    not loaded, a missing `task.weights.h5` is an error unless the
    classifier's `num_classes` differs from the saved one (a new head on
    purpose; KerasHub's loader does not pass on whether `num_classes` was
    given, so an equal count is taken as "load the head").
    """
    link = getattr(backbone, "_preset_task", None)
    task = link() if link is not None else None
    if link is not None:
        backbone._preset_task = None  # only the first load after from_config
    folder = _preset_folder_of(
        filepath, (MODEL_WEIGHTS_FILE, SHARDED_WEIGHTS_CONFIG_FILE)
    )
    if folder is None or _is_checked(folder):
        return
    task_path = os.path.join(folder, TASK_CONFIG_FILE)
    task_weights = os.path.join(folder, TASK_WEIGHTS_FILE)
    if (
        task is not None
        and not getattr(task, "_preset_head_loaded", False)
        and os.path.exists(task_path)
        and not os.path.exists(task_weights)
    ):
        saved = read_json(task_path).get("config", {}).get("num_classes")
        if saved == getattr(task, "num_classes", None):
            raise _missing_head_error(task_weights)
    _loader_check(folder, task=task is not None, load_weights=True)


class PresetLoadingMixin:
    """Runs the folder checks from the methods KerasHub's loader calls.

    For backbones: `load_weights` of a preset folder's `model.weights.h5`.
    For classifiers: `from_config` links the backbone to its classifier
    (for the missing-head check), `load_task_weights` (in
    `PresetSavingMixin`) checks the folder of `task.weights.h5`.
    """

    @classmethod
    def from_config(cls, config):
        model = super().from_config(config)
        backbone = getattr(model, "backbone", None)
        if isinstance(backbone, PresetLoadingMixin):
            model._preset_head_loaded = False
            backbone._preset_task = weakref.ref(model)
        return model

    def load_weights(self, filepath, *args, **kwargs):
        _before_backbone_weights(self, filepath)
        return super().load_weights(filepath, *args, **kwargs)


class PresetAssetsCheckMixin:
    """For preprocessors: KerasHub's loader calls `load_preset_assets(
    folder)` once it has built a task from the folder's `task.json`; the
    folder is checked there (JSON files, `config.json` against
    `task.json`, the manifest), before any weight is loaded."""

    def load_preset_assets(self, preset):
        if isinstance(preset, str) and os.path.isdir(preset):
            _loader_check(preset, task=True, load_weights=False)
        return super().load_preset_assets(preset)


def install_json_error_names():
    """Makes KerasHub's preset JSON errors name the file.

    KerasHub parses `config.json` (`preset_utils.load_json`) before it
    knows which class the folder holds, so no method of ours runs first,
    and `json.JSONDecodeError` names no file. The wrapper re-raises the
    same exception type with the path in its message; valid files load
    exactly as before. Installed once, when `keras_vmoe.models` is
    imported.
    """
    from keras_hub.src.utils import preset_utils

    original = preset_utils.load_json
    if getattr(original, "_keras_vmoe_names_files", False):
        return

    def load_json(preset, config_file=CONFIG_FILE):
        try:
            return original(preset, config_file)
        except json.JSONDecodeError as error:
            path = config_file
            if isinstance(preset, str) and os.path.isdir(preset):
                path = os.path.join(preset, config_file)
            raise json.JSONDecodeError(
                f"{path!r} is not a readable JSON file: {error.msg}",
                error.doc,
                error.pos,
            ) from None
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{config_file!r} of the preset {preset!r} is not a "
                f"readable JSON file: {error}"
            ) from None

    load_json._keras_vmoe_names_files = True
    preset_utils.load_json = load_json


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
    (or nothing), never a mix. The last file written is `manifest.json`
    (`write_manifest`). Files of an existing preset that the save
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
                write_manifest(folder)
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
        _loader_check(
            _preset_folder_of(filepath, (TASK_WEIGHTS_FILE,)),
            task=True,
            load_weights=True,
        )
        self._preset_head_loaded = True
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
