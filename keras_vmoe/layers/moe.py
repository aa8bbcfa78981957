"""`MoEFeedForward`: a sparse Mixture-of-Experts replacement for a dense FFN.

Axis letters (DESIGN.md glossary):
    B batch · T tokens per image · d model width · h expert hidden width
    E experts · K experts per item · C capacity (slots per expert)
    S items in the routing group: B*T tokens (token routing) or B images
      (image routing) · P tokens per item: 1 (token) or T (image)

Dispatch never runs an expert on an item it was not routed to: items are
gathered into an [E, C*P, d] buffer, all experts run as one batched matmul
on their own slots, and each item gathers its K results back; or (sorted
dispatch) the routed items are sorted by expert and each expert runs on
its own rows only (`keras_vmoe.layers.dispatch`).
"""

import math
import numbers

import keras
from keras import ops

from keras_vmoe.layers import losses as moe_losses
from keras_vmoe.layers import quantization
from keras_vmoe.layers.dispatch import DISPATCH_MODES
from keras_vmoe.layers.dispatch import StaticLayout
from keras_vmoe.layers.dispatch import resolve_dispatch
from keras_vmoe.layers.dispatch import slot_dispatch
from keras_vmoe.layers.dispatch import sorted_dispatch
from keras_vmoe.layers.distribution_hooks import dispatch_constraint
from keras_vmoe.layers.feed_forward import apply_activation
from keras_vmoe.layers.feed_forward import check_activation
from keras_vmoe.layers.feed_forward import make_shared_expert
from keras_vmoe.layers.routers import ROUTERS
from keras_vmoe.layers.routers import get_router
from keras_vmoe.layers.routing import compute_capacity
from keras_vmoe.layers.routing import expert_load
from keras_vmoe.layers.routing import group_items
from keras_vmoe.layers.routing import route

ROUTING_MODES = ("token", "image")
IMAGE_ROUTER_INPUTS = ("auto", "cls", "mean")
EXPERT_LOAD_NAME = "expert_load"


