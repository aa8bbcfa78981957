"""The MoE arguments that both backbone families take, in one place.

`ViTMoEBackbone` and `ConvNeXtMoEBackbone` take the same flat MoE
arguments, with the names (and meaning) of the `MoEFeedForward` constructor
arguments, and forward them to every MoE block. This module defines:

- `MOE_ARGUMENTS`: the names, in the order the backbones list them;
- `defaults(family)`: their default values; only `num_experts` and
  `routing` differ between the families (`FAMILY_DEFAULTS`);
- `ROUTER_TYPE_ARGUMENTS`: which of them each `router_type` layer takes;
- `build_moe_config`: validation and assembly of the per-block
  `moe_config`, `block_moe_config` the per-block `seed`;
- `get_config`: the backbone's config entries for them;
- `merge_moe_kwargs`: the deprecated ConvNeXt `moe_kwargs` dict.

The tests check that both backbones' signatures list exactly these names
with exactly these defaults, so the families cannot drift apart.
"""

from keras_vmoe.layers.moe_types import build_moe_layer
from keras_vmoe.layers.moe_types import check_router_type
from keras_vmoe.validation import warn_deprecated

# Names of the `MoEFeedForward` (or `SoftMoEFeedForward`,
# `ExpertChoiceFeedForward`) arguments a backbone forwards to its MoE
# blocks. Left out on purpose: `hidden_dim` (the family sets it: ViT
# `mlp_dim`, ConvNeXt `expert_mlp_ratio`), `activation`, `dropout` and
# `kernel_initializer` (those of the dense MLP the experts replace),
# `image_router_input` ("auto" picks CLS for ViT, the mean for ConvNeXt)
# and `return_routing` (a backbone returns features only).
MOE_ARGUMENTS = (
    "num_experts",
    "top_k",
    "routing",
    "router",
    "router_dim",
    "shared_expert",
    "capacity_factor",
    "eval_capacity_factor",
    "group_size",
    "eval_group_size",
    "batch_prioritized_routing",
    "normalize_gates",
    "noisy_gating",
    "noise_std",
    "load_balance_loss_weight",
    "importance_loss_weight",
    "load_loss_weight",
    "z_loss_weight",
    "dispatch",
    "seed",
    "router_type",
    "slots_per_expert",
    "normalize",
    "capacity_multiple_of",
    "partial_groups",
)

_COMMON_DEFAULTS = {
    "top_k": 1,
    "router": "linear",
    "router_dim": 256,
    "shared_expert": False,
    "capacity_factor": 1.25,
    "eval_capacity_factor": 2.0,
    "group_size": None,
    "eval_group_size": "image",
    "batch_prioritized_routing": True,
    "normalize_gates": False,
    "noisy_gating": False,
    "noise_std": None,
    "load_balance_loss_weight": 0.01,
    "importance_loss_weight": 0.0,
    "load_loss_weight": 0.0,
    "z_loss_weight": 0.0,
    "dispatch": "auto",
    "seed": None,
    "router_type": "top_k",
    "slots_per_expert": 1,
    "normalize": True,
    "capacity_multiple_of": None,
    "partial_groups": "error",
}

# The only defaults that differ: ViMoE routes images over 8 experts, the
# Sweet-spot MoE-ConvNeXt routes tokens over 4.
FAMILY_DEFAULTS = {
    "vit": {"num_experts": 8, "routing": "image"},
    "convnext": {"num_experts": 4, "routing": "token"},
}

# The arguments each router type's layer takes; every other MoE argument
# must keep its default with that router type.
ROUTER_TYPE_ARGUMENTS = {
    "top_k": tuple(
        name
        for name in MOE_ARGUMENTS
        if name not in ("router_type", "slots_per_expert", "normalize")
    ),
    "soft": (
        "num_experts",
        "slots_per_expert",
        "shared_expert",
        "normalize",
        "seed",
    ),
    "expert_choice": (
        "num_experts",
        "capacity_factor",
        "router",
        "router_dim",
        "shared_expert",
        "seed",
    ),
}

def defaults(family):
    """`{name: default}` of the MoE arguments of `family` ("vit" or
    "convnext"), in `MOE_ARGUMENTS` order."""
    values = dict(_COMMON_DEFAULTS, **FAMILY_DEFAULTS[family])
    return {name: values[name] for name in MOE_ARGUMENTS}


def collect(values):
    """The MoE arguments out of a dict holding them (e.g. `locals()`)."""
    return {name: values[name] for name in MOE_ARGUMENTS}


