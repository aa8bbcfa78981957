"""The registry of MoE layer types, for model builders and model tools.

A model's `moe_config` dict may name its layer with `"router_type"`:
"top_k" (`MoEFeedForward`, the default when the key is absent, so configs
saved before it existed still load), "soft" (`SoftMoEFeedForward`) or
"expert_choice" (`ExpertChoiceFeedForward`). Every MoE layer is a
`keras_vmoe.layers.base.MoELayer`; distribution, fit metrics, analysis,
statistics and surgery find a model's MoE layers with `find_moe_layers`.
"""

from keras_vmoe.layers.base import MOE_LAYERS
from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.expert_choice import ExpertChoiceFeedForward
from keras_vmoe.layers.moe import MoEFeedForward
from keras_vmoe.layers.soft_moe import SoftMoEFeedForward

__all__ = [
    "ExpertChoiceFeedForward",
    "MOE_LAYERS",
    "MOE_LAYER_TYPES",
    "MoEFeedForward",
    "MoELayer",
    "SoftMoEFeedForward",
    "build_moe_layer",
    "check_router_type",
    "find_moe_layers",
]

MOE_LAYER_TYPES = (MoELayer,)


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


def find_moe_layers(model, router_type=None):
    """The MoE layers of `model` in depth-first order (the model itself if
    it is one), optionally only those of one `router_type`.

    Args:
        model: a Keras model or layer.
        router_type: None for every MoE layer, or "top_k", "soft",
            "expert_choice".
    """
    if router_type is not None:
        check_router_type(router_type)
    if isinstance(model, MoELayer):
        layers = [model]
    else:
        layers = [
            layer
            for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, MoELayer)
        ]
    return [
        layer
        for layer in layers
        if router_type is None or layer.router_type == router_type
    ]
