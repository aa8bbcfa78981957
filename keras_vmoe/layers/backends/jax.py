"""The JAX adapter: always XLA; custom-VJP tile loops and row maps.

- `in_xla_context` is always True (JAX compiles every step).
- The tile matmul and the fused tile MLP are `jax.lax.fori_loop`s over
  the live tiles with hand-written VJPs (`jax.custom_vjp`).
- The row maps `gather_rows` and `sum_rows` are each other's VJP.
"""

import functools
import re

import jax
import jax.numpy as jnp
import keras
import numpy as np

from keras_vmoe.layers.backends import BackendAdapter
from keras_vmoe.layers.backends import _gather_rows
from keras_vmoe.layers.backends import _sum_rows


class JaxAdapter(BackendAdapter):
    def is_symbolic_dim(self, value):
        return jax.export.is_symbolic_dim(value)

    def in_xla_context(self):
        return True

    def tile_matmul(self, tiles, kernels, biases, tile_expert, live):
        return _tile_matmul()(
            *(
                keras.ops.convert_to_tensor(v)
                for v in (tiles, kernels, biases, tile_expert, live)
            )
        )

    def tiles_fuse_mlp(self):
        return True

    def tile_mlp(
        self,
        tiles,
        kernel_1,
        bias_1,
        kernel_2,
        bias_2,
        tile_expert,
        live,
        activation,
    ):
        weights = (kernel_1, bias_1, kernel_2, bias_2)
        args = (tiles, *weights, tile_expert, live)
        args = tuple(keras.ops.convert_to_tensor(v) for v in args)
        return _tile_mlp(activation)(*args)

    def gather_rows(self, x, index, valid, inverse):
        return _row_maps()[0](*_arguments(x, index, valid, inverse))

    def sum_rows(self, y, inverse, index, valid):
        return _row_maps()[1](*_arguments(y, index, valid, inverse))

    def accelerator(self):
        platform = jax.default_backend()
        return platform if platform in ("cpu", "tpu") else "gpu"

    def supports_grouped_matmul(self):
        return True

    def grouped_matmul_is_fast(
        self, dtype, num_rows, width_in, width_out, num_experts
    ):
        dtype = keras.backend.standardize_dtype(dtype)
        if self.accelerator() != "gpu" or dtype not in ("bfloat16", "float16"):
            return False
        return _ragged_dots_are_grouped(
            dtype, int(num_rows), int(width_in), int(width_out), int(num_experts)
        )

    def grouped_matmul(self, rows, kernels, group_sizes):
        # XLA's ragged dot: a grouped GEMM where the GPU library has one,
        # else a dense form; rows past the groups come out zero.
        rows, kernels, group_sizes = (
            keras.ops.convert_to_tensor(v) for v in (rows, kernels, group_sizes)
        )
        return jax.lax.ragged_dot(rows, kernels, group_sizes.astype("int32"))

    def stable_argsort(self, x, axis=-1):
        return jnp.argsort(jnp.asarray(x), axis=axis, stable=True).astype(
            jnp.int32
        )


@functools.cache
def _ragged_dots_are_grouped(dtype, num_rows, width_in, width_out, num_experts):
    """Whether XLA keeps the three ragged dots of a grouped matmul's
    forward pass and VJP (output, row and kernel gradients) as grouped
    kernels for these shapes, rather than rewriting them to dense dots
    over all E groups."""
    shapes = (
        jax.ShapeDtypeStruct((num_rows, width_in), dtype),
        jax.ShapeDtypeStruct((num_experts, width_in, width_out), dtype),
        jax.ShapeDtypeStruct((num_experts,), jnp.int32),
        jax.ShapeDtypeStruct((num_rows, width_out), dtype),
    )

    def forward_and_vjp(rows, kernels, group_sizes, grads):
        outputs, vjp = jax.vjp(
            lambda x, w: jax.lax.ragged_dot(x, w, group_sizes), rows, kernels
        )
        return outputs, vjp(grads)

    compiled = jax.jit(forward_and_vjp).lower(*shapes).compile()
    return count_ragged_dots(compiled.as_text()) >= 3


def count_ragged_dots(hlo_text):
    """The `ragged-dot` instructions of an HLO module's text (XLA's dense
    rewrite of a ragged dot leaves none)."""
    return len(re.findall(r"\sragged-dot\(", hlo_text))


