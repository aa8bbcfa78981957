"""Backend adapter for the sorted dispatch: the only backend-specific code.

What `keras.ops` cannot do portably, or XLA on a CPU runs slowly:

- Is the current step compiled with XLA (static shapes only)? JAX always
  is. TensorFlow is when the enclosing `tf.function` has
  `jit_compile=True` (Keras turns it on by default only when a GPU is
  present); this is read from the graph's XLA context. torch never is
  (eager, and `torch.compile` accepts dynamic shapes).
- A matmul per expert segment of rows whose lengths are known only at run
  time (dynamic shapes: TensorFlow without XLA, torch, eager JAX/NumPy).
- Under XLA, a matmul per fixed-size tile of rows with the tile's expert
  kernel read in place, skipping the tiles past the routed rows (JAX and
  TensorFlow: a loop with a hand-written gradient; elsewhere kernels
  gathered per tile), and on JAX the whole expert MLP of a tile in one
  such loop (`tile_mlp`).
- Where XLA on a CPU is slow at an op's autodiff gradient: row gathers
  (whose gradient is a scatter-add) and gate-weighted sums.
"""

import functools

import keras
import numpy as np

from keras_vmoe.layers.feed_forward import apply_activation


def in_xla_context():
    """True when the ops being built will be compiled by XLA."""
    backend = keras.backend.backend()
    if backend == "jax":
        return True
    if backend == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        if tf.executing_eagerly():
            return False
        graph = tf.compat.v1.get_default_graph()
        return bool(control_flow_util.GraphOrParentsInXlaContext(graph))
    return False


def sorted_beats_slots():
    """Whether exact-row dispatch beats the slot path at a capacity factor.

    Measured on a CPU (benchmarks/moe_layer.py, B=8): yes on TensorFlow
    without XLA, and on torch eager (with the fused segment matmul below)
    for every token and image configuration, at capacity 1.25 and 1.0.
    """
    return keras.backend.backend() in ("tensorflow", "torch")


def distributed():
    """Whether a `keras.distribution` (data or model parallel) is set."""
    return keras.distribution.distribution() is not None


def segment_sizes(totals, per_item=1):
    """Matmul rows per expert segment, and the number of routed choices.

    Args:
        totals: [E] int32 kept choices per expert.
        per_item: matmul rows per choice (P).

    Returns:
        `(sizes, num_choices)`: `totals * per_item` and `sum(totals)`, in
        TensorFlow graphs as tensors, elsewhere as a list of E Python ints
        and an int usable as a shape, read from the device once (one host
        sync per layer call, not one per matmul).
    """
    if keras.backend.backend() == "tensorflow":
        return totals * per_item, keras.ops.sum(totals)
    totals = [int(v) for v in keras.ops.convert_to_numpy(totals)]
    return [v * per_item for v in totals], sum(totals)


def segment_matmul(rows, kernels, biases, counts):
    """Expert e's kernel and bias on its own contiguous segment of rows.

    Args:
        rows: [R, a], sorted by expert.
        kernels: [E, a, c].
        biases: [E, c].
        counts: rows per expert, summing to R, from `segment_sizes`
            (an [E] int32 tensor, or a list of E Python ints).

    Returns:
        [R, c]: one matmul per expert, over exactly its rows.
    """
    backend = keras.backend.backend()
    kernels = keras.ops.convert_to_tensor(kernels)
    biases = keras.ops.convert_to_tensor(biases)
    num_experts = kernels.shape[0]
    if backend != "tensorflow" and not isinstance(counts, (list, tuple)):
        counts = [int(v) for v in keras.ops.convert_to_numpy(counts)]
    # Unstacked (not indexed) weights: the gradient of an unstack is one
    # stack, while E indexing ops would each write a full [E, a, c] zero
    # tensor in the backward pass.
    if backend == "tensorflow":
        import tensorflow as tf

        parts = tf.split(rows, counts, axis=0, num=num_experts)
        kernels = tf.unstack(kernels, num=num_experts)
        biases = tf.unstack(biases, num=num_experts)
    elif backend == "torch":
        rows = keras.ops.convert_to_tensor(rows)
        return _torch_segment_matmul().apply(rows, kernels, biases, counts)
    else:
        sizes = np.cumsum(counts)[:-1].tolist()
        parts = keras.ops.split(rows, sizes, axis=0)
        kernels = keras.ops.unstack(kernels, num_experts)
        biases = keras.ops.unstack(biases, num_experts)
    outputs = [
        keras.ops.matmul(part, kernel) + bias
        for part, kernel, bias in zip(parts, kernels, biases)
    ]
    return keras.ops.concatenate(outputs, axis=0)


