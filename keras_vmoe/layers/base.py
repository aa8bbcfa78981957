"""`MoELayer`: the base of every Mixture-of-Experts feed-forward layer.

A MoE layer replaces a block's dense FFN: `y = E_s(x) + routed(x)` where
`E_s` is the optional always-on shared expert and `routed` sends parts of
`x` through E stacked expert MLPs. The base owns everything that does not
depend on how items are routed:

- argument checks (`keras_vmoe.validation`), the input-shape check, and the
  common configuration (`num_experts`, `hidden_dim`, `shared_expert`,
  `activation`, `dropout`, `return_routing`, `kernel_initializer`, `seed`);
- the expert bank (`keras_vmoe.layers.experts.StackedExperts`: the four
  stacked weights, their quantization and the ways to run them), the shared
  expert and the dropout;
- the router layer of the layers that have one, with its Gaussian noise;
- the call template: check, empty batch, `_forward` (the subclass: route,
  dispatch, combine), shared expert, routing observers and
  `return_routing`;
- `routing_statistics()`, the per-layer numbers that `fit` logs;
- one registry of MoE layer types by router type (`MOE_LAYERS`), filled
  as subclasses are defined.

A subclass defines `router_type`, validates and stores its own arguments,
and implements `_forward`, `_routing_info`, `_routing_specs` and
`routing_statistics` (and optionally `_build_routing_weights`,
`_build_state`, `_check_inputs`). How its items reach the experts is a
`keras_vmoe.layers.dispatch.Dispatcher`'s business.

Axis letters: see `docs/glossary.md`.
"""

import keras
from keras import ops

from keras_vmoe import validation
from keras_vmoe.layers.distribution_hooks import dispatch_constraint
from keras_vmoe.layers.experts import StackedExperts
from keras_vmoe.layers.feed_forward import check_activation
from keras_vmoe.layers.feed_forward import make_shared_expert
from keras_vmoe.layers.quantization import unquantized_policy
from keras_vmoe.layers.routers import ROUTERS
from keras_vmoe.layers.routers import get_router

# Router type -> MoE layer class, filled by `MoELayer.__init_subclass__`.
MOE_LAYERS = {}


