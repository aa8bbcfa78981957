"""Hand checks of the dispatch's row maps: `gather_rows`, `sum_rows` (each
the other's transpose; on JAX each is written as the other's gradient) and
`scale_rows`."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import backends

BACKEND = keras.backend.backend()


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _value_and_grad(fn, *args):
    """`fn(*args)` and the gradient of `sum(fn(*args) * weights)` with
    respect to every float argument, on the current backend."""
    args = [np.asarray(a) for a in args]
    float_args = [i for i, a in enumerate(args) if a.dtype.kind == "f"]

    def loss(outputs, weights):
        return keras.ops.sum(outputs * weights)

    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            for i in float_args:
                tape.watch(tensors[i])
            outputs = fn(*tensors)
            weights = _weights(outputs.shape)
            value = loss(outputs, weights)
        grads = tape.gradient(value, [tensors[i] for i in float_args])
        return _np(outputs), weights, [_np(g) for g in grads]
    if BACKEND == "jax":
        import jax

        outputs = fn(*args)
        weights = _weights(outputs.shape)

        def scalar(*floats):
            full = list(args)
            for i, value in zip(float_args, floats):
                full[i] = value
            return loss(fn(*full), weights)

        grads = jax.grad(scalar, argnums=tuple(range(len(float_args))))(
            *[args[i] for i in float_args]
        )
        return _np(outputs), weights, [_np(g) for g in grads]
    import torch

    tensors = [torch.as_tensor(a) for a in args]
    for i in float_args:
        tensors[i].requires_grad_(True)
    outputs = fn(*tensors)
    weights = _weights(outputs.shape)
    loss(outputs, torch.as_tensor(weights)).backward()
    grads = [tensors[i].grad.numpy() for i in float_args]
    return outputs.detach().numpy(), weights, grads


def _weights(shape):
    size = int(np.prod(shape))
    return (np.arange(size, dtype="float32").reshape(shape) + 1.0) / size


# x has 3 rows; the output has 4: output 2 is not valid (a padding row).
X = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], "float32")
INDEX = np.array([2, 0, 0, 1], "int32")  # output row m reads x[INDEX[m]]
VALID = np.array([True, True, False, True])
# Rows of the output that read each row of x (4: none).
INVERSE = np.array([[1, 4], [3, 4], [0, 4]], "int32")


def test_gather_rows_reads_valid_rows_and_sums_gradients_back():
    outputs, w, (d_x,) = _value_and_grad(
        backends.gather_rows, X, INDEX, VALID, INVERSE
    )
    np.testing.assert_array_equal(
        outputs, [X[2], X[0], [0.0, 0.0], X[1]]
    )
    # x row n receives the weights of the output rows that read it.
    np.testing.assert_allclose(d_x, [w[1], w[3], w[0]], rtol=1e-6)


def test_gather_rows_padding_row_is_an_exact_zero_next_to_nan():
    x = X.copy()
    x[0] = np.nan  # read by output 1; output 2 reads row 0 but is padding
    outputs = _np(backends.gather_rows(x, INDEX, VALID, INVERSE))
    np.testing.assert_array_equal(outputs[2], [0.0, 0.0])
    assert np.isnan(outputs[1]).all()
    np.testing.assert_array_equal(outputs[[0, 3]], x[[2, 1]])


def test_sum_rows_adds_each_items_rows_and_gathers_gradients():
    # y has 4 rows; item 1 reads rows 3 and 0, item 0 row 1, item 2 none;
    # row 2 is read by nobody (padding) and holds NaN.
    y = np.array([[1.0, 2.0], [3.0, 4.0], [np.nan, np.nan], [5.0, 6.0]])
    y = y.astype("float32")
    inverse = np.array([[1, 4], [3, 0], [4, 4]], "int32")
    index = np.array([1, 0, 0, 1], "int32")  # reader of each row of y
    valid = np.array([True, True, False, True])
    outputs, w, (d_y,) = _value_and_grad(
        backends.sum_rows, y, inverse, index, valid
    )
    np.testing.assert_array_equal(
        outputs, [y[1], y[3] + y[0], [0.0, 0.0]]
    )
    np.testing.assert_allclose(
        d_y, [w[1], w[0], [0.0, 0.0], w[1]], rtol=1e-6
    )


def test_gather_and_sum_rows_are_transposes():
    """<gather(x), y> == <x, sum(y)> on a random partial permutation."""
    rng = np.random.default_rng(0)
    num_x, top_k, num_rows = 6, 2, 15
    slots = rng.permutation(num_rows)[: num_x * top_k]
    inverse = slots.reshape(num_x, top_k).astype("int32")
    inverse[1, 1] = num_rows  # a dropped choice
    index = np.zeros(num_rows, "int32")
    valid = np.zeros(num_rows, bool)
    for n in range(num_x):
        for k in range(top_k):
            if inverse[n, k] < num_rows:
                index[inverse[n, k]] = n
                valid[inverse[n, k]] = True
    x = rng.standard_normal((num_x, 3)).astype("float32")
    y = rng.standard_normal((num_rows, 3)).astype("float32")
    gathered = _np(backends.gather_rows(x, index, valid, inverse))
    summed = _np(backends.sum_rows(y, inverse, index, valid))
    np.testing.assert_allclose(
        np.sum(gathered * y), np.sum(x * summed), rtol=1e-5
    )


def test_scale_rows_and_its_gradient():
    rows = np.arange(12, dtype="float32").reshape(3, 2, 2)
    scales = np.array([0.5, 0.0, 2.0], "float32")
    outputs, w, (d_rows, d_scales) = _value_and_grad(
        backends.scale_rows, rows, scales
    )
    np.testing.assert_allclose(outputs, rows * scales[:, None, None])
    np.testing.assert_allclose(d_rows, w * scales[:, None, None], rtol=1e-6)
    np.testing.assert_allclose(
        d_scales, np.sum(w * rows, axis=(1, 2)), rtol=1e-6
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow XLA only")
def test_row_maps_and_their_gradients_under_tensorflow_xla():
    """Under `jit_compile=True` each map's gradient is the other map."""
    import tensorflow as tf

    w = _weights((4, 2))

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = backends.gather_rows(x, INDEX, VALID, INVERSE)
            z = backends.sum_rows(y * 2.0, INVERSE, INDEX, VALID)
            loss = tf.reduce_sum(y * w) + tf.reduce_sum(z * z)
        return y, z, tape.gradient(loss, x)

    y, z, d_x = (v.numpy() for v in step(tf.constant(X)))
    np.testing.assert_array_equal(y, [X[2], X[0], [0.0, 0.0], X[1]])
    np.testing.assert_array_equal(z, 2.0 * X)  # every row of x read once
    np.testing.assert_allclose(
        d_x, np.stack([w[1], w[3], w[0]]) + 8.0 * X, rtol=1e-6
    )
