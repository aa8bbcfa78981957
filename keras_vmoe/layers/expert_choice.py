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

import math

import keras
from keras import ops

from keras_vmoe import validation
from keras_vmoe.layers import backends
from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.dispatch import DISPATCHERS
from keras_vmoe.layers.routing import check_group_size
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
    # A stable sort of -p: ties keep item order on every backend.
    order = backends.stable_argsort(-scores, axis=-1)[..., :capacity]
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
class ExpertChoiceFeedForward(MoELayer):
    """Mixture-of-Experts feed-forward layer with Expert Choice routing.

    Its own layer rather than a `routing=` option of `MoEFeedForward`: the
    routing is inverted (experts pick tokens, no per-token top-k, no
    dropping, no load-balancing loss), so almost none of that layer's
    arguments apply. It shares the base, the expert bank and the router
    layers with it.

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
    `group_size` applies in training; `eval_group_size` (same values,
    default "image") at inference, so `predict` is batch independent
    whatever the training groups.

    Args:
        num_experts: E, number of experts (>= 1).
        hidden_dim: h, hidden width of every expert (and the shared expert).
        capacity_factor: average experts per token (> 0); default 2.0, the
            paper's EC-CF2 (a compute cost equal to top-2 routing).
        group_size: "image", None (the whole batch) or tokens per group,
            in training.
        eval_group_size: the same, at inference (default "image").
        router: "linear", "cosine", "l2", or a router layer instance
            mapping [N, d] to float32 [N, E] logits.
        router_dim: projection width of the cosine and L2 routers.
        noise_std: std of Gaussian noise added to the router logits in
            training (>= 0); 0 (default) for none, None for 1 / E (vmoe's
            value).
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
        seed: seed of the router noise and the dropout.

    Example:
    >>> moe = ExpertChoiceFeedForward(num_experts=4, hidden_dim=64)
    >>> moe(np.ones((2, 5, 16))).shape
    (2, 5, 16)
    """

    router_type = "expert_choice"
    routing_statistic_names = ("unrouted",)

    def __init__(
        self,
        num_experts,
        hidden_dim,
        capacity_factor=2.0,
        group_size="image",
        eval_group_size="image",
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
        validation.check_number(
            "capacity_factor", capacity_factor, minimum=0, min_inclusive=False
        )
        check_group_size("group_size", group_size)
        check_group_size("eval_group_size", eval_group_size)
        super().__init__(
            num_experts,
            hidden_dim,
            shared_expert=shared_expert,
            activation=activation,
            dropout=dropout,
            return_routing=return_routing,
            kernel_initializer=kernel_initializer,
            seed=seed,
            **kwargs,
        )
        self._init_router(router, router_dim, noise_std)
        self.capacity_factor = capacity_factor
        self.group_size = group_size
        self.eval_group_size = eval_group_size
        self._last_choice = None

    # === Forward ===
    def router_probs(self, tokens, training=None):
        """Float32 [..., E] probabilities (noisy in training if asked)."""
        _, logits = self._router_logits(tokens, training)
        return ops.softmax(logits, axis=-1)

    def _groups(self, inputs, training):
        """[G, S, d] routing groups of the tokens."""
        shape = ops.shape(inputs)
        size = self.group_size if training else self.eval_group_size
        if size == "image":
            return ops.reshape(inputs, (shape[0], -1, shape[-1]))
        argument = "group_size" if training else "eval_group_size"
        return group_items(ops.reshape(inputs, (-1, shape[-1])), size, argument)

    def _forward(self, inputs, training):
        groups = self._groups(inputs, training)
        shape = ops.shape(groups)
        num_groups, group_size, e = shape[0], shape[1], self.num_experts
        probs = self.router_probs(ops.reshape(groups, (-1, shape[-1])), training)
        probs = ops.reshape(probs, (num_groups, group_size, e))  # [G, S, E]
        capacity = expert_choice_capacity(group_size, e, self.capacity_factor)
        gates, item_index = top_items_per_expert(probs, capacity)  # [G, E, C]
        plan = {"item_index": item_index, "gates": gates}
        outputs = self._dispatch(
            DISPATCHERS["expert_choice"], groups, plan, training
        )
        self._last_choice = (item_index, group_size)
        return ops.reshape(outputs, ops.shape(inputs)), dict(plan, probs=probs)

    # === Routing information ===
    def expert_rows(self, input_shape):
        """C tokens per expert and routing group."""
        tokens = math.prod(input_shape[:-1])
        group = {"image": tokens // input_shape[0], None: tokens}.get(
            self.group_size, self.group_size
        )
        capacity = expert_choice_capacity(
            group, self.num_experts, self.capacity_factor
        )
        return (tokens // group) * self.num_experts * capacity

    def routing_statistics(self):
        """`{"unrouted": f}`: the share of the last batch's tokens that no
        expert chose (the load is balanced by construction)."""
        item_index, group_size = self._last_choice
        num_groups = ops.shape(item_index)[0]
        rows = item_index + ops.reshape(
            ops.arange(num_groups, dtype="int32") * group_size, (-1, 1, 1)
        )
        rows = ops.reshape(rows, (-1,))
        picks = ops.segment_sum(
            ops.ones_like(rows, dtype="float32"),
            rows,
            num_segments=num_groups * group_size,
        )
        return {"unrouted": ops.mean(ops.cast(picks == 0, "float32"))}

    def _routing_info(self, state, input_shape):
        e, probs = self.num_experts, state["probs"]
        gates, item_index = state["gates"], state["item_index"]
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

    def _routing_specs(self, input_shape):
        e, leading = self.num_experts, tuple(input_shape[:-1])
        return {
            "gates": (leading + (e,), "float32"),
            "router_probs": (leading + (e,), "float32"),
            "experts_per_token": (leading, "int32"),
            "tokens_per_expert": ((e,), "int32"),
            "unrouted_fraction": ((), "float32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "capacity_factor": self.capacity_factor,
                "group_size": self.group_size,
                "eval_group_size": self.eval_group_size,
            }
        )
        return config
