"""The trained V-MoE and E^3 checkpoints that google-research/vmoe publishes.

Each entry names a checkpoint in the publisher's Google Cloud Storage bucket
(`gs://vmoe_checkpoints/<name>`, served at `VMOE_BUCKET_URL`) and records
what is needed to run it: vmoe's model configuration (as its configuration
files build it), the image size and preprocessing the checkpoint was
trained / fine-tuned and evaluated with, the capacity factor at inference,
the routing group (8 images per group in vmoe's configurations, 128 for
the E^3 CIFAR-100 fine-tuning) and the accuracy the authors report
(`reported`, with where it is stated; None where vmoe states none). The
weights are not redistributed: `from_preset` downloads them from the
publisher (google-research/vmoe, Apache-2.0; no separate terms are stated
for the checkpoints).

Architecture (Riquelme et al., 2021): V-MoE "S" is 8 blocks of width 512
(8 heads, MLP 2048; not DeiT-S's 12 blocks), "B" 12 blocks of width 768;
E = 8 experts; Last-2 = MoE in blocks 5 and 7 (the last two odd blocks),
Every-2 = blocks 1, 3, 5, ...; K = 2 (V-MoE) or K = 1 per ensemble member
(E^3, M = 2 members of 4 experts).
"""

VMOE_BUCKET_URL = "https://storage.googleapis.com/vmoe_checkpoints"
# What `value_range(-1, 1)` does to [0, 255] pixels: x / 127.5 - 1.
VMOE_MEAN = (0.5, 0.5, 0.5)
VMOE_STD = (0.5, 0.5, 0.5)
VMOE_LICENSE = (
    "Weights by google-research/vmoe (Apache-2.0 repository; no separate "
    "terms stated for the checkpoints), downloaded from the publisher."
)

_VARIANTS = {
    # hidden, layers, mlp, heads
    "S": (512, 8, 2048, 8),
    "B": (768, 12, 3072, 12),
}


def _moe_layers(num_layers, where):
    kind, count = where
    if kind == "every":
        return list(range(count - 1, num_layers, count))
    return list(range(1, num_layers, 2))[-count:]


def vmoe_model_config(
    variant,
    patch,
    num_classes,
    where,
    top_k,
    representation_size,
    capacity_factor,
    ensemble_size=None,
):
    """vmoe's `config.model` of a published architecture (as a dict).

    `group_size` is left out: it depends on the image size
    (`images_per_group * tokens`), see `group_size_for`.
    """
    hidden, layers, mlp, heads = _VARIANTS[variant]
    moe = {
        "layers": _moe_layers(layers, where),
        "num_experts": 8,
        "router": {
            "num_selected_experts": top_k,
            "noise_std": 1.0,
            "importance_loss_weight": 0.005,
            "load_loss_weight": 0.005,
            "dispatcher": {
                "name": "einsum",
                "bfloat16": True,
                "capacity_factor": capacity_factor,
                "batch_priority": False,
            },
        },
    }
    name = "VisionTransformerMoe"
    if ensemble_size:
        moe["ensemble_size"] = ensemble_size
        name = "VisionTransformerMoeEnsemble"
    return {
        "name": name,
        "num_classes": num_classes,
        "patch_size": [patch, patch],
        "hidden_size": hidden,
        "classifier": "token",
        "representation_size": representation_size,
        "encoder": {
            "num_layers": layers,
            "mlp_dim": mlp,
            "num_heads": heads,
            "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "moe": moe,
        },
    }


