"""MoE-ConvNeXt: hierarchical and isotropic ConvNeXt with MoE blocks."""

from keras_vmoe.models.convnext_moe import preset_builder as _preset_builder
from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe.backbone import moe_block_indices
from keras_vmoe.models.convnext_moe.image_classifier import (
    ConvNeXtMoEImageClassifier,
)
from keras_vmoe.models.convnext_moe.image_classifier_preprocessor import (
    ConvNeXtMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.convnext_moe.image_converter import (
    ConvNeXtMoEImageConverter,
)
from keras_vmoe.models.convnext_moe.layers import ConvNeXtBlock

# `ConvNeXtMoEBackbone.from_preset(name)` and `ConvNeXtMoEImageClassifier.
# from_preset(name)` build the table presets with these builders.
_preset_builder.register()

__all__ = [
    "ConvNeXtBlock",
    "ConvNeXtMoEBackbone",
    "ConvNeXtMoEImageClassifier",
    "ConvNeXtMoEImageClassifierPreprocessor",
    "ConvNeXtMoEImageConverter",
    "moe_block_indices",
]
