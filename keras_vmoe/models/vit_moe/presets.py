"""ViMoE and Sweet-spot ViT-MoE presets: architectures and dense weights.

Every preset is a `ViTMoEBackbone` config plus the Hugging Face checkpoint of
the dense ViT it is upcycled from, and its params / active params / FLOPs
at 224x224 as `keras_vmoe.models.model_stats` counts them (a test checks
each recorded number against `analytic_stats` and, for ViT-S/14, against the
built model).

- ViMoE (ViT-S/14 from DINOv2, image routing from the CLS token, top-1,
  dropless): `vimoe_small_patch14_e{N}_last{L}[_shared]`, N in {2, 4, 8},
  L in {1, 2, 3, 5, 12}, plus the dense `vit_small_patch14_dinov2`. The
  position embedding keeps DINOv2's 37x37 grid (518x518 images) and is
  resampled to the 16x16 grid of 224x224 images, as in the paper's Table 1
  whose parameter counts include it.
- Sweet-spot ViT-MoE (timm ImageNet-21k ViT-S/16 and ViT-B/16, token
  routing, top-2, capacity factor 1.25 for training and 1.0 at inference):
  `vit_moe_{small,base}_patch16_e{4,8,16}_{every2,last2,last3}_top2`, plus
  the dense `vit_small_patch16` and `vit_base_patch16`.

- Soft MoE (Puigcerver et al., 2024): `soft_moe_{small,base}_patch16_128e`,
  128 experts with 1 slot in the last half of the blocks, as the paper's
  S/16 and B/16 (trained from scratch on JFT-4B there; no weights were
  released, so `load_weights=True` upcycles the dense timm ViT).
- Expert Choice (Zhou et al., 2022), routed per image:
  `expert_choice_vit_{small,base}_patch16_e8_every2_cf2` and
  `..._e128_last6_cf1` (the Soft MoE paper's placement and expert count).

Each preset also records the input statistics of its checkpoint (`mean`,
`std`, as timm's `pretrained_cfg`): ImageNet's for DINOv2, 0.5 / 0.5 for the
timm AugReg ViT-S/16 and ViT-B/16; `from_preset` builds its preprocessor
with them (`keras_vmoe.models.preset_normalization`).

Pretrained weights are upcycled: every expert (and the shared expert) starts
as the dense MLP, routers are new. The presets keep the papers' gates
(`normalize_gates=False`, `y = E_s(x) + g(x) E(x)`), so MoE blocks start as
the dense MLP scaled by the gate; `from_preset(name,
normalize_gates=True)` starts exactly at the dense model instead (for
top-1 the router then learns from the auxiliary loss only).
"""

from keras_vmoe.layers.expert_choice import expert_choice_capacity
from keras_vmoe.models.normalization import IMAGENET_MEAN
from keras_vmoe.models.normalization import IMAGENET_STD
from keras_vmoe.models.normalization import INCEPTION_MEAN
from keras_vmoe.models.normalization import INCEPTION_STD
from keras_vmoe.models.placement import resolve_moe_layers

_DINOV2_SMALL = {
    "image_shape": (224, 224, 3),
    "patch_size": 14,
    "num_layers": 12,
    "num_heads": 6,
    "hidden_dim": 384,
    "mlp_dim": 1536,
    "position_embedding_shape": (518, 518),
    "layer_scale_init_value": 1e-5,
}
_VIT_SMALL = {
    "image_shape": (224, 224, 3),
    "patch_size": 16,
    "num_layers": 12,
    "num_heads": 6,
    "hidden_dim": 384,
    "mlp_dim": 1536,
}
_VIT_BASE = dict(_VIT_SMALL, num_heads=12, hidden_dim=768, mlp_dim=3072)
_IMAGE_ROUTING = {
    "top_k": 1,
    "routing": "image",
    "capacity_factor": None,
    "eval_capacity_factor": None,
}
_TOKEN_ROUTING = {
    "top_k": 2,
    "routing": "token",
    "capacity_factor": 1.25,
    "eval_capacity_factor": 1.0,
}
_SOURCES = {
    "dinov2_small": "timm/vit_small_patch14_dinov2.lvd142m",
    "vit_small": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base": "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
}
# Input statistics each source was trained with (timm's pretrained_cfg):
# DINOv2 uses ImageNet's, the AugReg ViTs mean = std = 0.5.
_NORMALIZATION = {
    _SOURCES["dinov2_small"]: (IMAGENET_MEAN, IMAGENET_STD),
    _SOURCES["vit_small"]: (INCEPTION_MEAN, INCEPTION_STD),
    _SOURCES["vit_base"]: (INCEPTION_MEAN, INCEPTION_STD),
}


