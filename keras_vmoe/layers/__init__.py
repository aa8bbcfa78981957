"""Mixture-of-Experts layers: routers, routing, losses and the MoE FFN."""

from keras_vmoe.layers import losses
from keras_vmoe.layers import routing
from keras_vmoe.layers.expert_choice import ExpertChoiceFeedForward
from keras_vmoe.layers.feed_forward import FeedForward
from keras_vmoe.layers.moe import MoEFeedForward
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
    "SoftMoEFeedForward",
    "losses",
    "routing",
]
