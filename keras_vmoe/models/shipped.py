"""Trained presets installed with the package, loadable by name.

The folders under `keras_vmoe/presets_data/` (see its `MANIFEST.md`) are
KerasHub presets. Importing `keras_vmoe` registers each name with
KerasHub (`keras_hub.src.utils.preset_utils.register_presets`, the
mechanism of KerasHub's own built-in presets, with the installed folder as
the handle), so after a plain `pip install` both

    keras_hub.models.ImageClassifier.from_preset("vimoe_mnist")
    keras_vmoe.models.ViTMoEImageClassifier.from_preset("vimoe_mnist")

load the trained classifier, and `keras_vmoe.models.list_presets()` lists
the names.
"""

import os

from keras_vmoe.models import registry

PRESETS_DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "presets_data",
)

# name -> (family, description).
SHIPPED_PRESETS = {
    "vimoe_mnist": (
        "ViTMoE",
        "ViMoE (6 blocks, d 64, MoE in the last 2, image routing, shared "
        "expert) trained on MNIST 28x28: 98.56 % test accuracy.",
    ),
    "convnext_moe_mnist": (
        "ConvNeXtMoE",
        "MoE-ConvNeXt (3 stages, Last-2 MoE, token routing) trained on "
        "MNIST 28x28: 98.98 % test accuracy.",
    ),
}


def shipped_preset_dir(preset):
    """The installed folder of a shipped preset name, else None.

    Raises:
        FileNotFoundError: for a shipped name whose folder is missing from
            the installation (a package built without its data files).
    """
    if not (isinstance(preset, str) and preset in SHIPPED_PRESETS):
        return None
    folder = os.path.join(PRESETS_DATA, preset)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"The shipped preset {preset!r} is missing from the installed "
            f"package: no {os.path.join(folder, 'config.json')!r}. Reinstall "
            "keras-vmoe from a wheel or source tree that includes "
            "`keras_vmoe/presets_data/`."
        )
    return folder


def register_with_keras_hub():
    """Registers the shipped names as KerasHub built-in presets.

    Run by `keras_vmoe.models` once both families are registered
    (`keras_vmoe.models.registry`).
    """
    from keras_hub.src.utils.preset_utils import register_presets

    for name, (family, description) in SHIPPED_PRESETS.items():
        entry = {
            "metadata": {
                "description": description,
                "path": name,
                "model_card": None,
            },
            # KerasHub maps a registered name to this handle; a local
            # folder is a valid one.
            "kaggle_handle": os.path.join(PRESETS_DATA, name),
        }
        register_presets(
            {name: entry}, registry.family_class(family, "backbone")
        )
