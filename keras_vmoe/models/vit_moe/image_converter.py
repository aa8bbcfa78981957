"""Image converter (resize + normalise) of the ViT-MoE models."""

import keras
import keras_hub

from keras_vmoe.models.normalization import ImageNetConverterMixin
from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ViTMoEImageConverter(
    ImageNetConverterMixin, keras_hub.layers.ImageConverter
):
    """Resizes and normalises images for a `ViTMoEBackbone`.

    A KerasHub `ImageConverter`; `ViTMoEImageConverter.normalized(size,
    mean, std)` gives `(x / 255 - mean) / std` for images in [0, 255]
    (`.imagenet(size)`: ImageNet statistics, as DINOv2; the timm AugReg
    ViT-S/16 and ViT-B/16 use mean = std = 0.5, see
    `keras_vmoe.models.preset_normalization`).
    """

    backbone_cls = ViTMoEBackbone
