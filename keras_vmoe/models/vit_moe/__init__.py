"""ViMoE and Sweet-spot ViT-MoE: DINOv2-style ViTs with MoE blocks."""

from keras_vmoe.models.vit_moe import preset_builder as _preset_builder
from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone
from keras_vmoe.models.vit_moe.backbone import resolve_moe_layers
from keras_vmoe.models.vit_moe.image_classifier import ViTMoEImageClassifier
from keras_vmoe.models.vit_moe.image_classifier_preprocessor import (
    ViTMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vit_moe.image_converter import ViTMoEImageConverter

# `ViTMoEBackbone.from_preset(name)` and `ViTMoEImageClassifier.
# from_preset(name)` build the table presets with these builders.
_preset_builder.register()
