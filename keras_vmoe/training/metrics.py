"""Routing health in the `fit` logs (re-exported).

The code lives in `keras_vmoe.models.routing_metrics`, next to the models
that mix `RoutingMetricsMixin` in (models never import `keras_vmoe.training`).
"""

from keras_vmoe.models.routing_metrics import ROUTED_LAYER_TYPES
from keras_vmoe.models.routing_metrics import RoutingMetricsMixin
from keras_vmoe.models.routing_metrics import moe_layers
from keras_vmoe.models.routing_metrics import routed_layers
from keras_vmoe.models.routing_metrics import top_k_layers

__all__ = [
    "ROUTED_LAYER_TYPES",
    "RoutingMetricsMixin",
    "moe_layers",
    "routed_layers",
    "top_k_layers",
]
