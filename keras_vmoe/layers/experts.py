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

Axis letters: see `docs/glossary.md`.
"""

from keras import ops

from keras_vmoe.layers import quantization
from keras_vmoe.layers.feed_forward import apply_activation


class StackedExperts(quantization.QuantizedExpertsMixin):
    """Mixin of a MoE layer: the four stacked expert weights and their MLP.

    The layer has `num_experts`, `hidden_dim`, `input_dim` (set in
    `build`), `activation`, `kernel_initializer` and `dropout_layer`. In
    `build` it calls `_add_expert_weights()` and, after any weight of its
    own that must come before them, `_add_quantized_expert_weights()`: a
    quantized layer saves and loads its weights in that order.
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

    @property
    def expert_weights(self):
        """`(kernel_1, bias_1, kernel_2, bias_2)`, kernels dequantized."""
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
