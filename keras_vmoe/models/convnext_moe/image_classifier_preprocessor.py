"""Preprocessor of `ConvNeXtMoEImageClassifier`."""

import keras
from keras_hub.models import ImageClassifierPreprocessor

from keras_vmoe.models import preset_io
from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe.image_converter import (
    ConvNeXtMoEImageConverter,
)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ConvNeXtMoEImageClassifierPreprocessor(
    preset_io.PresetAssetsCheckMixin, ImageClassifierPreprocessor
):
    """Image classifier preprocessor wrapping a `ConvNeXtMoEImageConverter`.

    Args:
        image_converter: a `ConvNeXtMoEImageConverter`, or None.

    Example:
    >>> preprocessor = ConvNeXtMoEImageClassifierPreprocessor(
    ...     ConvNeXtMoEImageConverter(image_size=(64, 64), scale=1 / 255)
    ... )
    """

    backbone_cls = ConvNeXtMoEBackbone
    image_converter_cls = ConvNeXtMoEImageConverter
