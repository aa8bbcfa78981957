"""`model.quantize` that reaches the routed experts.

Keras' `Model.quantize` only visits leaf layers; the stacked experts of
the MoE layers (`MoEFeedForward`, `SoftMoEFeedForward`,
`ExpertChoiceFeedForward`) sit in a layer with sublayers (router, shared
expert, dropout), so plain Keras would leave them in float without a word.
keras-vmoe backbones and tasks add this mixin: after Keras has quantized
the leaves, every MoE layer that the filters select quantizes its experts
too (`QuantizedExpertsMixin.quantize`).
"""

import re
import warnings

import keras

from keras_vmoe.layers.quantization import QuantizedExpertsMixin


def _selected(layer, filters):
    """Keras' filter rule: regex on the layer name, a list, or a callable."""
    if filters is None:
        return True
    if isinstance(filters, str):
        return bool(re.search(filters, layer.name))
    if isinstance(filters, (list, tuple)):
        return any(re.search(pattern, layer.name) for pattern in filters)
    return bool(filters(layer))


class ExpertQuantizationMixin:
    """Adds the MoE experts to `quantize(mode)` ("int8" or "float8")."""

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        backbone = getattr(self, "backbone", self)
        if getattr(backbone, "lora_enabled", False):
            raise ValueError(
                "Cannot quantize a model with LoRA enabled: merge the "
                "adapters first (`merge_lora()`), or quantize before "
                f"`enable_lora`. Received: mode={mode!r}"
            )
        super().quantize(mode, config=config, filters=filters, **kwargs)
        mode = mode if mode is not None else getattr(config, "mode", None)
        changed = False
        left_in_float = []
        for layer in self._flatten_layers():
            if layer.quantization_mode is not None or not _selected(
                layer, filters
            ):
                continue
            if isinstance(layer, QuantizedExpertsMixin):
                layer.quantize(mode)
                changed = True
            elif hasattr(layer, "expert_kernel_1"):
                left_in_float.append(f"{layer.name} ({type(layer).__name__})")
        if left_in_float:
            warnings.warn(
                "These MoE layers have no expert quantization yet and keep "
                f"their experts in float: {', '.join(left_in_float)}. "
                f"Received: mode={mode!r}",
                stacklevel=2,
            )
        if changed:
            self.train_function = None
            self.test_function = None
            self.predict_function = None

    # === Saving ===
    def get_config(self):
        config = super().get_config()
        head = getattr(self, "output_dense", None)
        if head is not None and head.quantization_mode is not None:
            # The task rebuilds its head from `head_dtype`, which also
            # drives weight-free layers; record the head's mode instead.
            config["head_quantization"] = head.quantization_mode
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        head_mode = config.pop("head_quantization", None)
        model = super().from_config(config)
        if head_mode is not None:
            head = model.output_dense
            if isinstance(head.dtype_policy, keras.dtype_policies.DTypePolicyMap):
                # The backbone's map (a quantized backbone) has no entry for
                # the head: give it the map's float policy to quantize from.
                head._dtype_policy = head.dtype_policy.default_policy
            head.quantize(head_mode)
        return model

    def save_to_preset(self, preset_dir, *args, **kwargs):
        quantized = sorted(
            {
                layer.quantization_mode
                for layer in self._flatten_layers()
                if layer.quantization_mode is not None
            }
        )
        if quantized:
            raise ValueError(
                "A quantized model cannot be saved as a KerasHub preset: "
                "KerasHub's `from_preset` (0.32) drops the per-layer dtype "
                "policies, so the preset would not load. Save it with "
                "`model.save('model.keras')` and load it with "
                "`keras.models.load_model`. Received: quantized layers "
                f"({', '.join(quantized)}), preset_dir={preset_dir!r}"
            )
        return super().save_to_preset(preset_dir, *args, **kwargs)
