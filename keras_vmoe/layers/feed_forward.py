"""The dense feed-forward network (MLP) of a transformer or ConvNeXt block."""

import keras

from keras_vmoe.layers.lora import LoRADense
from keras_vmoe.layers.quantization import QuantizedCallMixin
from keras_vmoe.layers.quantization import sublayer_dtype
from keras_vmoe.layers.quantization import unquantized_policy

ACTIVATIONS = ("gelu", "gelu_tanh")


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {ACTIVATIONS}. Received: "
            f"activation={activation!r}"
        )


def apply_activation(x, activation):
    """Exact (erf) GELU or its tanh approximation."""
    return keras.activations.gelu(x, approximate=activation == "gelu_tanh")


@keras.saving.register_keras_serializable(package="keras_vmoe")
class FeedForward(QuantizedCallMixin, keras.layers.Layer):
    """`fc2(dropout(act(fc1(x))))`, the dense FFN that experts replicate.

    It is the dense baseline of every MoE layer, the shared expert of
    `MoEFeedForward`, and the source of weights when upcycling. Works on any
    input rank; the last axis is the feature axis.

    Args:
        hidden_dim: width of the hidden layer (h).
        output_dim: width of the output; default: the input width (d).
        activation: "gelu" (exact, erf) or "gelu_tanh".
        dropout: dropout rate after the activation and after `fc2`.
        kernel_initializer: initializer of both kernels.

    Example:
    >>> ffn = FeedForward(hidden_dim=64)
    >>> ffn(np.ones((2, 5, 16))).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        hidden_dim,
        output_dim=None,
        activation="gelu",
        dropout=0.0,
        kernel_initializer=None,
        **kwargs,
    ):
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(
                "`hidden_dim` must be a positive integer. Received: "
                f"hidden_dim={hidden_dim!r}"
            )
        check_activation(activation)
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.activation = activation
        self.dropout = dropout
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.fc1 = LoRADense(
            hidden_dim,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="fc1",
        )
        self.fc2 = None
        self.dropout_layer = keras.layers.Dropout(
            dropout, dtype=unquantized_policy(self.dtype_policy), name="dropout"
        )

    def build(self, input_shape):
        self.fc1.build(input_shape)
        self.fc2 = LoRADense(
            self.output_dim or input_shape[-1],
            kernel_initializer=self.kernel_initializer,
            dtype=sublayer_dtype(self),
            name="fc2",
        )
        self.fc2.build(tuple(input_shape[:-1]) + (self.hidden_dim,))

    def call(self, inputs, training=None):
        x = apply_activation(self.fc1(inputs), self.activation)
        x = self.dropout_layer(x, training=training)
        return self.dropout_layer(self.fc2(x), training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "output_dim": self.output_dim,
                "activation": self.activation,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


def make_shared_expert(
    enabled, hidden_dim, activation, dropout, kernel_initializer, dtype
):
    """The always-on shared expert of an MoE layer (a `FeedForward` named
    "shared_expert"), or None when `enabled` is false."""
    if not enabled:
        return None
    return FeedForward(
        hidden_dim,
        activation=activation,
        dropout=dropout,
        kernel_initializer=kernel_initializer,
        dtype=dtype,
        name="shared_expert",
    )
