"""MoE-ConvNeXt presets: the models of the Sweet-spot paper's ImageNet tables.

Names: `convnext_{size}` for the dense baselines, and
`convnext_moe_{size}_e{E}_{placement}[_mlp4]` for MoE models, where
`placement` is every2 / stage / last2 / last3 (see `moe_block_indices`)
and the expert mlp_ratio is the paper's ImageNet-1k default (§5.4): 2 for
hierarchical and 4 for isotropic models, unless `_mlp4` says 4 (the
paper's ImageNet-21k hierarchical models, Tab. 2, 5, 6). All these MoE
presets use top-1 token routing and the linear router, as the paper does.

Soft MoE presets (not in the paper; `router_type="soft"`):
`convnext_soft_moe_{size}_e{E}_s{C}_{placement}_mlp4`, a
`SoftMoEFeedForward` with E experts of C slots each in the MoE blocks.

Each preset records `params`, `active_params` (per token: only the routed
experts count) and `flops` (multiply-accumulates, the papers' convention)
of the 1000-class `ConvNeXtMoEImageClassifier` at 224x224, computed with
`keras_vmoe.models.stats.model_stats`, and, when the paper reports the
model, its printed numbers (`paper`) for comparison. No pretrained weights
are shipped: the converters in `keras_vmoe.converters.convnext` load
keras.applications or timm ConvNeXt weights and upcycle them.

Against the paper (params M / active M / GMACs): 16 of its 23 printed rows
match to its printed precision, e.g. ConvNeXt-T 28.6 / 28.6 / 4.47 (4.5),
ConvNeXt-T-4 Last-2 34.5 / 25.6 / 4.24 (4.2), ConvNeXt-T-8 Stage 47.4 /
25.5 / 4.01 (4.0), ConvNeXt-B-8 Last-2 mlp4 162.1 (162.0) / 88.6 / 15.38
(15.4). The other rows contradict the paper's own numbers:
- ConvNeXt-S dense: 50.2 (Tab. 1 prints 50, Tab. 2 50.3).
- ConvNeXt-B (iso.): 87.1; the ConvNeXt paper says 87M, the Sweet-spot
  82.4. Its E8 Last-2 (115.4 = 82.4 + 33.0) adds the 7 extra experts of a
  single 768-wide block; two MoE blocks give 153.2.
- ConvNeXt-T-8 Every-2 (Tab. 3): 54.3 / 17.0 / 3.8 printed; 17.0M active
  needs about a dozen MoE blocks, which with 8 experts hold far more than
  54.3M. Every-2 as "blocks 1, 3, ... of each stage" gives 58.1 / 23.7 / 3.67 and,
  with mlp_ratio 4, Tab. 5's 97.5 (ours 97.3).
- Tab. 5 (mlp_ratio 4): its "stage" 78.2 and "last 3" 70.0 are our last-3
  (78.2) and last-2 (69.9): the rows look shifted; our stage is 72.5.
- ConvNeXt-S (iso.) E8 Every-2: Tab. 3 prints 8.7G for every isotropic
  row (ConvNeXt-S's figure); Tab. 1 and ours give 4.3G.
"""

from keras_vmoe.models.normalization import IMAGENET_MEAN
from keras_vmoe.models.normalization import IMAGENET_STD
from keras_vmoe.models.placement import moe_block_indices

TINY = {"depths": [3, 3, 9, 3], "hidden_dims": [96, 192, 384, 768]}
SMALL = {"depths": [3, 3, 27, 3], "hidden_dims": [96, 192, 384, 768]}
BASE = {"depths": [3, 3, 27, 3], "hidden_dims": [128, 256, 512, 1024]}
# The isotropic ConvNeXt (Liu et al., 2022, §isotropic): 16x16 stem
# without LayerNorm, no LayerScale, 18 blocks at constant width.
ISOTROPIC = {
    "patch_size": 16,
    "stem_norm": False,
    "layer_scale_init_value": None,
}
ISOTROPIC_SMALL = {"depths": [18], "hidden_dims": [384], **ISOTROPIC}
ISOTROPIC_BASE = {"depths": [18], "hidden_dims": [768], **ISOTROPIC}

# Dense checkpoints the MoE models are upcycled from: keras.applications
# ImageNet-1k weights (the isotropic models have none in a safe format).
SOURCES = {
    "tiny": "keras.applications.ConvNeXtTiny",
    "small": "keras.applications.ConvNeXtSmall",
    "base": "keras.applications.ConvNeXtBase",
}

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