def _activation_and_derivative(x, activation):
    """`(act(x), act'(x))` for the GELU forms of `feed_forward`."""
    from keras_vmoe.layers.feed_forward import apply_activation

    ops = keras.ops
    if activation == "gelu_tanh":
        c = np.sqrt(2.0 / np.pi)
        t = ops.tanh(c * (x + 0.044715 * x * x * x))
        derivative = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (
            1.0 + 3.0 * 0.044715 * x * x
        )
    else:
        cdf = 0.5 * (1.0 + ops.erf(x * np.sqrt(0.5)))
        derivative = cdf + x * ops.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)
    return apply_activation(x, activation), ops.cast(derivative, x.dtype)


def _arguments(rows, index, valid, inverse):
    ops = keras.ops
    if valid is None:
        valid = ops.ones(ops.shape(index), "bool")
    return tuple(
        ops.convert_to_tensor(v) for v in (rows, index, valid, inverse)
    )


@functools.cache
def _row_maps():
    """`gather_rows` and `sum_rows` on JAX, each the other's VJP."""

    @jax.custom_vjp
    def gather(x, index, valid, inverse):
        return _gather_rows(x, index, valid)

    def gather_fwd(x, index, valid, inverse):
        return _gather_rows(x, index, valid), inverse

    def gather_bwd(inverse, grads):
        # Output rows that are not valid are in no `inverse`: never read.
        return _sum_rows(grads, inverse), None, None, None

    @jax.custom_vjp
    def total(y, index, valid, inverse):
        return _sum_rows(y, inverse)

    def total_fwd(y, index, valid, inverse):
        return _sum_rows(y, inverse), (index, valid)

    def total_bwd(residuals, grads):
        index, valid = residuals
        return _gather_rows(grads, index, valid), None, None, None

    gather.defvjp(gather_fwd, gather_bwd)
    total.defvjp(total_fwd, total_bwd)
    return gather, total


@functools.cache
def _tile_matmul():
    """The JAX tile matmul with its custom VJP (built once, lazily)."""

    @jax.custom_vjp
    def tile_matmul(tiles, kernels, biases, tile_expert, live):
        return _tile_matmul_forward(tiles, kernels, biases, tile_expert, live)

    def tile_matmul_fwd(tiles, kernels, biases, tile_expert, live):
        outputs = _tile_matmul_forward(
            tiles, kernels, biases, tile_expert, live
        )
        return outputs, (tiles, kernels, biases, tile_expert, live)

    tile_matmul.defvjp(tile_matmul_fwd, _tile_matmul_backward)
    return tile_matmul


def _tile_matmul_forward(tiles, kernels, biases, tile_expert, live):
    """[L, t, c]: each live tile through its expert; dead tiles stay 0."""
    # The VJP rule may see the caller's NumPy primals.
    tiles, kernels, biases, tile_expert, live = (
        jnp.asarray(v) for v in (tiles, kernels, biases, tile_expert, live)
    )
    dtype = jnp.result_type(tiles.dtype, kernels.dtype)
    num_tiles, tile = tiles.shape[0], tiles.shape[1]
    width = kernels.shape[-1]

    def body(i, outputs):
        e = tile_expert[i]
        y = jnp.matmul(tiles[i], kernels[e]) + biases[e]
        return outputs.at[i].set(y.astype(dtype))

    init = jnp.zeros((num_tiles, tile, width), dtype)
    # `live` is a prefix: loop over the live tiles only.
    return jax.lax.fori_loop(0, _num_live(live), body, init)


def _tile_matmul_backward(residuals, grads):
    """The tile matmul's VJP rule: gradients for tiles, kernels, biases."""
    tiles, kernels, biases, tile_expert, live = (
        jnp.asarray(v) for v in residuals
    )

    def body(i, carry):
        d_tiles, d_kernels, d_biases = carry
        e = tile_expert[i]
        g = grads[i]
        d_tiles = d_tiles.at[i].set(
            jnp.matmul(g, kernels[e].T).astype(d_tiles.dtype)
        )
        d_kernels = d_kernels.at[e].add(
            jnp.matmul(tiles[i].T, g).astype(d_kernels.dtype)
        )
        d_biases = d_biases.at[e].add(
            jnp.sum(g, axis=0).astype(d_biases.dtype)
        )
        return d_tiles, d_kernels, d_biases

    init = (
        jnp.zeros_like(tiles),
        jnp.zeros_like(kernels),
        jnp.zeros_like(biases),
    )
    d_tiles, d_kernels, d_biases = jax.lax.fori_loop(
        0, _num_live(live), body, init
    )
    return d_tiles, d_kernels, d_biases, None, None


