"""The expert bank of the MoE layers: E stacked two-layer MLPs.

Every MoE layer of the package stores its E routed experts as four stacked
weights on the layer itself, `expert_kernel_1` [E, d, h], `expert_bias_1`
[E, h], `expert_kernel_2` [E, h, d] and `expert_bias_2` [E, d], so that
upcycling (`keras_vmoe.converters.upcycle_feed_forward`), parameter
counting, quantization and the analysis tools treat them alike.
`StackedExperts` adds them and runs them in the three forms the dispatchers
(`keras_vmoe.layers.dispatch`) ask for:

- `run_experts`: [E, N, d] -> [E, N, d], expert e on its own N rows (the
  capacity-slot buffers);
- `run_expert_rows`: [R, d] rows sorted by expert, through a `RowExperts`
  that knows each row's expert (the sorted layout);
- `run_gathered_experts`: every item through the K experts it chose, with
  the weights gathered per item (dropless image routing).

All three read the kernels through `expert_kernel_1` / `expert_kernel_2`
(`expert_weights`), the effective kernels: dequantized when the experts
are quantized, plus the low-rank update when LoRA is enabled
(`enable_lora`), so every dispatch path computes with the adapted experts.

Axis letters: see `docs/glossary.md`.
"""

import keras
from keras import ops

from keras_vmoe.layers import quantization
from keras_vmoe.layers.feed_forward import apply_activation
from keras_vmoe.layers.lora import check_lora_arguments
from keras_vmoe.layers.lora import lora_delta
from keras_vmoe.layers.lora import remove_weights