class MoELayer(StackedExperts, keras.layers.Layer):
    """Base class of the MoE feed-forward layers (not used on its own).

    Args:
        num_experts: E, number of routed experts (>= 1).
        hidden_dim: h, hidden width of every expert (and the shared expert).
        shared_expert: add an always-on dense expert.
        activation: "gelu" (exact) or "gelu_tanh".
        dropout: dropout after the expert activation and output, in [0, 1).
        return_routing: also return a dict describing the routing (its
            keys depend on the layer).
        kernel_initializer: initializer of the expert kernels (default
            truncated normal, stddev 0.02, as ViT).
        seed: seed of the layer's randomness (router noise, dropout).
        lora_rank: if set, the layer enables LoRA on its routed experts
            with this rank when built (`enable_lora`); the config carries
            it, as Keras' `Dense` does.
        lora_alpha: the LoRA scale numerator (default `lora_rank`).
    """

    # The `router_type` of a model's `moe_config` that builds this layer.
    router_type = None
    # The keys of `routing_statistics()`.
    routing_statistic_names = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.router_type is not None:
            MOE_LAYERS[cls.router_type] = cls

    def __init__(
        self,
        num_experts,
        hidden_dim,
        shared_expert=False,
        activation="gelu",
        dropout=0.0,
        return_routing=False,
        kernel_initializer=None,
        seed=None,
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        validation.check_int("num_experts", num_experts)
        validation.check_int("lora_rank", lora_rank, allow_none=True)
        validation.check_int("hidden_dim", hidden_dim)
        validation.check_bool("shared_expert", shared_expert)
        validation.check_bool("return_routing", return_routing)
        check_activation(activation)
        validation.check_number(
            "dropout", dropout, minimum=0, maximum=1, max_inclusive=False
        )
        validation.check_int("seed", seed, minimum=0, allow_none=True)
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.shared_expert = shared_expert
        self.activation = activation
        self.dropout = dropout
        self.return_routing = return_routing
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.TruncatedNormal(stddev=0.02)
        )
        self.seed = seed
        self.router = None
        self._router_spec = None
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
        self._dispatch_path = None
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_enabled = False

    # === Router (layers that route with a router layer) ===
    def _init_router(self, router, router_dim, noise_std, noise=True):
        """Creates `self.router` from a name or takes a router layer.

        `noise_std` is the std of the Gaussian noise added to the logits in
        training when `noise` is on: None means 1 / E (vmoe's default), 0
        none.
        """
        if isinstance(router, str):
            validation.check_choice("router", router, tuple(ROUTERS))
        elif not isinstance(router, keras.layers.Layer):
            raise ValueError(
                f"`router` must be one of {tuple(ROUTERS)} or a router "
                f"layer. Received: router={router!r}"
            )
        validation.check_number("noise_std", noise_std, minimum=0, allow_none=True)
        self.router_dim = router_dim
        self.noise_std = noise_std
        self._router_noise = noise
        self._router_spec = router
        self.router = (
            get_router(router, self.num_experts, router_dim)
            if isinstance(router, str)
            else router
        )
        self.seed_generator = keras.random.SeedGenerator(self.seed)

    @property
    def router_name(self):
        """The router's name ("linear", "cosine", "l2"), or its class name
        for a router layer passed in."""
        spec = self._router_spec
        return spec if isinstance(spec, str) else type(spec).__name__

    @property
    def router_variables(self):
        """The weights that route: the router layer's (top-k and Expert
        Choice), Soft MoE's `phi` and `scale`. `freeze_routers` and the
        backbones' `enable_lora` freeze these."""
        if self.router is None:
            return []
        return list(self.router.weights)

    @property
    def _noise_std(self):
        return 1.0 / self.num_experts if self.noise_std is None else self.noise_std

    def _router_logits(self, router_input, training):
        """Float32 logits [N, E] and the (noisy in training) routing logits."""
        logits = self.router(router_input)
        if not (training and self._router_noise and self._noise_std > 0):
            return logits, logits
        noise = keras.random.normal(
            ops.shape(logits), dtype="float32", seed=self.seed_generator
        )
        return logits, logits + self._noise_std * noise

    # === Build ===
    def _check_input_shape(self, input_shape):
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
        built_width = getattr(self, "input_dim", None)
        if built_width is not None and input_shape[-1] != built_width:
            raise ValueError(
                f"`inputs` width must match the layer's width {built_width}. "
                f"Received: inputs.shape={input_shape}"
            )
        self._check_inputs(input_shape)

    def _check_inputs(self, input_shape):
        """Checks of a subclass on the input shape (a tuple)."""

    def build(self, input_shape):
        self._check_input_shape(input_shape)
        self.input_dim = input_shape[-1]
        if self.router is not None and not self.router.built:
            # (A router layer deserialized from a config comes built.)
            self.router.build((None, self.input_dim))
        self._build_routing_weights()
        self._add_expert_weights()
        if self.shared_ffn is not None:
            self.shared_ffn.build(input_shape)
        self._build_state()
        self._add_quantized_expert_weights()
        if self.lora_rank and not self.lora_enabled:
            self.built = True  # as `Dense.build` before its `enable_lora`
            self.enable_lora(self.lora_rank, self.lora_alpha)

    def _build_routing_weights(self):
        """Routing weights of the layer itself, added before the experts."""

    def _build_state(self):
        """Non-trainable state, added after the experts' float weights."""

    # === Forward ===
    def call(self, inputs, training=None):
        self._check_input_shape(inputs.shape)
        if inputs.shape[0] == 0:
            return self._empty_call(inputs)
        outputs, state = self._forward(inputs, training)
        if self.shared_ffn is not None:
            outputs = outputs + self.shared_ffn(inputs, training=training)
        if not (self.return_routing or self._routing_observers):
            return outputs
        info = self._routing_info(state, ops.shape(inputs))
        for observer in self._routing_observers:
            observer(self, info)
        return (outputs, info) if self.return_routing else outputs

    def _forward(self, inputs, training):
        """Routed outputs shaped like `inputs`, and the routing state that
        `_routing_info` turns into the `return_routing` dict."""
        raise NotImplementedError

    def _routing_info(self, state, input_shape):
        raise NotImplementedError

    def _dispatch(self, dispatcher, items, plan, training):
        """Runs `dispatcher` (a `keras_vmoe.layers.dispatch.Dispatcher`)
        on this layer's experts and records its name (`dispatch_path`)."""
        self._dispatch_path = dispatcher.name
        return dispatcher(
            items, plan, self, training, dispatch_constraint(self)
        )

    @property
    def dispatch_path(self):
        """The name of the dispatcher the last call ran ("slots",
        "sorted", "grouped", "gather", "expert_choice", "soft", ...), or
        None before the first call. With `dispatch="auto"` this is the
        path chosen for that call's backend, device, dtype and shapes."""
        return self._dispatch_path

    def _routing_specs(self, input_shape):
        """`{name: (shape, dtype)}` of the `return_routing` dict."""
        raise NotImplementedError

    def routing_statistics(self):
        """Scalar routing health of the last forward pass, `{name: value}`.

        These are the per-layer values `fit` logs as `<layer>_<name>` (see
        `keras_vmoe.models.routing_metrics`). Read them in the same trace
        as the forward pass (as `compute_loss` does) or eagerly after a
        direct call.
        """
        raise NotImplementedError

    def expert_rows(self, input_shape):
        """Token rows the routed experts process in one call on a static
        `input_shape` (each costs one expert MLP); for cost accounting."""
        raise NotImplementedError

    def routing_macs(self, input_shape):
        """Multiply-accumulates of the routing itself outside a router
        sublayer (Soft MoE's slot mixing), for one call; 0 by default."""
        return 0

    def _empty_call(self, inputs):
        """A batch of zero samples: an empty output, like `Dense`."""
        outputs = ops.zeros_like(inputs)
        if not self.return_routing:
            return outputs
        specs = self._routing_specs(tuple(inputs.shape))
        info = {
            name: ops.zeros(shape, dtype)
            for name, (shape, dtype) in specs.items()
        }
        return outputs, info

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

    # === Shapes and config ===
    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if not self.return_routing:
            return input_shape
        specs = self._routing_specs(input_shape)
        return input_shape, {name: shape for name, (shape, _) in specs.items()}

    def compute_output_spec(self, inputs, training=None):
        outputs = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        if not self.return_routing:
            return outputs
        return outputs, {
            name: keras.KerasTensor(shape, dtype=dtype)
            for name, (shape, dtype) in self._routing_specs(
                tuple(inputs.shape)
            ).items()
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
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
        if self.lora_rank:
            config["lora_rank"] = self.lora_rank
            config["lora_alpha"] = self.lora_alpha
        if self.router is not None:
            router = self._router_spec
            config["router"] = (
                router
                if isinstance(router, str)
                else keras.saving.serialize_keras_object(router)
            )
            config["router_dim"] = self.router_dim
            config["noise_std"] = self.noise_std
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("router"), dict):
            config["router"] = keras.saving.deserialize_keras_object(
                config["router"]
            )
        return cls(**config)