@functools.cache
def _tile_mlp(activation):
    """The JAX tile MLP with its custom VJP, one per activation."""

    @jax.custom_vjp
    def tile_mlp(tiles, k1, b1, k2, b2, tile_expert, live):
        return _tile_mlp_forward(
            activation, tiles, k1, b1, k2, b2, tile_expert, live, False
        )[0]

    def tile_mlp_fwd(tiles, k1, b1, k2, b2, tile_expert, live):
        outputs, pre = _tile_mlp_forward(
            activation, tiles, k1, b1, k2, b2, tile_expert, live, True
        )
        return outputs, (tiles, k1, b1, k2, b2, tile_expert, live, pre)

    def tile_mlp_bwd(residuals, grads):
        return _tile_mlp_backward(activation, residuals, grads)

    tile_mlp.defvjp(tile_mlp_fwd, tile_mlp_bwd)
    return tile_mlp


def _tile_mlp_forward(
    activation, tiles, k1, b1, k2, b2, tile_expert, live, save
):
    """`(outputs, pre_activations)` of the live tiles' expert MLPs.

    `pre_activations` is [L, t, h] when `save` (for the VJP rule), else an
    empty placeholder.
    """
    from keras_vmoe.layers.feed_forward import apply_activation

    tiles, k1, b1, k2, b2, tile_expert, live = (
        jnp.asarray(v) for v in (tiles, k1, b1, k2, b2, tile_expert, live)
    )
    dtype = jnp.result_type(tiles.dtype, k1.dtype, k2.dtype)
    num_tiles, tile = tiles.shape[0], tiles.shape[1]

    def body(i, carry):
        outputs, pre_activations = carry
        e = tile_expert[i]
        pre = (jnp.matmul(tiles[i], k1[e]) + b1[e]).astype(dtype)
        y = jnp.matmul(apply_activation(pre, activation), k2[e]) + b2[e]
        outputs = outputs.at[i].set(y.astype(dtype))
        if save:
            pre_activations = pre_activations.at[i].set(pre)
        return outputs, pre_activations

    init = (
        jnp.zeros((num_tiles, tile, k2.shape[-1]), dtype),
        jnp.zeros((num_tiles, tile, k1.shape[-1]) if save else (), dtype),
    )
    return jax.lax.fori_loop(0, _num_live(live), body, init)


def _tile_mlp_backward(activation, residuals, grads):
    """The tile MLP's VJP rule: gradients for tiles and the four weights."""
    tiles, k1, b1, k2, b2, tile_expert, live, pre_activations = (
        jnp.asarray(v) for v in residuals
    )
    dtype = pre_activations.dtype

    def body(i, carry):
        d_tiles, d_k1, d_b1, d_k2, d_b2 = carry
        e = tile_expert[i]
        g = grads[i].astype(dtype)
        act, derivative = _activation_and_derivative(
            pre_activations[i], activation
        )
        d_k2 = d_k2.at[e].add(jnp.matmul(act.T, g).astype(d_k2.dtype))
        d_b2 = d_b2.at[e].add(jnp.sum(g, axis=0).astype(d_b2.dtype))
        d_pre = (jnp.matmul(g, k2[e].T) * derivative).astype(dtype)
        d_k1 = d_k1.at[e].add(jnp.matmul(tiles[i].T, d_pre).astype(d_k1.dtype))
        d_b1 = d_b1.at[e].add(jnp.sum(d_pre, axis=0).astype(d_b1.dtype))
        d_tiles = d_tiles.at[i].set(
            jnp.matmul(d_pre, k1[e].T).astype(d_tiles.dtype)
        )
        return d_tiles, d_k1, d_b1, d_k2, d_b2

    init = tuple(jnp.zeros_like(v) for v in (tiles, k1, b1, k2, b2))
    grads_out = jax.lax.fori_loop(0, _num_live(live), body, init)
    return (*grads_out, None, None)


def _num_live(live):
    return jnp.sum(live.astype(jnp.int32))
