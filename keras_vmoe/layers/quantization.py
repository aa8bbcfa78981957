"""Weight quantization of stacked expert kernels ([E, in, out]).

Keras quantizes leaf layers (`Dense`, `EinsumDense`, ...) only; the routed
experts of the MoE layers (`MoEFeedForward`, `SoftMoEFeedForward`,
`ExpertChoiceFeedForward`) live in stacked [E, in, out] kernels of a
non-leaf layer, so `model.quantize` would leave them in float. This module
gives them their own weight-only quantization (`QuantizedExpertsMixin`,
shared by the three layers), with one scale per expert and output channel
(absmax over the input axis):

- `"int8"`: `q = round(w / s)` in [-127, 127], `s = absmax / 127`;
  4x smaller than float32.
- `"float8"`: e4m3 values (`s = absmax / 448`), stored as their uint8 bit
  patterns and decoded through a 256-entry table, so every backend can
  store, save and load them (TensorFlow and torch cannot hold float8
  variables portably); 4x smaller than float32.

Kernels are dequantized to the compute dtype inside the layer's call.
Routers are never quantized: they compute in float32 by design.
"""

import keras
import ml_dtypes
import numpy as np
from keras import ops

QUANTIZATION_MODES = ("int8", "float8")
_INT8_MAX = 127.0
_FLOAT8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
# Bit pattern -> value of every e4m3fn byte (the two NaN patterns are never
# produced: quantized values are clipped to +-448 first).
_FLOAT8_TABLE = np.nan_to_num(
    np.arange(256, dtype="uint8").view(ml_dtypes.float8_e4m3fn).astype("float32")
)
STORAGE_DTYPES = {"int8": "int8", "float8": "uint8"}


def check_mode(mode):
    if mode not in QUANTIZATION_MODES:
        raise ValueError(
            f"`mode` must be one of {QUANTIZATION_MODES} for MoE experts. "
            f"Received: mode={mode!r}"
        )


def quantize_kernel(kernel, mode):
    """Float [E, in, out] -> (stored [E, in, out], float32 scale [E, 1, out]).

    Computed in NumPy once, at quantization time.
    """
    check_mode(mode)
    kernel = np.asarray(kernel, dtype="float32")
    absmax = np.max(np.abs(kernel), axis=1, keepdims=True)
    limit = _INT8_MAX if mode == "int8" else _FLOAT8_MAX
    scale = np.where(absmax > 0, absmax / limit, 1.0).astype("float32")
    scaled = np.clip(kernel / scale, -limit, limit)
    if mode == "int8":
        return np.round(scaled).astype("int8"), scale
    return scaled.astype(ml_dtypes.float8_e4m3fn).view("uint8"), scale


def dequantize_kernel(stored, scale, mode, dtype):
    """Stored kernel and scale -> [E, in, out] kernel in `dtype` (in-graph)."""
    if mode == "int8":
        values = ops.cast(stored, "float32")
    else:
        values = ops.take(
            ops.convert_to_tensor(_FLOAT8_TABLE), ops.cast(stored, "int32")
        )
    return ops.cast(values * scale, dtype)


def unquantized_policy(policy):
    """The float policy a quantized policy was made from (else `policy`).

    Weight-free sublayers (dropout) must not run Keras' quantized call. A
    `DTypePolicyMap` (a quantized model being loaded) is passed on as it
    is: each sublayer resolves its own entry by path.
    """
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy
    if policy.quantization_mode is None:
        return policy
    return keras.dtype_policies.get(
        getattr(policy, "_source_name", None) or "float32"
    )


def sublayer_dtype(layer):
    """The dtype to give sublayers created in `layer.build`.

    Once built, `layer.dtype_policy` resolves a `DTypePolicyMap` to the
    layer's own entry; sublayers need the whole map to find theirs (this
    is how a quantized model loads its int8 / float8 layers).
    """
    policy = layer._dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy
    return layer.dtype_policy