def tile_matmul(tiles, kernels, biases, tile_expert, live):
    """Each tile of rows through its expert's kernel and bias (XLA layout).

    Args:
        tiles: [T, t, a] rows in T tiles of t rows, sorted by expert.
        kernels: [E, a, c].
        biases: [E, c].
        tile_expert: [T] int32 expert of each tile.
        live: [T] bool, False for the tiles past the last routed row
            (the static bound counts every expert's worst-case padding).

    Returns:
        [T, t, c]; rows of dead tiles are never read back (zeros on JAX
        and TensorFlow, the expert's bias elsewhere).

    On JAX and TensorFlow, a loop over the tiles reads each tile's kernel
    in place and skips dead tiles, with a hand-written backward pass that
    accumulates each tile's kernel gradient into its expert's slice
    (autodiff of the loop would add a full [E, a, c] tensor per tile).
    Elsewhere, one batched matmul with the kernels gathered per tile
    ([T, a, c]).
    """
    ops = keras.ops
    backend = keras.backend.backend()
    if backend in ("jax", "tensorflow"):
        loop = _jax_tile_matmul() if backend == "jax" else _tf_tile_matmul
        return loop(
            *(
                ops.convert_to_tensor(v)
                for v in (tiles, kernels, biases, tile_expert, live)
            )
        )
    outputs = ops.matmul(tiles, ops.take(kernels, tile_expert, axis=0))
    # Dead tiles hold zero rows and are never read back: no mask needed.
    return outputs + ops.take(biases, tile_expert, axis=0)[:, None, :]


def tiles_fuse_mlp():
    """Whether `tile_mlp` runs the whole expert MLP in one tile loop.

    True on JAX. TensorFlow's XLA ran the same fused loop (TensorArray or
    scatter buffers) slower than its two matmul loops (forward 126 -> 148
    ms, forward + backward 1.19x -> 1.23-1.29x dense at B=32, T=197, d=384,
    h=1536, top-1, capacity 1.25, on a CPU), so there `tile_mlp` is two
    `tile_matmul`s around the activation.
    """
    return keras.backend.backend() == "jax"


def tile_mlp(
    tiles, kernel_1, bias_1, kernel_2, bias_2, tile_expert, live, activation
):
    """Each tile through its expert's MLP, `fc2(act(fc1(x)))` (XLA layout).

    Args:
        tiles: [T, t, d] rows in T tiles of t rows, sorted by expert.
        kernel_1, bias_1, kernel_2, bias_2: the stacked expert weights,
            [E, d, h], [E, h], [E, h, d], [E, d].
        tile_expert: [T] int32 expert of each tile.
        live: [T] bool prefix mask of the tiles before the last routed row.
        activation: "gelu" (exact) or "gelu_tanh".

    Returns:
        [T, t, d] in the result type of `tiles` and the kernels; dead tiles
        are never read back (zeros on JAX).

    On JAX (`tiles_fuse_mlp`) one loop over the live tiles runs both
    matmuls and the activation of a tile, with a hand-written backward
    pass, one loop too, that keeps only the [T, t, h] pre-activations of
    the forward pass and recomputes the activation and its derivative per
    tile. Autodiff of the unfused form keeps the activations too and
    builds [R, h] gradients of the activation and of its input; measured
    at B=32, T=197, d=384, h=1536, top-1, capacity 1.25, on a CPU: train
    step activation memory 1.59x -> 0.61x dense, forward + backward 1.17x
    -> 0.94-1.03x dense. Elsewhere two `tile_matmul`s around the
    activation.
    """
    ops = keras.ops
    if tiles_fuse_mlp():
        weights = (kernel_1, bias_1, kernel_2, bias_2)
        args = (tiles, *weights, tile_expert, live)
        args = tuple(ops.convert_to_tensor(v) for v in args)
        return _jax_tile_mlp(activation)(*args)
    hidden = tile_matmul(tiles, kernel_1, bias_1, tile_expert, live)
    hidden = apply_activation(hidden, activation)
    return tile_matmul(hidden, kernel_2, bias_2, tile_expert, live)