# name: (architecture, (E, placement, expert mlp_ratio[, Soft MoE slots per
# expert]) or None, paper)
_MODELS = {
    # === Dense baselines ===
    "convnext_tiny": ("tiny", None, _paper("Tab. 1", 28.6, 28.6, 4.5)),
    "convnext_small": ("small", None, _paper("Tab. 1", 50.0, 50.0, 8.7)),
    "convnext_base": ("base", None, _paper("Tab. 1", 88.6, 88.6, 15.4)),
    "convnext_isotropic_small": (
        "isotropic_small",
        None,
        _paper("Tab. 1", 22.3, 22.3, 4.3),
    ),
    "convnext_isotropic_base": (
        "isotropic_base",
        None,
        _paper("Tab. 1", 82.4, 82.4, 16.9),
    ),
    # === ConvNeXt-T, ImageNet-1k setting (mlp_ratio 2): E x placement ===
    "convnext_moe_tiny_e4_every2": ("tiny", (4, "every2", 2), None),
    "convnext_moe_tiny_e4_stage": ("tiny", (4, "stage", 2), None),
    "convnext_moe_tiny_e4_last2": (
        "tiny",
        (4, "last2", 2),
        _paper("Tab. 1", 34.5, 25.6, 4.2),
    ),
    "convnext_moe_tiny_e4_last3": ("tiny", (4, "last3", 2), None),
    "convnext_moe_tiny_e8_every2": (
        "tiny",
        (8, "every2", 2),
        _paper("Tab. 3", 54.3, 17.0, 3.8),
    ),
    "convnext_moe_tiny_e8_stage": (
        "tiny",
        (8, "stage", 2),
        _paper("Tab. 3", 47.4, 25.5, 4.0),
    ),
    "convnext_moe_tiny_e8_last2": (
        "tiny",
        (8, "last2", 2),
        _paper("Tab. 3", 46.3, 25.6, 4.2),
    ),
    "convnext_moe_tiny_e8_last3": (
        "tiny",
        (8, "last3", 2),
        _paper("Tab. 3", 49.9, 25.0, 4.1),
    ),
    "convnext_moe_tiny_e16_every2": ("tiny", (16, "every2", 2), None),
    "convnext_moe_tiny_e16_stage": ("tiny", (16, "stage", 2), None),
    "convnext_moe_tiny_e16_last2": ("tiny", (16, "last2", 2), None),
    "convnext_moe_tiny_e16_last3": ("tiny", (16, "last3", 2), None),
    # === ConvNeXt-T, ImageNet-21k setting (mlp_ratio 4), Tab. 2, 5, 6 ===
    "convnext_moe_tiny_e8_every2_mlp4": (
        "tiny",
        (8, "every2", 4),
        _paper("Tab. 5", 97.5, 28.6, 4.5),
    ),
    "convnext_moe_tiny_e8_stage_mlp4": (
        "tiny",
        (8, "stage", 4),
        _paper("Tab. 5", 78.2, 28.6, 4.5),
    ),
    "convnext_moe_tiny_e8_last3_mlp4": (
        "tiny",
        (8, "last3", 4),
        _paper("Tab. 5", 70.0, 28.6, 4.5),
    ),
    "convnext_moe_tiny_e8_last2_mlp4": (
        "tiny",
        (8, "last2", 4),
        _paper("Tab. 2", 70.0, 28.7, 4.5),
    ),
    "convnext_moe_tiny_e16_last2_mlp4": (
        "tiny",
        (16, "last2", 4),
        _paper("Tab. 6", 117.1, 28.6, 4.5),
    ),
    "convnext_moe_tiny_e32_last2_mlp4": (
        "tiny",
        (32, "last2", 4),
        _paper("Tab. 6", 211.6, 28.6, 4.5),
    ),
    # === ConvNeXt-S and -B ===
    "convnext_moe_small_e4_last2": (
        "small",
        (4, "last2", 2),
        _paper("Tab. 1", 56.1, 47.3, 8.5),
    ),
    "convnext_moe_small_e8_last2_mlp4": (
        "small",
        (8, "last2", 4),
        _paper("Tab. 2", 91.6, 50.3, 8.7),
    ),
    "convnext_moe_base_e4_last2": (
        "base",
        (4, "last2", 2),
        _paper("Tab. 1", 99.1, 83.4, 15.0),
    ),
    "convnext_moe_base_e8_last2_mlp4": (
        "base",
        (8, "last2", 4),
        _paper("Tab. 2", 162.0, 88.6, 15.4),
    ),
    # === Isotropic ConvNeXt (expert mlp_ratio 4) ===
    "convnext_moe_isotropic_small_e8_every2": (
        "isotropic_small",
        (8, "every2", 4),
        _paper("Tab. 3", 96.7, 22.3, 8.7),
    ),
    "convnext_moe_isotropic_small_e8_last2": (
        "isotropic_small",
        (8, "last2", 4),
        _paper("Tab. 1", 38.9, 22.3, 4.3),
    ),
    "convnext_moe_isotropic_base_e8_last2": (
        "isotropic_base",
        (8, "last2", 4),
        _paper("Tab. 1", 115.4, None, 16.9),
    ),
    # === Soft MoE (router_type="soft"), upcycled like the `_mlp4` rows ===
    # Last-2 puts one Soft MoE block at stage 3 (14x14 = 196 tokens at
    # 224x224, d 384) and one at stage 4 (7x7 = 49 tokens, d 768); the
    # backbone gives both the same E x C slots, so no single choice equals
    # both token counts. E = 8, S = 10: 80 slots per image, between 49 and
    # 196 (0.41x and 1.63x the tokens), for which the two blocks' experts
    # cost what the dense MLPs cost: 80 x 5.90M = 472M MACs against
    # 196 x 1.18M + 49 x 4.72M = 462M.
    "convnext_soft_moe_tiny_e8_s10_last2_mlp4": (
        "tiny",
        (8, "last2", 4, 10),
        None,
    ),
    "convnext_soft_moe_small_e8_s10_last2_mlp4": (
        "small",
        (8, "last2", 4, 10),
        None,
    ),
}


