"""The ConvNeXt block, dense or with a Mixture-of-Experts MLP.

Axis letters (see docs/glossary.md): B batch · H, W feature-map height
and width · d block width · E experts.
"""

import keras
from keras import ops

from keras_vmoe.layers import FeedForward
from keras_vmoe.layers.moe_types import build_moe_layer


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ConvNeXtBlock(keras.layers.Layer):
    """ConvNeXt block; its pointwise MLP is dense or a token-routed MoE.

    Dense block (Liu et al., 2022, Fig. 4):
    `y = x + drop_path(gamma * MLP(LN(DWConv7x7(x))))`.

    MoE block (Sweet-spot, Videau et al., 2024, §3.2 and Fig. 1b-right):
    the MLP becomes a `MoEFeedForward` in which every spatial position is a
    token, and a skip connection is added around it:
    `u = LN(DWConv7x7(x))`, `y = x + drop_path(gamma * (MoE(u) + s * u))`.

    Our reading of the added skip (the green link of Fig. 1b): it bypasses
    the MoE only, from the MoE's input to its output, inside the block's
    own residual branch. Tokens the router drops (over capacity) then keep
    the depthwise-conv features `u` rather than losing the whole branch.
    `s` is a per-channel scale initialised to 1, so a model trained from
    scratch starts exactly as the paper's identity skip; it is a learned
    weight (d parameters per MoE block) so that sparse upcycling can set
    it to 0 and reproduce the dense block exactly (see
    `keras_vmoe.converters.convnext.upcycle_convnext`).

    A dense block may keep the skip as well (`dense_skip_connection`):
    `y = x + drop_path(gamma * (MLP(u) + s * u))`. Model surgery
    (`keras_vmoe.analysis.prune_moe_layers` / `merge_experts`) folds an MoE
    block into such a block, with the experts' width (`mlp_dim`).

    Args:
        hidden_dim: d, the block's width (input and output channels).
        mlp_ratio: width of the MLP hidden layer, or of every expert's, as a
            multiple of `hidden_dim`.
        mlp_dim: the MLP's (or every expert's) hidden width as a number of
            units; overrides `mlp_ratio` when set.
        moe_config: None for a dense block, or a dict of
            `keras_vmoe.layers.MoEFeedForward` arguments (`num_experts`,
            `top_k`, `router`, ...; `hidden_dim` is set from `mlp_ratio`),
            or, with `"router_type": "soft"` / `"expert_choice"`, of
            `SoftMoEFeedForward` / `ExpertChoiceFeedForward` arguments
            (see `keras_vmoe.layers.moe_types.build_moe_layer`).
        moe_skip_connection: add the Sweet-spot skip connection around the
            MoE (MoE blocks only).
        dense_skip_connection: add the same skip around a dense MLP (dense
            blocks only; a folded MoE block keeps its skip this way).
        layer_scale_init_value: initial LayerScale value `gamma`, or None
            for no LayerScale (the isotropic ConvNeXt).
        drop_path_rate: stochastic-depth rate of the residual branch.
        layer_norm_epsilon: epsilon of the LayerNorm.
        kernel_size: size of the depthwise convolution.
        seed: seed of the stochastic-depth draws.

    Example:
    >>> block = ConvNeXtBlock(hidden_dim=32, moe_config={"num_experts": 4})
    >>> block(np.ones((2, 8, 8, 32))).shape
    (2, 8, 8, 32)
    """

    def __init__(
        self,
        hidden_dim,
        mlp_ratio=4.0,
        moe_config=None,
        moe_skip_connection=True,
        layer_scale_init_value=1e-6,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        kernel_size=7,
        seed=None,
        mlp_dim=None,
        dense_skip_connection=False,
        **kwargs,
    ):
        if not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(
                "`hidden_dim` must be a positive integer. Received: "
                f"hidden_dim={hidden_dim!r}"
            )
        if not mlp_ratio > 0 or int(hidden_dim * mlp_ratio) < 1:
            raise ValueError(
                "`mlp_ratio` must be > 0 and give a hidden width >= 1. "
                f"Received: mlp_ratio={mlp_ratio!r}, hidden_dim={hidden_dim}"
            )
        if mlp_dim is not None and (
            not isinstance(mlp_dim, int)
            or isinstance(mlp_dim, bool)
            or mlp_dim < 1
        ):
            raise ValueError(
                "`mlp_dim` must be None or a positive integer. Received: "
                f"mlp_dim={mlp_dim!r}"
            )
        if dense_skip_connection and moe_config is not None:
            raise ValueError(
                "`dense_skip_connection` applies to dense blocks only (an "
                "MoE block's skip is `moe_skip_connection`). Received: "
                "dense_skip_connection=True with a `moe_config`"
            )
        if moe_config is not None and not isinstance(moe_config, dict):
            raise ValueError(
                "`moe_config` must be None or a dict of MoEFeedForward "
                f"arguments. Received: moe_config={moe_config!r}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(
                "`drop_path_rate` must be in [0, 1). Received: "
                f"drop_path_rate={drop_path_rate!r}"
            )
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.mlp_ratio = mlp_ratio
        self.moe_config = moe_config
        self.moe_skip_connection = moe_skip_connection
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_size = kernel_size
        self.seed = seed
        self.mlp_dim = mlp_dim
        self.dense_skip_connection = bool(dense_skip_connection)

        # === Layers ===
        self.depthwise_conv = keras.layers.DepthwiseConv2D(
            kernel_size,
            padding="same",
            # Independent of keras.config.image_data_format(): the block's
            # LayerNorm and MLP act on the last axis.
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="depthwise_conv",
        )
        self.norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name="norm"
        )
        mlp_hidden_dim = (
            mlp_dim if mlp_dim is not None else int(hidden_dim * mlp_ratio)
        )
        if moe_config is None:
            self.mlp = FeedForward(
                mlp_hidden_dim, dtype=self.dtype_policy, name="mlp"
            )
        else:
            self.mlp = build_moe_layer(
                moe_config,
                hidden_dim=mlp_hidden_dim,
                dtype=self.dtype_policy,
                name="moe",
            )
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def is_moe(self):
        return self.moe_config is not None

    def build(self, input_shape):
        if input_shape[-1] != self.hidden_dim:
            raise ValueError(
                f"`inputs` must have {self.hidden_dim} channels "
                f"(`hidden_dim`). Received: inputs.shape={tuple(input_shape)}"
            )
        self.depthwise_conv.build(input_shape)
        self.norm.build(input_shape)
        self.mlp.build(input_shape)
        self.skip_scale = None
        if (self.is_moe and self.moe_skip_connection) or (
            self.dense_skip_connection
        ):
            self.skip_scale = self.add_weight(
                name="skip_scale", shape=(self.hidden_dim,), initializer="ones"
            )
        self.layer_scale = None
        if self.layer_scale_init_value is not None:
            self.layer_scale = self.add_weight(
                name="layer_scale",
                shape=(self.hidden_dim,),
                initializer=keras.initializers.Constant(
                    self.layer_scale_init_value
                ),
            )

    def _drop_path(self, x, training):
        """Stochastic depth: drops the whole branch of random samples."""
        if not training or not self.drop_path_rate:
            return x
        keep = 1.0 - self.drop_path_rate
        mask_shape = (ops.shape(x)[0], 1, 1, 1)
        mask = keras.random.uniform(
            mask_shape, dtype=x.dtype, seed=self.seed_generator
        )
        return x * ops.cast(mask < keep, x.dtype) / keep

    def call(self, inputs, training=None):
        tokens = self.norm(self.depthwise_conv(inputs))  # [B, H, W, d]
        branch = self.mlp(tokens, training=training)
        if self.skip_scale is not None:
            branch = branch + tokens * ops.cast(self.skip_scale, tokens.dtype)
        if self.layer_scale is not None:
            branch = branch * ops.cast(self.layer_scale, branch.dtype)
        return inputs + self._drop_path(branch, training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "mlp_ratio": self.mlp_ratio,
                "moe_config": self.moe_config,
                "moe_skip_connection": self.moe_skip_connection,
                "layer_scale_init_value": self.layer_scale_init_value,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_size": self.kernel_size,
                "seed": self.seed,
                "mlp_dim": self.mlp_dim,
                "dense_skip_connection": self.dense_skip_connection,
            }
        )
        return config