def _activation_and_derivative(x, activation):
    """`(act(x), act'(x))` for the GELU forms of `feed_forward`."""
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


def scale_rows(rows, scales):
    """`rows * scales[..., None, None]` for [..., P, d] rows.

    Under XLA an einsum: XLA on a CPU reduces the gradient of a broadcast
    product over the last axes one element at a time (measured 28 ms of a
    620 ms JAX train step at B=32, T=197, d=384); the einsum's gradient is
    a batched dot.
    """
    if in_xla_context():
        axes = "abcdefgh"[: len(scales.shape)]
        return keras.ops.einsum(f"{axes}pd,{axes}->{axes}pd", rows, scales)
    return rows * scales[..., None, None]


def gather_rows(x, index, valid, inverse):
    """`y = where(valid, x[index], 0)`: the transpose of `sum_rows`.

    Args:
        x: [N, ...] rows.
        index: [M] int32 row of `x` read by each output row (any row in
            [0, N) where not `valid`).
        valid: [M] bool, False for output rows that hold exact zeros, or
            None (every output row reads its row).
        inverse: [N, K] int32: the output rows that read each row of `x`,
            `M` where there are fewer than K. Every valid output row must
            appear exactly once in `inverse`, in its own `index` row.

    Returns:
        [M, ...]: the gathered rows.

    The gradient of a gather is a scatter-add; XLA runs it one row at a
    time on a CPU. With the map inverted the gradient is
    `sum_rows(dy, inverse)`, a gather, and under XLA (JAX, TensorFlow with
    `jit_compile=True`) it is written that way (measured on JAX: routing
    and dispatch forward + backward 34 -> 13 ms per top-1 layer at B=32,
    T=197, d=384). Elsewhere autodiff of the gather (TensorFlow and torch
    run a segment sum / `index_add`).
    """
    if keras.backend.backend() == "jax":
        return _jax_row_maps()[0](*_jax_arguments(x, index, valid, inverse))
    if _tensorflow_xla():
        return _tf_row_map(
            lambda x: _gather_rows(x, index, valid),
            lambda dy: _sum_rows(dy, inverse),
            x,
        )
    return _gather_rows(x, index, valid)


def sum_rows(y, inverse, index, valid):
    """`x[n] = sum_k y[inverse[n, k]]`: the transpose of `gather_rows`.

    Args:
        y: [M, ...] rows; `M` in `inverse` reads a row of zeros.
        inverse: [N, K] int32 rows of `y` summed into each output row.
        index: [M] int32 output row that reads each row of `y` (any row
            where not `valid`).
        valid: [M] bool, False for rows of `y` that no output row reads,
            or None (every row is read).

    Returns:
        [N, ...]. The K reads are added one by one (K is small), not
        gathered into [N, K, ...] and reduced: XLA on a CPU reduces a
        middle axis slowly. Under XLA the gradient is `gather_rows(dx,
        index, valid)`, a gather.
    """
    if keras.backend.backend() == "jax":
        return _jax_row_maps()[1](*_jax_arguments(y, index, valid, inverse))
    if _tensorflow_xla():
        return _tf_row_map(
            lambda y: _sum_rows(y, inverse),
            lambda dx: _gather_rows(dx, index, valid),
            y,
        )
    return _sum_rows(y, inverse)


def _tensorflow_xla():
    return keras.backend.backend() == "tensorflow" and in_xla_context()


def _tf_row_map(forward, backward, rows):
    """`forward(rows)` with the gradient `backward(upstream)` (TensorFlow)."""
    import tensorflow as tf

    @tf.custom_gradient
    def row_map(rows):
        return forward(rows), backward

    return row_map(rows)


def _jax_arguments(rows, index, valid, inverse):
    ops = keras.ops
    if valid is None:
        valid = ops.ones(ops.shape(index), "bool")
    return tuple(
        ops.convert_to_tensor(v) for v in (rows, index, valid, inverse)
    )


def _gather_rows(x, index, valid):
    ops = keras.ops
    rows = ops.take(x, index, axis=0)
    if valid is None:
        return rows
    mask = ops.reshape(valid, ops.shape(valid) + (1,) * (len(x.shape) - 1))
    return ops.where(mask, rows, ops.zeros((), rows.dtype))


