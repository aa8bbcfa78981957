"""MoE-ConvNeXt image classifier: global average pool, LayerNorm, head."""

import keras
from keras_hub.models import ImageClassifier
from keras_hub.models import Task

from keras_vmoe.export import ServingExportMixin
from keras_vmoe.models import preset_io
from keras_vmoe.models import registry
from keras_vmoe.models.convnext_moe import presets
from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe.image_classifier_preprocessor import (
    ConvNeXtMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.quantization import ExpertQuantizationMixin
from keras_vmoe.models.routing_metrics import RoutingMetricsMixin
from keras_vmoe.models.shuffle import ShuffledFitMixin
from keras_vmoe.validation import TASK_KWARGS
from keras_vmoe.validation import check_head_args
from keras_vmoe.validation import check_no_unknown_kwargs
from keras_vmoe.validation import check_number


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ConvNeXtMoEImageClassifier(
    ExpertQuantizationMixin,
    ShuffledFitMixin,
    RoutingMetricsMixin,
    ServingExportMixin,
    preset_io.PresetLoadingMixin,
    preset_io.PresetSavingMixin,
    ImageClassifier,
):
    """Image classifier on a `ConvNeXtMoEBackbone`.

    The ConvNeXt head (Liu et al., 2022): global average pooling of the
    last feature map, LayerNorm (epsilon 1e-6), dropout, then a dense
    layer. The MoE blocks' auxiliary (load-balancing) losses are added with
    `add_loss`, so `fit()` trains them with the classification loss, and
    the `fit` logs show `aux_loss` and each MoE layer's `max_load` (see
    `keras_vmoe.models.routing_metrics.RoutingMetricsMixin`).

    Args:
        backbone: a `ConvNeXtMoEBackbone`.
        num_classes: number of output classes.
        preprocessor: a `ConvNeXtMoEImageClassifierPreprocessor`, or None.
        activation: activation of the head (None for logits).
        dropout: dropout rate before the head.
        layer_norm_epsilon: epsilon of the head LayerNorm.
        head_dtype: dtype policy of the head; default the backbone's.

    Example:
    >>> backbone = ConvNeXtMoEBackbone(
    ...     depths=[1, 1, 2, 1], hidden_dims=[8, 16, 24, 32],
    ...     moe_layers="last-2", image_shape=(64, 64, 3),
    ... )
    >>> classifier = ConvNeXtMoEImageClassifier(backbone, num_classes=10)
    >>> classifier.compile(optimizer="adam")
    >>> classifier.fit(np.ones((4, 64, 64, 3)), np.arange(4), epochs=1)
    """

    backbone_cls = ConvNeXtMoEBackbone
    preprocessor_cls = ConvNeXtMoEImageClassifierPreprocessor

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        activation=None,
        dropout=0.0,
        layer_norm_epsilon=1e-6,
        head_dtype=None,
        **kwargs,
    ):
        check_no_unknown_kwargs(type(self).__name__, kwargs, TASK_KWARGS)
        check_head_args(backbone, ConvNeXtMoEBackbone, num_classes, dropout)
        check_number(
            "layer_norm_epsilon",
            layer_norm_epsilon,
            minimum=0,
            min_inclusive=False,
        )
        head_dtype = head_dtype or backbone.dtype_policy

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pooler = keras.layers.GlobalAveragePooling2D(
            data_format="channels_last", dtype=head_dtype, name="pooler"
        )
        self.head_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=head_dtype, name="head_norm"
        )
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=head_dtype, name="output_dropout"
        )
        self.output_dense = keras.layers.Dense(
            num_classes,
            activation=activation,
            dtype=head_dtype,
            name="predictions",
        )

        # === Functional Model ===
        inputs = self.backbone.input
        x = self.backbone(inputs)
        x = self.head_norm(self.pooler(x))
        outputs = self.output_dense(self.output_dropout(x))
        Task.__init__(self, inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.activation = activation
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.pooling = "avg"
        self._track_routing()

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds a classifier from a preset name, a directory or a handle.

        For a name from `keras_vmoe.models.list_presets()`, `num_classes` is
        required; with 1000 classes and `load_weights` the ImageNet head is
        loaded, otherwise the head is new; the other keyword arguments go
        to `keras_vmoe.models.convnext_moe.preset_builder.build_model`.
        Anything else is handled by KerasHub.
        """
        if not (isinstance(preset, str) and preset in presets.PRESETS):
            preset_io.check_preset_name(preset, "ConvNeXtMoE", cls.__name__)
            preset_io.check_preset_dir(preset, True, load_weights, **kwargs)
            return preset_io._wrap_loading_errors(
                preset,
                lambda: super(ConvNeXtMoEImageClassifier, cls).from_preset(
                    preset, load_weights=load_weights, **kwargs
                ),
            )
        if kwargs.get("num_classes") is None:
            raise ValueError(
                "`num_classes` is required to build a classifier from the "
                f"preset {preset!r}. Received: "
                f"num_classes={kwargs.get('num_classes')!r}"
            )
        return registry.build_preset(cls, preset, load_weights, **kwargs)

    def get_config(self):
        config = Task.get_config(self)
        config.update(
            {
                "num_classes": self.num_classes,
                "activation": self.activation,
                "dropout": self.dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config
