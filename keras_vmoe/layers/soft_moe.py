"""`SoftMoEFeedForward`: Soft Mixture-of-Experts (Puigcerver et al., 2024).

"From Sparse to Soft Mixtures of Experts" (ICLR 2024). Axis letters:
    B batch (one routing group per image) · T tokens per image · d width
    h expert hidden width · E experts · S slots per expert · N = E*S slots

Every slot's input is a convex combination of all tokens of its image, and
every token's output a convex combination of all slot outputs:

    logits  = x phi                  [B, T, N]   (float32)
    D       = softmax(logits, T)     dispatch weights, each slot sums to 1
    C       = softmax(logits, N)     combine weights, each token sums to 1
    slots   = D^T x                  [B, N, d]
    y       = C  expert(slots)       [B, T, d]   slot n runs expert n // S

With `normalize=True` (the paper's Sec. 2.3, and vmoe's `SoftRouter`) the
tokens are L2-normalised over d, the columns of `phi` over d, and the
logits multiplied by a learned scalar `scale` (initialised to 1):
`logits = scale * (x / |x|) (phi / |phi|)`; the norms use
`rsqrt(sum(v^2) + 1e-6)` as vmoe does. Nothing is dropped, there is no
load-balancing loss, and each image is routed independently of the
others in the batch.
"""

import keras
from keras import ops

from keras_vmoe.layers.distribution_hooks import dispatch_constraint
from keras_vmoe.layers.experts import add_expert_weights
from keras_vmoe.layers.experts import check_dropout
from keras_vmoe.layers.experts import check_input_shape
from keras_vmoe.layers.experts import check_positive_int
from keras_vmoe.layers.experts import run_experts
from keras_vmoe.layers.feed_forward import check_activation
from keras_vmoe.layers.feed_forward import make_shared_expert
from keras_vmoe.layers.quantization import QuantizedExpertsMixin
from keras_vmoe.layers.quantization import unquantized_policy

NORM_EPSILON = 1e-6


def l2_normalize(x, axis):
    """`x / sqrt(sum(x^2) + 1e-6)` along `axis` (vmoe's `normalize`)."""
    return x * ops.rsqrt(
        ops.sum(ops.square(x), axis=axis, keepdims=True) + NORM_EPSILON
    )


def soft_routing_weights(tokens, phi, scale=None):
    """Dispatch and combine weights of Soft MoE.

    Args:
        tokens: [B, T, d] float32 (already normalised if wanted).
        phi: [d, N] float32 slot parameters (already normalised if wanted).
        scale: optional scalar multiplying the logits.

    Returns:
        `(dispatch, combine)`, both [B, T, N] float32: `dispatch` sums to 1
        over T (each slot mixes the tokens of its image), `combine` sums to
        1 over N (each token mixes the slots).
    """
    logits = ops.einsum("btd,dn->btn", tokens, phi)
    if scale is not None:
        logits = logits * scale
    return ops.softmax(logits, axis=1), ops.softmax(logits, axis=-1)


