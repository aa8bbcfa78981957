"""Building blocks of the DINOv2-style ViT: embeddings, attention, blocks.

Axis letters (see docs/glossary.md): B batch · T tokens per image · d
model width · H, W patch grid (rows, columns). `num_register_tokens`
counts the register tokens.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_vmoe.layers.feed_forward import FeedForward
from keras_vmoe.layers.lora import LoRADense
from keras_vmoe.layers.moe_types import build_moe_layer
from keras_vmoe.layers.quantization import sublayer_dtype


def _cubic(x, a=-0.5):
    """Keys' cubic convolution kernel (a = -0.5, as PIL's bicubic filter)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_resize_matrix(input_size, output_size):
    """[output_size, input_size] matrix of antialiased bicubic resampling.

    It reproduces `torch.nn.functional.interpolate(mode="bicubic",
    antialias=True, align_corners=False)` along one axis, which timm uses to
    resample ViT position embeddings: output pixel `i` has its centre at
    `scale * (i + 0.5)` in input coordinates (`scale = in / out`); the cubic
    kernel is stretched by `scale` when shrinking (antialiasing) and each
    row's weights are renormalised to sum to one at the borders.

    `keras.ops.image.resize` is not used because its bicubic kernel differs
    between backends and from PyTorch's, which breaks checkpoint parity.

    Args:
        input_size: number of input positions along the axis.
        output_size: number of output positions.

    Returns:
        float64 numpy array; the identity when the sizes are equal.
    """
    scale = input_size / output_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    matrix = np.zeros((output_size, input_size))
    for i in range(output_size):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), input_size)
        positions = np.arange(start, stop)
        weights = _cubic((positions - center + 0.5) / stretch)
        matrix[i, start:stop] = weights / weights.sum()
    return matrix


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ViTEmbedding(keras.layers.Layer):
    """Patch embedding, CLS and register tokens, learned position embedding.

    Images [B, H*p, W*p, channels] become tokens
    [B, 1 + num_register_tokens + H*W, d] ordered
    `[CLS, registers, patches]`. The learned position embedding covers the
    patch grid it was trained at (`position_embedding_grid`); for another
    grid it is resampled with antialiased bicubic interpolation (as timm's
    `resample_abs_pos_embed`), computed from static shapes as two small
    matrix products. Prefix tokens carry no position embedding: a checkpoint
    whose CLS/register tokens have one is converted by folding it into the
    token (exact, since both are constants).

    Args:
        hidden_dim: d, the token width.
        patch_size: p, side of the square patches.
        position_embedding_grid: (rows, columns) of the stored position
            embedding.
        num_register_tokens: extra learned tokens after CLS (Darcet et
            al., 2024, "Vision Transformers Need Registers").
    """

    def __init__(
        self,
        hidden_dim,
        patch_size,
        position_embedding_grid,
        num_register_tokens=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.patch_size = patch_size
        self.position_embedding_grid = tuple(position_embedding_grid)
        self.num_register_tokens = num_register_tokens

        # === Layers ===
        self.patch_projection = keras.layers.Conv2D(
            hidden_dim,
            kernel_size=patch_size,
            strides=patch_size,
            padding="valid",
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="patch_projection",
        )

    def build(self, input_shape):
        self.patch_projection.build(input_shape)
        initializer = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight(
            name="cls_token",
            shape=(1, 1, self.hidden_dim),
            initializer=initializer,
        )
        self.register_tokens = (
            self.add_weight(
                name="register_tokens",
                shape=(1, self.num_register_tokens, self.hidden_dim),
                initializer=initializer,
            )
            if self.num_register_tokens
            else None
        )
        rows, columns = self.position_embedding_grid
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(rows, columns, self.hidden_dim),
            initializer=initializer,
        )

    def _grid_position_embedding(self, rows, columns):
        """The position embedding resampled to a [rows, columns] grid."""
        embedding = self.position_embedding
        source_rows, source_columns = self.position_embedding_grid
        if (rows, columns) != (source_rows, source_columns):
            embedding = ops.cast(embedding, "float32")
            row_matrix = bicubic_resize_matrix(source_rows, rows)
            column_matrix = bicubic_resize_matrix(source_columns, columns)
            embedding = ops.einsum(
                "ri,ijd->rjd", row_matrix.astype("float32"), embedding
            )
            embedding = ops.einsum(
                "cj,rjd->rcd", column_matrix.astype("float32"), embedding
            )
        return ops.cast(
            ops.reshape(embedding, (1, rows * columns, self.hidden_dim)),
            self.compute_dtype,
        )

    def call(self, images):
        patches = self.patch_projection(images)  # [B, H, W, d]
        rows, columns = patches.shape[1], patches.shape[2]
        batch = ops.shape(patches)[0]
        patches = ops.reshape(patches, (batch, rows * columns, self.hidden_dim))
        patches = patches + self._grid_position_embedding(rows, columns)
        prefix = [self.cls_token]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens)
        prefix = ops.cast(ops.concatenate(prefix, axis=1), patches.dtype)
        prefix = ops.broadcast_to(
            prefix, (batch, 1 + self.num_register_tokens, self.hidden_dim)
        )
        return ops.concatenate([prefix, patches], axis=1)

    def compute_output_shape(self, input_shape):
        rows = input_shape[1] // self.patch_size
        columns = input_shape[2] // self.patch_size
        num_tokens = 1 + self.num_register_tokens + rows * columns
        return (input_shape[0], num_tokens, self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "patch_size": self.patch_size,
                "position_embedding_grid": self.position_embedding_grid,
                "num_register_tokens": self.num_register_tokens,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ViTAttention(keras.layers.Layer):
    """Multi-head self-attention with one fused `qkv` projection (timm).

    Args:
        num_heads: number of attention heads; must divide the width.
        use_bias: bias on `qkv` (the output `proj` always has one).
    """

    def __init__(self, num_heads, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.use_bias = use_bias

    def build(self, input_shape):
        width = input_shape[-1]
        initializer = keras.initializers.TruncatedNormal(stddev=0.02)
        self.qkv = LoRADense(
            3 * width,
            use_bias=self.use_bias,
            kernel_initializer=initializer,
            dtype=sublayer_dtype(self),
            name="qkv",
        )
        self.qkv.build(input_shape)
        self.proj = LoRADense(
            width,
            kernel_initializer=initializer,
            dtype=sublayer_dtype(self),
            name="proj",
        )
        self.proj.build(input_shape)

    def call(self, inputs):
        batch, num_tokens = ops.shape(inputs)[0], ops.shape(inputs)[1]
        width = inputs.shape[-1]
        head_dim = width // self.num_heads
        qkv = ops.reshape(
            self.qkv(inputs), (batch, num_tokens, 3, self.num_heads, head_dim)
        )
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attended = ops.dot_product_attention(
            query, key, value, scale=1.0 / math.sqrt(head_dim)
        )  # [B, T, heads, head_dim]
        return self.proj(ops.reshape(attended, (batch, num_tokens, width)))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "use_bias": self.use_bias})
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class LayerScale(keras.layers.Layer):
    """Per-channel learned scale `gamma * x` (Touvron et al., 2021, CaiT).

    Args:
        init_value: initial value of every entry of `gamma`.
    """

    def __init__(self, init_value, **kwargs):
        super().__init__(**kwargs)
        self.init_value = init_value

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value),
        )

    def call(self, inputs):
        return inputs * ops.cast(self.gamma, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"init_value": self.init_value})
        return config


