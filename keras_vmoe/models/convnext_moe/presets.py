"""MoE-ConvNeXt presets: the models of the Sweet-spot paper's ImageNet tables.

Names: `convnext_{size}` for the dense baselines, and
`convnext_moe_{size}_e{E}_{placement}[_mlp4]` for MoE models, where
`placement` is every2 / stage / last2 / last3 (see `moe_block_indices`)
and the expert mlp_ratio is the paper's ImageNet-1k default (§5.4): 2 for
hierarchical and 4 for isotropic models, unless `_mlp4` says 4 (the
paper's ImageNet-21k hierarchical models, Tab. 2, 5, 6). All MoE presets
use top-1 token routing and the linear router, as the paper does.

Each preset records `params`, `active_params` (per token: only the routed
experts count) and `flops` (multiply-accumulates, the papers' convention)
of the 1000-class `ConvNeXtMoEImageClassifier` at 224x224, computed with
`keras_vmoe.models.stats.model_stats`, and, when the paper reports the
model, its printed numbers (`paper`) for comparison. No pretrained weights
are shipped: the converters in `keras_vmoe.converters.convnext` load
keras.applications or timm ConvNeXt weights and upcycle them.
"""

TINY = {"depths": [3, 3, 9, 3], "hidden_dims": [96, 192, 384, 768]}
SMALL = {"depths": [3, 3, 27, 3], "hidden_dims": [96, 192, 384, 768]}
BASE = {"depths": [3, 3, 27, 3], "hidden_dims": [128, 256, 512, 1024]}
# The isotropic ConvNeXt (Liu et al., 2022, §isotropic): 16x16 stem
# without LayerNorm, no LayerScale, 18 blocks at constant width.
ISOTROPIC = {"patch_size": 16, "stem_norm": False, "layer_scale_init_value": None}
ISOTROPIC_SMALL = {"depths": [18], "hidden_dims": [384], **ISOTROPIC}
ISOTROPIC_BASE = {"depths": [18], "hidden_dims": [768], **ISOTROPIC}

ARCHITECTURES = {
    "tiny": ("ConvNeXt-T", TINY),
    "small": ("ConvNeXt-S", SMALL),
    "base": ("ConvNeXt-B", BASE),
    "isotropic_small": ("ConvNeXt-S (iso.)", ISOTROPIC_SMALL),
    "isotropic_base": ("ConvNeXt-B (iso.)", ISOTROPIC_BASE),
}
PLACEMENTS = {
    "every2": "every-2",
    "stage": "stage",
    "last2": "last-2",
    "last3": "last-3",
}


def _paper(table, params_m, active_params_m, flops_g):
    """Numbers as the paper prints them: millions, millions, GMACs."""
    return {
        "table": table,
        "params_m": params_m,
        "active_params_m": active_params_m,
        "flops_g": flops_g,
    }


