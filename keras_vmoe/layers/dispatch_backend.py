"""Backend adapter for the sorted dispatch: the only backend-specific code.

Two questions `keras.ops` cannot answer portably:

- Is the current step compiled with XLA (static shapes only)? JAX always
  is. TensorFlow is when the enclosing `tf.function` has
  `jit_compile=True` (Keras turns it on by default only when a GPU is
  present); this is read from the graph's XLA context. torch never is
  (eager, and `torch.compile` accepts dynamic shapes).
- A matmul per expert segment of rows whose lengths are known only at run
  time (dynamic shapes: TensorFlow without XLA, torch, eager JAX/NumPy).
"""

import keras
import numpy as np


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

    Measured on a CPU (benchmarks/moe_layer.py): yes on TensorFlow without
    XLA; on torch eager the slot path was faster at capacity 1.25, so
    torch takes the sorted path only for dropless token routing.
    """
    return keras.backend.backend() == "tensorflow"


def row_count(total):
    """A row count usable as a shape: a tensor in TF graphs, else an int."""
    if keras.backend.backend() == "tensorflow":
        return total
    return int(keras.ops.convert_to_numpy(total))


def segment_matmul(rows, kernels, biases, counts):
    """Expert e's kernel and bias on its own contiguous segment of rows.

    Args:
        rows: [R, a], sorted by expert.
        kernels: [E, a, c].
        biases: [E, c].
        counts: [E] int32 rows per expert, summing to R.

    Returns:
        [R, c]: one matmul per expert, over exactly its rows.
    """
    backend = keras.backend.backend()
    kernels = keras.ops.convert_to_tensor(kernels)
    biases = keras.ops.convert_to_tensor(biases)
    num_experts = kernels.shape[0]
    # Unstacked (not indexed) weights: the gradient of an unstack is one
    # stack, while E indexing ops would each write a full [E, a, c] zero
    # tensor in the backward pass.
    if backend == "tensorflow":
        import tensorflow as tf

        parts = tf.split(rows, counts, axis=0, num=num_experts)
        kernels = tf.unstack(kernels, num=num_experts)
        biases = tf.unstack(biases, num=num_experts)
    elif backend == "torch":
        import torch

        sizes = counts.detach().cpu().tolist()
        parts = torch.split(rows, sizes, dim=0)
        kernels = torch.unbind(kernels, 0)
        biases = torch.unbind(biases, 0)
    else:
        sizes = np.cumsum(keras.ops.convert_to_numpy(counts))[:-1].tolist()
        parts = keras.ops.split(rows, sizes, axis=0)
        kernels = keras.ops.unstack(kernels, num_experts)
        biases = keras.ops.unstack(biases, num_experts)
    outputs = [
        keras.ops.matmul(part, kernel) + bias
        for part, kernel, bias in zip(parts, kernels, biases)
    ]
    return keras.ops.concatenate(outputs, axis=0)
