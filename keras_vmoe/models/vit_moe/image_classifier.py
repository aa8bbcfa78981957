"""`ViTMoEImageClassifier`: a linear head on a `ViTMoEBackbone`."""

import math

import keras
import keras_hub
from keras import ops

from keras_vmoe.export import ServingExportMixin
from keras_vmoe.models import preset_io
from keras_vmoe.models import registry
from keras_vmoe.models.quantization import ExpertQuantizationMixin
from keras_vmoe.models.routing_metrics import RoutingMetricsMixin
from keras_vmoe.models.shuffle import ShuffledFitMixin
from keras_vmoe.models.vit_moe import presets
from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS
from keras_vmoe.models.vit_moe.image_classifier_preprocessor import (
    ViTMoEImageClassifierPreprocessor,
)

# Re-exported: presets and .keras files saved before the split name this
# module for the converter (their registered name, "keras_vmoe>...", is
# unchanged).
from keras_vmoe.models.vit_moe.image_converter import (  # noqa: F401
    ViTMoEImageConverter,
)
from keras_vmoe.validation import TASK_KWARGS
from keras_vmoe.validation import check_head_args
from keras_vmoe.validation import check_int
from keras_vmoe.validation import check_no_unknown_kwargs

POOLINGS = ("cls", "cls+mean")


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ViTMoEImageClassifier(
    ExpertQuantizationMixin,
    ShuffledFitMixin,
    RoutingMetricsMixin,
    ServingExportMixin,
    preset_io.PresetLoadingMixin,
    preset_io.PresetSavingMixin,
    keras_hub.models.ImageClassifier,
):
    """Image classifier on a ViT-MoE backbone.

    The head reads the CLS token (`pooling="cls"`) or, as DINOv2's linear
    probes, the CLS token concatenated with the mean of the patch tokens
    (`pooling="cls+mean"`; register tokens are left out). The backbone's
    auxiliary MoE losses (load balance, ...) are in `model.losses`, so
    `fit()` minimises them with the classification loss and logs them
    (`aux_loss`) with each MoE layer's busiest-expert load
    (`block_<i>_mlp_max_load`; 1.0 is balanced).

    Args:
        backbone: a `ViTMoEBackbone`.
        num_classes: number of classes.
        preprocessor: None or a `ViTMoEImageClassifierPreprocessor`.
        pooling: "cls" or "cls+mean".
        activation: activation of the output layer, None for logits.
        dropout: dropout before the output layer.
        head_dtype: dtype policy of the head; default: the backbone's.
        representation_size: None, or the width of a `pre_logits` Dense
            layer with tanh between the pooled features and the output
            layer (ViT's `representation_size`, used by vmoe's models).

    With an E^3 backbone (`ensemble_size=M` > 1) the head runs on every
    member's features and the output is the log of the members' mean
    probability, `logsumexp_m(log_softmax(z_m)) - log M` (vmoe's ensemble
    evaluation), [B, num_classes]; `activation` applies after that. A loss
    on logits (`from_logits=True`) is then the ensemble's negative log
    likelihood.

    Example:
    >>> backbone = ViTMoEBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
    ...     hidden_dim=32, mlp_dim=64, moe_layers="last-1", num_experts=4)
    >>> classifier = ViTMoEImageClassifier(backbone, num_classes=10)
    >>> classifier.predict(np.ones((2, 32, 32, 3))).shape
    (2, 10)
    """

    backbone_cls = ViTMoEBackbone
    preprocessor_cls = ViTMoEImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        pooling="cls",
        activation=None,
        dropout=0.0,
        head_dtype=None,
        representation_size=None,
        **kwargs,
    ):
        check_no_unknown_kwargs(type(self).__name__, kwargs, TASK_KWARGS)
        check_head_args(backbone, ViTMoEBackbone, num_classes, dropout)
        if pooling not in POOLINGS:
            raise ValueError(
                f"`pooling` must be one of {POOLINGS}. Received: "
                f"pooling={pooling!r}"
            )
        check_int("representation_size", representation_size, allow_none=True)
        head_dtype = head_dtype or backbone.dtype_policy
        ensemble_size = getattr(backbone, "ensemble_size", 1)

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=head_dtype, name="output_dropout"
        )
        self.pre_logits = (
            keras.layers.Dense(
                representation_size,
                activation="tanh",
                dtype=head_dtype,
                name="pre_logits",
            )
            if representation_size
            else None
        )
        self.output_dense = keras.layers.Dense(
            num_classes,
            activation=activation if ensemble_size == 1 else None,
            dtype=head_dtype,
            name="predictions",
        )

        # === Functional Model ===
        inputs = self.backbone.input
        tokens = self.backbone(inputs)
        features = tokens[:, 0]
        if pooling == "cls+mean":
            patch_mean = ops.mean(
                tokens[:, backbone.num_prefix_tokens :], axis=1
            )
            features = ops.concatenate([features, patch_mean], axis=-1)
        if self.pre_logits is not None:
            features = self.pre_logits(features)
        outputs = self.output_dense(self.output_dropout(features))
        if ensemble_size > 1:
            outputs = ensemble_log_mean_probability(outputs, ensemble_size)
            if activation is not None:
                outputs = keras.activations.get(activation)(outputs)
        # Skip `ImageClassifier.__init__`, which builds a 2D pooling head.
        keras_hub.models.Task.__init__(
            self, inputs=inputs, outputs=outputs, **kwargs
        )

        # === Config ===
        self.num_classes = num_classes
        self.pooling = pooling
        self.activation = activation
        self.dropout = dropout
        self.representation_size = representation_size
        self._track_routing()

    def get_config(self):
        config = super().get_config()
        if self.representation_size is not None:
            # Only when set: configs saved before the option still load.
            config["representation_size"] = self.representation_size
        return config

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a classifier from a preset name, a directory or a handle.

        For a published V-MoE / E^3 checkpoint (a name of
        `keras_vmoe.models.vit_moe.vmoe_presets.VMOE_PRESETS`) the trained
        classifier is downloaded (or read from `checkpoint=`) and
        converted; `num_classes=n` starts fine-tuning from it (see
        `build_vmoe_preset`). For another name from
        `keras_vmoe.models.list_presets()`, `num_classes` is
        required (the dense checkpoints have no head for the target task),
        the head is new, the preprocessor normalises with the statistics of
        the preset's checkpoint (`keras_vmoe.models.preset_normalization`),
        and the other keyword arguments go to `ViTMoEBackbone.from_preset`
        except `pooling`, `activation`, `dropout` and `head_dtype`. Anything
        else is handled by KerasHub.
        """
        if not (
            isinstance(preset, str)
            and (preset in presets.PRESETS or preset in VMOE_PRESETS)
        ):
            preset_io.check_preset_name(preset, "ViTMoE", cls.__name__)
            preset_io.check_preset_dir(preset, True, load_weights, **kwargs)
            return preset_io._wrap_loading_errors(
                preset,
                lambda: super(ViTMoEImageClassifier, cls).from_preset(
                    preset, load_weights=load_weights, **kwargs
                ),
            )
        return registry.build_preset(cls, preset, load_weights, **kwargs)


def ensemble_log_mean_probability(logits, ensemble_size):
    """[B*M, C] member logits (copies of an image consecutive) -> [B, C]
    log of the members' mean probability, in float32."""
    logits = ops.cast(logits, "float32")
    logits = ops.reshape(logits, (-1, ensemble_size, logits.shape[-1]))
    log_probs = ops.log_softmax(logits, axis=-1)
    return ops.logsumexp(log_probs, axis=1) - math.log(ensemble_size)