@keras.saving.register_keras_serializable(package="keras_vmoe")
class ViTBlock(keras.layers.Layer):
    """Pre-norm transformer block whose MLP is dense or Mixture-of-Experts.

    `x = x + drop_path(ls1(attention(norm1(x))))`
    `x = x + drop_path(ls2(mlp(norm2(x))))`

    Sublayers are attributes with fixed names (`norm1`, `attention`, `ls1`,
    `norm2`, `mlp`, `ls2`) so converters address them by name. `mlp` is a
    `FeedForward`, or the MoE layer `moe_config` describes (see
    `keras_vmoe.layers.moe_types`); its layer name is `<block name>_mlp`.

    Args:
        num_heads: attention heads.
        mlp_dim: hidden width of the MLP (and of every expert).
        layer_scale_init_value: initial LayerScale value, or None for no
            LayerScale.
        drop_path_rate: stochastic depth rate of this block's branches.
        layer_norm_epsilon: epsilon of both LayerNorms.
        activation: "gelu" (exact) or "gelu_tanh", of the MLP or experts.
        moe_config: None for a dense MLP, else the keyword arguments of
            the MoE layer other than `hidden_dim`, plus an optional
            `"router_type"` ("top_k", the default: `MoEFeedForward`;
            "soft"; "expert_choice").
    """

    def __init__(
        self,
        num_heads,
        mlp_dim,
        layer_scale_init_value=None,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        moe_config=None,
        activation="gelu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.activation = activation
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layer_scale_init_value = layer_scale_init_value
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        self.moe_config = dict(moe_config) if moe_config is not None else None

        # === Layers ===
        dtype = self.dtype_policy
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="norm1"
        )
        self.attention = ViTAttention(num_heads, dtype=dtype, name="attention")
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="norm2"
        )
        # The block's name in the MLP's keeps MoE layer names unique in a
        # model (routing metrics and analyses are keyed by them).
        mlp_name = f"{self.name}_mlp"
        if moe_config is None:
            self.mlp = FeedForward(
                mlp_dim, activation=activation, dtype=dtype, name=mlp_name
            )
        else:
            self.mlp = build_moe_layer(
                dict(moe_config, activation=activation),
                hidden_dim=mlp_dim,
                dtype=dtype,
                name=mlp_name,
            )
        self.ls1, self.ls2 = (
            (
                LayerScale(layer_scale_init_value, dtype=dtype, name="ls1"),
                LayerScale(layer_scale_init_value, dtype=dtype, name="ls2"),
            )
            if layer_scale_init_value is not None
            else (None, None)
        )
        # Stochastic depth: drop a residual branch for whole samples.
        self.drop_path = keras.layers.Dropout(
            drop_path_rate,
            noise_shape=(None, 1, 1),
            dtype=dtype,
            name="drop_path",
        )

    @property
    def is_moe(self):
        return self.moe_config is not None

    def build(self, input_shape):
        for layer in (self.norm1, self.attention, self.norm2, self.mlp):
            layer.build(input_shape)
        for layer in (self.ls1, self.ls2):
            if layer is not None:
                layer.build(input_shape)

    def _residual(self, x, branch, scale, training):
        if scale is not None:
            branch = scale(branch)
        return x + self.drop_path(branch, training=training)

    def call(self, inputs, training=None):
        x = self._residual(
            inputs, self.attention(self.norm1(inputs)), self.ls1, training
        )
        return self._residual(
            x, self.mlp(self.norm2(x), training=training), self.ls2, training
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "mlp_dim": self.mlp_dim,
                "layer_scale_init_value": self.layer_scale_init_value,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "moe_config": self.moe_config,
                "activation": self.activation,
            }
        )
        return config
