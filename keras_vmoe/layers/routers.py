"""Routers: map item features [S, d] to expert logits [S, E] in float32.

The three gates compared in "Mixture of Experts in Image Classification:
What's the Sweet Spot?" (Sec. 3 / Tab. 7): linear ("conv" there), cosine
(Chi et al., 2022, X-MoE) and L2.

Routers always compute in float32, whatever the dtype policy of the model:
softmax over a handful of logits is where bfloat16 / float16 rounding flips
the top-1 choice.
"""

import math

import keras
from keras import ops


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )


class _Router(keras.layers.Layer):
    """Shared constructor and config of the routers."""

    def __init__(self, num_experts, kernel_initializer=None, **kwargs):
        _check_positive_int("num_experts", num_experts)
        # Router math is float32 by design; a float32 policy is forced even
        # under mixed precision.
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.TruncatedNormal(stddev=0.02)
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_experts,)

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)
        config.update(
            {
                "num_experts": self.num_experts,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LinearRouter(_Router):
    """One dense layer from features to E logits: `logits = x W (+ b)`.

    Args:
        num_experts: E, number of experts.
        use_bias: add a bias to the logits.
        kernel_initializer: initializer of W, default truncated normal with
            stddev 0.02.

    Example:
    >>> router = LinearRouter(num_experts=4)
    >>> router(np.ones((3, 16))).shape
    (3, 4)
    """

    def __init__(self, num_experts, use_bias=False, **kwargs):
        super().__init__(num_experts, **kwargs)
        self.use_bias = use_bias

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.num_experts),
            initializer=self.kernel_initializer,
        )
        self.bias = (
            self.add_weight(
                name="bias", shape=(self.num_experts,), initializer="zeros"
            )
            if self.use_bias
            else None
        )

    def call(self, inputs):
        logits = ops.matmul(ops.cast(inputs, "float32"), self.kernel)
        if self.bias is not None:
            logits = logits + self.bias
        return logits

    def get_config(self):
        config = super().get_config()
        config["use_bias"] = self.use_bias
        return config


class _ProjectedRouter(_Router):
    """Projection to `router_dim` followed by a comparison with E codes."""

    def __init__(self, num_experts, router_dim=256, **kwargs):
        super().__init__(num_experts, **kwargs)
        _check_positive_int("router_dim", router_dim)
        self.router_dim = router_dim

    def build(self, input_shape):
        # The projection never widens the features (Chi et al. use d_r << d).
        projected_dim = min(self.router_dim, input_shape[-1])
        self.projection = self.add_weight(
            name="projection",
            shape=(input_shape[-1], projected_dim),
            initializer=self.kernel_initializer,
        )
        self.codes = self.add_weight(
            name="codes",
            shape=(self.num_experts, projected_dim),
            initializer=self.kernel_initializer,
        )

    def _project(self, inputs):
        return ops.matmul(ops.cast(inputs, "float32"), self.projection)

    def get_config(self):
        config = super().get_config()
        config["router_dim"] = self.router_dim
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class CosineRouter(_ProjectedRouter):
    """Cosine-similarity gate of X-MoE (Chi et al., 2022).

    `logits_i = cos(P x, c_i) / tau`: features are projected to
    `min(router_dim, d)` dimensions and compared with E learned codes. The
    temperature `tau` is learned in log space and clamped to
    `[min_temperature, max_temperature]` so the logits can neither explode
    nor flatten out.

    Args:
        num_experts: E.
        router_dim: projection width (default 256, or d if smaller).
        temperature: initial temperature (default 0.07, as X-MoE).
        min_temperature / max_temperature: clamp range of the temperature.
        kernel_initializer: initializer of the projection and the codes.
    """

    def __init__(
        self,
        num_experts,
        router_dim=256,
        temperature=0.07,
        min_temperature=0.01,
        max_temperature=1.0,
        **kwargs,
    ):
        if not 0 < min_temperature <= temperature <= max_temperature:
            raise ValueError(
                "Expected 0 < `min_temperature` <= `temperature` <= "
                "`max_temperature`. Received: "
                f"min_temperature={min_temperature}, "
                f"temperature={temperature}, "
                f"max_temperature={max_temperature}"
            )
        super().__init__(num_experts, router_dim, **kwargs)
        self.temperature = temperature
        self.min_temperature = min_temperature
        self.max_temperature = max_temperature

    def build(self, input_shape):
        super().build(input_shape)
        self.log_temperature = self.add_weight(
            name="log_temperature",
            shape=(),
            initializer=keras.initializers.Constant(
                math.log(self.temperature)
            ),
        )

    def call(self, inputs):
        features = ops.normalize(self._project(inputs), axis=-1)
        codes = ops.normalize(self.codes, axis=-1)
        temperature = ops.exp(
            ops.clip(
                self.log_temperature,
                math.log(self.min_temperature),
                math.log(self.max_temperature),
            )
        )
        return ops.matmul(features, ops.transpose(codes)) / temperature

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "temperature": self.temperature,
                "min_temperature": self.min_temperature,
                "max_temperature": self.max_temperature,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class L2Router(_ProjectedRouter):
    """Negative squared L2 distance to E learned codes.

    `logits_i = -||P x - c_i||^2`, with the same projection as
    `CosineRouter`.

    Args:
        num_experts: E.
        router_dim: projection width (default 256, or d if smaller).
        kernel_initializer: initializer of the projection and the codes.
    """

    def call(self, inputs):
        features = self._project(inputs)
        # ||f||^2 - 2 f.c + ||c||^2 without materialising [S, E, r].
        distance = (
            ops.sum(ops.square(features), axis=-1, keepdims=True)
            - 2.0 * ops.matmul(features, ops.transpose(self.codes))
            + ops.sum(ops.square(self.codes), axis=-1)
        )
        return -distance


ROUTERS = {"linear": LinearRouter, "cosine": CosineRouter, "l2": L2Router}


def get_router(router, num_experts, router_dim=256, name="router"):
    """Builds a router from its name ("linear", "cosine", "l2")."""
    if router not in ROUTERS:
        raise ValueError(
            f"`router` must be one of {sorted(ROUTERS)}. Received: "
            f"router={router!r}"
        )
    if router == "linear":
        return LinearRouter(num_experts, name=name)
    return ROUTERS[router](num_experts, router_dim=router_dim, name=name)
