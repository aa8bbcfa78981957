"""Routing health in the `fit` logs.

`RoutingMetricsMixin` adds, to any Keras model that contains
`MoEFeedForward` layers:
- `aux_loss`: the sum of the weighted auxiliary routing losses (they are
  added in training only, so `val_aux_loss` is 0);
- `<layer>_max_load`: for each MoE layer, `E * max_i load_i`, the busiest
  expert's share of the batch relative to a uniform split: 1.0 is perfectly
  balanced, E means every item went to one expert (routing collapse);
  `val_<layer>_max_load` is the same at evaluation.

The values are read in `compute_loss`, where every backend (JAX's stateless
step included) sees this step's forward losses and the layers' updated
`expert_load` statistics.
"""

import keras

from keras_vmoe.layers.moe import MoEFeedForward


def moe_layers(model):
    """All `MoEFeedForward` layers of a model, in depth-first order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MoEFeedForward)
    ]


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
        self._routed_layers = moe_layers(self)
        self.aux_loss_tracker = keras.metrics.Mean(name="aux_loss")
        self.load_trackers = [
            keras.metrics.Mean(name=f"{name}_max_load")
            for name in _unique_names(self._routed_layers)
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
            for layer, tracker in zip(self._routed_layers, self.load_trackers):
                tracker.update_state(
                    layer.num_experts * keras.ops.max(layer.expert_load)
                )
        return loss