def _sum_rows(y, inverse):
    ops = keras.ops
    # The spare row of zeros as padding: on TensorFlow the gradient of a
    # concatenation read by a gather selects rows with a dynamically shaped
    # `where` that takes XLA minutes to bound.
    y = ops.pad(y, ((0, 1),) + ((0, 0),) * (len(y.shape) - 1))
    total = ops.take(y, inverse[:, 0], axis=0)
    for k in range(1, inverse.shape[1]):
        total = total + ops.take(y, inverse[:, k], axis=0)
    return total


@functools.cache
def _jax_row_maps():
    """`gather_rows` and `sum_rows` on JAX, each the other's VJP."""
    import jax

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
def _jax_tile_matmul():
    """The JAX tile matmul with its custom VJP (built once, lazily)."""
    import jax
    import jax.numpy as jnp

    def forward(tiles, kernels, biases, tile_expert, live):
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

    @jax.custom_vjp
    def tile_matmul(tiles, kernels, biases, tile_expert, live):
        return forward(tiles, kernels, biases, tile_expert, live)

    def tile_matmul_fwd(tiles, kernels, biases, tile_expert, live):
        outputs = forward(tiles, kernels, biases, tile_expert, live)
        return outputs, (tiles, kernels, biases, tile_expert, live)

    def tile_matmul_bwd(residuals, grads):
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

    def _num_live(live):
        return jnp.sum(live.astype(jnp.int32))

    tile_matmul.defvjp(tile_matmul_fwd, tile_matmul_bwd)
    return tile_matmul


@functools.cache
def _jax_tile_mlp(activation):
    """The JAX tile MLP with its custom VJP, one per activation."""
    import jax
    import jax.numpy as jnp

    def run(tiles, k1, b1, k2, b2, tile_expert, live, save):
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
        return jax.lax.fori_loop(0, _jax_num_live(live), body, init)

    @jax.custom_vjp
    def tile_mlp(tiles, k1, b1, k2, b2, tile_expert, live):
        return run(tiles, k1, b1, k2, b2, tile_expert, live, False)[0]

    def tile_mlp_fwd(tiles, k1, b1, k2, b2, tile_expert, live):
        outputs, pre = run(tiles, k1, b1, k2, b2, tile_expert, live, True)
        return outputs, (tiles, k1, b1, k2, b2, tile_expert, live, pre)

    def tile_mlp_bwd(residuals, grads):
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
            d_k1 = d_k1.at[e].add(
                jnp.matmul(tiles[i].T, d_pre).astype(d_k1.dtype)
            )
            d_b1 = d_b1.at[e].add(jnp.sum(d_pre, axis=0).astype(d_b1.dtype))
            d_tiles = d_tiles.at[i].set(
                jnp.matmul(d_pre, k1[e].T).astype(d_tiles.dtype)
            )
            return d_tiles, d_k1, d_b1, d_k2, d_b2

        init = tuple(jnp.zeros_like(v) for v in (tiles, k1, b1, k2, b2))
        grads_out = jax.lax.fori_loop(0, _jax_num_live(live), body, init)
        return (*grads_out, None, None)

    tile_mlp.defvjp(tile_mlp_fwd, tile_mlp_bwd)
    return tile_mlp


def _jax_num_live(live):
    import jax.numpy as jnp

    return jnp.sum(live.astype(jnp.int32))


