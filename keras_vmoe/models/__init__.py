"""Model families and the functions that describe them."""

from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.models.convnext_moe.presets import (
    PRESETS as _CONVNEXT_MOE_PRESETS,
)
from keras_vmoe.models.inference import set_eval_group_size
from keras_vmoe.models.lora import freeze_routers
from keras_vmoe.models.lora import merge_lora
from keras_vmoe.models.lora import set_routers_trainable
from keras_vmoe.models.preset_io import check_manifest
from keras_vmoe.models.preset_io import check_preset_dir
from keras_vmoe.models.preset_io import install_json_error_names
from keras_vmoe.models.preset_io import load_classifier
from keras_vmoe.models.preset_io import preset_normalization
from keras_vmoe.models.shipped import SHIPPED_PRESETS as _SHIPPED_PRESETS
from keras_vmoe.models.shipped import register_with_keras_hub
from keras_vmoe.models.shipped import shipped_preset_dir
from keras_vmoe.models.stats import layer_stats
from keras_vmoe.models.stats import model_stats
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier
from keras_vmoe.models.vit_moe.presets import PRESETS as _VIT_MOE_PRESETS
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS

# One table per model family: name -> preset description (config, source
# checkpoint, params, active params, FLOPs at 224x224).
_PRESET_TABLES = (_VIT_MOE_PRESETS, _CONVNEXT_MOE_PRESETS, VMOE_PRESETS)


# The trained presets installed with the package load by name through
# KerasHub too: `keras_hub.models.ImageClassifier.from_preset("vimoe_mnist")`.
register_with_keras_hub()
# KerasHub's JSON errors name the file (see `install_json_error_names`).
install_json_error_names()


def list_presets():
    """Names of all keras-vmoe presets, sorted.

    The shipped, trained presets (`vimoe_mnist`, `convnext_moe_mnist`)
    load with `keras_hub.models.ImageClassifier.from_preset(name)` or
    their family's `from_preset(name)`; the architecture presets with the
    `from_preset` of their family, e.g.
    `ViTMoEImageClassifier.from_preset(name, num_classes=...)`; the
    published V-MoE / E^3 checkpoints (`VMOE_PRESETS`) with
    `ViTMoEImageClassifier.from_preset(name)` (downloaded from their
    publisher).
    """
    names = {name for table in _PRESET_TABLES for name in table}
    return sorted(names | set(_SHIPPED_PRESETS))
