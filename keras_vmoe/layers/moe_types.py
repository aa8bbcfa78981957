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

