"""LoRA fine-tuning of the backbones, merging, and frozen routers.

KerasHub's `Backbone.enable_lora` adapts the layers named `query` /
`value` (`default_lora_layer_names`), which the backbones here do not
have (their attention is one fused `qkv` `Dense`), and Keras' LoRA reaches
`Dense` / `EinsumDense` only, not the stacked experts that hold most of
the parameters. `LoRAMixin` gives both backbone families an `enable_lora`
that adapts:

- every `Dense` layer of the backbone (`keras_vmoe.layers.lora.LoRADense`):
  ViT attention `qkv` and `proj`, dense-MLP and shared-expert `fc1` /
  `fc2`; ConvNeXt's pointwise MLP `fc1` / `fc2` and shared experts;
- the routed expert kernels of every MoE layer, one low-rank pair per
  expert (`keras_vmoe.layers.experts.StackedExperts.enable_lora`).

Everything else in the backbone is frozen, as KerasHub freezes the whole
backbone: patch / stem convolutions, embeddings, norms, LayerScale, biases
and the routers (frozen by default, as MoE fine-tuning practice;
`train_routers=True` trains them in full: a router's [d, E] kernel is
already smaller than most rank-r pairs). A task's head is outside the
backbone and stays trainable. `merge_lora` folds the adapters into the
kernels for export; `freeze_routers` freezes the routers of a model
without LoRA.
"""

import json

import keras
import numpy as np

from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.lora import check_lora_arguments
from keras_vmoe.layers.lora import merge_dense_lora
from keras_vmoe.layers.moe_types import find_moe_layers
from keras_vmoe.validation import check_bool

LORA_WEIGHTS_SUFFIX = ".lora.h5"


def _size(variable):
    return int(np.prod(variable.shape))