def _tf_tile_matmul(tiles, kernels, biases, tile_expert, live):
    """The TensorFlow tile matmul with its custom gradient.

    A `tf.while_loop` over the live tiles only (`live` is a prefix, so the
    trip count is their number and no tile needs a condition), writing
    each tile's rows into one [T, t, c] buffer of zeros. Under XLA the
    loop's buffer updates happen in place; it also runs eagerly and in a
    plain `tf.function`. As on JAX, the outputs are in the result type of
    `tiles` and `kernels`, and the gradients in the dtypes of the inputs.
    """
    import tensorflow as tf

    dtype = keras.backend.result_type(tiles.dtype, kernels.dtype)
    tile_expert = tf.cast(tile_expert, "int32")
    num_live = tf.reduce_sum(tf.cast(live, "int32"))
    num_tiles, tile = tiles.shape[0], tiles.shape[1]
    width = kernels.shape[-1]

    def loop(body, init):
        return tf.while_loop(
            lambda i, *_: i < num_live,
            body,
            (tf.constant(0), *init),
            maximum_iterations=num_tiles,
        )[1:]

    @tf.custom_gradient
    def tile_matmul(tiles, kernels, biases):
        def body(i, outputs):
            e = tile_expert[i]
            y = tf.matmul(tf.cast(tiles[i], dtype), tf.cast(kernels[e], dtype))
            y = y + tf.cast(biases[e], dtype)
            return i + 1, tf.tensor_scatter_nd_update(outputs, [[i]], y[None])

        (outputs,) = loop(body, (tf.zeros((num_tiles, tile, width), dtype),))

        def grad(grads):
            def body(i, d_tiles, d_kernels, d_biases):
                e = tile_expert[i]
                g = tf.cast(grads[i], dtype)
                d_x = tf.matmul(g, tf.cast(kernels[e], dtype), transpose_b=True)
                d_w = tf.matmul(tf.cast(tiles[i], dtype), g, transpose_a=True)
                d_b = tf.reduce_sum(g, axis=0)
                # Dead tiles and experts without tiles keep their zeros.
                return (
                    i + 1,
                    tf.tensor_scatter_nd_update(
                        d_tiles, [[i]], tf.cast(d_x, d_tiles.dtype)[None]
                    ),
                    tf.tensor_scatter_nd_add(
                        d_kernels, [[e]], tf.cast(d_w, d_kernels.dtype)[None]
                    ),
                    tf.tensor_scatter_nd_add(
                        d_biases, [[e]], tf.cast(d_b, d_biases.dtype)[None]
                    ),
                )

            return loop(
                body,
                (
                    tf.zeros_like(tiles),
                    tf.zeros_like(kernels),
                    tf.zeros_like(biases),
                ),
            )

        return outputs, grad

    return tile_matmul(tiles, kernels, biases)


@functools.cache
def _torch_segment_matmul():
    """The torch segment matmul as one autograd function (built lazily).

    Each expert's `addmm` writes straight into its rows of one output
    (no `cat` of the segments), and the backward pass writes each kernel
    gradient into its slice of one [E, a, c] tensor (autodiff through
    `unbind` would `stack` E separate gradients). Measured on a CPU
    (benchmarks/moe_layer.py): a few ms per call at B=8, T=197, d=384.
    """
    import torch

    class SegmentMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows, kernels, biases, sizes):
            ctx.dtypes = (rows.dtype, kernels.dtype, biases.dtype)
            dtype = torch.result_type(rows, kernels)
            rows, kernels, biases = (
                v.to(dtype) for v in (rows, kernels, biases)
            )
            outputs = rows.new_empty((rows.shape[0], kernels.shape[-1]))
            start = 0
            for e, size in enumerate(sizes):
                if size:
                    end = start + size
                    torch.addmm(
                        biases[e],
                        rows[start:end],
                        kernels[e],
                        out=outputs[start:end],
                    )
                    start = end
            ctx.save_for_backward(rows, kernels)
            ctx.sizes = sizes
            return outputs

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grads):
            rows, kernels = ctx.saved_tensors
            grads = grads.contiguous()
            d_rows = d_kernels = d_biases = None
            if ctx.needs_input_grad[0]:
                d_rows = torch.empty_like(rows)
            if ctx.needs_input_grad[1]:
                d_kernels = torch.empty_like(kernels)
            if ctx.needs_input_grad[2]:
                d_biases = kernels.new_empty(
                    (kernels.shape[0], kernels.shape[-1])
                )
            start = 0
            for e, size in enumerate(ctx.sizes):
                if not size:
                    # An expert without rows gets exact zero gradients.
                    if d_kernels is not None:
                        d_kernels[e].zero_()
                    if d_biases is not None:
                        d_biases[e].zero_()
                    continue
                end = start + size
                g = grads[start:end]
                if d_rows is not None:
                    torch.mm(g, kernels[e].t(), out=d_rows[start:end])
                if d_kernels is not None:
                    torch.mm(rows[start:end].t(), g, out=d_kernels[e])
                if d_biases is not None:
                    torch.sum(g, dim=0, out=d_biases[e])
                start = end
            # Gradients in the dtypes of the inputs, as autodiff of the
            # casts would give them.
            grads = [
                None if g is None else g.to(dtype)
                for g, dtype in zip((d_rows, d_kernels, d_biases), ctx.dtypes)
            ]
            return (*grads, None)

    return SegmentMatmul
