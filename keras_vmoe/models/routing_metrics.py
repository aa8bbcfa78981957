"""Routing health in the `fit` logs.

`RoutingMetricsMixin` adds, to any Keras model that contains
`MoEFeedForward` layers:
- `aux_loss`: the sum of the weighted auxiliary routing losses (they are
  added in training only, so `val_aux_loss` is 0);
- `<layer>_max_load`: for each MoE layer, `E * max_i load_i`, the busiest
  expert's share of the batch relative to a uniform split: 1.0 is perfectly
  balanced, E means every item went to one expert (routing collapse);
  `val_<layer>_max_load` is the same at evaluation;
- for every `SoftMoEFeedForward`, `<layer>_max_load` as well, computed from
  the combine mass (`E * max_i` of expert i's share of all combine
  weights of the batch; 1.0 when every expert gets the same mass);
- for every `ExpertChoiceFeedForward`, `<layer>_unrouted`: the fraction of
  the batch's tokens that no expert chose (its load is balanced by
  construction, so a max load would always read 1.0).

The values are read in `compute_loss`, where every backend (JAX's stateless
step included) sees this step's forward losses and the layers' updated
`expert_load` statistics.
"""

import keras

from keras_vmoe.layers.expert_choice import ExpertChoiceFeedForward
from keras_vmoe.layers.moe import MoEFeedForward
from keras_vmoe.layers.soft_moe import SoftMoEFeedForward

ROUTED_LAYER_TYPES = (
    MoEFeedForward,
    SoftMoEFeedForward,
    ExpertChoiceFeedForward,
)


def moe_layers(model):
    """All top-k `MoEFeedForward` layers of a model, in depth-first order.

    Soft MoE and Expert Choice layers are not included (they have no
    top-k choices); see `routed_layers`.
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, MoEFeedForward)
    ]


def routed_layers(model):
    """Every MoE layer of a model (`MoEFeedForward`, `SoftMoEFeedForward`,
    `ExpertChoiceFeedForward`), in depth-first order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, ROUTED_LAYER_TYPES)
    ]


def _metric_suffix(layer):
    if isinstance(layer, ExpertChoiceFeedForward):
        return "unrouted"
    return "max_load"


def _layer_metric(layer):
    """The per-layer fit-log value of `layer` for this step."""
    if isinstance(layer, MoEFeedForward):
        return layer.num_experts * keras.ops.max(layer.expert_load)
    # Soft MoE and Expert Choice keep this step's statistics (tensors of
    # the same trace) in `_fit_stats` while `_record_fit_stats` is set.
    return layer._fit_stats[_metric_suffix(layer)]


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
        for layer in self._routed_layers:
            if not isinstance(layer, MoEFeedForward):
                layer._record_fit_stats = True
        self.aux_loss_tracker = keras.metrics.Mean(name="aux_loss")
        self.load_trackers = [
            keras.metrics.Mean(name=f"{name}_{_metric_suffix(layer)}")
            for name, layer in zip(
                _unique_names(self._routed_layers), self._routed_layers
            )
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
                tracker.update_state(_layer_metric(layer))
        return loss
