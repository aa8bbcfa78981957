"""Routing health in the `fit` logs.

`RoutingMetricsMixin` adds, to any Keras model that contains MoE layers
(`keras_vmoe.layers.MoELayer`):
- `aux_loss`: the sum of the weighted auxiliary routing losses (they are
  added in training only, so `val_aux_loss` is 0);
- for every MoE layer, `<layer>_<name>` for each entry of its
  `routing_statistics()`: `max_load` for top-k layers (`E * max_i load_i`,
  the busiest expert's share of the batch relative to a uniform split:
  1.0 is perfectly balanced, E means every item went to one expert) and
  Soft MoE layers (the same on the combine mass), `unrouted` for Expert
  Choice layers (the fraction of the batch's tokens no expert chose; their
  load is balanced by construction). `val_<layer>_<name>` is the same at
  evaluation.

The values are read in `compute_loss`, where every backend (JAX's stateless
step included) sees this step's forward losses and the layers' statistics
of the same step.
"""

import keras

from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.moe_types import find_moe_layers
from keras_vmoe.validation import warn_deprecated

# Every MoE layer is a `MoELayer`.
ROUTED_LAYER_TYPES = (MoELayer,)


def top_k_layers(model):
    """All top-k `MoEFeedForward` layers of a model, in depth-first order."""
    return find_moe_layers(model, router_type="top_k")


def moe_layers(model):
    """Deprecated: `top_k_layers(model)` (`moe_layers` names the placement
    argument of the backbones)."""
    warn_deprecated("moe_layers(model)", "`top_k_layers(model)`")
    return top_k_layers(model)


def routed_layers(model):
    """Every MoE layer of a model, in depth-first order."""
    return find_moe_layers(model)


def _unique_names(layers):
    """Layer names, or their paths where names repeat (ConvNeXt's "moe")."""
    names = [layer.name for layer in layers]
    if len(set(names)) == len(names):
        return names
    return [layer.path.replace("/", "_") for layer in layers]


class RoutingMetricsMixin:
    """Mixin for `keras.Model` subclasses; call `_track_routing()` once the
    model's layers exist (end of `__init__`)."""

    def _track_routing(self):
        self._routed_layers = routed_layers(self)
        self.aux_loss_tracker = keras.metrics.Mean(name="aux_loss")
        # (layer index, statistic name) of each tracker.
        self._load_sources = [
            (index, statistic)
            for index, layer in enumerate(self._routed_layers)
            for statistic in layer.routing_statistic_names
        ]
        names = _unique_names(self._routed_layers)
        self.load_trackers = [
            keras.metrics.Mean(name=f"{names[index]}_{statistic}")
            for index, statistic in self._load_sources
        ]

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=training,
        )
        if getattr(self, "_routed_layers", None):
            losses = self.losses
            self.aux_loss_tracker.update_state(
                keras.ops.sum(keras.ops.stack(losses)) if losses else 0.0
            )
            statistics = {}
            for (index, statistic), tracker in zip(
                self._load_sources, self.load_trackers
            ):
                if index not in statistics:
                    layer = self._routed_layers[index]
                    statistics[index] = layer.routing_statistics()
                tracker.update_state(statistics[index][statistic])
        return loss
