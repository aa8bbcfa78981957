"""ImageNet normalisation shared by the model families' image converters."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetConverterMixin:
    """Adds `Converter.imagenet(image_size)` to a KerasHub `ImageConverter`.

    The timm / DINOv2 / keras.applications checkpoints expect images in
    [0, 255] mapped to `(x / 255 - mean) / std` with ImageNet statistics.
    """

    @classmethod
    def imagenet(cls, image_size=(224, 224), **kwargs):
        """Converter with ImageNet normalisation: `(x / 255 - mean) / std`."""
        return cls(
            image_size=image_size,
            scale=[1.0 / (255.0 * std) for std in IMAGENET_STD],
            offset=[-mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD)],
            interpolation="bicubic",
            **kwargs,
        )