class StackedExperts(quantization.QuantizedExpertsMixin):
    """Mixin of a MoE layer: the four stacked expert weights and their MLP.

    The layer has `num_experts`, `hidden_dim`, `input_dim` (set in
    `build`), `activation`, `kernel_initializer` and `dropout_layer`. In
    `build` it calls `_add_expert_weights()` and, after any weight of its
    own that must come before them, `_add_quantized_expert_weights()`: a
    quantized layer saves and loads its weights in that order.

    LoRA (`enable_lora`): the layer has `lora_rank`, `lora_alpha` and
    `lora_enabled` (set by `MoELayer.__init__`).
    """

    def _add_expert_weights(self):
        """The float kernels (unless quantized) and the biases."""
        e, d, h = self.num_experts, self.input_dim, self.hidden_dim
        mode = self.quantization_mode
        if mode is not None:
            quantization.check_mode(mode)
        for index, (shape_in, shape_out) in enumerate(((d, h), (h, d)), 1):
            if mode is None:
                setattr(
                    self,
                    f"_expert_kernel_{index}",
                    self.add_weight(
                        name=f"expert_kernel_{index}",
                        shape=(e, shape_in, shape_out),
                        initializer=self.kernel_initializer,
                    ),
                )
            setattr(
                self,
                f"expert_bias_{index}",
                self.add_weight(
                    name=f"expert_bias_{index}",
                    shape=(e, shape_out),
                    initializer="zeros",
                ),
            )

    def _add_quantized_expert_weights(self):
        """The stored kernels and scales when the policy is quantized."""
        if self.quantization_mode is not None:
            self._build_quantized_kernels(self.quantization_mode)

    # === LoRA ===
    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """Low-rank adapters on the routed expert kernels.

        The semantics of Keras' `Dense.enable_lora`, per expert: for the
        kernels [E, d, h] and [E, h, d] it adds float32 adapters
        `expert_kernel_1_lora_a` [E, d, r], `expert_kernel_1_lora_b`
        [E, r, h], `expert_kernel_2_lora_a` [E, h, r] and
        `expert_kernel_2_lora_b` [E, r, d], freezes the base kernels, and
        the experts compute with `W_e + (lora_alpha / r) * A_e @ B_e` on
        every dispatch path. B starts at zero (`b_initializer`), so the
        outputs do not change; each expert's A is drawn as a `Dense`
        layer's [in, r] A (`a_initializer`, fan-in `in`). Quantized
        (int8 / float8) experts keep their stored kernels and add the
        update to the dequantized kernel. Biases, router and shared expert
        are left as they are (the backbones' `enable_lora` freezes them).

        Args:
            rank: r, a positive int.
            lora_alpha: scale numerator; default `rank` (scale 1).
            a_initializer: initializer of A.
            b_initializer: initializer of B.
        """
        if not self.built:
            raise ValueError(
                f"Cannot enable LoRA on the layer {self.name!r} before it "
                "is built."
            )
        if self.lora_enabled:
            raise ValueError(
                f"LoRA is already enabled on the layer {self.name!r} "
                f"(lora_rank={self.lora_rank}); it can be enabled once. "
                f"Received: rank={rank!r}"
            )
        lora_alpha = check_lora_arguments(rank, lora_alpha)
        e, d, h = self.num_experts, self.input_dim, self.hidden_dim
        self._tracker.unlock()
        for index, (shape_in, shape_out) in enumerate(((d, h), (h, d)), 1):
            for part, shape, initializer in (
                ("a", (e, shape_in, rank), a_initializer),
                ("b", (e, rank, shape_out), b_initializer),
            ):
                name = f"expert_kernel_{index}_lora_{part}"
                setattr(
                    self,
                    name,
                    self.add_weight(
                        name=name,
                        shape=shape,
                        initializer=_per_expert(initializer),
                        dtype="float32",
                    ),
                )
        self._tracker.lock()
        for index in (1, 2):
            getattr(self, f"_expert_kernel_{index}").trainable = False
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha

    @property
    def lora_variables(self):
        """The four expert adapters (A1, B1, A2, B2), [] without LoRA."""
        if not self.lora_enabled:
            return []
        return [
            getattr(self, f"expert_kernel_{index}_lora_{part}")
            for index in (1, 2)
            for part in ("a", "b")
        ]

    def merge_lora(self):
        """Folds the expert adapters into the kernels and removes them.

        Float kernels become `W + (alpha / r) * A @ B` (computed in
        float32); quantized kernels are requantized from that sum with new
        per-expert scales. Afterwards `lora_enabled` is False and the layer
        saves like one that never had LoRA.
        """
        if not self.lora_enabled:
            raise ValueError(
                f"LoRA is not enabled on the layer {self.name!r}: nothing "
                "to merge."
            )
        mode = self.quantization_mode
        for index in (1, 2):
            merged = ops.convert_to_numpy(
                ops.add(
                    ops.cast(self._expert_kernel(index, lora=False), "float32"),
                    self._lora_delta(index),
                )
            )
            stored = getattr(self, f"_expert_kernel_{index}")
            if mode is None:
                stored.assign(merged.astype(stored.dtype))
            else:
                values, scale = quantization.quantize_kernel(merged, mode)
                stored.assign(values)
                getattr(self, f"expert_kernel_{index}_scale").assign(scale)
        remove_weights(
            self,
            [
                f"expert_kernel_{index}_lora_{part}"
                for index in (1, 2)
                for part in ("a", "b")
            ],
        )
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None

    def _lora_delta(self, index):
        """float32 [E, in, out] update of expert kernel `index`."""
        return lora_delta(
            getattr(self, f"expert_kernel_{index}_lora_a"),
            getattr(self, f"expert_kernel_{index}_lora_b"),
            self.lora_alpha / self.lora_rank,
        )


    @property
    def expert_weights(self):
        """`(kernel_1, bias_1, kernel_2, bias_2)`, the effective kernels
        (dequantized, LoRA update added)."""
        return (
            self.expert_kernel_1,
            self.expert_bias_1,
            self.expert_kernel_2,
            self.expert_bias_2,
        )

    def run_experts(self, expert_inputs, training=None):
        """[E, N, d] -> [E, N, d]: expert e runs on its own N rows only."""
        kernel_1, bias_1, kernel_2, bias_2 = self.expert_weights
        hidden = ops.einsum("end,edh->enh", expert_inputs, kernel_1)
        hidden = apply_activation(
            hidden + ops.expand_dims(bias_1, 1), self.activation
        )
        hidden = self.dropout_layer(hidden, training=training)
        outputs = ops.einsum("enh,ehd->end", hidden, kernel_2)
        outputs = outputs + ops.expand_dims(bias_2, 1)
        return self.dropout_layer(outputs, training=training)

    def run_expert_rows(self, rows, row_experts, training=None):
        """[R, d] -> [R, d]: each row through its own expert.

        `row_experts` (a `keras_vmoe.layers.dispatch.RowExperts`) applies
        each row's expert kernel; without dropout between the two matmuls
        it may run the whole MLP fused.
        """
        if not (training and self.dropout):
            outputs = row_experts.mlp(
                rows, *self.expert_weights, self.activation
            )
            return self.dropout_layer(outputs, training=training)
        kernel_1, bias_1, kernel_2, bias_2 = self.expert_weights
        hidden = row_experts.matmul(rows, kernel_1, bias_1)
        hidden = apply_activation(hidden, self.activation)
        hidden = self.dropout_layer(hidden, training=training)
        outputs = row_experts.matmul(hidden, kernel_2, bias_2)
        return self.dropout_layer(outputs, training=training)

    def run_gathered_experts(self, items, expert_index, gates, training=None):
        """Each item through its K experts, weights gathered per item.

        Args:
            items: [N, P, d].
            expert_index: [N, K] int32 experts of each item.
            gates: [N, K] gates of each choice.

        Returns:
            [N, P, d]: `sum_k gates[n, k] * expert_{index[n, k]}(items[n])`.
        """
        kernel_1, bias_1, kernel_2, bias_2 = (
            ops.take(weight, expert_index, axis=0)
            for weight in self.expert_weights
        )
        hidden = ops.einsum("npd,nkdh->nkph", items, kernel_1)
        hidden = apply_activation(hidden + bias_1[:, :, None, :], self.activation)
        hidden = self.dropout_layer(hidden, training=training)
        outputs = ops.einsum("nkph,nkhd->nkpd", hidden, kernel_2)
        outputs = self.dropout_layer(
            outputs + bias_2[:, :, None, :], training=training
        )
        return ops.einsum(
            "nkpd,nk->npd", outputs, ops.cast(gates, outputs.dtype)
        )


def _per_expert(initializer):
    """An initializer of [E, in, out] that draws each expert's [in, out]
    slice as `initializer` draws a `Dense` kernel (fan-in `in`, not
    `E * in` as Keras' fans of a 3-D shape)."""
    initializer = keras.initializers.get(initializer)

    def initialize(shape, dtype=None):
        experts, rows, columns = shape
        values = initializer((rows, experts * columns), dtype=dtype)
        values = ops.reshape(values, (rows, experts, columns))
        return ops.transpose(values, (1, 0, 2))

    return initialize