def group_size_for(preset, image_size):
    """Tokens per routing group of `preset` at `image_size`:
    images per group x tokens per image (x members for E^3)."""
    patch = preset["model"]["patch_size"][0]
    tokens = (image_size // patch) ** 2 + 1
    members = preset["model"]["encoder"]["moe"].get("ensemble_size") or 1
    return preset["images_per_group"] * tokens * members


_CENTER_CROP = "decode|resize_small(256)|central_crop(224)|value_range(-1,1)"


def _resize(size):
    return f"decode|resize({size})|value_range(-1,1)"


def _entry(
    description,
    model,
    image_size,
    eval_capacity_factor,
    preprocessing,
    dataset,
    reported,
    images_per_group=8,
    eval_capacity_note="vmoe configuration",
):
    return {
        "description": description,
        "model": model,
        "image_size": image_size,
        "eval_capacity_factor": eval_capacity_factor,
        "eval_capacity_note": eval_capacity_note,
        "images_per_group": images_per_group,
        "preprocessing": preprocessing,
        "dataset": dataset,
        "reported": reported,
    }


def _reported(top1, split, source):
    return {"top1": top1, "split": split, "source": source}


_LIGHT1_CONFIG = (
    "vmoe/configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1"
)
_S32_LAST2 = dict(variant="S", patch=32, where=("last", 2), top_k=2)
_B16_EVERY2 = dict(variant="B", patch=16, where=("every", 2), top_k=2)
_EEE_S32 = dict(
    variant="S", patch=32, where=("last", 2), top_k=1, ensemble_size=2
)

# name (the checkpoint's prefix in the bucket) -> description.
VMOE_PRESETS = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": _entry(
        "V-MoE S/32, 8 experts in the last 2 odd blocks, K=2, trained from "
        "scratch on ILSVRC2012 with RandAugment (light1) for 300 epochs.",
        vmoe_model_config(
            num_classes=1000,
            representation_size=512,
            capacity_factor=1.05,
            **_S32_LAST2,
        ),
        224,
        4.0,
        _CENTER_CROP,
        "ILSVRC2012 (1,000 classes)",
        _reported(73.1, "ILSVRC2012 validation", _LIGHT1_CONFIG + ".py"),
    ),
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": _entry(
        "The light1 V-MoE S/32 fine-tuned on ILSVRC2012 at 384 pixels.",
        vmoe_model_config(
            num_classes=1000,
            representation_size=None,
            capacity_factor=1.5,
            **_S32_LAST2,
        ),
        384,
        1.5,
        _resize(384),
        "ILSVRC2012 (1,000 classes)",
        _reported(
            75.9, "ILSVRC2012 validation", _LIGHT1_CONFIG + "_ft_ilsvrc2012.py"
        ),
    ),
    "vmoe_s32_last2_ilsvrc2012_randaug_medium": _entry(
        "V-MoE S/32, 8 experts in the last 2 odd blocks, K=2, trained from "
        "scratch on ILSVRC2012 with RandAugment (medium) for 1000 epochs.",
        vmoe_model_config(
            num_classes=1000,
            representation_size=512,
            capacity_factor=1.05,
            **_S32_LAST2,
        ),
        224,
        4.0,
        _CENTER_CROP,
        "ILSVRC2012 (1,000 classes)",
        None,
        eval_capacity_note="not published; the light1 configuration's",
    ),
    "vmoe_b16_imagenet21k_randaug_strong": _entry(
        "V-MoE B/16, 8 experts in every odd block, K=2, trained from "
        "scratch on ImageNet-21k with RandAugment (strong).",
        vmoe_model_config(
            num_classes=21843,
            representation_size=None,
            capacity_factor=1.05,
            **_B16_EVERY2,
        ),
        224,
        1.05,
        _CENTER_CROP,
        "ImageNet-21k (21,843 classes)",
        None,
    ),
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": _entry(
        "The ImageNet-21k V-MoE B/16 fine-tuned on ILSVRC2012 at 384 "
        "pixels.",
        vmoe_model_config(
            num_classes=1000,
            representation_size=None,
            capacity_factor=1.5,
            **_B16_EVERY2,
        ),
        384,
        1.5,
        _resize(384),
        "ILSVRC2012 (1,000 classes)",
        _reported(
            85.6,
            "ILSVRC2012 validation",
            "vmoe/configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py",
        ),
    ),
    "vmoe_b16_imagenet21k_randaug_strong_ft_cifar10": _entry(
        "The ImageNet-21k V-MoE B/16 fine-tuned on CIFAR-10 at 128 pixels.",
        vmoe_model_config(
            num_classes=10,
            representation_size=None,
            capacity_factor=1.5,
            **_B16_EVERY2,
        ),
        128,
        1.5,
        _resize(128),
        "CIFAR-10 (10 classes)",
        _reported(
            98.7,
            "CIFAR-10 test",
            "vmoe/configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_cifar10.py",
        ),
    ),
    "eee_s32_last2_ilsvrc2012": _entry(
        "E^3 S/32: V-MoE S/32 with 8 experts in the last 2 odd blocks "
        "split between 2 ensemble members (K=1 each), trained from scratch "
        "on ILSVRC2012 with RandAugment for 300 epochs.",
        vmoe_model_config(
            num_classes=1000,
            representation_size=512,
            capacity_factor=1.05,
            **_EEE_S32,
        ),
        224,
        1.05,
        _CENTER_CROP,
        "ILSVRC2012 (1,000 classes)",
        None,
        eval_capacity_note="not published; vmoe's pre-training default",
    ),
    "eee_s32_last2_ilsvrc2012_ft_cifar100": _entry(
        "The E^3 S/32 fine-tuned on CIFAR-100 at 128 pixels.",
        vmoe_model_config(
            num_classes=100,
            representation_size=512,
            capacity_factor=1.5,
            **_EEE_S32,
        ),
        128,
        1.5,
        _resize(128),
        "CIFAR-100 (100 classes)",
        _reported(
            81.3,
            "CIFAR-100 test",
            "vmoe/configs/eee_paper/eee_s32_last2_ilsvrc2012_ft_cifar100.py",
        ),
        images_per_group=128,
    ),
}


def checkpoint_url(name):
    """The base URL of preset `name`'s checkpoint (add `.index`,
    `.data-00000-of-0000N`)."""
    return f"{VMOE_BUCKET_URL}/{name}"