def analytic_stats(config, image_size=224, num_classes=1000):
    """Params, active params and FLOPs of the classifier, by formula.

    The closed form of what `keras_vmoe.models.stats.model_stats` measures
    on a built `ConvNeXtMoEImageClassifier` (convolution, dense, router and
    used-expert MACs, plus 5 per element of each LayerNorm); it lets the
    preset table be checked without building 200M-parameter models.
    """
    depths, dims = config["depths"], config["hidden_dims"]
    patch = config.get("patch_size", 4)
    mlp_ratio = config.get("mlp_ratio", 4.0)
    expert_ratio = config.get("expert_mlp_ratio") or mlp_ratio
    experts = config.get("num_experts", 4)
    top_k = config.get("top_k", 1)
    soft = config.get("router_type", "top_k") == "soft"
    slots = experts * config.get("slots_per_expert", 1)
    shared = config.get("shared_expert", False)
    router = config.get("router", "linear")
    layer_scale = config.get("layer_scale_init_value", 1e-6) is not None
    skip = config.get("moe_skip_connection", True)
    moe_positions = set(moe_block_indices(depths, config.get("moe_layers")))

    size = image_size // patch
    params = 3 * patch * patch * dims[0] + dims[0]
    flops = size * size * dims[0] * 3 * patch * patch
    if config.get("stem_norm", True):
        params += 2 * dims[0]
        flops += 5 * size * size * dims[0]
    inactive = 0
    for stage, (depth, d) in enumerate(zip(depths, dims)):
        if stage > 0:
            previous = dims[stage - 1]
            params += 2 * previous + 4 * previous * d + d
            flops += 5 * size * size * previous
            size //= 2
            flops += size * size * 4 * previous * d
        tokens = size * size
        for block in range(depth):
            params += 49 * d + d + 2 * d + layer_scale * d
            flops += tokens * (49 * d + 5 * d)
            if (stage, block) not in moe_positions:
                h = int(d * mlp_ratio)
                params += 2 * d * h + h + d
                flops += tokens * 2 * d * h
                continue
            h = int(d * expert_ratio)
            expert = 2 * d * h + h + d
            if soft:
                # phi [d, N] and the logit scale; every expert is active.
                params += experts * expert + d * slots + 1 + skip * d
                params += shared * expert
                flops += 3 * tokens * d * slots + slots * 2 * d * h
                flops += shared * tokens * 2 * d * h
                continue
            if router == "linear":
                router_params = router_flops = d * experts
            else:
                width = min(config.get("router_dim", 256), d)
                router_flops = d * width + experts * width
                router_params = router_flops + (router == "cosine")
            params += experts * expert + router_params + skip * d
            params += shared * expert
            inactive += (experts - top_k) * expert
            flops += tokens * ((top_k + shared) * 2 * d * h + router_flops)
    d = dims[-1]
    params += 2 * d + d * num_classes + num_classes
    flops += 5 * d + d * num_classes
    return {
        "params": params,
        "active_params": params - inactive,
        "flops": flops,
    }


def _stats(params, active_params, flops):
    return {"params": params, "active_params": active_params, "flops": flops}


