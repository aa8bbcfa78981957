"""`MoEFeedForward`: a sparse Mixture-of-Experts replacement for a dense FFN.

Every item (a token, or an image with all its tokens) picks its top-K
experts; expert capacity, batch-prioritized routing and routing groups
follow V-MoE (Riquelme et al., 2021). The items reach their experts
through a `keras_vmoe.layers.dispatch.Dispatcher`, which never runs an
expert on an item that was not routed to it.

Axis letters: see `docs/glossary.md`.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_vmoe import validation
from keras_vmoe.layers import losses as moe_losses
from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.dispatch import choose_dispatcher
from keras_vmoe.layers.dispatch import dispatch_modes
from keras_vmoe.layers.distribution_hooks import dispatch_constraint
from keras_vmoe.layers.routing import check_group_size
from keras_vmoe.layers.routing import compute_capacity
from keras_vmoe.layers.routing import expert_load
from keras_vmoe.layers.routing import group_items
from keras_vmoe.layers.routing import route

ROUTING_MODES = ("token", "image")
IMAGE_ROUTER_INPUTS = ("auto", "cls", "mean")
EXPERT_LOAD_NAME = "expert_load"
AUX_LOSSES = ("load_balance", "importance", "load", "z")
PARTIAL_GROUPS = ("error", "pad")


def _group_argument(training):
    """The argument that sets the routing groups of a call."""
    return "group_size" if training else "eval_group_size"


def _check_capacity_factor(name, value):
    validation.check_number(
        name, value, minimum=0, min_inclusive=False, allow_none=True
    )


def _check_routing_arguments(
    num_experts,
    top_k,
    routing,
    capacity_factor,
    eval_capacity_factor,
    group_size,
    eval_group_size,
    image_router_input,
    dispatch,
):
    validation.check_int("num_experts", num_experts)
    validation.check_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(
            "`top_k` must be <= `num_experts`. Received: "
            f"top_k={top_k}, num_experts={num_experts}"
        )
    validation.check_choice("routing", routing, ROUTING_MODES)
    _check_capacity_factor("capacity_factor", capacity_factor)
    _check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
    validation.check_int("group_size", group_size, allow_none=True)
    check_group_size("eval_group_size", eval_group_size)
    validation.check_choice(
        "image_router_input", image_router_input, IMAGE_ROUTER_INPUTS
    )
    validation.check_choice("dispatch", dispatch, dispatch_modes())


def _check_ensemble(
    ensemble_size, num_experts, top_k, routing, group_size, eval_group_size
):
    validation.check_int("ensemble_size", ensemble_size)
    if ensemble_size == 1:
        return
    if num_experts % ensemble_size:
        raise ValueError(
            "`num_experts` must be a multiple of `ensemble_size` (each "
            "ensemble member routes among its own num_experts / "
            f"ensemble_size experts). Received: num_experts={num_experts}, "
            f"ensemble_size={ensemble_size}"
        )
    if top_k > num_experts // ensemble_size:
        raise ValueError(
            "`top_k` must be <= num_experts / ensemble_size, the experts of "
            f"one ensemble member. Received: top_k={top_k}, num_experts="
            f"{num_experts}, ensemble_size={ensemble_size}"
        )
    if routing != "token":
        raise ValueError(
            "Ensemble routing (`ensemble_size` > 1) routes tokens; use "
            f"routing='token'. Received: routing={routing!r}"
        )
    for name, size in (
        ("group_size", group_size),
        ("eval_group_size", eval_group_size),
    ):
        if isinstance(size, int) and size % ensemble_size:
            raise ValueError(
                f"`{name}` must be a multiple of `ensemble_size` (a group "
                "holds the tokens of every member of its images). Received: "
                f"{name}={size}, ensemble_size={ensemble_size}"
            )


def _loss_weights(*weights, noisy_gating, noise_std):
    """`{loss name: weight}` of the auxiliary losses, checked (>= 0); the
    load loss needs gating noise."""
    loss_weights = dict(zip(AUX_LOSSES, weights))
    for name, value in loss_weights.items():
        validation.check_number(f"{name}_loss_weight", value, minimum=0)
    if loss_weights["load"] > 0 and not (noisy_gating and noise_std != 0):
        raise ValueError(
            "`load_loss_weight` > 0 needs `noisy_gating=True` and "
            "`noise_std` > 0: the load loss of Shazeer et al. is defined "
            "through the gating noise. Received: load_loss_weight="
            f"{loss_weights['load']}, noisy_gating={noisy_gating}, "
            f"noise_std={noise_std}"
        )
    return loss_weights


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MoEFeedForward(MoELayer):
    """Mixture-of-Experts feed-forward layer with top-k routing.

    `y = E_s(x) + sum_{i in top-k} g_i(x) E_i(x)` where each expert `E_i` is
    a two-layer GELU MLP, `g` the softmax router gates and `E_s` the
    optional always-on shared expert (ViMoE, Eq. 3).

    Routing granularity:
    - `routing="token"`: every token (patch, or spatial position of a
      [B, H, W, d] feature map) picks its own experts (V-MoE, Sweet-spot).
    - `routing="image"`: one decision per image from its CLS token (the
      first token) or the mean token; every token of the image follows it
      (ViMoE). Capacity is counted in images.

    Routing groups in training: `group_size=None` routes the whole batch as
    one group. With `group_size=n`, the flattened batch is cut into
    contiguous groups of n items (tokens for token routing, images for image
    routing), and capacity and the priority order are per group (vmoe's
    `group_size`). The routing of an item then depends only on its own
    group, so it does not change with the number of devices as long as
    every device holds whole groups.

    Routing groups at inference (`training=False`: `predict`, `evaluate`,
    serving) are set apart by `eval_group_size`. Its default, "image", makes
    every image its own group: an image's tokens compete only with each
    other for the capacity `C = ceil(K * T * eval_capacity_factor / E)` of
    its T tokens (image routing: an image always gets its top-K experts),
    so an image's output never depends on the other images of the batch,
    on their number or on its position. `eval_group_size=None` (the whole
    batch) or `=n` (n items, as `group_size`) opt in to batch-level
    capacity at inference, e.g. to reproduce an evaluation protocol that
    routed groups of several images.

    With integer groups, a batch whose item count is not a multiple of n
    raises a `ValueError`, unless `partial_groups="pad"`: then, at
    inference, the last group is completed with padding items that claim
    no expert slot (capacity stays that of a full group): the real items
    route as in a full group whose other items are absent. For top-1 routing without
    batch priority that is exactly the start of a full group (an item never
    competes with the items after it); with K > 1 the later items' first
    choices would come before an item's second choice, so there it is not.
    Training still needs whole groups.

    Capacity: each expert has `C = ceil(K * S * capacity_factor / E)` slots
    per group of S items; choices beyond that are dropped and contribute
    zero (the item keeps the shared expert's output and the block's
    residual). With `batch_prioritized_routing=True` the items with the
    largest router probability claim slots first (Riquelme et al., 2021);
    the order uses the raw probability also when `normalize_gates=True`;
    equal probabilities go in item order on every backend.
    `capacity_factor=None` is dropless: no choice is ever dropped. With
    `capacity_multiple_of=m`, C is rounded up to a multiple of m (vmoe
    rounds to 4).

    Ensemble routing (E^3, Allingham et al., 2022, "Sparse MoEs meet
    Efficient Ensembles"): with `ensemble_size=M` > 1 the input batch holds
    M copies of every image, consecutive (`[x_0, x_0, x_1, x_1, ...]` for
    M = 2, as `ops.repeat(images, M, axis=0)`): copy m is ensemble member m
    and routes only among experts `[m E/M, (m+1) E/M)`: its router
    probabilities are the softmax over those E/M logits (0 elsewhere), its
    noise std defaults to M / E, and the auxiliary losses are computed per
    member over its E/M experts and averaged. The tokens are grouped in
    (image, token, member) order, as vmoe's `EncoderMoeEnsemble`, so a
    group of `group_size` tokens holds all members of its images.

    Dispatch (`dispatch`) never changes the results, only how they are
    computed: "slots" fills E*C capacity slots per group, used or not;
    "sorted" sorts the kept choices by expert and runs each expert on its
    own rows only (under XLA in a static number of row tiles); "grouped"
    sorts them too and runs every expert weight as one grouped matmul
    (JAX's `ragged_dot`, torch's `grouped_mm`; not on TensorFlow); "auto"
    (default) picks per call from the backend, XLA, the distribution, the
    capacity and the batch (see `keras_vmoe.layers.dispatch` and
    `docs/dispatch.md`).

    Samples never mix through padding: unclaimed slots hold zeros and
    dropped choices contribute exact zeros, so a NaN or inf in one sample
    cannot reach another sample's output. An item whose router input is
    not finite claims no slot, gets a NaN routed output, and turns the
    `expert_load` statistic (and the `<layer>_max_load` fit log) into NaN,
    instead of showing a fake collapse onto expert 0.

    Auxiliary losses are added with `add_loss` at training time, weighted,
    computed per routing group and averaged: `load_balance` (ViMoE Eq. 2 /
    Switch / GShard, counting first choices; alpha = 0.01 by default),
    `importance` (on the clean router probabilities) and `load` (Shazeer
    et al., 2017; `load` needs noisy gating) and `z` (router z-loss). See
    `keras_vmoe.layers.losses` for the exact definitions.

    Args:
        num_experts: E, number of routed experts (>= 1).
        hidden_dim: h, hidden width of every expert (and the shared expert).
        top_k: K, experts per item, 1 <= K <= E.
        routing: "token" or "image".
        router: "linear", "cosine", "l2", or a router layer instance
            mapping [N, d] to float32 [N, E] logits.
        router_dim: projection width of the cosine and L2 routers.
        shared_expert: add an always-on dense expert.
        capacity_factor: training capacity factor (> 0), None = dropless.
        eval_capacity_factor: capacity factor at inference, None = dropless.
        group_size: items per routing group in training (tokens for token
            routing, images for image routing), or None for the whole batch.
        eval_group_size: routing groups at inference: "image" (default:
            every image alone, batch independent), None (the whole batch)
            or items per group, as `group_size`.
        batch_prioritized_routing: fill slots by descending top gate.
        normalize_gates: rescale the K chosen gates to sum to one.
        noisy_gating: add Gaussian noise to the logits at training time.
        noise_std: its standard deviation (>= 0); None (default) is 1 / E,
            as vmoe.
        image_router_input: "cls" (first token), "mean", or "auto" (CLS for
            [B, T, d] inputs, mean for [B, H, W, d]). Image routing only.
        activation: "gelu" (exact) or "gelu_tanh".
        dropout: dropout after the expert activation and output.
        load_balance_loss_weight, importance_loss_weight, load_loss_weight,
        z_loss_weight: weights of the auxiliary losses (>= 0).
        return_routing: also return a dict describing the routing:
            `expert_index` and `gates` ([B, T, K], [B, H, W, K], or [B, K]
            for image routing; gates are 0 where dropped), `dropped` (bool,
            same shape), `router_probs` ([..., E]) and `expert_load` ([E],
            fraction of all choices each expert processed).
        kernel_initializer: initializer of the expert kernels (default
            truncated normal, stddev 0.02, as ViT).
        seed: seed of the gating noise and the dropout.
        dispatch: "auto", "slots", "sorted" or "grouped" (or the name of a
            registered dispatcher): how items reach their experts.
        capacity_multiple_of: None, or a positive int: the capacity is
            rounded up to a multiple of it (vmoe: 4).
        ensemble_size: M, ensemble members (E^3 routing, see above); 1 (the
            default) is ordinary routing. M > 1 needs token routing, E a
            multiple of M, K <= E / M and a `group_size` multiple of M.
        partial_groups: "error" (default) or "pad": what a batch that does
            not fill whole routing groups does at inference (see above).

    Example:
    >>> moe = MoEFeedForward(num_experts=4, hidden_dim=64, top_k=2)
    >>> moe(np.ones((2, 5, 16))).shape
    (2, 5, 16)
    """

    router_type = "top_k"
    routing_statistic_names = ("max_load",)

    def __init__(
        self,
        num_experts,
        hidden_dim,
        top_k=1,
        routing="token",
        router="linear",
        router_dim=256,
        shared_expert=False,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        group_size=None,
        eval_group_size="image",
        batch_prioritized_routing=True,
        normalize_gates=False,
        noisy_gating=False,
        noise_std=None,
        image_router_input="auto",
        activation="gelu",
        dropout=0.0,
        load_balance_loss_weight=0.01,
        importance_loss_weight=0.0,
        load_loss_weight=0.0,
        z_loss_weight=0.0,
        return_routing=False,
        kernel_initializer=None,
        seed=None,
        dispatch="auto",
        capacity_multiple_of=None,
        ensemble_size=1,
        partial_groups="error",
        **kwargs,
    ):
        _check_routing_arguments(
            num_experts,
            top_k,
            routing,
            capacity_factor,
            eval_capacity_factor,
            group_size,
            eval_group_size,
            image_router_input,
            dispatch,
        )
        validation.check_int(
            "capacity_multiple_of", capacity_multiple_of, allow_none=True
        )
        _check_ensemble(
            ensemble_size,
            num_experts,
            top_k,
            routing,
            group_size,
            eval_group_size,
        )
        validation.check_choice("partial_groups", partial_groups, PARTIAL_GROUPS)
        loss_weights = _loss_weights(
            load_balance_loss_weight,
            importance_loss_weight,
            load_loss_weight,
            z_loss_weight,
            noisy_gating=noisy_gating,
            noise_std=noise_std,
        )
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
        self._init_router(router, router_dim, noise_std, noise=noisy_gating)
        self.top_k = top_k
        self.routing = routing
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.group_size = group_size
        self.eval_group_size = eval_group_size
        self.batch_prioritized_routing = batch_prioritized_routing
        self.normalize_gates = normalize_gates
        self.noisy_gating = noisy_gating
        self.image_router_input = image_router_input
        self.loss_weights = loss_weights
        self.dispatch = dispatch
        self.capacity_multiple_of = capacity_multiple_of
        self.ensemble_size = ensemble_size
        self.partial_groups = partial_groups

    @property
    def _noise_std(self):
        # vmoe divides the noise by the experts one item can choose from.
        if self.noise_std is None:
            return self.ensemble_size / self.num_experts
        return self.noise_std

    # === Build ===
    def _check_inputs(self, input_shape):
        if (
            self.routing == "image"
            and len(input_shape) == 4
            and self.image_router_input == "cls"
        ):
            raise ValueError(
                "`image_router_input='cls'` needs [B, T, d] tokens with a "
                "CLS token first; a [B, H, W, d] feature map has none, use "
                f"'mean'. Received: inputs.shape={input_shape}"
            )

    def _build_state(self):
        # Routing statistic, not a parameter: the fraction of all choices
        # each expert processed in the last batch, kept as a variable so
        # that `fit` logs read it on every backend (JAX's stateless step
        # included, like BatchNorm's moving averages).
        self.expert_load = self.add_weight(
            name=EXPERT_LOAD_NAME,
            shape=(self.num_experts,),
            initializer="zeros",
            trainable=False,
            dtype="float32",
        )

    # === Forward ===
    def _items(self, inputs):
        """The routed items [N, P, d] and the router input [N, d]."""
        shape = ops.shape(inputs)
        tokens = ops.reshape(inputs, (shape[0], -1, shape[-1]))  # [B, T, d]
        if self.routing == "token":
            return (
                ops.reshape(tokens, (-1, 1, shape[-1])),
                ops.reshape(tokens, (-1, shape[-1])),
            )
        use_cls = self.image_router_input == "cls" or (
            self.image_router_input == "auto" and len(inputs.shape) == 3
        )
        return tokens, tokens[:, 0] if use_cls else ops.mean(tokens, axis=1)

    def _routing_group_size(self, inputs, training):
        """Items per routing group in this call (None: the whole batch).
        `inputs` is the layer input ([B, ..., d], B = images x members)."""
        size = self.group_size if training else self.eval_group_size
        if size != "image":
            return size
        if self.routing == "image":
            return 1
        # An image's T tokens of all M members are contiguous in the
        # (image, token, member) order.
        return self._tokens(inputs) * self.ensemble_size

    def _plan(self, router_input, training, group_size):
        """Routes [N, d] router inputs in groups of `group_size`: the plan,
        the [G, S, E] probabilities and the capacity factor in force."""
        logits, routing_logits = (
            group_items(x, group_size, _group_argument(training))
            for x in self._router_logits(router_input, training)
        )
        probs = ops.softmax(
            self._member_logits(routing_logits), axis=-1
        )  # float32 [G, S, E]
        capacity_factor = (
            self.capacity_factor if training else self.eval_capacity_factor
        )
        capacity = compute_capacity(
            ops.shape(probs)[1],
            self.num_experts,
            self.top_k,
            capacity_factor,
            self.capacity_multiple_of,
        )
        plan = route(
            probs,
            self.top_k,
            capacity,
            normalize=self.normalize_gates,
            batch_prioritized=self.batch_prioritized_routing,
        )
        plan["capacity"] = capacity
        if training:
            self._add_aux_losses(
                logits, routing_logits, probs, plan["expert_index"]
            )
        return plan, probs, capacity_factor

    # === Ensemble routing ===
    def _member_logits(self, logits):
        """[G, S, E] logits with every expert outside an item's ensemble
        member at -inf (items are in (image, token, member) order)."""
        members = self.ensemble_size
        if members == 1:
            return logits
        shape = ops.shape(logits)
        experts = self.num_experts // members
        own = np.repeat(np.eye(members, dtype=bool), experts, axis=1)
        grouped = ops.reshape(logits, (shape[0], -1, members, self.num_experts))
        masked = ops.where(own, grouped, float("-inf"))
        return ops.reshape(masked, shape)

    def _member_blocks(self, x, offset=False):
        """[G, S, X] (X = E, or K expert indices) -> [M*G, S/M, X'] with
        each member's own experts: X' = E/M columns of its block, or the
        indices relative to its block (`offset=True`)."""
        members = self.ensemble_size
        if members == 1:
            return x
        shape = ops.shape(x)
        x = ops.reshape(x, (shape[0], -1, members, shape[-1]))
        experts = self.num_experts // members
        blocks = []
        for m in range(members):
            if offset:
                blocks.append(x[:, :, m, :] - m * experts)
            else:
                blocks.append(x[:, :, m, m * experts : (m + 1) * experts])
        blocks = ops.stack(blocks, axis=0)
        return ops.reshape(blocks, (-1,) + tuple(blocks.shape[2:]))

    def _member_minor(self, inputs):
        """[B*M, ..., d] (copies of an image consecutive) -> [B*M, T, d]
        whose flattened order is (image, token, member)."""
        members, width = self.ensemble_size, inputs.shape[-1]
        tokens = ops.reshape(inputs, (-1, members, self._tokens(inputs), width))
        tokens = ops.transpose(tokens, (0, 2, 1, 3))
        return ops.reshape(tokens, (-1, self._tokens(inputs), width))

    def _member_major(self, x, num_tokens):
        """Inverse of `_member_minor` for a [B*M*T, X] tensor."""
        members = self.ensemble_size
        x = ops.reshape(x, (-1, num_tokens, members, ops.shape(x)[-1]))
        x = ops.transpose(x, (0, 2, 1, 3))
        return ops.reshape(x, (-1, ops.shape(x)[-1]))

    # === Partial routing groups ===
    def _pad_to_groups(self, items, router_input, training, size):
        """With `partial_groups="pad"` at inference, pads [N, P, d] items
        and [N, d] router inputs to whole groups of `size`. Padding items
        have a NaN router input: they claim no slot. Returns the items,
        router input and N (None when nothing was padded)."""
        whole_images = not training and self.eval_group_size == "image"
        if size is None or self.partial_groups == "error" or whole_images:
            return items, router_input, None
        num_items = ops.shape(items)[0]
        static = isinstance(num_items, int)
        if static and num_items % size == 0:
            return items, router_input, None
        if training:
            if static:
                raise ValueError(
                    f"In training the number of routed items ({num_items}) "
                    f"must be a multiple of `group_size` ({size}): "
                    "`partial_groups='pad'` pads partial groups at "
                    "inference only. Use a batch size whose items fill "
                    "whole groups (and drop the last partial batch)."
                )
            return items, router_input, None
        pad = (-num_items) % size
        items = ops.pad(items, [[0, pad], [0, 0], [0, 0]])
        router_input = ops.pad(
            router_input, [[0, pad], [0, 0]], constant_values=float("nan")
        )
        return items, router_input, num_items

    @staticmethod
    def _real_items(plan, num_items):
        """The [N, ...] rows of the first `num_items` items of a grouped
        plan (all of them when `num_items` is None)."""
        if num_items is None:
            return plan
        real = {}
        for name, value in plan.items():
            if name == "capacity":
                real[name] = value
                continue
            rows = ops.reshape(value, (-1,) + tuple(value.shape[2:]))
            real[name] = rows[:num_items]
        return real

    @staticmethod
    def _tokens(inputs):
        return math.prod(inputs.shape[1:-1])

    def _forward(self, inputs, training):
        ensemble = self.ensemble_size > 1
        if ensemble:
            inputs_shape = ops.shape(inputs)
            inputs = self._member_minor(inputs)
        items, router_input = self._items(inputs)
        group_size = self._routing_group_size(inputs, training)
        items, router_input, num_items = self._pad_to_groups(
            items, router_input, training, group_size
        )
        plan, probs, capacity_factor = self._plan(
            router_input, training, group_size
        )
        real = self._real_items(plan, num_items)
        load = expert_load(
            real["expert_index"], real["kept"], self.num_experts, real["valid"]
        )
        self.expert_load.assign(load)
        grouped = group_items(
            items, group_size, _group_argument(training)
        )  # [G, S, P, d]
        dispatcher = choose_dispatcher(
            self.dispatch,
            ops.shape(grouped),
            self.top_k,
            plan["capacity"],
            self.num_experts,
            routing=self.routing,
            dropless=capacity_factor is None,
            static_shape=None not in tuple(items.shape),
            expert_parallel=dispatch_constraint(self) is not None,
            dtype=self.compute_dtype,
            hidden_dim=self.hidden_dim,
        )
        routed = self._dispatch(dispatcher, grouped, plan, training)
        # Items with non-finite router input get NaN, never a fake expert.
        valid = ops.reshape(plan["valid"], (-1, 1, 1))
        routed = ops.where(valid, ops.reshape(routed, ops.shape(items)), float("nan"))
        if num_items is not None:
            routed = routed[:num_items]
            probs = self._real_items({"probs": probs}, num_items)["probs"]
            plan = real
        if ensemble:
            routed = self._member_major(
                ops.reshape(routed, (-1, inputs.shape[-1])),
                self._tokens(inputs),
            )
            return ops.reshape(routed, inputs_shape), {
                "plan": plan,
                "probs": probs,
                "load": load,
                "tokens": self._tokens(inputs),
            }
        outputs = ops.reshape(routed, ops.shape(inputs))
        return outputs, {"plan": plan, "probs": probs, "load": load}

    def _add_aux_losses(self, logits, noisy_logits, probs, expert_index):
        """Adds the weighted aux losses; all inputs are [G, S, ...]. With
        ensemble routing each member's block is one more group."""
        logits, noisy_logits, expert_index = (
            self._member_blocks(logits),
            self._member_blocks(noisy_logits),
            self._member_blocks(expert_index, offset=True),
        )
        if self.ensemble_size > 1:
            probs = ops.softmax(noisy_logits, axis=-1)
        weights = self.loss_weights
        values = {}
        if weights["load_balance"]:
            values["load_balance"] = moe_losses.load_balance_loss(
                probs, expert_index
            )
        if weights["importance"]:
            values["importance"] = moe_losses.importance_loss(
                ops.softmax(logits, axis=-1)
            )
        if weights["load"]:
            values["load"] = moe_losses.load_loss(
                logits, noisy_logits, self._noise_std, self.top_k
            )
        if weights["z"]:
            values["z"] = moe_losses.router_z_loss(logits)
        for name, value in values.items():
            self.add_loss(weights[name] * value)

    # === Routing information ===
    def expert_rows(self, input_shape):
        """Every token times K (capacity drops not subtracted)."""
        return math.prod(input_shape[:-1]) * self.top_k

    def routing_statistics(self):
        """`{"max_load": E * max_i load_i}` of the last batch: 1.0 is a
        perfectly balanced split, E all choices on one expert."""
        return {"max_load": self.num_experts * ops.max(self.expert_load)}

    def _leading(self, input_shape):
        input_shape = tuple(input_shape)
        return input_shape[:-1] if self.routing == "token" else input_shape[:1]

    def _routing_info(self, state, input_shape):
        plan, leading = state["plan"], self._leading(input_shape)

        def shaped(x, last):
            if "tokens" in state:  # ensemble: back to the input's order
                x = self._member_major(
                    ops.reshape(x, (-1, last)), state["tokens"]
                )
            return ops.reshape(x, leading + (last,))

        k, e = self.top_k, self.num_experts
        return {
            "expert_index": shaped(plan["expert_index"], k),
            "gates": shaped(plan["gates"], k),
            "dropped": shaped(ops.logical_not(plan["kept"]), k),
            "router_probs": shaped(state["probs"], e),
            "expert_load": state["load"],
        }

    def _routing_specs(self, input_shape):
        leading, k, e = self._leading(input_shape), self.top_k, self.num_experts
        return {
            "expert_index": (leading + (k,), "int32"),
            "gates": (leading + (k,), "float32"),
            "dropped": (leading + (k,), "bool"),
            "router_probs": (leading + (e,), "float32"),
            "expert_load": ((e,), "float32"),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "top_k": self.top_k,
                "routing": self.routing,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "group_size": self.group_size,
                "eval_group_size": self.eval_group_size,
                "batch_prioritized_routing": self.batch_prioritized_routing,
                "normalize_gates": self.normalize_gates,
                "noisy_gating": self.noisy_gating,
                "image_router_input": self.image_router_input,
                "load_balance_loss_weight": self.loss_weights["load_balance"],
                "importance_loss_weight": self.loss_weights["importance"],
                "load_loss_weight": self.loss_weights["load"],
                "z_loss_weight": self.loss_weights["z"],
                "dispatch": self.dispatch,
                "capacity_multiple_of": self.capacity_multiple_of,
                "ensemble_size": self.ensemble_size,
                "partial_groups": self.partial_groups,
            }
        )
        return config
