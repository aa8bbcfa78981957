"""Low-rank adapters (LoRA, Hu et al., 2021) for the layers of the package.

Two kinds of weights take adapters, with the semantics of Keras'
`Dense.enable_lora(rank, lora_alpha=None, a_initializer="he_uniform",
b_initializer="zeros")`: the base kernel W is frozen and the layer computes
with `W + (lora_alpha / rank) * A @ B`; B starts at zero, so enabling LoRA
does not change the outputs; A and B are float32 whatever the dtype policy.

- `LoRADense`: the `Dense` layers of the blocks (attention `qkv` / `proj`,
  MLP and shared-expert `fc1` / `fc2`). It is a `keras.layers.Dense` that,
  with LoRA enabled, saves its base kernel and adapters apart (Keras'
  `Dense` saves the merged kernel and zeroes the adapters on load, so a
  reloaded model could not go on training them).
- the stacked expert kernels [E, in, out] of every MoE layer
  (`keras_vmoe.layers.experts.StackedExperts.enable_lora`): one pair per
  expert, A [E, in, r] and B [E, r, out].

`merge_dense_lora` folds a `Dense` layer's adapters into its kernel and
removes them.
"""

import keras
from keras import ops

from keras_vmoe.validation import check_int


def check_lora_arguments(rank, lora_alpha):
    """`rank` a positive int, `lora_alpha` None or a positive number;
    returns `lora_alpha` with its default (`rank`)."""
    check_int("rank", rank)
    if lora_alpha is None:
        return rank
    if (
        not isinstance(lora_alpha, (int, float))
        or isinstance(lora_alpha, bool)
        or lora_alpha <= 0
    ):
        raise ValueError(
            "`lora_alpha` must be a positive number or None (= `rank`). "
            f"Received: lora_alpha={lora_alpha!r}"
        )
    return lora_alpha


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LoRADense(keras.layers.Dense):
    """`keras.layers.Dense` whose LoRA adapters are saved as they are.

    Without LoRA it is `Dense`, weights file included. With LoRA enabled
    (`enable_lora`, Keras' own) it saves and loads every variable in
    tracking order (base kernel, bias, `lora_kernel_a`, `lora_kernel_b`,
    then any quantization state) instead of Keras' merged kernel, so a
    model saved with LoRA loads with the same base kernel and adapters.
    """

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras' `Dense.quantize` refuses subclasses by default; this one
        # changes saving only, so Keras' quantization applies as it is.
        del type_check
        return super().quantize(mode, type_check=False, config=config)

    def save_own_variables(self, store):
        if not self.lora_enabled:
            return super().save_own_variables(store)
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        if not self.lora_enabled:
            return super().load_own_variables(store)
        keras.layers.Layer.load_own_variables(self, store)


def lora_delta(lora_a, lora_b, scale):
    """`scale * A @ B` for A [..., in, r], B [..., r, out] (float32)."""
    return ops.multiply(scale, ops.matmul(lora_a, lora_b))


def remove_weights(layer, names):
    """Untracks and deletes the weights `layer.<name>` (after a merge)."""
    layer._tracker.unlock()
    for name in names:
        variable = getattr(layer, name)
        layer._untrack_variable(variable)
        delattr(layer, name)
    layer._tracker.lock()


def merge_dense_lora(dense):
    """Folds a LoRA-enabled `Dense`'s adapters into its kernel, in place.

    Float (and Keras "float8", whose kernel is float) kernels get
    `W + (alpha / rank) * A @ B` computed in float32; an int8 / int4 kernel
    is requantized by Keras (`Dense._get_kernel_with_merged_lora`). The
    adapters are removed and `lora_enabled` is False afterwards.
    """
    mode = dense.quantization_mode
    if mode in (None, "float8"):
        scale = dense.lora_alpha / dense.lora_rank
        merged = ops.add(
            ops.cast(dense._kernel, "float32"),
            lora_delta(dense.lora_kernel_a, dense.lora_kernel_b, scale),
        )
        dense._kernel.assign(ops.cast(merged, dense._kernel.dtype))
    elif mode in ("int8", "int4"):
        kernel, kernel_scale, kernel_zero = dense._get_kernel_with_merged_lora()
        dense._kernel.assign(kernel)
        dense.kernel_scale.assign(kernel_scale)
        if kernel_zero is not None:
            dense.kernel_zero.assign(kernel_zero)
    else:
        raise ValueError(
            f"Cannot merge LoRA into the Dense layer {dense.name!r} quantized "
            f"with mode={mode!r}: only float, float8, int8 and int4 kernels."
        )
    remove_weights(dense, ("lora_kernel_a", "lora_kernel_b"))
    dense.lora_enabled = False
    dense.lora_rank = None
    dense.lora_alpha = None
