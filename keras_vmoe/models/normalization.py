"""Input normalisation of the pretrained checkpoints, shared by the families.

Each checkpoint expects images in [0, 255] mapped to `(x / 255 - mean) /
std`, with the statistics it was trained with (timm records them in each
model's `pretrained_cfg`):
- ImageNet statistics (`IMAGENET_MEAN`, `IMAGENET_STD`): DINOv2, timm and
  keras.applications ConvNeXt;
- mean = std = 0.5 (`INCEPTION_MEAN`, `INCEPTION_STD`, timm's
  `IMAGENET_INCEPTION_*`): the timm AugReg ViT-S/16 and ViT-B/16
  (`vit_*_patch16_224.augreg*`), timm's `_cfg` default for these ViTs.

Every preset records its pair (`PRESETS[name]["mean"]`, `["std"]`);
`keras_vmoe.models.preset_normalization(name)` returns it.
"""

import math

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def _statistics(name, values):
    """`values` as 3 floats, or a ValueError naming `name`."""
    try:
        result = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        result = ()
    if len(result) != 3:
        raise ValueError(
            f"`{name}` must be 3 numbers (one per RGB channel). "
            f"Received: {name}={values!r}"
        )
    return result


def normalization_scale_offset(mean, std):
    """`(scale, offset)` with `x * scale + offset == (x / 255 - mean) / std`."""
    mean, std = _statistics("mean", mean), _statistics("std", std)
    if not all(math.isfinite(value) for value in mean + std) or not all(
        value > 0 for value in std
    ):
        raise ValueError(
            "`mean` must be finite and `std` finite and positive. "
            f"Received: mean={mean!r}, std={std!r}"
        )
    scale = [1.0 / (255.0 * s) for s in std]
    offset = [-m / s for m, s in zip(mean, std)]
    return scale, offset


class ImageNetConverterMixin:
    """Adds `Converter.normalized(...)` / `.imagenet(...)` to a KerasHub
    `ImageConverter`.

    The converters map images in [0, 255] to `(x / 255 - mean) / std`.
    Images are channels-last whatever `keras.config.image_data_format()`
    says, as the models are.
    """

    def __init__(self, *args, data_format=None, **kwargs):
        if data_format not in (None, "channels_last"):
            raise ValueError(
                "keras-vmoe models take channels-last images: `data_format` "
                "must be None or 'channels_last'. Received: "
                f"data_format={data_format!r}"
            )
        super().__init__(*args, data_format="channels_last", **kwargs)

    @classmethod
    def normalized(cls, image_size=(224, 224), mean=None, std=None, **kwargs):
        """Converter with `(x / 255 - mean) / std` (bicubic resize).

        Args:
            image_size: output `(height, width)`.
            mean, std: per-channel statistics in [0, 1] units; default
                ImageNet's.
        """
        mean = IMAGENET_MEAN if mean is None else mean
        std = IMAGENET_STD if std is None else std
        scale, offset = normalization_scale_offset(mean, std)
        kwargs.setdefault("interpolation", "bicubic")
        return cls(image_size=image_size, scale=scale, offset=offset, **kwargs)

    @classmethod
    def imagenet(cls, image_size=(224, 224), **kwargs):
        """Converter with ImageNet normalisation: `(x / 255 - mean) / std`."""
        return cls.normalized(
            image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs
        )
