"""Expert Choice routing (Zhou et al., NeurIPS 2022) and its MoE layer.

"Mixture-of-Experts with Expert Choice Routing": instead of every token
choosing its top-k experts, every expert chooses its top-C tokens of the
routing group by router probability. Load is balanced by construction (each
expert processes exactly C tokens), while a token may be processed by any
number of experts, 0 to E. vmoe calls it `NoisyTopItemsPerExpertRouter`.

Axis letters:
    G routing groups · S items (tokens) per group · E experts · d width
    C capacity: tokens per expert, `ceil(S * capacity_factor / E)`

Ties: when several tokens have the same probability for an expert, the one
with the lower index in the group wins (stable sort on every backend). The
routing functions are pure `keras.ops` functions of tensors.
"""

import numbers

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
from keras_vmoe.layers.routers import ROUTERS
from keras_vmoe.layers.routers import get_router
from keras_vmoe.layers.routing import compute_capacity
from keras_vmoe.layers.routing import group_items


def expert_choice_capacity(group_size, num_experts, capacity_factor):
    """Tokens per expert, `C = ceil(S * capacity_factor / E)`, in [1, S].

    `capacity_factor` is the average number of experts per token (the
    paper's "EC-CF2" is 2). A Python int when `group_size` is static.
    """
    return compute_capacity(group_size, num_experts, 1, capacity_factor)


def top_items_per_expert(probs, capacity):
    """Every expert's top-`capacity` items.

    Args:
        probs: [G, S, E] float32 router probabilities (softmax over E).
        capacity: C, 1 <= C <= S.

    Returns:
        `(gates, item_index)`, both [G, E, C]: the chosen items of each
        expert in descending probability (ties: lower item index first)
        and their probabilities, which are the combine weights.
    """
    scores = ops.transpose(probs, (0, 2, 1))  # [G, E, S]
    # Ascending sort of -p keeps equal probabilities in index order on
    # every backend: torch and JAX sort stably, TensorFlow's argsort is
    # built on its stable `top_k` (the tests check ties on all three).
    order = ops.argsort(-scores, axis=-1)[..., :capacity]
    order = ops.cast(order, "int32")
    gates = ops.take_along_axis(scores, order, axis=-1)
    return gates, order


