"""Stacked experts shared by the MoE layers that are not `MoEFeedForward`.

Every MoE layer of the package stores its E experts as four stacked
weights, `expert_kernel_1` [E, d, h], `expert_bias_1` [E, h],
`expert_kernel_2` [E, h, d] and `expert_bias_2` [E, d], so that upcycling
(`keras_vmoe.converters.upcycle_feed_forward`), parameter counting and the
analysis tools treat them alike. The forward pass over [E, N, d] rows is
`MoEFeedForward._run_experts`, reused here as it is.
"""

from keras_vmoe.layers import quantization
from keras_vmoe.layers.moe import MoEFeedForward

# [E, N, d] -> [E, N, d]: expert e runs on its own N rows. Needs the four
# weights above plus `activation` and `dropout_layer` on the layer.
run_experts = MoEFeedForward._run_experts


def add_expert_weights(layer, num_experts, input_dim, hidden_dim, initializer):
    """Adds the four stacked expert weights to `layer` (in its `build`).

    `layer` is a `QuantizedExpertsMixin`: the float kernels are stored as
    `_expert_kernel_1` / `_expert_kernel_2` (read through the
    `expert_kernel_*` properties). When the layer's policy is quantized (a
    quantized layer being loaded), the float kernels are replaced by the
    stored kernels and their scales, added after the biases, in the order
    `quantize` leaves them.
    """
    e, d, h = num_experts, input_dim, hidden_dim
    mode = layer.quantization_mode
    if mode is not None:
        quantization.check_mode(mode)
    for index, (shape_in, shape_out) in enumerate(((d, h), (h, d)), 1):
        if mode is None:
            setattr(
                layer,
                f"_expert_kernel_{index}",
                layer.add_weight(
                    name=f"expert_kernel_{index}",
                    shape=(e, shape_in, shape_out),
                    initializer=initializer,
                ),
            )
        setattr(
            layer,
            f"expert_bias_{index}",
            layer.add_weight(
                name=f"expert_bias_{index}",
                shape=(e, shape_out),
                initializer="zeros",
            ),
        )
    if mode is not None:
        layer._build_quantized_kernels(mode)


def check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


def check_dropout(dropout):
    if (
        not isinstance(dropout, (int, float))
        or isinstance(dropout, bool)
        or not 0.0 <= dropout < 1.0
    ):
        raise ValueError(
            f"`dropout` must be in [0, 1). Received: dropout={dropout!r}"
        )


def check_input_shape(layer, input_shape):
    """Rank 3 ([B, T, d]) or 4 ([B, H, W, d]), width as built."""
    input_shape = tuple(input_shape)
    if len(input_shape) not in (3, 4):
        raise ValueError(
            "`inputs` must have rank 3 ([B, T, d]) or rank 4 "
            f"([B, H, W, d]). Received: inputs.shape={input_shape}"
        )
    if input_shape[-1] is None:
        raise ValueError(
            "The last axis of `inputs` must be known. Received: "
            f"inputs.shape={input_shape}"
        )
    built_width = getattr(layer, "input_dim", None)
    if built_width is not None and input_shape[-1] != built_width:
        raise ValueError(
            f"`inputs` width must match the layer's width {built_width}. "
            f"Received: inputs.shape={input_shape}"
        )
