"""Image converter (resize + rescale) of the MoE-ConvNeXt models."""

import keras
from keras_hub.layers import ImageConverter

from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ConvNeXtMoEImageConverter(ImageConverter):
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

    @classmethod
    def imagenet(cls, image_size=(224, 224), **kwargs):
        """Converter with ImageNet normalisation: `(x / 255 - mean) / std`."""
        return cls(
            image_size=image_size,
            scale=[1.0 / (255.0 * std) for std in IMAGENET_STD],
            offset=[
                -mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)
            ],
            interpolation="bicubic",
            **kwargs,
        )