def _is_finite_number(value):
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _check_capacity_factor(name, value):
    if value is None:
        return
    if not _is_finite_number(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0, or None for dropless "
            f"routing. Received: {name}={value!r}"
        )


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MoEFeedForward(
    quantization.QuantizedExpertsMixin, keras.layers.Layer
):
    """Mixture-of-Experts feed-forward layer with top-k routing.

    `y = E_s(x) + sum_{i in top-k} g_i(x) E_i(x)` where each expert `E_i` is
    a two-layer GELU MLP, `g` the softmax router gates and `E_s` the
    optional always-on shared expert (ViMoE, Eq. 3).

    Routing granularity:
    - `routing="token"`: every token (patch, or spatial position of a
      [B, H, W, d] feature map) picks its own experts (V-MoE, Sweet-spot).
      Capacity and batch-prioritized routing work per routing group:
      the whole batch (B*T tokens) by default, or `group_size` tokens.
    - `routing="image"`: one decision per image from its CLS token (the
      first token) or the mean token; every token of the image follows it
      (ViMoE). Capacity is counted in images.

    Routing groups: `group_size=None` routes the whole batch as one group.
    With `group_size=n`, the flattened batch is cut into contiguous groups
    of n items (tokens for token routing, images for image routing) and
    capacity `C = ceil(K * n * capacity_factor / E)` and the priority order
    are per group (vmoe's `group_size`). The routing of an item then
    depends only on its own group, so it does not change with the number
    of devices as long as every device holds whole groups (choose n to
    divide the per-device item count). A batch whose item count is not a
    multiple of n raises a `ValueError`.

    Capacity: each expert has `C = ceil(K * S * capacity_factor / E)` slots;
    choices beyond that are dropped and contribute zero (the item keeps the
    shared expert's output and the block's residual). With
    `batch_prioritized_routing=True` the items with the largest router
    probability claim slots first (Riquelme et al., 2021); the order uses
    the raw probability also when `normalize_gates=True`. `capacity_factor=None` is
    dropless: no choice is ever dropped.

    Dispatch (`dispatch`): "slots" computes every capacity slot (E*C rows,
    used or not; dropless image routing gathers each image's expert
    weights). "sorted" sorts the kept choices by expert and runs each
    expert on its own rows only: exactly the routed rows where shapes may
    be dynamic (TensorFlow without XLA, which is what `fit` compiles on a
    CPU-only machine; torch), and under XLA (JAX; TensorFlow with
    `jit_compile=True`) a static number of row tiles, each expert padded
    to a whole tile (at most K*S + E*(tile-1) rows). Both give the same
    routing and outputs (to float rounding). "auto" (default) picks
    "sorted" on TensorFlow without XLA and on torch, and under XLA
    "sorted" where the tiles' expected rows (routed rows plus half a tile
    of padding per expert) are no more than the slot path's E*C slots
    (dropless token routing, and capacity factors above 1 at batches of
    more than a few images) and "slots" otherwise. On JAX each tile runs
    its expert's whole MLP in one loop with a hand-written backward pass,
    which keeps only the pre-activations (train-step activation memory
    below the dense FFN's).
    Under XLA with a batch size unknown at trace time (TensorFlow `fit`
    with `jit_compile=True`) the static layout has no bound, and "sorted"
    and "auto" run the slot path.

    When to use dropless token routing (`capacity_factor=None`): with
    "auto" on TensorFlow's default (non-XLA) mode it costs about
    what capacity 1.0 costs, and no token loses its expert, so it is the
    better choice for fine-tuning and for MoE-ConvNeXt / ViT-MoE token
    routing on CPU or small batches, and for evaluation
    (`eval_capacity_factor=None`). Under XLA it costs about what capacity
    1.25 costs (every expert padded to whole tiles of rows): on JAX
    1.05-1.15x a dense FFN at B=32 (ViT-S sizes), 1.9-3x at B=1 to 4.

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
            mapping [S, d] to float32 [S, E] logits.
        router_dim: projection width of the cosine and L2 routers.
        shared_expert: add an always-on dense expert.
        capacity_factor: training capacity factor (> 0), None = dropless.
        group_size: items per routing group (tokens for token routing,
            images for image routing), or None for the whole batch.
        eval_capacity_factor: capacity factor at inference, None = dropless.
        batch_prioritized_routing: fill slots by descending top gate.
        normalize_gates: rescale the K chosen gates to sum to one.
        noisy_gating: add Gaussian noise to the logits at training time.
        noise_std: its standard deviation; default 1 / E (as vmoe).
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
        seed: seed of the gating noise.
        dispatch: "auto", "slots" or "sorted": how items reach their
            experts (see Dispatch above); never changes the results.

    Example:
    >>> moe = MoEFeedForward(num_experts=4, hidden_dim=64, top_k=2)
    >>> moe(np.ones((2, 5, 16))).shape
    (2, 5, 16)
    """

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
        **kwargs,
    ):
        for name, value in (
            ("num_experts", num_experts),
            ("hidden_dim", hidden_dim),
            ("top_k", top_k),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"`{name}` must be a positive integer. Received: "
                    f"{name}={value!r}"
                )
        if top_k > num_experts:
            raise ValueError(
                "`top_k` must be <= `num_experts`. Received: "
                f"top_k={top_k}, num_experts={num_experts}"
            )
        _check_choice("routing", routing, ROUTING_MODES)
        if isinstance(router, str):
            _check_choice("router", router, tuple(ROUTERS))
        elif not isinstance(router, keras.layers.Layer):
            raise ValueError(
                f"`router` must be one of {tuple(ROUTERS)} or a router "
                f"layer. Received: router={router!r}"
            )
        _check_capacity_factor("capacity_factor", capacity_factor)
        _check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        if group_size is not None and (
            not isinstance(group_size, int)
            or isinstance(group_size, bool)
            or group_size < 1
        ):
            raise ValueError(
                "`group_size` must be a positive integer, or None for one "
                f"group per batch. Received: group_size={group_size!r}"
            )
        if noise_std is not None and (
            not _is_finite_number(noise_std) or noise_std <= 0
        ):
            raise ValueError(
                "`noise_std` must be a finite number > 0. Received: "
                f"noise_std={noise_std!r}"
            )
        _check_choice(
            "image_router_input", image_router_input, IMAGE_ROUTER_INPUTS
        )
        check_activation(activation)
        _check_choice("dispatch", dispatch, DISPATCH_MODES)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"`dropout` must be in [0, 1). Received: dropout={dropout!r}"
            )
        loss_weights = {
            "load_balance": load_balance_loss_weight,
            "importance": importance_loss_weight,
            "load": load_loss_weight,
            "z": z_loss_weight,
        }
        for name, value in loss_weights.items():
            if not _is_finite_number(value) or value < 0:
                raise ValueError(
                    f"`{name}_loss_weight` must be a finite number >= 0. "
                    "Received: "
                    f"{name}_loss_weight={value!r}"
                )
        if load_loss_weight > 0 and not noisy_gating:
            raise ValueError(
                "`load_loss_weight` > 0 needs `noisy_gating=True`: the load "
                "loss of Shazeer et al. is defined through the gating noise. "
                f"Received: load_loss_weight={load_loss_weight}, "
                f"noisy_gating={noisy_gating}"
            )
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.top_k = top_k
        self.routing = routing
        self.router_dim = router_dim
        self.shared_expert = shared_expert
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.group_size = group_size
        self.batch_prioritized_routing = batch_prioritized_routing
        self.normalize_gates = normalize_gates
        self.noisy_gating = noisy_gating
        self.noise_std = noise_std
        self.image_router_input = image_router_input
        self.activation = activation
        self.dropout = dropout
        self.loss_weights = loss_weights
        self.return_routing = return_routing
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.seed = seed
        self.dispatch = dispatch

        # === Layers ===
        self.router = (
            get_router(router, num_experts, router_dim)
            if isinstance(router, str)
            else router
        )
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
            dtype=quantization.unquantized_policy(self.dtype_policy),
            name="dropout",
        )
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._router_spec = router
        self._routing_observers = []

    # === Build ===
    def _check_input_shape(self, input_shape):
        if len(input_shape) not in (3, 4):
            raise ValueError(
                "`inputs` must have rank 3 ([B, T, d]) or rank 4 "
                f"([B, H, W, d]). Received: inputs.shape={tuple(input_shape)}"
            )
        if (
            self.routing == "image"
            and len(input_shape) == 4
            and self.image_router_input == "cls"
        ):
            raise ValueError(
                "`image_router_input='cls'` needs [B, T, d] tokens with a "
                "CLS token first; a [B, H, W, d] feature map has none, use "
                "'mean'. Received: "
                f"inputs.shape={tuple(input_shape)}"
            )
        built_width = getattr(self, "input_dim", None)
        width = input_shape[-1]
        if built_width is not None and width is not None and width != built_width:
            raise ValueError(
                f"`inputs` width must match the layer's width {built_width}. "
                f"Received: inputs.shape={tuple(input_shape)}"
            )

    def build(self, input_shape):
        self._check_input_shape(input_shape)
        d, h, e = input_shape[-1], self.hidden_dim, self.num_experts
        if d is None:
            raise ValueError(
                "The last axis of `inputs` must be known. Received: "
                f"inputs.shape={tuple(input_shape)}"
            )
        self.input_dim = d
        self.router.build((None, d))
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
        if self.shared_ffn is not None:
            self.shared_ffn.build(input_shape)
        # Routing statistic, not a parameter: the fraction of all choices
        # each expert processed in the last batch. Task models read
        # it to log expert load during `fit` (on every backend, including
        # JAX's stateless training step, like BatchNorm's moving averages).
        self.expert_load = self.add_weight(
            name=EXPERT_LOAD_NAME,
            shape=(e,),
            initializer="zeros",
            trainable=False,
            dtype="float32",
        )
        if mode is not None:
            self._build_quantized_kernels(mode)

    # === Forward ===
    def _router_logits(self, router_input, training):
        """Float32 logits [S, E] and the (possibly noisy) routing logits."""
        logits = self.router(router_input)
        if not (training and self.noisy_gating):
            return logits, logits
        noise = keras.random.normal(
            ops.shape(logits), dtype="float32", seed=self.seed_generator
        )
        return logits, logits + self._noise_std * noise

    @property
    def _noise_std(self):
        return self.noise_std or 1.0 / self.num_experts

    def _add_aux_losses(self, logits, noisy_logits, probs, expert_index):
        """Adds the weighted aux losses; all inputs are [G, S, ...]."""
        values = {}
        if self.loss_weights["load_balance"]:
            values["load_balance"] = moe_losses.load_balance_loss(
                probs, expert_index
            )
        if self.loss_weights["importance"]:
            values["importance"] = moe_losses.importance_loss(
                ops.softmax(logits, axis=-1)
            )
        if self.loss_weights["load"]:
            values["load"] = moe_losses.load_loss(
                logits, noisy_logits, self._noise_std, self.top_k
            )
        if self.loss_weights["z"]:
            values["z"] = moe_losses.router_z_loss(logits)
        for name, value in values.items():
            self.add_loss(self.loss_weights[name] * value)

    def _run_experts(self, expert_inputs, training):
        """[E, N, d] -> [E, N, d]: expert e runs on its own N rows only."""
        hidden = ops.einsum("end,edh->enh", expert_inputs, self.expert_kernel_1)
        hidden = hidden + ops.expand_dims(self.expert_bias_1, 1)
        hidden = apply_activation(hidden, self.activation)
        hidden = self.dropout_layer(hidden, training=training)
        outputs = ops.einsum("enh,ehd->end", hidden, self.expert_kernel_2)
        outputs = outputs + ops.expand_dims(self.expert_bias_2, 1)
        return self.dropout_layer(outputs, training=training)

    def _run_expert_rows(self, rows, experts, training):
        """[R, d] -> [R, d] for the sorted dispatch (`experts`: a
        `dispatch.RowExperts`, which applies each row's expert)."""
        if not (training and self.dropout):
            # No dropout between the matmuls: the layout may fuse the MLP.
            outputs = experts.mlp(
                rows,
                self.expert_kernel_1,
                self.expert_bias_1,
                self.expert_kernel_2,
                self.expert_bias_2,
                self.activation,
            )
            return self.dropout_layer(outputs, training=training)
        hidden = experts.matmul(rows, self.expert_kernel_1, self.expert_bias_1)
        hidden = apply_activation(hidden, self.activation)
        hidden = self.dropout_layer(hidden, training=training)
        outputs = experts.matmul(
            hidden, self.expert_kernel_2, self.expert_bias_2
        )
        return self.dropout_layer(outputs, training=training)

    def _dropless_image_experts(self, images, plan, training):
        """Dropless image routing: each image through its experts' weights.

        images [B, T, d] -> [B, T, d], with weights gathered per image;
        `plan` holds [B, K] tensors.
        """
        index = plan["expert_index"]  # [B, K]
        kernel_1 = ops.take(self.expert_kernel_1, index, axis=0)
        bias_1 = ops.take(self.expert_bias_1, index, axis=0)
        kernel_2 = ops.take(self.expert_kernel_2, index, axis=0)
        bias_2 = ops.take(self.expert_bias_2, index, axis=0)
        hidden = ops.einsum("btd,bkdh->bkth", images, kernel_1)
        hidden = apply_activation(hidden + bias_1[:, :, None, :], self.activation)
        hidden = self.dropout_layer(hidden, training=training)
        outputs = ops.einsum("bkth,bkhd->bktd", hidden, kernel_2)
        outputs = self.dropout_layer(
            outputs + bias_2[:, :, None, :], training=training
        )
        gates = ops.cast(plan["gates"], outputs.dtype)
        return ops.einsum("bktd,bk->btd", outputs, gates)

    def _empty_call(self, inputs):
        """A batch of zero samples: an empty output, like `Dense`."""
        outputs = ops.zeros_like(inputs)
        if not self.return_routing:
            return outputs
        shapes = self.compute_output_shape(inputs.shape)[1]
        dtypes = self._routing_dtypes()
        info = {
            name: ops.zeros(
                shape if name == "expert_load" else (0,) + tuple(shape[1:]),
                dtypes[name],
            )
            for name, shape in shapes.items()
        }
        return outputs, info

    def call(self, inputs, training=None):
        self._check_input_shape(inputs.shape)
        if inputs.shape[0] == 0:
            return self._empty_call(inputs)
        input_shape = ops.shape(inputs)
        batch, width = input_shape[0], input_shape[-1]
        tokens = ops.reshape(inputs, (batch, -1, width))  # [B, T, d]

        if self.routing == "token":
            items = ops.reshape(tokens, (-1, 1, width))  # [B*T, 1, d]
            router_input = ops.reshape(tokens, (-1, width))
        else:
            items = tokens  # [B, T, d]
            use_cls = self.image_router_input == "cls" or (
                self.image_router_input == "auto" and len(inputs.shape) == 3
            )
            router_input = (
                tokens[:, 0] if use_cls else ops.mean(tokens, axis=1)
            )

        # Routing groups: [N, ...] -> [G, S, ...].
        logits, routing_logits = (
            group_items(x, self.group_size)
            for x in self._router_logits(router_input, training)
        )
        probs = ops.softmax(routing_logits, axis=-1)  # float32 [G, S, E]
        capacity_factor = (
            self.capacity_factor if training else self.eval_capacity_factor
        )
        capacity = compute_capacity(
            ops.shape(probs)[1], self.num_experts, self.top_k, capacity_factor
        )
        plan = route(
            probs,
            self.top_k,
            capacity,
            normalize=self.normalize_gates,
            batch_prioritized=self.batch_prioritized_routing,
        )
        if training:
            self._add_aux_losses(
                logits, routing_logits, probs, plan["expert_index"]
            )
        load = expert_load(
            plan["expert_index"], plan["kept"], self.num_experts, plan["valid"]
        )
        self.expert_load.assign(load)

        constrain = dispatch_constraint(self)
        grouped_items = group_items(items, self.group_size)
        dropless_images = capacity_factor is None and self.routing == "image"
        dispatch = resolve_dispatch(
            self.dispatch,
            dropless_tokens=capacity_factor is None and self.routing == "token",
            static_shape=None not in tuple(items.shape),
            layout=None
            if dropless_images
            else StaticLayout.of(
                ops.shape(grouped_items), self.top_k, capacity, self.num_experts
            ),
        )
        if constrain is not None and dispatch == "sorted":
            # Expert parallelism shards the [G, E, C, ...] slot buffers; the
            # sorted layout has none to shard.
            if self.dispatch == "sorted":
                raise ValueError(
                    "`dispatch='sorted'` cannot run under expert parallelism "
                    "(its rows are not laid out per group and expert); use "
                    "'slots' or 'auto'. Received: dispatch='sorted'"
                )
            dispatch = "slots"
        if dispatch == "sorted":
            routed = sorted_dispatch(
                grouped_items,
                plan,
                capacity,
                self.num_experts,
                lambda x, experts: self._run_expert_rows(x, experts, training),
            )
        elif capacity_factor is None and self.routing == "image":
            flat_plan = {
                name: ops.reshape(plan[name], (-1, self.top_k))
                for name in ("expert_index", "gates")
            }
            routed = self._dropless_image_experts(items, flat_plan, training)
        else:
            routed = slot_dispatch(
                grouped_items,
                plan,
                capacity,
                self.num_experts,
                lambda x: self._run_experts(x, training),
                constrain=constrain,
            )
        # Items with non-finite router input get NaN, never a fake expert.
        valid = ops.reshape(plan["valid"], (-1, 1, 1))
        routed = ops.reshape(routed, ops.shape(items))
        routed = ops.where(valid, routed, float("nan"))
        outputs = ops.reshape(routed, input_shape)
        if self.shared_ffn is not None:
            outputs = outputs + self.shared_ffn(inputs, training=training)
        if not (self.return_routing or self._routing_observers):
            return outputs
        info = self._routing_info(plan, probs, input_shape, load)
        for observer in self._routing_observers:
            observer(self, info)
        return (outputs, info) if self.return_routing else outputs

    # === Routing observers ===
    def add_routing_observer(self, observer):
        """Calls `observer(layer, routing)` on every forward pass.

        `routing` is the dict that `return_routing=True` returns. This is
        how analysis code reads the routing of MoE layers nested inside
        blocks, without changing the model's outputs. Observers run
        eagerly: call the model directly (`model(x)`), not inside a
        compiled function, to get concrete values.
        """
        self._routing_observers.append(observer)

    def remove_routing_observer(self, observer):
        """Removes an observer added with `add_routing_observer`."""
        self._routing_observers.remove(observer)

    def _routing_info(self, plan, probs, input_shape, load):
        k, e = self.top_k, self.num_experts
        if self.routing == "token":
            leading = tuple(input_shape[:-1])
        else:
            leading = (input_shape[0],)

        def shaped(x, last):
            return ops.reshape(x, leading + (last,))

        return {
            "expert_index": shaped(plan["expert_index"], k),
            "gates": shaped(plan["gates"], k),
            "dropped": shaped(ops.logical_not(plan["kept"]), k),
            "router_probs": shaped(probs, e),
            "expert_load": load,
        }

    # === Shapes and config ===
    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if not self.return_routing:
            return input_shape
        leading = input_shape[:-1] if self.routing == "token" else input_shape[:1]
        k, e = self.top_k, self.num_experts
        return input_shape, {
            "expert_index": leading + (k,),
            "gates": leading + (k,),
            "dropped": leading + (k,),
            "router_probs": leading + (e,),
            "expert_load": (e,),
        }

    @staticmethod
    def _routing_dtypes():
        return {
            "expert_index": "int32",
            "gates": "float32",
            "dropped": "bool",
            "router_probs": "float32",
            "expert_load": "float32",
        }

    def compute_output_spec(self, inputs, training=None):
        output_shape = self.compute_output_shape(inputs.shape)
        outputs = keras.KerasTensor(
            output_shape[0] if self.return_routing else output_shape,
            dtype=self.compute_dtype,
        )
        if not self.return_routing:
            return outputs
        dtypes = self._routing_dtypes()
        return outputs, {
            name: keras.KerasTensor(shape, dtype=dtypes[name])
            for name, shape in output_shape[1].items()
        }

    def get_config(self):
        config = super().get_config()
        router = self._router_spec
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "top_k": self.top_k,
                "routing": self.routing,
                "router": (
                    router
                    if isinstance(router, str)
                    else keras.saving.serialize_keras_object(router)
                ),
                "router_dim": self.router_dim,
                "shared_expert": self.shared_expert,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "group_size": self.group_size,
                "batch_prioritized_routing": self.batch_prioritized_routing,
                "normalize_gates": self.normalize_gates,
                "noisy_gating": self.noisy_gating,
                "noise_std": self.noise_std,
                "image_router_input": self.image_router_input,
                "activation": self.activation,
                "dropout": self.dropout,
                "load_balance_loss_weight": self.loss_weights["load_balance"],
                "importance_loss_weight": self.loss_weights["importance"],
                "load_loss_weight": self.loss_weights["load"],
                "z_loss_weight": self.loss_weights["z"],
                "return_routing": self.return_routing,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "seed": self.seed,
                "dispatch": self.dispatch,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("router"), dict):
            config["router"] = keras.saving.deserialize_keras_object(
                config["router"]
            )
        return cls(**config)