class QuantizedCallMixin:
    """For container layers whose sublayers hold the quantized weights:
    Keras routes a quantized layer's `__call__` to `_<mode>_call`."""

    def _int8_call(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def _float8_call(self, *args, **kwargs):
        return self.call(*args, **kwargs)


class QuantizedExpertsMixin(QuantizedCallMixin):
    """Per-expert quantization of the stacked expert kernels of a MoE layer.

    The layer stores its float kernels as `_expert_kernel_1` [E, d, h] and
    `_expert_kernel_2` [E, h, d] (`keras_vmoe.layers.experts`), has
    `num_experts`, `hidden_dim`, `input_dim` (set in `build`) and
    `shared_ffn` (a `FeedForward` or None), and calls
    `_build_quantized_kernels(mode)` at the end of its own weights in
    `build` when its policy is quantized (a quantized layer being loaded).
    `expert_kernel_1` / `expert_kernel_2` read the kernels, dequantized to
    the compute dtype when quantized.
    """

    def _build_quantized_kernels(self, mode):
        """Stored kernels and per-expert, per-channel scales (after the
        float weights, so a quantized layer saves and loads in one order)."""
        e, d, h = self.num_experts, self.input_dim, self.hidden_dim
        self._is_quantized = True  # Keras' marker: setting the policy is done
        for index, (shape_in, shape_out) in enumerate(((d, h), (h, d)), 1):
            setattr(
                self,
                f"_expert_kernel_{index}",
                self.add_weight(
                    name=f"expert_kernel_{index}",
                    shape=(e, shape_in, shape_out),
                    initializer="zeros",
                    dtype=STORAGE_DTYPES[mode],
                    trainable=False,
                ),
            )
            setattr(
                self,
                f"expert_kernel_{index}_scale",
                self.add_weight(
                    name=f"expert_kernel_{index}_scale",
                    shape=(e, 1, shape_out),
                    initializer="ones",
                    dtype="float32",
                    trainable=False,
                ),
            )

    @property
    def expert_kernel_1(self):
        """[E, d, h] first expert kernels (dequantized when quantized)."""
        return self._expert_kernel(1)

    @property
    def expert_kernel_2(self):
        """[E, h, d] second expert kernels (dequantized when quantized)."""
        return self._expert_kernel(2)

    def _expert_kernel(self, index, lora=True):
        """Kernel `index`: dequantized when quantized, plus the LoRA update
        (`keras_vmoe.layers.experts.StackedExperts.enable_lora`) when LoRA
        is enabled and `lora`."""
        stored = getattr(self, f"_expert_kernel_{index}")
        mode = self.quantization_mode
        if mode is None:
            kernel = stored
        else:
            scale = getattr(self, f"expert_kernel_{index}_scale")
            kernel = dequantize_kernel(stored, scale, mode, self.compute_dtype)
        if not (lora and getattr(self, "lora_enabled", False)):
            return kernel
        return ops.cast(
            ops.add(ops.cast(kernel, "float32"), self._lora_delta(index)),
            self.compute_dtype,
        )

    def quantize(self, mode=None, type_check=True, config=None):
        """Weight-only quantization of the experts: "int8" or "float8".

        Every routed expert kernel gets one scale per expert and output
        channel (see `keras_vmoe.layers.quantization`); the shared expert's
        `Dense` layers are quantized with Keras' own `Dense.quantize` (if
        `model.quantize` has not done so already). Biases stay in float
        and the router stays float32. `model.quantize(mode)` on keras-vmoe
        models calls this for every MoE layer.
        """
        del type_check, config  # the experts take no quantizer config
        check_mode(mode)
        if getattr(self, "lora_enabled", False):
            raise ValueError(
                f"Cannot quantize the experts of the layer {self.name!r} "
                "with LoRA enabled: merge the adapters first "
                "(`merge_lora()`), or enable LoRA after quantizing. "
                f"Received: mode={mode!r}"
            )
        stored = {}
        for index in (1, 2):
            kernel = getattr(self, f"_expert_kernel_{index}")
            stored[index] = quantize_kernel(ops.convert_to_numpy(kernel), mode)
            delattr(self, f"_expert_kernel_{index}")
        self._build_quantized_kernels(mode)
        for index, (values, scale) in stored.items():
            getattr(self, f"_expert_kernel_{index}").assign(values)
            getattr(self, f"expert_kernel_{index}_scale").assign(scale)
        if self.shared_ffn is not None:
            for dense in (self.shared_ffn.fc1, self.shared_ffn.fc2):
                if dense.quantization_mode is None:
                    dense.quantize(mode)
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = keras.dtype_policies.get(
                f"{mode}_from_{self.dtype_policy.name}"
            )
