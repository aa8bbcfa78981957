"""The MoE feed-forward layer of each router type, for model builders.

A model's `moe_config` dict may name its layer with `"router_type"`:
"top_k" (`MoEFeedForward`, the default when the key is absent, so configs
saved before it existed still load), "soft" (`SoftMoEFeedForward`) or
"expert_choice" (`ExpertChoiceFeedForward`).
"""

from keras_vmoe.layers.expert_choice import ExpertChoiceFeedForward
from keras_vmoe.layers.moe import MoEFeedForward
from keras_vmoe.layers.soft_moe import SoftMoEFeedForward

MOE_LAYERS = {
    "top_k": MoEFeedForward,
    "soft": SoftMoEFeedForward,
    "expert_choice": ExpertChoiceFeedForward,
}
MOE_LAYER_TYPES = tuple(MOE_LAYERS.values())


def check_router_type(router_type):
    if router_type not in MOE_LAYERS:
        raise ValueError(
            f"`router_type` must be one of {tuple(MOE_LAYERS)}. Received: "
            f"router_type={router_type!r}"
        )


def build_moe_layer(moe_config, **kwargs):
    """Builds the layer `moe_config["router_type"]` names.

    Args:
        moe_config: the layer's arguments plus an optional `"router_type"`.
        **kwargs: further arguments (`hidden_dim`, `dtype`, `name`).
    """
    moe_config = dict(moe_config)
    router_type = moe_config.pop("router_type", "top_k")
    check_router_type(router_type)
    return MOE_LAYERS[router_type](**moe_config, **kwargs)


def router_type_config(
    router_type, top_k_config, slots_per_expert, used_arguments, defaults
):
    """The `moe_config` of a backbone's MoE blocks for `router_type`.

    Backbones take the top-k arguments of `MoEFeedForward` flat; a Soft MoE
    or Expert Choice backbone passes on the arguments its layer uses and
    refuses a non-default value for any other.

    Args:
        router_type: "top_k", "soft" or "expert_choice".
        top_k_config: the backbone's top-k MoE arguments.
        slots_per_expert: Soft MoE slots per expert (1 unless "soft").
        used_arguments: `{router_type: names passed to that layer}`.
        defaults: `{name: default}` of the backbone's top-k arguments.

    Raises:
        ValueError: naming `slots_per_expert` or an argument that
            `router_type` does not use but that was given a non-default
            value.
    """
    check_router_type(router_type)
    if (
        not isinstance(slots_per_expert, int)
        or isinstance(slots_per_expert, bool)
        or slots_per_expert < 1
    ):
        raise ValueError(
            "`slots_per_expert` must be a positive integer. Received: "
            f"slots_per_expert={slots_per_expert!r}"
        )
    if router_type != "soft" and slots_per_expert != 1:
        raise ValueError(
            "`slots_per_expert` applies to `router_type='soft'` only. "
            f"Received: slots_per_expert={slots_per_expert!r}, "
            f"router_type={router_type!r}"
        )
    if router_type == "top_k":
        return dict(top_k_config)
    used = used_arguments[router_type]
    for name, default in defaults.items():
        if name not in used and top_k_config[name] != default:
            raise ValueError(
                f"router_type={router_type!r} does not use `{name}`; leave "
                f"it at its default {default!r}. Received: "
                f"{name}={top_k_config[name]!r}"
            )
    values = dict(top_k_config, slots_per_expert=slots_per_expert)
    config = {name: values[name] for name in used}
    config["router_type"] = router_type
    return config
