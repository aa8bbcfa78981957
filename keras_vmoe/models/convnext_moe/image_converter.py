"""Image converter (resize + rescale) of the MoE-ConvNeXt models."""

import keras
from keras_hub.layers import ImageConverter

from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ConvNeXtMoEImageConverter(ImageConverter):
    """Resizes and rescales images for `ConvNeXtMoEBackbone`.

    ConvNeXt checkpoints expect ImageNet normalisation:
    `scale=[1 / (255 * 0.229), 1 / (255 * 0.224), 1 / (255 * 0.225)]`,
    `offset=[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]`.
    See `keras_hub.layers.ImageConverter` for the arguments.

    Example:
    >>> converter = ConvNeXtMoEImageConverter(
    ...     image_size=(64, 64), scale=1 / 255
    ... )
    >>> converter(np.ones((1, 80, 80, 3)) * 255).shape
    (1, 64, 64, 3)
    """

    backbone_cls = ConvNeXtMoEBackbone
