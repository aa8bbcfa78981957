"""Small architectures for the embedded data (MNIST 28x28) and how to build
any keras-vmoe classifier by name.

`build_classifier(name, num_classes, image_size)` accepts:
- a small recipe (`SMALL_MODELS`): "vimoe_mnist" (ViMoE: image routing from
  the CLS token, top-1, shared expert, MoE in the last 2 of 6 blocks) or
  "convnext_moe_mnist" (MoE-ConvNeXt with three stages, token routing,
  top-1, Last-2 placement, the Sweet-spot skip connection; the
  `keras-vmoe train` default: it converges in fewer CPU minutes);
- a preset name from `keras_vmoe.models.list_presets()` (the ImageNet
  architectures; `pretrained=True` loads the dense checkpoint and upcycles);
- a directory written by `save_to_preset`.
"""

import os

from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.models.convnext_moe.image_classifier_preprocessor import (
    ConvNeXtMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.convnext_moe.image_converter import (
    ConvNeXtMoEImageConverter,
)
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier
from keras_vmoe.models.vit_moe.image_classifier import (
    ViTMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.vit_moe.image_classifier import ViTMoEImageConverter
from keras_vmoe.validation import check_int


def _vimoe_mnist(num_classes, image_size, group_size=None):
    backbone = ViTMoEBackbone(
        image_shape=(image_size, image_size, 3),
        patch_size=4,
        num_layers=6,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        drop_path_rate=0.05,
        moe_layers="last-2",
        num_experts=4,
        top_k=1,
        routing="image",
        shared_expert=True,
        capacity_factor=None,
        eval_capacity_factor=None,
        group_size=group_size,
    )
    preprocessor = ViTMoEImageClassifierPreprocessor(
        ViTMoEImageConverter(image_size=(image_size, image_size), scale=1 / 255)
    )
    return ViTMoEImageClassifier(
        backbone, num_classes=num_classes, preprocessor=preprocessor
    )


def _convnext_moe_mnist(num_classes, image_size, group_size=None):
    backbone = ConvNeXtMoEBackbone(
        depths=[2, 2, 2],
        hidden_dims=[32, 64, 128],
        patch_size=2,
        drop_path_rate=0.05,
        moe_layers="last-2",
        num_experts=4,
        top_k=1,
        expert_mlp_ratio=2,
        image_shape=(image_size, image_size, 3),
        group_size=group_size,
    )
    preprocessor = ConvNeXtMoEImageClassifierPreprocessor(
        ConvNeXtMoEImageConverter(
            image_size=(image_size, image_size), scale=1 / 255
        )
    )
    return ConvNeXtMoEImageClassifier(
        backbone, num_classes=num_classes, preprocessor=preprocessor
    )


SMALL_MODELS = {
    "vimoe_mnist": _vimoe_mnist,
    "convnext_moe_mnist": _convnext_moe_mnist,
}


def _preset_family(name):
    from keras_vmoe.models.convnext_moe import presets as convnext_presets
    from keras_vmoe.models.vit_moe import presets as vit_presets

    from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS

    if name in vit_presets.PRESETS or name in VMOE_PRESETS:
        return ViTMoEImageClassifier
    if name in convnext_presets.PRESETS:
        return ConvNeXtMoEImageClassifier
    return None


def build_classifier(
    name,
    num_classes,
    image_size=28,
    pretrained=False,
    group_size=None,
    checkpoint=None,
):
    """A classifier from a small recipe, a preset name or a preset folder.

    Args:
        name: see the module docstring.
        num_classes: classes of the task (ignored for a saved preset, which
            keeps its head).
        image_size: input side for the small recipes.
        pretrained: for preset names, load the dense checkpoint (from the
            Hugging Face hub or its cache) and upcycle it.
        group_size: routing groups of every MoE layer (items per group:
            images for image routing, tokens for token routing), e.g. for
            expert parallelism. Small recipes and preset names of both
            families (not a saved preset folder).
        checkpoint: for a published V-MoE / E^3 name, a local copy of its
            checkpoint (prefix or folder) instead of the download.

    Raises:
        ValueError: for an unknown name.
    """
    check_int("num_classes", num_classes)
    check_int("image_size", image_size)
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(
            "`model` must be a recipe name, a preset name or a preset "
            f"directory. Received: model={name!r}"
        )
    if group_size is not None:
        check_int("group_size", group_size)
    if name in SMALL_MODELS:
        return SMALL_MODELS[name](num_classes, image_size, group_size)
    family = _preset_family(name)
    if group_size is not None and family is None:
        raise ValueError(
            "`group_size` can be set here for the small recipes "
            f"{sorted(SMALL_MODELS)} and preset names (both families); set "
            "it in the backbone's config (`group_size`) of a saved preset. "
            f"Received: group_size={group_size}, model={name!r}"
        )
    from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS

    if checkpoint is not None and name not in VMOE_PRESETS:
        raise ValueError(
            "`checkpoint` is for the published V-MoE / E^3 names "
            f"{sorted(VMOE_PRESETS)}. Received: checkpoint={checkpoint!r}, "
            f"model={name!r}"
        )
    if name in VMOE_PRESETS:
        overrides = {} if group_size is None else {"group_size": group_size}
        return family.from_preset(
            name,
            load_weights=pretrained,
            num_classes=num_classes,
            image_size=image_size,
            checkpoint=checkpoint,
            **overrides,
        )
    if family is not None:
        overrides = {} if group_size is None else {"group_size": group_size}
        return family.from_preset(
            name, load_weights=pretrained, num_classes=num_classes, **overrides
        )
    if os.path.isdir(name):
        from keras_vmoe.models import load_classifier

        return load_classifier(name)
    from keras_vmoe.models import list_presets

    raise ValueError(
        "`model` must be a small recipe "
        f"{sorted(SMALL_MODELS)}, a preset name (keras_vmoe.models."
        f"list_presets(), {len(list_presets())} names), or a preset "
        f"directory. Received: model={name!r}"
    )
