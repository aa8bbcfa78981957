"""The TensorFlow adapter: XLA context, graph-friendly segments, tile loop.

- `in_xla_context` reads the graph's XLA context (`jit_compile=True`).
- Segment sizes stay tensors in graphs; the segment matmul splits with
  `tf.split`, which accepts them.
- The tile matmul is a `tf.while_loop` over the live tiles with a
  hand-written gradient. TensorFlow's XLA runs the fused tile MLP loop
  slower than two matmul loops, so `tile_mlp` keeps the base form (two
  `tile_matmul`s around the activation).
- Under XLA the row maps are written as each other's gradient
  (`tf.custom_gradient`).
- `stable_argsort` and `first_argmax` sort with `tf.math.top_k` (ties:
  the lower index first), exportable to ONNX and LiteRT.
"""

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from keras_vmoe.layers.backends import BackendAdapter
from keras_vmoe.layers.backends import _gather_rows
from keras_vmoe.layers.backends import _segment_outputs
from keras_vmoe.layers.backends import _sum_rows


class TensorFlowAdapter(BackendAdapter):
    def in_xla_context(self):
        if tf.executing_eagerly():
            return False
        graph = tf.compat.v1.get_default_graph()
        return bool(control_flow_util.GraphOrParentsInXlaContext(graph))

    def accelerator(self):
        # TensorFlow places the ops on a GPU whenever it sees one.
        return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"

    def sorted_beats_slots(self):
        return True

    def segment_sizes(self, totals, per_item=1):
        return totals * per_item, keras.ops.sum(totals)

    def segment_matmul(self, rows, kernels, biases, counts):
        kernels = keras.ops.convert_to_tensor(kernels)
        biases = keras.ops.convert_to_tensor(biases)
        num_experts = kernels.shape[0]
        # Unstacked (not indexed) weights, as in the base adapter.
        parts = tf.split(rows, counts, axis=0, num=num_experts)
        kernels = tf.unstack(kernels, num=num_experts)
        biases = tf.unstack(biases, num=num_experts)
        return _segment_outputs(parts, kernels, biases)

    def tile_matmul(self, tiles, kernels, biases, tile_expert, live):
        return _tile_matmul(
            *(
                keras.ops.convert_to_tensor(v)
                for v in (tiles, kernels, biases, tile_expert, live)
            )
        )

    def gather_rows(self, x, index, valid, inverse):
        if self.in_xla_context():
            return _row_map(
                lambda x: _gather_rows(x, index, valid),
                lambda dy: _sum_rows(dy, inverse),
                x,
            )
        return _gather_rows(x, index, valid)

    def sum_rows(self, y, inverse, index, valid):
        if self.in_xla_context():
            return _row_map(
                lambda y: _sum_rows(y, inverse),
                lambda dx: _gather_rows(dx, index, valid),
                y,
            )
        return _sum_rows(y, inverse)

    def first_argmax(self, x):
        # `keras.ops.argmax` tells -0.0 from 0.0 through `Bitcast` /
        # `BitwiseAnd` (ops neither ONNX nor the LiteRT builtins have), and
        # `tf.math.argmax` does not promise the first of equal maxima;
        # `top_k` promises it and exists in both.
        x = tf.convert_to_tensor(x)
        indices = tf.math.top_k(x, k=1).indices
        return tf.cast(tf.squeeze(indices, axis=-1), "int32")

    def stable_argsort(self, x, axis=-1):
        # `tf.math.top_k` promises the lower index first among equal values
        # (also under XLA), so the top-k of -x is a stable ascending order.
        # `tf.argsort(stable=True)` would be too, but it sorts floats
        # through `Bitcast` / `BitwiseAnd`, which neither ONNX nor the
        # LiteRT builtins have; `TopK` exists in both, with the same
        # tie-break.
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating or axis not in (-1, len(x.shape) - 1):
            return tf.argsort(x, axis=axis, stable=True)
        return tf.math.top_k(-x, k=tf.shape(x)[-1], sorted=True).indices


def _row_map(forward, backward, rows):
    """`forward(rows)` with the gradient `backward(upstream)`."""

    @tf.custom_gradient
    def row_map(rows):
        return forward(rows), backward

    return row_map(rows)


def _tile_matmul(tiles, kernels, biases, tile_expert, live):
    """The TensorFlow tile matmul with its custom gradient.

    A `tf.while_loop` over the live tiles only (`live` is a prefix, so the
    trip count is their number and no tile needs a condition), writing
    each tile's rows into one [L, t, c] buffer of zeros. Under XLA the
    loop's buffer updates happen in place; it also runs eagerly and in a
    plain `tf.function`. As on JAX, the outputs are in the result type of
    `tiles` and `kernels`, and the gradients in the dtypes of the inputs.
    """
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
            return _tile_matmul_grad(
                loop, tiles, kernels, biases, tile_expert, dtype, grads
            )

        return outputs, grad

    return tile_matmul(tiles, kernels, biases)


def _tile_matmul_grad(loop, tiles, kernels, biases, tile_expert, dtype, grads):
    """The tile matmul's gradients for tiles, kernels and biases.

    `loop(body, init)` runs `body` over the live tiles (as in the forward
    pass); the gradients are in the dtypes of the inputs.
    """

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
