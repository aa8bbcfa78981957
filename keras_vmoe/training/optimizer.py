"""The fine-tuning recipe: AdamW with layer-wise lr decay, warmup + cosine.

ViMoE fine-tunes DINOv2 with AdamW, lr 1e-4, weight decay 0.05 and a
layer-wise learning-rate decay of 0.65 (BEiT, Bao et al., 2022): block i of
L gets `lr * decay ** (L + 1 - layer_id)`, where the embeddings are layer 0,
block i is layer i + 1, and the final norm, the head and every router get the
full rate (layer L + 1).

Keras has AdamW, the warmup + cosine schedule (`CosineDecay` with
`warmup_target`) and gradient clipping; what it lacks is a per-variable
learning-rate multiplier, which `LayerDecayAdamW` adds.
"""

import re

import keras

from keras_vmoe.training.devices import auto_precision
from keras_vmoe.validation import check_int
from keras_vmoe.validation import check_number

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
# Variables never weight-decayed: norms, biases, position embeddings,
# class / register tokens, LayerScale and the stacked expert biases (rank 2,
# so the rank rule alone would miss them).
NO_DECAY_NAMES = re.compile(
    r"bias|gamma|beta|norm|position|pos_embed|token|layer_scale"
)
_BLOCK_INDEX = re.compile(r"(?:^|/)[a-z_]*?block_?(\d+)(?:/|$)")
_STAGE = re.compile(r"(?:^|/)stage_(\d+)_(?:block_(\d+)|downsample)")


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LayerDecayAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is scaled per variable.

    The decoupled weight decay is scaled by the same multiplier, as when
    every layer has its own parameter group (BEiT / timm).

    Args:
        learning_rate: a float or a `LearningRateSchedule`.
        weight_decay: decoupled weight decay.
        lr_multipliers: `{variable.path: multiplier}`; variables not listed
            use 1.0. See `layer_decay_multipliers`.
        **kwargs: other `keras.optimizers.AdamW` arguments (`beta_1`,
            `global_clipnorm`, ...).
    """

    def __init__(
        self, learning_rate=1e-4, weight_decay=0.05, lr_multipliers=None, **kwargs
    ):
        if not isinstance(
            learning_rate, keras.optimizers.schedules.LearningRateSchedule
        ) and not callable(learning_rate):
            check_number("learning_rate", learning_rate, minimum=0)
        check_number("weight_decay", weight_decay, minimum=0, allow_none=True)
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, **kwargs
        )
        self.lr_multipliers = dict(lr_multipliers or {})
        for path, value in self.lr_multipliers.items():
            check_number(f"lr_multipliers[{path!r}]", value, minimum=0)

    def build(self, variables):
        # The update step may see backend variables (TensorFlow) that have
        # no Keras path: key the multipliers the way the optimizer keys
        # its own slots.
        self._key_multipliers = {
            self._var_key(variable): self.lr_multipliers.get(variable.path, 1.0)
            for variable in variables
        }
        super().build(variables)

    def _multiplier(self, variable):
        return self._key_multipliers.get(self._var_key(variable), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self._multiplier(variable)
        if multiplier != 1.0:
            learning_rate = learning_rate * multiplier
        super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = keras.ops.cast(self.learning_rate, variable.dtype)
                decay = keras.ops.cast(self.weight_decay, variable.dtype)
                scale = lr * decay * self._multiplier(variable)
                variable.assign(variable - variable * scale)

    def get_config(self):
        config = super().get_config()
        config["lr_multipliers"] = self.lr_multipliers
        return config


def default_layer_id(path, num_layers):
    """Layer id of a variable path for layer-wise lr decay.

    Routers, norms after the last block and heads -> `num_layers + 1`;
    a variable inside `..block_<i>..` -> `i + 1`; everything else
    (patch / stem embeddings, tokens, position embeddings) -> 0.
    """
    if "router" in path:
        return num_layers + 1
    match = _BLOCK_INDEX.search(path)
    if match:
        return min(int(match.group(1)) + 1, num_layers + 1)
    if re.search(r"embed|token|stem|position", path):
        return 0
    return num_layers + 1


def staged_layer_id(depths):
    """Layer ids for staged models (ConvNeXt): blocks are numbered globally.

    `stage_<s>_block_<b>` -> offset of stage s + b + 1; a stage's
    downsampling layers share the id of its first block; routers, the final
    norm and the head get `sum(depths) + 1`; the stem gets 0.
    """
    offsets = [sum(depths[:stage]) for stage in range(len(depths))]

    def layer_id(path, num_layers):
        if "router" in path:
            return num_layers + 1
        match = _STAGE.search(path)
        if match is None:
            return default_layer_id(path, num_layers)
        stage, block = int(match.group(1)), match.group(2)
        return offsets[stage] + (int(block) if block else 0) + 1

    return layer_id


def layer_decay_multipliers(model, layer_decay, num_layers=None, layer_id=None):
    """`{variable.path: layer_decay ** (num_layers + 1 - layer_id)}`.

    Args:
        model: a Keras model (its trainable variables are mapped).
        layer_decay: decay per layer, in (0, 1].
        num_layers: number of blocks; default: the backbone's `num_layers`,
            or `sum(depths)` for staged backbones.
        layer_id: `(path, num_layers) -> int`; default `staged_layer_id`
            for backbones with `depths`, else `default_layer_id`.
    """
    check_number("layer_decay", layer_decay)
    if not 0 < layer_decay <= 1:
        raise ValueError(
            f"`layer_decay` must be in (0, 1]. Received: layer_decay={layer_decay!r}"
        )
    owner = getattr(model, "backbone", model)
    depths = getattr(owner, "depths", None)
    if layer_id is None and depths is not None:
        layer_id = staged_layer_id(depths)
    if num_layers is None:
        num_layers = getattr(owner, "num_layers", None)
        if num_layers is None and depths is not None:
            num_layers = sum(depths)
        if num_layers is None:
            raise ValueError(
                "Pass `num_layers`: the model has no `num_layers` attribute. "
                f"Received: model={model.name!r}"
            )
    layer_id = layer_id or default_layer_id
    return {
        variable.path: float(
            layer_decay ** (num_layers + 1 - layer_id(variable.path, num_layers))
        )
        for variable in model.trainable_variables
    }


def no_weight_decay_variables(model):
    """Biases, norms, LayerScale, tokens, position embeddings (rank <= 1 or
    named so)."""
    return [
        variable
        for variable in model.trainable_variables
        if len(variable.shape) <= 1 or NO_DECAY_NAMES.search(variable.path)
    ]


def warmup_cosine_schedule(
    learning_rate, total_steps, warmup_steps=0, min_learning_rate=0.0
):
    """Linear warmup from 0 to `learning_rate`, then cosine decay to
    `min_learning_rate` at `total_steps` (Keras `CosineDecay`).

    Raises:
        ValueError: naming the argument and value: `learning_rate` not a
            finite number > 0, `total_steps` not an int >= 1,
            `warmup_steps` not an int in [0, total_steps),
            `min_learning_rate` not in [0, learning_rate].
    """
    check_number(
        "learning_rate", learning_rate, minimum=0, min_inclusive=False
    )
    check_int("total_steps", total_steps)
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_number(
        "min_learning_rate", min_learning_rate, minimum=0, maximum=learning_rate
    )
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            "Expected 0 <= `warmup_steps` < `total_steps`. Received: "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=total_steps - warmup_steps,
        alpha=min_learning_rate / learning_rate,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def create_optimizer(
    model,
    total_steps,
    learning_rate=1e-4,
    weight_decay=0.05,
    layer_decay=0.65,
    warmup_steps=0,
    min_learning_rate=1e-6,
    global_clipnorm=1.0,
    num_layers=None,
):
    """The ViMoE fine-tuning optimizer for `model` (see module docstring).

    Args:
        model: the model to train (built).
        total_steps: number of optimizer steps of the whole run.
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay (not applied to norms, biases,
            tokens, position embeddings and LayerScale).
        layer_decay: layer-wise decay; 1.0 turns it off.
        warmup_steps: linear warmup steps.
        min_learning_rate: final learning rate of the cosine.
        global_clipnorm: gradient clipping by global norm (None = off).
        num_layers: number of blocks if the model has no `num_layers`.

    Raises:
        ValueError: naming the argument and value when one is not a finite
            number in its range (NaN, inf, a negative learning rate, ...).
    """
    check_int("total_steps", total_steps)
    check_number(
        "learning_rate", learning_rate, minimum=0, min_inclusive=False
    )
    check_number("weight_decay", weight_decay, minimum=0)
    check_number(
        "layer_decay", layer_decay, minimum=0, min_inclusive=False, maximum=1
    )
    check_int("warmup_steps", warmup_steps, minimum=0)
    check_number(
        "global_clipnorm",
        global_clipnorm,
        minimum=0,
        min_inclusive=False,
        allow_none=True,
    )
    check_int("num_layers", num_layers, allow_none=True)
    multipliers = (
        layer_decay_multipliers(model, layer_decay, num_layers)
        if layer_decay != 1.0
        else {}
    )
    optimizer = LayerDecayAdamW(
        learning_rate=warmup_cosine_schedule(
            learning_rate, total_steps, warmup_steps, min_learning_rate
        ),
        weight_decay=weight_decay,
        lr_multipliers=multipliers,
        global_clipnorm=global_clipnorm,
    )
    optimizer.exclude_from_weight_decay(var_list=no_weight_decay_variables(model))
    return optimizer


def vmoe_finetune_optimizer(
    total_steps,
    learning_rate=0.003,
    warmup_steps=500,
    end_learning_rate=1e-5,
    momentum=0.9,
    global_clipnorm=10.0,
):
    """vmoe's fine-tuning optimizer (its `*_ft_*` configurations).

    SGD with momentum 0.9, linear warmup then cosine decay to
    `end_learning_rate` (optax's `warmup_cosine_decay_schedule`), gradients
    clipped to global norm 10, no weight decay. The defaults are those of
    the ILSVRC2012 fine-tuning (peak 0.003, 500 warmup steps, of 10,000);
    vmoe's CIFAR-10 fine-tuning uses peak 0.0015 and 100 warmup steps of
    1,000, the E^3 CIFAR-100 one 0.005 and 200 of 2,000. The fine-tuned
    models route with capacity factor 1.5 (`from_preset(name,
    num_classes=n)` sets it).

    Args:
        total_steps: optimizer steps of the whole run (>= 1).
        learning_rate: peak learning rate.
        warmup_steps: linear warmup steps, < `total_steps`.
        end_learning_rate: final learning rate, in [0, learning_rate].
        momentum: SGD momentum in [0, 1).
        global_clipnorm: clip gradients to this global norm (None: off).

    Raises:
        ValueError: naming the argument and value when one is out of range.
    """
    check_number("momentum", momentum, minimum=0, maximum=1, max_inclusive=False)
    check_number(
        "global_clipnorm",
        global_clipnorm,
        minimum=0,
        min_inclusive=False,
        allow_none=True,
    )
    return keras.optimizers.SGD(
        learning_rate=warmup_cosine_schedule(
            learning_rate, total_steps, warmup_steps, end_learning_rate
        ),
        momentum=momentum,
        global_clipnorm=global_clipnorm,
    )


def set_precision(precision):
    """Sets the global dtype policy.

    Args:
        precision: "float32", "mixed_float16", "mixed_bfloat16", or "auto"
            (`auto_precision()`: mixed_bfloat16, or mixed_float16 on a
            GPU older than compute capability 8.0). Routers,
            softmax and aux losses of keras-vmoe layers stay float32 under
            every policy; with mixed_float16, `compile` wraps the optimizer
            in Keras' `LossScaleOptimizer`.

    Returns:
        The policy name that was set.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"`precision` must be one of {PRECISIONS}. Received: "
            f"precision={precision!r}"
        )
    if precision == "auto":
        precision = auto_precision()
    keras.config.set_dtype_policy(precision)
    return precision