def analytic_stats(config):
    """Params, active params and FLOPs at the config's image size, by formula.

    The closed form of what `model_stats` measures on a built
    `ViTMoEBackbone` (see `keras_vmoe.models.stats` for the conventions);
    it lets the preset table be checked without building 500M-parameter
    models.
    """
    d, h = config["hidden_dim"], config["mlp_dim"]
    p, depth = config["patch_size"], config["num_layers"]
    height, width, channels = config["image_shape"]
    registers = config.get("num_register_tokens", 0)
    position_shape = config.get("position_embedding_shape") or (height, width)
    num_patches = (height // p) * (width // p)
    tokens = 1 + registers + num_patches
    layer_scale = config.get("layer_scale_init_value") is not None
    moe_blocks = len(resolve_moe_layers(config.get("moe_layers"), depth))
    experts = config.get("num_experts", 8)
    top_k = config.get("top_k", 1)
    ffn_params = 2 * d * h + h + d
    ffn_flops = 2 * d * h

    params = channels * p * p * d + d + (1 + registers) * d
    params += (position_shape[0] // p) * (position_shape[1] // p) * d
    params += depth * (4 * d + 4 * d * d + 4 * d + 2 * d * layer_scale)
    params += (depth - moe_blocks) * ffn_params + 2 * d
    flops = num_patches * channels * p * p * d
    flops += depth * tokens * (2 * 5 * d + 4 * d * d) + 5 * tokens * d
    flops += (depth - moe_blocks) * tokens * ffn_flops
    active = params
    router_type = config.get("router_type", "top_k")
    shared = config.get("shared_expert", False)
    if moe_blocks and router_type == "soft":
        # Every expert runs on its slots of every image: all are active.
        slots = experts * config.get("slots_per_expert", 1)
        per_block = (experts + shared) * ffn_params + d * slots + 1
        params += moe_blocks * per_block
        active = params
        flops += moe_blocks * (
            3 * tokens * d * slots
            + slots * ffn_flops
            + shared * tokens * ffn_flops
        )
    elif moe_blocks:
        router = config.get("router", "linear")
        if router == "linear":
            router_params = router_flops = d * experts
        else:
            width_r = min(config.get("router_dim", 256), d)
            router_flops = d * width_r + experts * width_r
            router_params = router_flops + (router == "cosine")
        router_rows = tokens if config.get("routing", "image") == "token" else 1
        per_block = experts * ffn_params + router_params + shared * ffn_params
        params += moe_blocks * per_block
        active = params - moe_blocks * (experts - top_k) * ffn_params
        expert_rows = tokens * top_k
        if router_type == "expert_choice":
            # Per-image groups; every expert takes C tokens of each image.
            router_rows, active = tokens, params
            expert_rows = experts * expert_choice_capacity(
                tokens, experts, config.get("capacity_factor", 1.25)
            )
        flops += moe_blocks * (
            (expert_rows + shared * tokens) * ffn_flops
            + router_rows * router_flops
        )
    return {"params": params, "active_params": active, "flops": flops}


def _preset(description, source, config, stats):
    mean, std = _NORMALIZATION[source]
    return {
        "description": description,
        "source": source,
        "config": config,
        "mean": mean,
        "std": std,
        "params": stats[0],
        "active_params": stats[1],
        "flops": stats[2],
    }


def _vimoe(num_experts, num_layers, shared):
    return dict(
        _DINOV2_SMALL,
        moe_layers=f"last-{num_layers}",
        num_experts=num_experts,
        shared_expert=shared,
        **_IMAGE_ROUTING,
    )


def _sweet_spot(base, num_experts, placement):
    return dict(
        base, moe_layers=placement, num_experts=num_experts, **_TOKEN_ROUTING
    )


def _soft_moe(base):
    """Soft MoE paper (Sec. 3.4): 128 experts, 1 slot, last half of blocks."""
    return dict(
        base,
        moe_layers=f"last-{base['num_layers'] // 2}",
        num_experts=128,
        router_type="soft",
        slots_per_expert=1,
    )


def _expert_choice(base, num_experts, placement, capacity_factor):
    return dict(
        base,
        moe_layers=placement,
        num_experts=num_experts,
        router_type="expert_choice",
        capacity_factor=capacity_factor,
    )


# name -> description, dense source checkpoint, backbone config, and
# (params, active params, FLOPs) at 224x224, as counted by `model_stats`.
PRESETS = {
    "vit_small_patch14_dinov2": _preset(
        "Dense DINOv2 ViT-S/14 (ViMoE Table 1, L = 0).",
        _SOURCES["dinov2_small"],
        dict(_DINOV2_SMALL),
        (22055808, 22055808, 5527190400),
    ),
    "vimoe_small_patch14_e2_last1": _preset(
        "ViMoE ViT-S/14, E=2, last 1 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 1, shared=False),
        (23238144, 22056576, 5527191168),
    ),
    "vimoe_small_patch14_e2_last1_shared": _preset(
        "ViMoE ViT-S/14, E=2, last 1 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 1, shared=True),
        (24419712, 23238144, 5830360704),
    ),
    "vimoe_small_patch14_e2_last2": _preset(
        "ViMoE ViT-S/14, E=2, last 2 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 2, shared=False),
        (24420480, 22057344, 5527191936),
    ),
    "vimoe_small_patch14_e2_last2_shared": _preset(
        "ViMoE ViT-S/14, E=2, last 2 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 2, shared=True),
        (26783616, 24420480, 6133531008),
    ),
    "vimoe_small_patch14_e2_last3": _preset(
        "ViMoE ViT-S/14, E=2, last 3 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 3, shared=False),
        (25602816, 22058112, 5527192704),
    ),
    "vimoe_small_patch14_e2_last3_shared": _preset(
        "ViMoE ViT-S/14, E=2, last 3 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 3, shared=True),
        (29147520, 25602816, 6436701312),
    ),
    "vimoe_small_patch14_e2_last5": _preset(
        "ViMoE ViT-S/14, E=2, last 5 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 5, shared=False),
        (27967488, 22059648, 5527194240),
    ),
    "vimoe_small_patch14_e2_last5_shared": _preset(
        "ViMoE ViT-S/14, E=2, last 5 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 5, shared=True),
        (33875328, 27967488, 7043041920),
    ),
    "vimoe_small_patch14_e2_last12": _preset(
        "ViMoE ViT-S/14, E=2, last 12 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 12, shared=False),
        (36243840, 22065024, 5527199616),
    ),
    "vimoe_small_patch14_e2_last12_shared": _preset(
        "ViMoE ViT-S/14, E=2, last 12 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(2, 12, shared=True),
        (50422656, 36243840, 9165234048),
    ),
    "vimoe_small_patch14_e4_last1": _preset(
        "ViMoE ViT-S/14, E=4, last 1 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 1, shared=False),
        (25602048, 22057344, 5527191936),
    ),
    "vimoe_small_patch14_e4_last1_shared": _preset(
        "ViMoE ViT-S/14, E=4, last 1 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 1, shared=True),
        (26783616, 23238912, 5830361472),
    ),
    "vimoe_small_patch14_e4_last2": _preset(
        "ViMoE ViT-S/14, E=4, last 2 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 2, shared=False),
        (29148288, 22058880, 5527193472),
    ),
    "vimoe_small_patch14_e4_last2_shared": _preset(
        "ViMoE ViT-S/14, E=4, last 2 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 2, shared=True),
        (31511424, 24422016, 6133532544),
    ),
    "vimoe_small_patch14_e4_last3": _preset(
        "ViMoE ViT-S/14, E=4, last 3 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 3, shared=False),
        (32694528, 22060416, 5527195008),
    ),
    "vimoe_small_patch14_e4_last3_shared": _preset(
        "ViMoE ViT-S/14, E=4, last 3 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 3, shared=True),
        (36239232, 25605120, 6436703616),
    ),
    "vimoe_small_patch14_e4_last5": _preset(
        "ViMoE ViT-S/14, E=4, last 5 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 5, shared=False),
        (39787008, 22063488, 5527198080),
    ),
    "vimoe_small_patch14_e4_last5_shared": _preset(
        "ViMoE ViT-S/14, E=4, last 5 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 5, shared=True),
        (45694848, 27971328, 7043045760),
    ),
    "vimoe_small_patch14_e4_last12": _preset(
        "ViMoE ViT-S/14, E=4, last 12 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 12, shared=False),
        (64610688, 22074240, 5527208832),
    ),
    "vimoe_small_patch14_e4_last12_shared": _preset(
        "ViMoE ViT-S/14, E=4, last 12 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(4, 12, shared=True),
        (78789504, 36253056, 9165243264),
    ),
    "vimoe_small_patch14_e8_last1": _preset(
        "ViMoE ViT-S/14, E=8, last 1 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 1, shared=False),
        (30329856, 22058880, 5527193472),
    ),
    "vimoe_small_patch14_e8_last1_shared": _preset(
        "ViMoE ViT-S/14, E=8, last 1 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 1, shared=True),
        (31511424, 23240448, 5830363008),
    ),
    "vimoe_small_patch14_e8_last2": _preset(
        "ViMoE ViT-S/14, E=8, last 2 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 2, shared=False),
        (38603904, 22061952, 5527196544),
    ),
    "vimoe_small_patch14_e8_last2_shared": _preset(
        "ViMoE ViT-S/14, E=8, last 2 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 2, shared=True),
        (40967040, 24425088, 6133535616),
    ),
    "vimoe_small_patch14_e8_last3": _preset(
        "ViMoE ViT-S/14, E=8, last 3 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 3, shared=False),
        (46877952, 22065024, 5527199616),
    ),
    "vimoe_small_patch14_e8_last3_shared": _preset(
        "ViMoE ViT-S/14, E=8, last 3 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 3, shared=True),
        (50422656, 25609728, 6436708224),
    ),
    "vimoe_small_patch14_e8_last5": _preset(
        "ViMoE ViT-S/14, E=8, last 5 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 5, shared=False),
        (63426048, 22071168, 5527205760),
    ),
    "vimoe_small_patch14_e8_last5_shared": _preset(
        "ViMoE ViT-S/14, E=8, last 5 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 5, shared=True),
        (69333888, 27979008, 7043053440),
    ),
    "vimoe_small_patch14_e8_last12": _preset(
        "ViMoE ViT-S/14, E=8, last 12 blocks, image top-1.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 12, shared=False),
        (121344384, 22092672, 5527227264),
    ),
    "vimoe_small_patch14_e8_last12_shared": _preset(
        "ViMoE ViT-S/14, E=8, last 12 blocks, image top-1, shared.",
        _SOURCES["dinov2_small"],
        _vimoe(8, 12, shared=True),
        (135523200, 36271488, 9165261696),
    ),
    "vit_small_patch16": _preset(
        "Dense ViT-S/16, timm ImageNet-21k + 1k weights.",
        _SOURCES["vit_small"],
        dict(_VIT_SMALL),
        (21665280, 21665280, 4250290560),
    ),
    "vit_moe_small_patch16_e4_every2_top2": _preset(
        "Sweet-spot ViT-S/16, E=4, Every-2, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 4, "every-2"),
        (42942720, 28763904, 5646450048),
    ),
    "vit_moe_small_patch16_e4_last2_top2": _preset(
        "Sweet-spot ViT-S/16, E=4, Last-2, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 4, "last-2"),
        (28757760, 24031488, 4715677056),
    ),
    "vit_moe_small_patch16_e4_last3_top2": _preset(
        "Sweet-spot ViT-S/16, E=4, Last-3, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 4, "last-3"),
        (32304000, 25214592, 4948370304),
    ),
    "vit_moe_small_patch16_e8_every2_top2": _preset(
        "Sweet-spot ViT-S/16, E=8, Every-2, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 8, "every-2"),
        (71309568, 28773120, 5648265600),
    ),
    "vit_moe_small_patch16_e8_last2_top2": _preset(
        "Sweet-spot ViT-S/16, E=8, Last-2, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 8, "last-2"),
        (38213376, 24034560, 4716282240),
    ),
    "vit_moe_small_patch16_e8_last3_top2": _preset(
        "Sweet-spot ViT-S/16, E=8, Last-3, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 8, "last-3"),
        (46487424, 25219200, 4949278080),
    ),
    "vit_moe_small_patch16_e16_every2_top2": _preset(
        "Sweet-spot ViT-S/16, E=16, Every-2, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 16, "every-2"),
        (128043264, 28791552, 5651896704),
    ),
    "vit_moe_small_patch16_e16_last2_top2": _preset(
        "Sweet-spot ViT-S/16, E=16, Last-2, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 16, "last-2"),
        (57124608, 24040704, 4717492608),
    ),
    "vit_moe_small_patch16_e16_last3_top2": _preset(
        "Sweet-spot ViT-S/16, E=16, Last-3, token top-2.",
        _SOURCES["vit_small"],
        _sweet_spot(_VIT_SMALL, 16, "last-3"),
        (74854272, 25228416, 4951093632),
    ),
    "soft_moe_small_patch16_128e": _preset(
        "Soft MoE-S/16, 128 experts x 1 slot in the last 6 blocks (Soft "
        "MoE paper Sec. 3.4). Weights: upcycled from the dense ViT-S/16.",
        _SOURCES["vit_small"],
        _soft_moe(_VIT_SMALL),
        (922315014, 922315014, 3936209280),
    ),
    "expert_choice_vit_small_patch16_e8_every2_cf2": _preset(
        "Expert Choice ViT-S/16, E=8, Every-2, capacity factor 2 (per "
        "image). Weights: upcycled from the dense ViT-S/16.",
        _SOURCES["vit_small"],
        _expert_choice(_VIT_SMALL, 8, "every-2", 2.0),
        (71309568, 71309568, 5690732928),
    ),
    "expert_choice_vit_small_patch16_e128_last6_cf1": _preset(
        "Expert Choice ViT-S/16, E=128, last 6 blocks, capacity factor 1 "
        "(per image). Weights: upcycled from the dense ViT-S/16.",
        _SOURCES["vit_small"],
        _expert_choice(_VIT_SMALL, 128, "last-6", 1.0),
        (922315008, 922315008, 4725983616),
    ),
    "vit_base_patch16": _preset(
        "Dense ViT-B/16, timm ImageNet-21k + 1k weights.",
        _SOURCES["vit_base"],
        dict(_VIT_BASE),
        (85797888, 85797888, 16866644736),
    ),
    "vit_moe_base_patch16_e4_every2_top2": _preset(
        "Sweet-spot ViT-B/16, E=4, Every-2, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 4, "every-2"),
        (170820096, 114150912, 22447651584),
    ),
    "vit_moe_base_patch16_e4_last2_top2": _preset(
        "Sweet-spot ViT-B/16, E=4, Last-2, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 4, "last-2"),
        (114138624, 95248896, 18726980352),
    ),
    "vit_moe_base_patch16_e4_last3_top2": _preset(
        "Sweet-spot ViT-B/16, E=4, Last-3, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 4, "last-3"),
        (128308992, 99974400, 19657148160),
    ),
    "vit_moe_base_patch16_e8_every2_top2": _preset(
        "Sweet-spot ViT-B/16, E=8, Every-2, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 8, "every-2"),
        (284176896, 114169344, 22451282688),
    ),
    "vit_moe_base_patch16_e8_last2_top2": _preset(
        "Sweet-spot ViT-B/16, E=8, Last-2, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 8, "last-2"),
        (151924224, 95255040, 18728190720),
    ),
    "vit_moe_base_patch16_e8_last3_top2": _preset(
        "Sweet-spot ViT-B/16, E=8, Last-3, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 8, "last-3"),
        (184987392, 99983616, 19658963712),
    ),
    "vit_moe_base_patch16_e16_every2_top2": _preset(
        "Sweet-spot ViT-B/16, E=16, Every-2, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 16, "every-2"),
        (510890496, 114206208, 22458544896),
    ),
    "vit_moe_base_patch16_e16_last2_top2": _preset(
        "Sweet-spot ViT-B/16, E=16, Last-2, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 16, "last-2"),
        (227495424, 95267328, 18730611456),
    ),
    "vit_moe_base_patch16_e16_last3_top2": _preset(
        "Sweet-spot ViT-B/16, E=16, Last-3, token top-2.",
        _SOURCES["vit_base"],
        _sweet_spot(_VIT_BASE, 16, "last-3"),
        (298344192, 100002048, 19662594816),
    ),
    "soft_moe_base_patch16_128e": _preset(
        "Soft MoE-B/16, 128 experts x 1 slot in the last 6 blocks (Soft "
        "MoE paper Sec. 3.4). Weights: upcycled from the dense ViT-B/16.",
        _SOURCES["vit_base"],
        _soft_moe(_VIT_BASE),
        (3684880902, 3684880902, 15261733632),
    ),
    "expert_choice_vit_base_patch16_e8_every2_cf2": _preset(
        "Expert Choice ViT-B/16, E=8, Every-2, capacity factor 2 (per "
        "image). Weights: upcycled from the dense ViT-B/16.",
        _SOURCES["vit_base"],
        _expert_choice(_VIT_BASE, 8, "every-2", 2.0),
        (284176896, 284176896, 22621152000),
    ),
    "expert_choice_vit_base_patch16_e128_last6_cf1": _preset(
        "Expert Choice ViT-B/16, E=128, last 6 blocks, capacity factor 1 "
        "(per image). Weights: upcycled from the dense ViT-B/16.",
        _SOURCES["vit_base"],
        _expert_choice(_VIT_BASE, 128, "last-6", 1.0),
        (3684880896, 3684880896, 18653221632),
    ),
}