def _preset(name):
    architecture, moe, paper = _MODELS[name]
    title, config = ARCHITECTURES[architecture]
    config = dict(config)
    if moe is None:
        description = f"{title}, dense"
    elif len(moe) == 4:
        num_experts, placement, expert_mlp_ratio, slots_per_expert = moe
        config.update(
            moe_layers=PLACEMENTS[placement],
            num_experts=num_experts,
            expert_mlp_ratio=expert_mlp_ratio,
            router_type="soft",
            slots_per_expert=slots_per_expert,
        )
        description = (
            f"{title}-{num_experts} {PLACEMENTS[placement]} Soft MoE, "
            f"{slots_per_expert} slots per expert, expert mlp_ratio "
            f"{expert_mlp_ratio}"
        )
    else:
        num_experts, placement, expert_mlp_ratio = moe
        config.update(
            moe_layers=PLACEMENTS[placement],
            num_experts=num_experts,
            top_k=1,
            expert_mlp_ratio=expert_mlp_ratio,
        )
        description = (
            f"{title}-{num_experts} {PLACEMENTS[placement]} top-1, expert "
            f"mlp_ratio {expert_mlp_ratio}"
        )
    return {
        "description": description,
        "source": SOURCES.get(architecture),
        "config": config,
        # keras.applications and timm ConvNeXt: ImageNet statistics.
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        **_STATS[name],
        "paper": paper,
    }


# (params, active params, FLOPs) of the 1000-class classifier at 224x224,
# as `model_stats` counts them (checked against `analytic_stats` for every
# preset and against `model_stats` on built models by the tests).
_STATS = {
    "convnext_tiny": _stats(28589128, 28589128, 4470399744),
    "convnext_small": _stats(50223688, 50223688, 8705354496),
    "convnext_base": _stats(88591464, 88591464, 15383585792),
    "convnext_isotropic_small": _stats(22308712, 22308712, 4293143424),
    "convnext_isotropic_base": _stats(87083752, 87083752, 16909883136),
    "convnext_moe_tiny_e4_every2": _stats(38426056, 23693992, 3664322304),
    "convnext_moe_tiny_e4_stage": _stats(34873288, 25460008, 4010235648),
    "convnext_moe_tiny_e4_last2": _stats(34501192, 25643464, 4239640320),
    "convnext_moe_tiny_e4_last3": _stats(35685448, 25054792, 4124335872),
    "convnext_moe_tiny_e8_every2": _stats(58079176, 23704360, 3667483392),
    "convnext_moe_tiny_e8_stage": _stats(47430088, 25465768, 4012493568),
    "convnext_moe_tiny_e8_last2": _stats(46316104, 25648072, 4240091904),
    "convnext_moe_tiny_e8_last3": _stats(49865800, 25060936, 4125088512),
    "convnext_moe_tiny_e16_every2": _stats(97385416, 23725096, 3673805568),
    "convnext_moe_tiny_e16_stage": _stats(72543688, 25477288, 4017009408),
    "convnext_moe_tiny_e16_last2": _stats(69945928, 25657288, 4240995072),
    "convnext_moe_tiny_e16_last3": _stats(78226504, 25073224, 4126593792),
    "convnext_moe_tiny_e8_every2_mlp4": _stats(97343944, 28612456, 4476721920),
    "convnext_moe_tiny_e8_stage_mlp4": _stats(72520648, 28602088, 4474915584),
    "convnext_moe_tiny_e8_last3_mlp4": _stats(78201928, 28602952, 4471905024),
    "convnext_moe_tiny_e8_last2_mlp4": _stats(69927496, 28599496, 4471302912),
    "convnext_moe_tiny_e16_last2_mlp4": _stats(117168712, 28608712, 4472206080),
    "convnext_moe_tiny_e32_last2_mlp4": _stats(211651144, 28627144, 4474012416),
    "convnext_moe_small_e4_last2": _stats(56135752, 47278024, 8474595072),
    "convnext_moe_small_e8_last2_mlp4": _stats(91562056, 50234056, 8706257664),
    "convnext_moe_base_e4_last2": _stats(99095656, 83353192, 14973146112),
    "convnext_moe_base_e8_last2_mlp4": _stats(162059368, 88605288, 15384790016),
    "convnext_moe_isotropic_small_e8_every2": _stats(
        96778600, 22339816, 4298562432
    ),
    "convnext_moe_isotropic_small_e8_last2": _stats(
        38857576, 22315624, 4294347648
    ),
    "convnext_moe_isotropic_base_e8_last2": _stats(
        153211624, 87097576, 16912291584
    ),
    "convnext_soft_moe_tiny_e8_s10_last2_mlp4": _stats(
        70010442, 70010442, 4506931968
    ),
    "convnext_soft_moe_small_e8_s10_last2_mlp4": _stats(
        91645002, 91645002, 8741886720
    ),
}

PRESETS = {name: _preset(name) for name in _MODELS}
