"""Preprocessor of `ViTMoEImageClassifier`."""

import keras
import keras_hub

from keras_vmoe.models import preset_io
from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone
from keras_vmoe.models.vit_moe.image_converter import ViTMoEImageConverter


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ViTMoEImageClassifierPreprocessor(
    preset_io.PresetAssetsCheckMixin,
    keras_hub.models.ImageClassifierPreprocessor,
):
    """Preprocessor of `ViTMoEImageClassifier` (wraps the image converter)."""

    backbone_cls = ViTMoEBackbone
    image_converter_cls = ViTMoEImageConverter