def expert_choice_gates(gates, item_index, group_size):
    """Scatters [G, E, C] chosen gates to a dense [G, S, E] matrix.

    Entry (g, s, e) is the gate of item s for expert e when e chose it, and
    0 otherwise (an expert never picks an item twice).
    """
    num_groups = ops.shape(item_index)[0]
    num_experts = ops.shape(item_index)[1]
    group_offset = ops.reshape(
        ops.arange(num_groups, dtype="int32") * group_size, (-1, 1, 1)
    )
    expert = ops.reshape(ops.arange(num_experts, dtype="int32"), (1, -1, 1))
    flat = ((item_index + group_offset) * num_experts + expert)  # [G, E, C]
    dense = ops.segment_sum(
        ops.reshape(gates, (-1,)),
        ops.reshape(flat, (-1,)),
        num_segments=num_groups * group_size * num_experts,
    )
    return ops.reshape(dense, (num_groups, group_size, num_experts))


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ExpertChoiceFeedForward(QuantizedExpertsMixin, keras.layers.Layer):
    """Mixture-of-Experts feed-forward layer with Expert Choice routing.

    Its own layer rather than a `routing=` option of `MoEFeedForward`: the
    routing is inverted (experts pick tokens, no per-token top-k, no
    dropping, no load-balancing loss), so almost none of that layer's
    arguments apply. It shares the stacked expert weights and their
    forward pass with it.

    `y_t = E_s(x_t) + sum_{e : t in top-C(e)} p_e(x_t) E_e(x_t)` where
    `p = softmax(router(x))` over the E experts, each expert `E_e` takes
    the C tokens of the routing group with the largest `p_e`, and `E_s` is
    the optional shared expert. A token no expert chose gets 0 from the
    routed experts (it keeps the shared expert and the block's residual).

    Routing groups: `group_size="image"` (default) routes the T tokens of
    every image on their own (`C = ceil(T * cf / E)`; an image's output
    does not depend on the rest of the batch); `None` routes all B*T
    tokens of the batch as one group (`C = ceil(B*T * cf / E)`); an int n
    cuts the flattened B*T tokens into contiguous groups of n tokens, as
    `MoEFeedForward`'s `group_size` (B*T must be a multiple of n).

    Args:
        num_experts: E, number of experts (>= 1).
        hidden_dim: h, hidden width of every expert (and the shared expert).
        capacity_factor: average experts per token (> 0); default 2.0, the
            paper's EC-CF2 (a compute cost equal to top-2 routing).
        group_size: "image", None (the whole batch) or tokens per group.
        router: "linear", "cosine" or "l2" (see `keras_vmoe.layers`).
        router_dim: projection width of the cosine and L2 routers.
        noise_std: std of Gaussian noise added to the router logits in
            training (vmoe uses 1 / E); 0 for none.
        shared_expert: add an always-on dense expert.
        activation: "gelu" (exact) or "gelu_tanh".
        dropout: dropout after the expert activation and output.
        return_routing: also return a dict: `gates` ([..., E], the combine
            weight of every token for every expert, 0 where the expert did
            not choose it), `router_probs` ([..., E]), `experts_per_token`
            ([...], int32), `tokens_per_expert` ([E], int32, tokens each
            expert processed in the batch), `unrouted_fraction` (scalar,
            share of the tokens that no expert chose); `...` is [B, T] or
            [B, H, W].
        kernel_initializer: initializer of the expert kernels.
        seed: seed of the router noise.

    Example:
    >>> moe = ExpertChoiceFeedForward(num_experts=4, hidden_dim=64)
    >>> moe(np.ones((2, 5, 16))).shape
    (2, 5, 16)
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        capacity_factor=2.0,
        group_size="image",
        router="linear",
        router_dim=256,
        noise_std=0.0,
        shared_expert=False,
        activation="gelu",
        dropout=0.0,
        return_routing=False,
        kernel_initializer=None,
        seed=None,
        **kwargs,
    ):
        check_positive_int("num_experts", num_experts)
        check_positive_int("hidden_dim", hidden_dim)
        if (
            not isinstance(capacity_factor, numbers.Real)
            or isinstance(capacity_factor, bool)
            or not capacity_factor > 0
        ):
            raise ValueError(
                "`capacity_factor` must be a number > 0. Received: "
                f"capacity_factor={capacity_factor!r}"
            )
        if group_size not in ("image", None) and (
            not isinstance(group_size, int)
            or isinstance(group_size, bool)
            or group_size < 1
        ):
            raise ValueError(
                "`group_size` must be 'image', None (the whole batch) or a "
                f"positive integer. Received: group_size={group_size!r}"
            )
        if router not in ROUTERS:
            raise ValueError(
                f"`router` must be one of {tuple(ROUTERS)}. Received: "
                f"router={router!r}"
            )
        if (
            not isinstance(noise_std, numbers.Real)
            or isinstance(noise_std, bool)
            or noise_std < 0
        ):
            raise ValueError(
                "`noise_std` must be a number >= 0. Received: "
                f"noise_std={noise_std!r}"
            )
        check_activation(activation)
        check_dropout(dropout)
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.capacity_factor = capacity_factor
        self.group_size = group_size
        self.router_name = router
        self.router_dim = router_dim
        self.noise_std = noise_std
        self.shared_expert = shared_expert
        self.activation = activation
        self.dropout = dropout
        self.return_routing = return_routing
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.seed = seed

        # === Layers ===
        self.router = get_router(router, num_experts, router_dim)
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
            dtype=unquantized_policy(self.dtype_policy),
            name="dropout",
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._routing_observers = []
        # Set by `RoutingMetricsMixin`: keep this step's unrouted fraction
        # in `_fit_stats` for the fit logs.
        self._record_fit_stats = False
        self._fit_stats = {}

    # === Build ===
    def build(self, input_shape):
        check_input_shape(self, input_shape)
        d = input_shape[-1]
        self.input_dim = d
        self.router.build((None, d))
        add_expert_weights(
            self, self.num_experts, d, self.hidden_dim, self.kernel_initializer
        )
        if self.shared_ffn is not None:
            self.shared_ffn.build(input_shape)

    # === Forward ===
    def router_probs(self, tokens, training=None):
        """Float32 [..., E] probabilities (noisy in training if asked)."""
        logits = self.router(tokens)
        if training and self.noise_std > 0:
            logits = logits + self.noise_std * keras.random.normal(
                ops.shape(logits), dtype="float32", seed=self.seed_generator
            )
        return ops.softmax(logits, axis=-1)

    def call(self, inputs, training=None):
        check_input_shape(self, inputs.shape)
        input_shape = ops.shape(inputs)
        width, e = input_shape[-1], self.num_experts
        if self.group_size == "image":
            groups = ops.reshape(inputs, (input_shape[0], -1, width))
        else:
            groups = group_items(
                ops.reshape(inputs, (-1, width)), self.group_size
            )
        num_groups, group_size = ops.shape(groups)[0], ops.shape(groups)[1]
        probs = self.router_probs(
            ops.reshape(groups, (-1, width)), training
        )
        probs = ops.reshape(probs, (num_groups, group_size, e))  # [G, S, E]
        capacity = expert_choice_capacity(group_size, e, self.capacity_factor)
        gates, item_index = top_items_per_expert(probs, capacity)  # [G, E, C]

        rows = item_index + ops.reshape(
            ops.arange(num_groups, dtype="int32") * group_size, (-1, 1, 1)
        )
        constrain = dispatch_constraint(self)
        if constrain is None:
            outputs = self._dispatch_flat(groups, rows, gates, training)
        else:
            outputs = self._dispatch_grouped(
                groups, item_index, gates, constrain, training
            )
        outputs = ops.reshape(outputs, input_shape)
        if self.shared_ffn is not None:
            outputs = outputs + self.shared_ffn(inputs, training=training)
        if self._record_fit_stats:
            picks = ops.segment_sum(
                ops.ones_like(ops.reshape(rows, (-1,)), dtype="float32"),
                ops.reshape(rows, (-1,)),
                num_segments=num_groups * group_size,
            )
            self._fit_stats = {
                "unrouted": ops.mean(ops.cast(picks == 0, "float32"))
            }
        if not (self.return_routing or self._routing_observers):
            return outputs
        info = self._routing_info(gates, item_index, probs, input_shape)
        for observer in self._routing_observers:
            observer(self, info)
        return (outputs, info) if self.return_routing else outputs

    def _dispatch_flat(self, groups, rows, gates, training):
        """One device: gather the chosen tokens of all groups into
        [E, G*C, d] and scatter-add the gated outputs back."""
        e, width = self.num_experts, ops.shape(groups)[-1]
        rows = ops.reshape(ops.transpose(rows, (1, 0, 2)), (e, -1))
        flat_tokens = ops.reshape(groups, (-1, width))
        expert_inputs = ops.take(flat_tokens, ops.reshape(rows, (-1,)), axis=0)
        expert_outputs = run_experts(
            self, ops.reshape(expert_inputs, (e, -1, width)), training
        )
        weights = ops.reshape(ops.transpose(gates, (1, 0, 2)), (e, -1, 1))
        weighted = expert_outputs * ops.cast(weights, expert_outputs.dtype)
        # Each token sums the outputs of the experts that chose it.
        return ops.segment_sum(
            ops.reshape(weighted, (-1, width)),
            ops.reshape(rows, (-1,)),
            num_segments=ops.shape(flat_tokens)[0],
        )

    def _dispatch_grouped(self, groups, item_index, gates, constrain, training):
        """Expert parallelism: every index operation is batched over the
        groups G, so each device fills and reads only its own groups; the
        [G, E, C, d] <-> [E, G, C, d] exchange is the all-to-all."""
        e = self.num_experts
        shape = ops.shape(groups)
        num_groups, group_size, width = shape[0], shape[1], shape[2]
        capacity = ops.shape(item_index)[-1]
        buffer = ops.take_along_axis(
            groups, ops.reshape(item_index, (num_groups, -1, 1)), axis=1
        )  # [G, E*C, d]
        buffer = constrain(
            ops.reshape(buffer, (num_groups, e, capacity, width)),
            "dispatch_groups",
        )
        buffer = constrain(
            ops.transpose(buffer, (1, 0, 2, 3)), "dispatch_experts"
        )
        expert_outputs = run_experts(
            self, ops.reshape(buffer, (e, -1, width)), training
        )
        expert_outputs = constrain(
            ops.reshape(expert_outputs, (e, num_groups, capacity, width)),
            "combine_experts",
        )
        expert_outputs = constrain(
            ops.transpose(expert_outputs, (1, 0, 2, 3)), "combine_groups"
        )
        # Combine weights [G, E, C, S]: the gate where slot (e, c) holds
        # token s (vmoe's dense combine tensor), summed per token.
        combine = ops.one_hot(item_index, group_size, dtype="float32")
        combine = combine * gates[..., None]
        return ops.einsum(
            "gecs,gecd->gsd",
            ops.cast(combine, expert_outputs.dtype),
            expert_outputs,
        )

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

    def _routing_info(self, gates, item_index, probs, input_shape):
        e = self.num_experts
        group_size = ops.shape(probs)[1]
        dense = expert_choice_gates(gates, item_index, group_size)
        chosen = ops.cast(
            expert_choice_gates(ops.ones_like(gates), item_index, group_size),
            "int32",
        )
        leading = tuple(input_shape[:-1])
        experts_per_token = ops.sum(chosen, axis=-1)
        return {
            "gates": ops.reshape(dense, leading + (e,)),
            "router_probs": ops.reshape(probs, leading + (e,)),
            "experts_per_token": ops.reshape(experts_per_token, leading),
            "tokens_per_expert": ops.sum(chosen, axis=(0, 1)),
            "unrouted_fraction": ops.mean(
                ops.cast(experts_per_token == 0, "float32")
            ),
        }

    # === Shapes and config ===
    def _routing_specs(self, input_shape):
        e = self.num_experts
        leading = tuple(input_shape[:-1])
        return {
            "gates": (leading + (e,), "float32"),
            "router_probs": (leading + (e,), "float32"),
            "experts_per_token": (leading, "int32"),
            "tokens_per_expert": ((e,), "int32"),
            "unrouted_fraction": ((), "float32"),
        }

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if not self.return_routing:
            return input_shape
        specs = self._routing_specs(input_shape)
        return input_shape, {name: s for name, (s, _) in specs.items()}

    def compute_output_spec(self, inputs, training=None):
        outputs = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not self.return_routing:
            return outputs
        return outputs, {
            name: keras.KerasTensor(shape, dtype=dtype)
            for name, (shape, dtype) in self._routing_specs(
                inputs.shape
            ).items()
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "capacity_factor": self.capacity_factor,
                "group_size": self.group_size,
                "router": self.router_name,
                "router_dim": self.router_dim,
                "noise_std": self.noise_std,
                "shared_expert": self.shared_expert,
                "activation": self.activation,
                "dropout": self.dropout,
                "return_routing": self.return_routing,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "seed": self.seed,
            }
        )
        return config
