"""Backend adapters for the benchmarks: compiled forward / train steps.

Benchmarks (unlike `keras_vmoe/`) may import the backend frameworks: what
they measure is the compiled function a user's `fit` / `predict` would run.
"""

import statistics
import time

import keras
import numpy as np


def compiled_forward(layer, training=False, jit_compile=False):
    """A compiled `x -> layer(x, training=training)` on the current backend.

    `jit_compile` only applies to TensorFlow (XLA); JAX always compiles
    with XLA and torch runs eagerly.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(
            lambda x: layer(x, training=training), jit_compile=jit_compile
        )
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        @jax.jit
        def forward(x):
            outputs, _ = layer.stateless_call(
                trainable, non_trainable, x, training=training
            )
            return outputs

        return forward
    if backend == "torch":
        import torch

        def forward(x):
            with torch.no_grad():
                return layer(x, training=training)

        return forward
    raise ValueError(f"Unsupported backend: {backend}")


def compiled_train_step(layer, jit_compile=False, input_gradient=False):
    """A compiled forward + backward: gradients of sum(outputs**2) + losses.

    `jit_compile` only applies to TensorFlow (XLA). With `input_gradient`
    the step also returns the gradient of the inputs, as the backward pass
    of any layer but a network's first computes it (a layer benchmark
    without it lets XLA drop the dense FFN's input-gradient matmul, one of
    its six, while a loop with a hand-written backward pass keeps it).
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=jit_compile)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = layer(x, training=True)
                loss = tf.reduce_mean(tf.square(tf.cast(outputs, "float32")))
                loss += sum(layer.losses) if layer.losses else 0.0
            sources = list(layer.trainable_variables)
            if input_gradient:
                sources.append(x)
            return tape.gradient(loss, sources)

        return step
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_fn(weights, x):
            outputs, _, losses = layer.stateless_call(
                weights, non_trainable, x, training=True, return_losses=True
            )
            return jnp.mean(jnp.square(outputs.astype("float32"))) + sum(
                losses
            )

        grad = jax.jit(
            jax.grad(loss_fn, argnums=(0, 1) if input_gradient else 0)
        )

        def step(x):
            return grad(trainable, x)

        # `step.lower(x).compile()` is the compiled step (XLA's cache makes
        # it free after a call): its HLO text and memory analysis.
        step.lower = lambda x: grad.lower(trainable, x)
        return step
    if backend == "torch":

        def step(x):
            layer.zero_grad()
            if input_gradient:
                x = x.detach().requires_grad_(True)
            outputs = layer(x, training=True)
            loss = (outputs.float() ** 2).mean()
            for extra in layer.losses:
                loss = loss + extra
            loss.backward()

        return step
    raise ValueError(f"Unsupported backend: {backend}")


def block(value):
    """Waits for asynchronous results (JAX dispatch, CUDA streams): every
    JAX array's `block_until_ready`, and on torch a device-wide
    `torch.cuda.synchronize()` (a torch step may return nothing)."""
    leaves = keras.tree.flatten(value) if value is not None else []
    for leaf in leaves:
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return value


def interleaved_median_times(functions, inputs, rounds=7, warmup=2):
    """Median seconds per call of each function, measured round-robin.

    Round-robin order keeps the comparison fair when the machine's speed
    drifts (thermal state, other processes): every ratio compares calls made
    at the same time.
    """
    for function in functions.values():
        for _ in range(warmup):
            block(function(inputs))
    samples = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            block(function(inputs))
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def random_inputs(shape, seed=0):
    return keras.ops.convert_to_tensor(
        np.random.default_rng(seed).standard_normal(shape).astype("float32")
    )