def merge_moe_kwargs(moe_kwargs, values, family):
    """`values` (the flat MoE arguments) updated from a deprecated
    `moe_kwargs` dict.

    Args:
        moe_kwargs: None, or a dict whose keys are MoE argument names.
        values: `{name: value}` of all the flat MoE arguments.
        family: "vit" or "convnext" (for the defaults).

    Returns:
        A new dict of the flat MoE arguments.

    Raises:
        ValueError: naming `moe_kwargs` and the offending key, for a key
            that is not a MoE argument or that repeats a flat argument
            given with a different value.
    """
    if moe_kwargs is None:
        return dict(values)
    if not isinstance(moe_kwargs, dict):
        raise ValueError(
            "`moe_kwargs` must be a dict of MoE arguments or None. "
            f"Received: moe_kwargs={moe_kwargs!r}"
        )
    warn_deprecated(
        "moe_kwargs", "the flat MoE arguments (e.g. `group_size=4`)", 4
    )
    default = defaults(family)
    merged = dict(values)
    for key, value in moe_kwargs.items():
        if key not in default:
            raise ValueError(
                f"`moe_kwargs` has the key {key!r}, which is not a MoE "
                f"argument of the backbone (one of {MOE_ARGUMENTS}). "
                f"Received: moe_kwargs={moe_kwargs!r}"
            )
        if values[key] != default[key] and values[key] != value:
            raise ValueError(
                f"`moe_kwargs` sets {key!r} to {value!r} but the argument "
                f"`{key}` is {values[key]!r}; pass it once, flat. Received: "
                f"moe_kwargs={moe_kwargs!r}, {key}={values[key]!r}"
            )
        merged[key] = value
    return merged


def build_moe_config(values, family, validate=True):
    """The `moe_config` of the MoE blocks from the flat MoE arguments.

    With `router_type="top_k"` it holds every top-k argument; a Soft MoE
    or Expert Choice config holds the arguments its layer takes
    (`ROUTER_TYPE_ARGUMENTS`) plus `"router_type"`, and every other MoE
    argument must keep the family's default.

    Args:
        values: `{name: value}` of all the flat MoE arguments.
        family: "vit" or "convnext" (for the defaults).
        validate: build one throwaway MoE layer so that a bad value gets
            the layer's own error message now.

    Returns:
        The per-block `moe_config` dict (see `block_moe_config`).

    Raises:
        ValueError: naming the argument and the value received.
    """
    default = defaults(family)
    router_type = values["router_type"]
    check_router_type(router_type)
    slots_per_expert = values["slots_per_expert"]
    if (
        not isinstance(slots_per_expert, int)
        or isinstance(slots_per_expert, bool)
        or slots_per_expert < 1
    ):
        raise ValueError(
            "`slots_per_expert` must be a positive integer. Received: "
            f"slots_per_expert={slots_per_expert!r}"
        )
    if not isinstance(values["router"], str):
        # One router instance cannot serve several MoE blocks.
        raise ValueError(
            "`router` must be a router name ('linear', 'cosine', 'l2'); "
            "each MoE block builds its own. Received: "
            f"router={values['router']!r}"
        )
    used = ROUTER_TYPE_ARGUMENTS[router_type]
    for name in MOE_ARGUMENTS:
        if name == "router_type" or name in used:
            continue
        if values[name] != default[name]:
            raise ValueError(
                f"`{name}` is not used with router_type={router_type!r}; "
                f"leave it at its default {default[name]!r}. Received: "
                f"{name}={values[name]!r}"
            )
    config = {name: values[name] for name in used}
    if router_type != "top_k":
        config["router_type"] = router_type
    if validate:
        build_moe_layer(config, hidden_dim=1, name="moe_argument_check")
    return config


def block_moe_config(moe_config, block_index):
    """The `moe_config` of block `block_index` (counted over all blocks):
    a `seed` becomes `seed + block_index`, so that blocks draw different
    gating noise."""
    if moe_config is None or moe_config.get("seed") is None:
        return moe_config
    return dict(moe_config, seed=moe_config["seed"] + block_index)


def set_attributes(backbone, values):
    """Stores the flat MoE arguments on `backbone` (for `get_config`)."""
    for name in MOE_ARGUMENTS:
        setattr(backbone, name, values[name])


def get_config(backbone):
    """The config entries of the MoE arguments of `backbone`."""
    return {name: getattr(backbone, name) for name in MOE_ARGUMENTS}
