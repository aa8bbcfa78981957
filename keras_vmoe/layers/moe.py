"""`MoEFeedForward`: a sparse Mixture-of-Experts replacement for a dense FFN.

Axis letters (DESIGN.md glossary):
    B batch · T tokens per image · d model width · h expert hidden width
    E experts · K experts per item · C capacity (slots per expert)
    S items in the routing group: B*T tokens (token routing) or B images
      (image routing) · P tokens per item: 1 (token) or T (image)

Dispatch never runs an expert on an item it was not routed to: items are
gathered into an [E, C*P, d] buffer, all experts run as one batched matmul
on their own slots, and each item gathers its K results back.
"""

import numbers

import keras
from keras import ops

from keras_vmoe.layers import losses as moe_losses
from keras_vmoe.layers.feed_forward import FeedForward
from keras_vmoe.layers.feed_forward import apply_activation
from keras_vmoe.layers.feed_forward import check_activation
from keras_vmoe.layers.routers import ROUTERS
from keras_vmoe.layers.routers import get_router
from keras_vmoe.layers.routing import compute_capacity
from keras_vmoe.layers.routing import expert_load
from keras_vmoe.layers.routing import route

ROUTING_MODES = ("token", "image")
IMAGE_ROUTER_INPUTS = ("auto", "cls", "mean")
EXPERT_LOAD_NAME = "expert_load"


def _check_capacity_factor(name, value):
    if value is None:
        return
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or value <= 0
    ):
        raise ValueError(
            f"`{name}` must be a number > 0, or None for dropless routing. "
            f"Received: {name}={value!r}"
        )


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )


@keras.saving.register_keras_serializable(package="keras_vmoe")
class MoEFeedForward(keras.layers.Layer):
    """Mixture-of-Experts feed-forward layer with top-k routing.

    `y = E_s(x) + sum_{i in top-k} g_i(x) E_i(x)` where each expert `E_i` is
    a two-layer GELU MLP, `g` the softmax router gates and `E_s` the
    optional always-on shared expert (ViMoE, Eq. 3).

    Routing granularity:
    - `routing="token"`: every token (patch, or spatial position of a
      [B, H, W, d] feature map) picks its own experts (V-MoE, Sweet-spot).
      The routing group is the whole batch: capacity and batch-prioritized
      routing work over all B*T tokens.
    - `routing="image"`: one decision per image from its CLS token (the
      first token) or the mean token; every token of the image follows it
      (ViMoE). Capacity is counted in images.

    Capacity: each expert has `C = ceil(K * S * capacity_factor / E)` slots;
    choices beyond that are dropped and contribute zero (the item keeps the
    shared expert's output and the block's residual). With
    `batch_prioritized_routing=True` the items with the largest top gate
    claim slots first (Riquelme et al., 2021). `capacity_factor=None` is
    dropless: image routing then runs each image through its own experts'
    gathered weights; token routing gives every expert S slots, which is
    exact but costs E/K times the compute of a balanced layer.

    Auxiliary losses are added with `add_loss` at training time, weighted:
    `load_balance` (ViMoE Eq. 2 / Switch / GShard, alpha = 0.01 by default),
    `importance` and `load` (Shazeer et al., 2017; `load` needs noisy
    gating) and `z` (router z-loss).

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
        if noise_std is not None and not noise_std > 0:
            raise ValueError(
                f"`noise_std` must be > 0. Received: noise_std={noise_std!r}"
            )
        _check_choice(
            "image_router_input", image_router_input, IMAGE_ROUTER_INPUTS
        )
        check_activation(activation)
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
            if not isinstance(value, numbers.Real) or value < 0:
                raise ValueError(
                    f"`{name}_loss_weight` must be a number >= 0. Received: "
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

        # === Layers ===
        self.router = (
            get_router(router, num_experts, router_dim)
            if isinstance(router, str)
            else router
        )
        self.shared_ffn = (
            FeedForward(
                hidden_dim,
                activation=activation,
                dropout=dropout,
                kernel_initializer=self.kernel_initializer,
                dtype=self.dtype_policy,
                name="shared_expert",
            )
            if shared_expert
            else None
        )
        self.dropout_layer = keras.layers.Dropout(
            dropout, dtype=self.dtype_policy, name="dropout"
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
        self.expert_kernel_1 = self.add_weight(
            name="expert_kernel_1",
            shape=(e, d, h),
            initializer=self.kernel_initializer,
        )
        self.expert_bias_1 = self.add_weight(
            name="expert_bias_1", shape=(e, h), initializer="zeros"
        )
        self.expert_kernel_2 = self.add_weight(
            name="expert_kernel_2",
            shape=(e, h, d),
            initializer=self.kernel_initializer,
        )
        self.expert_bias_2 = self.add_weight(
            name="expert_bias_2", shape=(e, d), initializer="zeros"
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
        values = {}
        if self.loss_weights["load_balance"]:
            values["load_balance"] = moe_losses.load_balance_loss(
                probs, expert_index
            )
        if self.loss_weights["importance"]:
            values["importance"] = moe_losses.importance_loss(probs)
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

    def _dispatch_and_combine(self, items, plan, capacity, training):
        """Capacity-based dispatch. items [S, P, d] -> [S, P, d]."""
        e = self.num_experts
        num_items = ops.shape(items)[0]
        tokens_per_item, width = ops.shape(items)[1], ops.shape(items)[2]
        num_slots = e * capacity
        slot = plan["expert_index"] * capacity + plan["position"]  # [S, K]
        # Which item fills each slot. Dropped choices write to one spare
        # slot past the end; slots nobody claims keep item 0, whose results
        # are never read back.
        target = ops.where(plan["kept"], slot, num_slots)
        item_ids = ops.broadcast_to(
            ops.expand_dims(ops.arange(num_items, dtype="int32"), 1),
            ops.shape(target),
        )
        slot_item = ops.scatter_update(
            ops.zeros((num_slots + 1,), "int32"),
            ops.reshape(target, (-1, 1)),
            ops.reshape(item_ids, (-1,)),
        )[:num_slots]
        expert_inputs = ops.take(items, slot_item, axis=0)  # [E*C, P, d]
        expert_outputs = self._run_experts(
            ops.reshape(expert_inputs, (e, -1, width)), training
        )
        expert_outputs = ops.reshape(
            expert_outputs, (num_slots, tokens_per_item, width)
        )
        # Gather each choice's result; dropped choices read a valid slot
        # with a zero gate.
        read = ops.minimum(slot, num_slots - 1)
        gates = ops.cast(plan["gates"], expert_outputs.dtype)
        if self.top_k == 1:
            return ops.take(expert_outputs, read[:, 0], axis=0) * gates[
                :, :, None
            ]
        gathered = ops.take(expert_outputs, read, axis=0)  # [S, K, P, d]
        return ops.einsum("skpd,sk->spd", gathered, gates)

    def _dropless_image_experts(self, images, plan, training):
        """Dropless image routing: each image through its experts' weights.

        images [B, T, d] -> [B, T, d], with weights gathered per image.
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

    def call(self, inputs, training=None):
        self._check_input_shape(inputs.shape)
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

        logits, routing_logits = self._router_logits(router_input, training)
        probs = ops.softmax(routing_logits, axis=-1)  # float32 [S, E]
        capacity_factor = (
            self.capacity_factor if training else self.eval_capacity_factor
        )
        num_items = ops.shape(items)[0]
        dropless_images = capacity_factor is None and self.routing == "image"
        capacity = compute_capacity(
            num_items, self.num_experts, self.top_k, capacity_factor
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
        load = expert_load(plan["expert_index"], plan["kept"], self.num_experts)
        self.expert_load.assign(load)

        if dropless_images:
            routed = self._dropless_image_experts(items, plan, training)
        else:
            routed = self._dispatch_and_combine(items, plan, capacity, training)
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

    def compute_output_spec(self, inputs, training=None):
        output_shape = self.compute_output_shape(inputs.shape)
        outputs = keras.KerasTensor(output_shape if not self.return_routing else output_shape[0], dtype=self.compute_dtype)
        if not self.return_routing:
            return outputs
        dtypes = {
            "expert_index": "int32",
            "gates": "float32",
            "dropped": "bool",
            "router_probs": "float32",
            "expert_load": "float32",
        }
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
