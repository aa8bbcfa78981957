"""Image converter (resize + rescale) of the MoE-ConvNeXt models."""

import keras
from keras_hub.layers import ImageConverter

from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone
from keras_vmoe.models.normalization import ImageNetConverterMixin


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ConvNeXtMoEImageConverter(ImageNetConverterMixin, ImageConverter):
    """Resizes and rescales images for `ConvNeXtMoEBackbone`.

    ConvNeXt checkpoints (keras.applications with
    `include_preprocessing=False`, timm) expect images in [0, 255]
    normalised with ImageNet statistics: `ConvNeXtMoEImageConverter.imagenet()`.
    See `keras_hub.layers.ImageConverter` for the arguments.

    Example:
    >>> converter = ConvNeXtMoEImageConverter(
    ...     image_size=(64, 64), scale=1 / 255
    ... )
    >>> converter(np.ones((1, 80, 80, 3)) * 255).shape
    (1, 64, 64, 3)
    """

    backbone_cls = ConvNeXtMoEBackbone