def slot_entropy(dispatch, num_experts):
    """Mean entropy (nats) of each expert's slot distributions over tokens.

    Args:
        dispatch: [B, T, N] dispatch weights (sum to 1 over T).
        num_experts: E; N = E * S.

    Returns:
        [E] float32: entropy of every slot's dispatch distribution,
        averaged over the images and the expert's S slots. log(T) means a
        slot averages all tokens, 0 that it picks a single token.
    """
    plogp = dispatch * ops.log(ops.maximum(dispatch, 1e-30))
    entropy = -ops.sum(plogp, axis=1)  # [B, N]
    slots_per_expert = ops.shape(entropy)[1] // num_experts
    entropy = ops.reshape(entropy, (-1, num_experts, slots_per_expert))
    return ops.mean(entropy, axis=(0, 2))


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftMoEFeedForward(QuantizedExpertsMixin, keras.layers.Layer):
    """Soft Mixture-of-Experts feed-forward layer.

    `y = E_s(x) + C(x) expert(D(x)^T x)`: see the module docstring for the
    dispatch (`D`, softmax over the tokens of each image) and combine (`C`,
    softmax over all E*S slots) weights. Fully differentiable; every expert
    processes exactly S slots per image, so the cost is that of a dense FFN
    run on E*S tokens per image, whatever T is. `E_s` is the optional
    always-on shared expert.

    The router (`phi` [d, E*S] and `scale`) computes in float32 under any
    dtype policy; the slot mixing and the experts run in the compute dtype.
    Inputs are [B, T, d] tokens or [B, H, W, d] feature maps (the H*W
    positions of an image are its tokens). The experts are stored as
    `MoEFeedForward`'s stacked `expert_kernel_1` [E, d, h], `expert_bias_1`,
    `expert_kernel_2` [E, h, d], `expert_bias_2`, so upcycling and the
    parameter counts apply unchanged.

    Args:
        num_experts: E, number of experts (>= 1).
        hidden_dim: h, hidden width of every expert (and the shared expert).
        slots_per_expert: S, slots per expert (>= 1); the paper's ViTs use
            1 with E = 128 (Sec. 3).
        shared_expert: add an always-on dense expert.
        normalize: L2-normalise tokens and `phi` over d and learn a scalar
            scale of the logits (the paper's normalisation; needed at large
            d, Sec. 2.3). With False, `logits = x phi`.
        activation: "gelu" (exact) or "gelu_tanh".
        dropout: dropout after the expert activation and output.
        return_routing: also return a dict: `dispatch_weights` and
            `combine_weights` ([B, T, E, S], or [B, H, W, E, S]; float32),
            `slot_entropy` ([E], see `slot_entropy`), `dispatch_weights_max`
            ([E], largest dispatch weight of a slot, averaged over images
            and slots) and `expert_load` ([E], the share of the combine
            weights each expert receives, averaged over tokens; sums to 1).
        kernel_initializer: initializer of the expert kernels (default
            truncated normal, stddev 0.02, as ViT).
        phi_initializer: initializer of `phi` (default LeCun normal, as
            vmoe's `SoftRouter`).
        seed: seed of `phi`'s default initializer and of the dropout.

    Example:
    >>> moe = SoftMoEFeedForward(num_experts=4, hidden_dim=64)
    >>> moe(np.ones((2, 5, 16))).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        slots_per_expert=1,
        shared_expert=False,
        normalize=True,
        activation="gelu",
        dropout=0.0,
        return_routing=False,
        kernel_initializer=None,
        phi_initializer=None,
        seed=None,
        **kwargs,
    ):
        check_positive_int("num_experts", num_experts)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("slots_per_expert", slots_per_expert)
        for name, value in (
            ("shared_expert", shared_expert),
            ("normalize", normalize),
            ("return_routing", return_routing),
        ):
            if not isinstance(value, bool):
                raise TypeError(
                    f"`{name}` must be a bool. Received: {name}={value!r}"
                )
        check_activation(activation)
        check_dropout(dropout)
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.slots_per_expert = slots_per_expert
        self.shared_expert = shared_expert
        self.normalize = normalize
        self.activation = activation
        self.dropout = dropout
        self.return_routing = return_routing
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.phi_initializer = keras.initializers.get(
            phi_initializer or keras.initializers.LecunNormal(seed=seed)
        )
        self.seed = seed

        # === Layers ===
        self.shared_ffn = make_shared_expert(
            shared_expert,
            hidden_dim,
            activation,
            dropout,
            self.kernel_initializer,
            self.dtype_policy,
        )
        self.dropout_layer = keras.layers.Dropout(
            dropout,
            seed=seed,
            dtype=unquantized_policy(self.dtype_policy),
            name="dropout",
        )
        self._routing_observers = []
        # Set by `RoutingMetricsMixin`: keep this step's combine-mass load
        # in `_fit_stats` for the fit logs.
        self._record_fit_stats = False
        self._fit_stats = {}

    @property
    def num_slots(self):
        """N = E * S, the total number of slots per image."""
        return self.num_experts * self.slots_per_expert

    # === Build ===
    def build(self, input_shape):
        check_input_shape(self, input_shape)
        d = input_shape[-1]
        self.input_dim = d
        # The router weights are float32 and read as float32 (no autocast)
        # under mixed precision.
        self.phi = self.add_weight(
            name="phi",
            shape=(d, self.num_slots),
            initializer=self.phi_initializer,
            dtype="float32",
            autocast=False,
        )
        self.scale = (
            self.add_weight(
                name="scale",
                shape=(),
                initializer="ones",
                dtype="float32",
                autocast=False,
            )
            if self.normalize
            else None
        )
        add_expert_weights(
            self, self.num_experts, d, self.hidden_dim, self.kernel_initializer
        )
        if self.shared_ffn is not None:
            self.shared_ffn.build(input_shape)

    # === Forward ===
    def routing_weights(self, tokens):
        """Float32 `(dispatch, combine)` [B, T, N] for tokens [B, T, d]."""
        tokens = ops.cast(tokens, "float32")
        phi = ops.cast(self.phi, "float32")
        scale = None
        if self.normalize:
            tokens = l2_normalize(tokens, axis=-1)
            phi = l2_normalize(phi, axis=0)
            scale = ops.cast(self.scale, "float32")
        return soft_routing_weights(tokens, phi, scale)

    def call(self, inputs, training=None):
        check_input_shape(self, inputs.shape)
        input_shape = ops.shape(inputs)
        width = input_shape[-1]
        e, s = self.num_experts, self.slots_per_expert
        tokens = ops.reshape(inputs, (input_shape[0], -1, width))  # [B, T, d]
        dispatch, combine = self.routing_weights(tokens)
        slots = ops.einsum(
            "btn,btd->bnd", ops.cast(dispatch, tokens.dtype), tokens
        )
        # [B, E, S, d] -> [E, B*S, d]: expert e runs on its slots only.
        # Under expert parallelism the slots are sharded on B (images stay
        # on their device), then on E: an all-to-all, and back after the
        # experts.
        constrain = dispatch_constraint(self) or (lambda x, name: x)
        slots = constrain(
            ops.reshape(slots, (-1, e, s, width)), "dispatch_groups"
        )
        slots = constrain(
            ops.transpose(slots, (1, 0, 2, 3)), "dispatch_experts"
        )
        slot_outputs = run_experts(
            self, ops.reshape(slots, (e, -1, width)), training
        )
        slot_outputs = constrain(
            ops.reshape(slot_outputs, (e, -1, s, width)), "combine_experts"
        )
        slot_outputs = constrain(
            ops.transpose(slot_outputs, (1, 0, 2, 3)), "combine_groups"
        )
        slot_outputs = ops.reshape(slot_outputs, (-1, e * s, width))
        outputs = ops.einsum(
            "btn,bnd->btd", ops.cast(combine, slot_outputs.dtype), slot_outputs
        )
        outputs = ops.reshape(outputs, input_shape)
        if self.shared_ffn is not None:
            outputs = outputs + self.shared_ffn(inputs, training=training)
        if self._record_fit_stats:
            self._fit_stats = {
                "max_load": e * ops.max(self._combine_load(combine))
            }
        if not (self.return_routing or self._routing_observers):
            return outputs
        info = self._routing_info(dispatch, combine, input_shape)
        for observer in self._routing_observers:
            observer(self, info)
        return (outputs, info) if self.return_routing else outputs

    # === Routing observers ===
    def add_routing_observer(self, observer):
        """Calls `observer(layer, routing)` on every forward pass.

        `routing` is the dict that `return_routing=True` returns (see the
        class docstring); same mechanism as `MoEFeedForward`. Observers run
        eagerly: call the model directly, not in a compiled function.
        """
        self._routing_observers.append(observer)

    def remove_routing_observer(self, observer):
        """Removes an observer added with `add_routing_observer`."""
        self._routing_observers.remove(observer)

    def _combine_load(self, combine):
        """[E] share of the combine weights of all tokens per expert."""
        e, s = self.num_experts, self.slots_per_expert
        return ops.mean(
            ops.sum(ops.reshape(combine, (-1, e, s)), axis=-1), axis=0
        )

    def _routing_info(self, dispatch, combine, input_shape):
        e, s = self.num_experts, self.slots_per_expert
        per_expert = ops.reshape(ops.max(dispatch, axis=1), (-1, e, s))
        load = self._combine_load(combine)
        leading = tuple(input_shape[:-1])
        return {
            "dispatch_weights": ops.reshape(dispatch, leading + (e, s)),
            "combine_weights": ops.reshape(combine, leading + (e, s)),
            "slot_entropy": slot_entropy(dispatch, e),
            "dispatch_weights_max": ops.mean(per_expert, axis=(0, 2)),
            "expert_load": load,
        }

    # === Shapes and config ===
    def _routing_shapes(self, input_shape):
        e, s = self.num_experts, self.slots_per_expert
        leading = tuple(input_shape[:-1])
        return {
            "dispatch_weights": leading + (e, s),
            "combine_weights": leading + (e, s),
            "slot_entropy": (e,),
            "dispatch_weights_max": (e,),
            "expert_load": (e,),
        }

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if not self.return_routing:
            return input_shape
        return input_shape, self._routing_shapes(input_shape)

    def compute_output_spec(self, inputs, training=None):
        outputs = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not self.return_routing:
            return outputs
        return outputs, {
            name: keras.KerasTensor(shape, dtype="float32")
            for name, shape in self._routing_shapes(inputs.shape).items()
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "slots_per_expert": self.slots_per_expert,
                "shared_expert": self.shared_expert,
                "normalize": self.normalize,
                "activation": self.activation,
                "dropout": self.dropout,
                "return_routing": self.return_routing,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "phi_initializer": keras.initializers.serialize(
                    self.phi_initializer
                ),
                "seed": self.seed,
            }
        )
        return config