# name: (architecture, (E, placement, expert mlp_ratio) or None, paper)
_MODELS = {
    # === Dense baselines ===
    "convnext_tiny": ("tiny", None, _paper("Tab. 1", 28.6, 28.6, 4.5)),
    "convnext_small": ("small", None, _paper("Tab. 1", 50.0, 50.0, 8.7)),
    "convnext_base": ("base", None, _paper("Tab. 1", 88.6, 88.6, 15.4)),
    "convnext_isotropic_small": (
        "isotropic_small", None, _paper("Tab. 1", 22.3, 22.3, 4.3)
    ),
    "convnext_isotropic_base": (
        "isotropic_base", None, _paper("Tab. 1", 82.4, 82.4, 16.9)
    ),
    # === ConvNeXt-T, ImageNet-1k setting (mlp_ratio 2): E x placement ===
    "convnext_moe_tiny_e4_every2": ("tiny", (4, "every2", 2), None),
    "convnext_moe_tiny_e4_stage": ("tiny", (4, "stage", 2), None),
    "convnext_moe_tiny_e4_last2": (
        "tiny", (4, "last2", 2), _paper("Tab. 1", 34.5, 25.6, 4.2)
    ),
    "convnext_moe_tiny_e4_last3": ("tiny", (4, "last3", 2), None),
    "convnext_moe_tiny_e8_every2": (
        "tiny", (8, "every2", 2), _paper("Tab. 3", 54.3, 17.0, 3.8)
    ),
    "convnext_moe_tiny_e8_stage": (
        "tiny", (8, "stage", 2), _paper("Tab. 3", 47.4, 25.5, 4.0)
    ),
    "convnext_moe_tiny_e8_last2": (
        "tiny", (8, "last2", 2), _paper("Tab. 3", 46.3, 25.6, 4.2)
    ),
    "convnext_moe_tiny_e8_last3": (
        "tiny", (8, "last3", 2), _paper("Tab. 3", 49.9, 25.0, 4.1)
    ),
    "convnext_moe_tiny_e16_every2": ("tiny", (16, "every2", 2), None),
    "convnext_moe_tiny_e16_stage": ("tiny", (16, "stage", 2), None),
    "convnext_moe_tiny_e16_last2": ("tiny", (16, "last2", 2), None),
    "convnext_moe_tiny_e16_last3": ("tiny", (16, "last3", 2), None),
    # === ConvNeXt-T, ImageNet-21k setting (mlp_ratio 4), Tab. 2, 5, 6 ===
    "convnext_moe_tiny_e8_every2_mlp4": (
        "tiny", (8, "every2", 4), _paper("Tab. 5", 97.5, 28.6, 4.5)
    ),
    "convnext_moe_tiny_e8_stage_mlp4": (
        "tiny", (8, "stage", 4), _paper("Tab. 5", 78.2, 28.6, 4.5)
    ),
    "convnext_moe_tiny_e8_last3_mlp4": (
        "tiny", (8, "last3", 4), _paper("Tab. 5", 70.0, 28.6, 4.5)
    ),
    "convnext_moe_tiny_e8_last2_mlp4": (
        "tiny", (8, "last2", 4), _paper("Tab. 2", 70.0, 28.7, 4.5)
    ),
    "convnext_moe_tiny_e16_last2_mlp4": (
        "tiny", (16, "last2", 4), _paper("Tab. 6", 117.1, 28.6, 4.5)
    ),
    "convnext_moe_tiny_e32_last2_mlp4": (
        "tiny", (32, "last2", 4), _paper("Tab. 6", 211.6, 28.6, 4.5)
    ),
    # === ConvNeXt-S and -B ===
    "convnext_moe_small_e4_last2": (
        "small", (4, "last2", 2), _paper("Tab. 1", 56.1, 47.3, 8.5)
    ),
    "convnext_moe_small_e8_last2_mlp4": (
        "small", (8, "last2", 4), _paper("Tab. 2", 91.6, 50.3, 8.7)
    ),
    "convnext_moe_base_e4_last2": (
        "base", (4, "last2", 2), _paper("Tab. 1", 99.1, 83.4, 15.0)
    ),
    "convnext_moe_base_e8_last2_mlp4": (
        "base", (8, "last2", 4), _paper("Tab. 2", 162.0, 88.6, 15.4)
    ),
    # === Isotropic ConvNeXt (expert mlp_ratio 4) ===
    "convnext_moe_isotropic_small_e8_every2": (
        "isotropic_small", (8, "every2", 4), _paper("Tab. 3", 96.7, 22.3, 8.7)
    ),
    "convnext_moe_isotropic_small_e8_last2": (
        "isotropic_small", (8, "last2", 4), _paper("Tab. 1", 38.9, 22.3, 4.3)
    ),
    "convnext_moe_isotropic_base_e8_last2": (
        "isotropic_base", (8, "last2", 4), _paper("Tab. 1", 115.4, None, 16.9)
    ),
}

# model_stats of the 1000-class classifier at 224x224:
# name: (params, active_params, flops).
_STATS = {}


def _preset(name):
    architecture, moe, paper = _MODELS[name]
    title, config = ARCHITECTURES[architecture]
    config = dict(config)
    if moe is None:
        description = f"{title}, dense"
    else:
        num_experts, placement, expert_mlp_ratio = moe
        config.update(
            moe_placement=PLACEMENTS[placement],
            num_experts=num_experts,
            top_k=1,
            expert_mlp_ratio=expert_mlp_ratio,
        )
        description = (
            f"{title}-{num_experts} {PLACEMENTS[placement]} top-1, expert "
            f"mlp_ratio {expert_mlp_ratio}"
        )
    params, active_params, flops = _STATS.get(name, (None, None, None))
    return {
        "description": description,
        "config": config,
        "num_classes": 1000,
        "params": params,
        "active_params": active_params,
        "flops": flops,
        "paper": paper,
    }


backbone_presets = {name: _preset(name) for name in _MODELS}


def list_presets():
    """Names of the MoE-ConvNeXt presets, in table order."""
    return list(backbone_presets)