class LoRAMixin:
    """`enable_lora`, `lora_summary`, `merge_lora` and LoRA-weight files
    for the keras-vmoe backbones (see the module docstring)."""

    @property
    def lora_enabled(self):
        """Whether `enable_lora` has run (and `merge_lora` not since)."""
        return bool(getattr(self, "_lora_config", None))

    @property
    def lora_config(self):
        """The `enable_lora` arguments (a dict), None without LoRA."""
        config = getattr(self, "_lora_config", None)
        return dict(config) if config else None

    def _lora_candidates(self):
        return [
            layer
            for layer in self._flatten_layers(include_self=False)
            if isinstance(layer, (keras.layers.Dense, MoELayer))
        ]

    def default_lora_layer_names(self):
        """Names of the layers `enable_lora` adapts by default: the `Dense`
        layers and the MoE layers (their routed experts)."""
        return sorted({layer.name for layer in self._lora_candidates()})

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
        train_routers=False,
        target_layer_names=None,
        verbose=True,
    ):
        """Freezes the backbone and adds low-rank adapters.

        With the semantics of Keras' `Dense.enable_lora`: each adapted
        kernel W computes as `W + (lora_alpha / rank) * A @ B`, W frozen, A
        and B float32, B zero at first so the outputs do not change. The
        adapted layers are every `Dense` of the backbone (attention `qkv`
        / `proj`, MLP and shared-expert `fc1` / `fc2`) and the routed
        experts of every MoE layer (A [E, in, r], B [E, r, out]). After
        the call, the backbone's trainable weights are exactly the
        adapters (and the router weights with `train_routers=True`); all
        other weights, biases and norms included, are frozen. Call it
        before `compile`. The config carries the LoRA arguments, so
        `save_to_preset` / `from_preset` and `.keras` files reload the
        model with LoRA enabled and the same base weights and adapters.

        Args:
            rank: r, a positive int.
            lora_alpha: scale numerator; default `rank` (scale 1).
            a_initializer: initializer of every A (default "he_uniform").
            b_initializer: initializer of every B (default "zeros").
            train_routers: False (default): routers frozen, as in MoE
                fine-tuning practice; True: the router weights (top-k and
                Expert Choice routers, Soft MoE's `phi` / `scale`) train in
                full.
            target_layer_names: None for every layer above, or a list of
                layer names among `default_lora_layer_names()` (e.g.
                `["qkv", "proj"]`, or MoE layer names such as
                "block_3_mlp"); the others stay frozen.
            verbose: print `lora_summary()`, e.g. "LoRA rank 4: 98,304
                trainable of 22,185,216 parameters (0.44 %) ...".

        Raises:
            ValueError: LoRA is already enabled, the arguments are invalid,
                or nothing would be adapted (no `Dense` or MoE layer
                matches `target_layer_names`).
        """
        if self.lora_enabled:
            raise ValueError(
                "LoRA is already enabled on this backbone (lora_config="
                f"{self._lora_config}); it can be enabled once. Merge it "
                f"first (`merge_lora()`) to start over. Received: rank={rank!r}"
            )
        lora_alpha = check_lora_arguments(rank, lora_alpha)
        check_bool("train_routers", train_routers)
        check_bool("verbose", verbose)
        targets = self._lora_targets(target_layer_names)
        if any(layer.lora_enabled for layer in self._lora_candidates()):
            raise ValueError(
                "Some layers of this backbone already have LoRA enabled "
                "(layer by layer): enable it on the backbone only. "
                f"Received: rank={rank!r}"
            )
        unsupported = {
            layer.name: layer.quantization_mode
            for layer in targets
            if isinstance(layer, keras.layers.Dense)
            and layer.quantization_mode not in (None, "int8", "int4")
        }
        if unsupported:
            raise ValueError(
                "Keras' LoRA supports float, int8 and int4 `Dense` layers "
                f"only. Received: quantized Dense layers {unsupported}. "
                "Pass `target_layer_names` without them, e.g. the MoE "
                "layers only (LoRA works on int8 and float8 experts): "
                f"{[layer.name for layer in find_moe_layers(self)]}"
            )
        initializers = {
            "a_initializer": keras.initializers.serialize(
                keras.initializers.get(a_initializer)
            ),
            "b_initializer": keras.initializers.serialize(
                keras.initializers.get(b_initializer)
            ),
        }

        self.trainable = True
        for layer in self._flatten_layers(include_self=False):
            layer.trainable = False
        trained = []
        for layer in targets:
            # Adapters added to a frozen layer would be frozen too.
            layer.trainable = True
            layer.enable_lora(
                rank,
                lora_alpha=lora_alpha,
                a_initializer=keras.initializers.deserialize(
                    initializers["a_initializer"]
                ),
                b_initializer=keras.initializers.deserialize(
                    initializers["b_initializer"]
                ),
            )
            trained += _adapters(layer)
        for moe in find_moe_layers(self):
            if moe.router is not None:
                moe.router.trainable = train_routers
            if train_routers:
                trained += moe.router_variables
        trained_ids = {id(variable) for variable in trained}
        for variable in self.weights:
            variable.trainable = id(variable) in trained_ids

        self._lora_config = {
            "rank": rank,
            "lora_alpha": lora_alpha,
            **initializers,
            "train_routers": train_routers,
            "target_layer_names": (
                None if target_layer_names is None else list(target_layer_names)
            ),
        }
        # KerasHub's attributes of a LoRA-enabled backbone.
        self._lora_rank = rank
        self._lora_enabled_layers = [layer.name for layer in targets]
        _reset_compiled_functions(self)
        if verbose:
            print(self.lora_summary())

    def _lora_targets(self, target_layer_names):
        candidates = self._lora_candidates()
        if target_layer_names is None:
            targets = candidates
        else:
            if isinstance(target_layer_names, str) or not isinstance(
                target_layer_names, (list, tuple)
            ):
                raise ValueError(
                    "`target_layer_names` must be None or a list of layer "
                    f"names. Received: target_layer_names={target_layer_names!r}"
                )
            available = {layer.name for layer in candidates}
            unknown = [
                name for name in target_layer_names if name not in available
            ]
            if unknown:
                raise ValueError(
                    f"`target_layer_names` has names of no Dense or MoE layer "
                    f"of this backbone: {unknown}. Available: "
                    f"{sorted(available)}. Received: "
                    f"target_layer_names={target_layer_names!r}"
                )
            targets = [
                layer
                for layer in candidates
                if layer.name in target_layer_names
            ]
        if not targets:
            raise ValueError(
                "`enable_lora` would adapt nothing: this backbone has no "
                "Dense or MoE layer to adapt. Received: "
                f"target_layer_names={target_layer_names!r}"
            )
        return targets

    def _lora_trained_variables(self):
        """Adapters (and trained router weights) in weight order."""
        if not self.lora_enabled:
            return []
        trained = []
        for layer in self._lora_candidates():
            trained += _adapters(layer)
        if self._lora_config["train_routers"]:
            for moe in find_moe_layers(self):
                trained += moe.router_variables
        ids = {id(variable) for variable in trained}
        return [variable for variable in self.weights if id(variable) in ids]

    def lora_summary(self):
        """One line: "LoRA rank r: N trainable of M parameters (x %)",
        with N the backbone's trainable parameters and M all of its
        parameters (adapters included), then how many of N are expert
        adapters."""
        if not self.lora_enabled:
            raise ValueError(
                "LoRA is not enabled on this backbone: call "
                "`enable_lora(rank)` first."
            )
        trainable = sum(_size(v) for v in self.trainable_weights)
        total = sum(_size(v) for v in self.weights)
        experts = sum(
            _size(v)
            for moe in find_moe_layers(self)
            for v in moe.lora_variables
        )
        return (
            f"LoRA rank {self._lora_config['rank']}: {trainable:,} trainable "
            f"of {total:,} parameters ({100.0 * trainable / total:.2f} %); "
            f"{experts:,} of them in expert adapters"
        )

    def merge_lora(self):
        """Folds every adapter into its kernel and removes the adapters.

        Afterwards the backbone computes the same outputs as before (up to
        float32 rounding; requantization error for int8 / float8 experts),
        has no LoRA weights, `lora_enabled` is False and its config and
        weights are those of a plain model (e.g. for export or serving).
        The weights stay frozen (`backbone.trainable = True` unfreezes
        them).
        """
        if not self.lora_enabled:
            raise ValueError(
                "LoRA is not enabled on this backbone: nothing to merge."
            )
        for layer in self._lora_candidates():
            if isinstance(layer, MoELayer):
                if layer.lora_enabled:
                    layer.merge_lora()
            elif layer.lora_enabled:
                merge_dense_lora(layer)
        self._lora_config = None
        self._lora_rank = None
        self._lora_enabled_layers = []
        _reset_compiled_functions(self)

    # === Saving ===
    def get_config(self):
        config = super().get_config()
        if self.lora_enabled:
            config["lora_config"] = self.lora_config
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        lora_config = config.pop("lora_config", None)
        model = super().from_config(config)
        if lora_config:
            model.enable_lora(**lora_config, verbose=False)
        return model

    def save_lora_weights(self, filepath):
        """Writes the LoRA arguments and the trained weights (adapters,
        and router weights with `train_routers`) to a `.lora.h5` file."""
        if not self.lora_enabled:
            raise ValueError(
                "LoRA is not enabled on this backbone: call "
                f"`enable_lora(rank)` first. Received: filepath={filepath!r}"
            )
        _check_lora_path(filepath)
        store = keras.src.saving.saving_lib.H5IOStore(str(filepath), mode="w")
        try:
            entry = store.make("lora")
            entry["config"] = np.frombuffer(
                json.dumps(self._lora_config).encode("utf-8"), dtype="uint8"
            )
            for index, variable in enumerate(self._lora_trained_variables()):
                entry[str(index)] = variable
        finally:
            store.close()

    def load_lora_weights(self, filepath):
        """Reads a `save_lora_weights` file: enables LoRA with its
        arguments if it is not enabled (else they must match), then sets
        the adapters (and trained router weights)."""
        _check_lora_path(filepath)
        store = keras.src.saving.saving_lib.H5IOStore(str(filepath), mode="r")
        try:
            entry = store.get("lora")
            if "config" not in entry:
                raise ValueError(
                    f"{filepath!r} is not a keras-vmoe LoRA weights file "
                    "(written by `save_lora_weights`): it has no LoRA "
                    "config."
                )
            config = json.loads(bytes(entry["config"]).decode("utf-8"))
            if not self.lora_enabled:
                self.enable_lora(**config, verbose=False)
            elif _comparable(config) != _comparable(self._lora_config):
                raise ValueError(
                    f"The LoRA arguments of {filepath!r} ({config}) differ "
                    "from those this backbone was enabled with "
                    f"({self._lora_config})."
                )
            variables = self._lora_trained_variables()
            stored = len(entry.keys()) - 1
            if stored != len(variables):
                raise ValueError(
                    f"{filepath!r} holds {stored} LoRA weights; this backbone "
                    f"has {len(variables)}: it was saved from another "
                    "architecture."
                )
            for index, variable in enumerate(variables):
                value = entry[str(index)]
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"LoRA weight {index} of {filepath!r} has shape "
                        f"{tuple(value.shape)}; the backbone's "
                        f"{variable.path!r} has {tuple(variable.shape)}."
                    )
                variable.assign(value)
        finally:
            store.close()


