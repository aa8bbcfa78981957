"""Mixture-of-Experts layers: routers, routing, dispatch, losses and the
MoE feed-forward layers (one base, `MoELayer`, and one subclass per
router type)."""

from keras_vmoe.layers import losses
from keras_vmoe.layers import routing
from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.expert_choice import ExpertChoiceFeedForward
from keras_vmoe.layers.feed_forward import FeedForward
from keras_vmoe.layers.moe import MoEFeedForward
from keras_vmoe.layers.moe_types import find_moe_layers
from keras_vmoe.layers.routers import CosineRouter
from keras_vmoe.layers.routers import L2Router
from keras_vmoe.layers.routers import LinearRouter
from keras_vmoe.layers.soft_moe import SoftMoEFeedForward

__all__ = [
    "CosineRouter",
    "ExpertChoiceFeedForward",
    "FeedForward",
    "L2Router",
    "LinearRouter",
    "MoEFeedForward",
    "MoELayer",
    "SoftMoEFeedForward",
    "find_moe_layers",
    "losses",
    "routing",
]
