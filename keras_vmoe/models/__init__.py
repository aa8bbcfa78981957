"""Model families and the functions that describe them."""

from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.models.convnext_moe.presets import (
    PRESETS as _CONVNEXT_MOE_PRESETS,
)
from keras_vmoe.models.preset_io import check_preset_dir
from keras_vmoe.models.preset_io import load_classifier
from keras_vmoe.models.preset_io import preset_normalization
from keras_vmoe.models.stats import layer_stats
from keras_vmoe.models.stats import model_stats
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier
from keras_vmoe.models.vit_moe.presets import PRESETS as _VIT_MOE_PRESETS

# One table per model family: name -> preset description (config, source
# checkpoint, params, active params, FLOPs at 224x224).
_PRESET_TABLES = (_VIT_MOE_PRESETS, _CONVNEXT_MOE_PRESETS)


def list_presets():
    """Names of all keras-vmoe presets, sorted.

    Each name loads with the `from_preset` of its family, e.g.
    `ViTMoEImageClassifier.from_preset(name, num_classes=...)`.
    """
    return sorted(name for table in _PRESET_TABLES for name in table)