def _comparable(config):
    return {key: config[key] for key in ("rank", "lora_alpha", "train_routers")}


def _check_lora_path(filepath):
    if not str(filepath).endswith(LORA_WEIGHTS_SUFFIX):
        raise ValueError(
            f"The filename must end in `{LORA_WEIGHTS_SUFFIX}`. Received: "
            f"filepath={filepath!r}"
        )


def _adapters(layer):
    """The LoRA weights of a `Dense` or MoE layer ([] without LoRA)."""
    if isinstance(layer, MoELayer):
        return layer.lora_variables
    if getattr(layer, "lora_enabled", False):
        return [layer.lora_kernel_a, layer.lora_kernel_b]
    return []


def _reset_compiled_functions(model):
    """Trainable variables changed: traced train/test steps are stale."""
    for name in ("train_function", "test_function", "predict_function"):
        if hasattr(model, name):
            setattr(model, name, None)


def _backbone(model):
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, LoRAMixin):
        raise ValueError(
            "Expected a keras-vmoe backbone or a task with one "
            f"(`model.backbone`). Received: model={type(model).__name__}"
        )
    return backbone


def merge_lora(model):
    """`merge_lora()` of a backbone or of a task's backbone; returns
    `model`. See `LoRAMixin.merge_lora`."""
    _backbone(model).merge_lora()
    return model


def set_routers_trainable(model, trainable):
    """Makes the router weights of every MoE layer of `model` trainable or
    frozen (top-k and Expert Choice router layers, Soft MoE's `phi` and
    `scale`), leaving every other weight as it is.

    Args:
        model: a model or layer with MoE layers.
        trainable: bool.

    Returns:
        The number of router parameters changed.

    Raises:
        ValueError: `model` has no MoE layer.
    """
    check_bool("trainable", trainable)
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(
            "`model` has no MoE layer, so no router to freeze or unfreeze. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    count = 0
    for layer in layers:
        if layer.router is not None:
            layer.router.trainable = trainable
        for variable in layer.router_variables:
            variable.trainable = trainable
            count += _size(variable)
    _reset_compiled_functions(model)
    return count


def freeze_routers(model):
    """Freezes the routers of every MoE layer of `model` (MoE fine-tuning
    practice), the rest stays trainable; call before `compile`. Returns
    the number of router parameters frozen. See `set_routers_trainable`."""
    return set_routers_trainable(model, False)
