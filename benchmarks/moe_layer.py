"""MoE layer speed and memory against a dense FFN of equal *active* params.

Usage:
    python benchmarks/moe_layer.py                  # TensorFlow, fit mode
    python benchmarks/moe_layer.py --xla            # TensorFlow with XLA
    KERAS_BACKEND=jax python benchmarks/moe_layer.py
    KERAS_BACKEND=torch python benchmarks/moe_layer.py
    python benchmarks/moe_layer.py --dispatch slots # force one path

Prints, for B=32, T=197, d=384, h=1536, E=8 by default, the ratio of each
MoE configuration's time to the dense baseline measured in the same run
(forward, and forward + backward with the input gradient, as inside a
network, both in training mode) for capacity factors 1.25 and 1.0 and
dropless token routing, and the peak memory of
the compiled train step against dense where the backend reports it (XLA
memory analysis on JAX, where `activations` leaves out the weight
gradients, which grow with the total rather than the active parameters;
device peak memory on a GPU). Times are medians of
`--rounds` interleaved calls.

TensorFlow without `--xla` runs a `tf.function` without XLA, which is what
Keras' `fit` compiles on a CPU-only machine (`jit_compile="auto"`).

Soft MoE runs with S = ceil(T / E) slots per expert, so its E*S slots
match the T tokens of an image (200 for T=197, E=8) and its active cost is
one dense FFN. Expert Choice (per-image groups) processes E*ceil(T*cf/E)
tokens per image, about cf dense FFNs, and is compared with one.
`--configs` picks lines by name, e.g. `--configs soft "cf=1.0 expert choice"`.
"""

import argparse
import math
import os
import sys

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import compiled_forward  # noqa: E402
from _timing import compiled_train_step  # noqa: E402
from _timing import interleaved_median_times  # noqa: E402
from _timing import random_inputs  # noqa: E402

from keras_vmoe.layers import ExpertChoiceFeedForward  # noqa: E402
from keras_vmoe.layers import FeedForward  # noqa: E402
from keras_vmoe.layers import MoEFeedForward  # noqa: E402
from keras_vmoe.layers import SoftMoEFeedForward  # noqa: E402

# name: (capacity factor, MoE kwargs, number of dense FFNs with the same
# active parameters)
CONFIGS = {
    "cf=1.25 token top-1": (1.25, dict(routing="token", top_k=1), 1),
    "cf=1.25 token top-2": (1.25, dict(routing="token", top_k=2), 2),
    "cf=1.25 image top-1": (1.25, dict(routing="image", top_k=1), 1),
    "cf=1.0 token top-1": (1.0, dict(routing="token", top_k=1), 1),
    "cf=1.0 token top-2": (1.0, dict(routing="token", top_k=2), 2),
    "cf=1.0 image top-1": (1.0, dict(routing="image", top_k=1), 1),
    "dropless token top-1": (None, dict(routing="token", top_k=1), 1),
    "dropless token top-2": (None, dict(routing="token", top_k=2), 2),
}

# name: (layer factory, number of dense FFNs with the same active cost)
OTHER_ROUTERS = {
    "soft": (
        lambda args: SoftMoEFeedForward(
            args.experts,
            args.hidden,
            slots_per_expert=math.ceil(args.tokens / args.experts),
        ),
        1,
    ),
    "cf=1.0 expert choice": (
        lambda args: ExpertChoiceFeedForward(
            args.experts, args.hidden, capacity_factor=1.0
        ),
        1,
    ),
    "cf=1.25 expert choice": (
        lambda args: ExpertChoiceFeedForward(
            args.experts, args.hidden, capacity_factor=1.25
        ),
        1,
    ),
}


def jax_temp_memory_bytes(layer, inputs):
    """Temp bytes of the compiled train step (XLA analysis): activations
    and workspace, without the weights and their gradients (which grow with
    the total, not the active, parameters)."""
    return _jax_memory_analysis(layer, inputs).temp_size_in_bytes


def jax_peak_memory_bytes(layer, inputs):
    """Temp + output (gradient) bytes of the compiled train step."""
    analysis = _jax_memory_analysis(layer, inputs)
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def _jax_memory_analysis(layer, inputs):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss_fn(weights, x):
        outputs, _ = layer.stateless_call(
            weights, non_trainable, x, training=True
        )
        return jnp.mean(jnp.square(outputs.astype("float32")))

    grad = jax.grad(loss_fn, argnums=(0, 1))
    compiled = jax.jit(grad).lower(trainable, inputs).compile()
    return compiled.memory_analysis()


def gpu_peak_memory_bytes(step, inputs):
    """Peak device memory of one call of `step` on a GPU, else None."""
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU"):
            return None
        tf.config.experimental.reset_memory_stats("GPU:0")
        base = tf.config.experimental.get_memory_info("GPU:0")["current"]
        step(inputs)
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] - base
    return None


def peak_memory_bytes(layer, step, inputs):
    if keras.backend.backend() == "jax":
        return jax_peak_memory_bytes(layer, inputs)
    return gpu_peak_memory_bytes(step, inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--xla", action="store_true", help="TensorFlow: jit_compile=True"
    )
    parser.add_argument(
        "--dispatch",
        default=None,
        help="MoEFeedForward `dispatch` (default: the layer's default)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(CONFIGS) + list(OTHER_ROUTERS),
        choices=list(CONFIGS) + list(OTHER_ROUTERS),
        metavar="CONFIG",
        help=f"subset of {list(CONFIGS) + list(OTHER_ROUTERS)}",
    )
    args = parser.parse_args()

    shape = (args.batch, args.tokens, args.width)
    inputs = random_inputs(shape)
    mode = keras.backend.backend()
    if mode == "tensorflow":
        mode += " XLA" if args.xla else " tf.function (fit default)"
    print(
        f"backend={mode} dispatch={args.dispatch or 'default'} "
        f"B={args.batch} T={args.tokens} d={args.width} h={args.hidden} "
        f"E={args.experts} training mode, median of {args.rounds} rounds"
    )
    dense = {}
    for copies in (1, 2):
        layer = FeedForward(args.hidden * copies)
        layer.build(shape)
        dense[copies] = layer
    extra = {} if args.dispatch is None else {"dispatch": args.dispatch}
    for name in args.configs:
        if name in OTHER_ROUTERS:
            factory, copies = OTHER_ROUTERS[name]
            moe = factory(args)
        else:
            capacity_factor, kwargs, copies = CONFIGS[name]
            moe = MoEFeedForward(
                args.experts,
                args.hidden,
                capacity_factor=capacity_factor,
                eval_capacity_factor=capacity_factor,
                **kwargs,
                **extra,
            )
        moe.build(shape)
        baseline = dense[copies]
        line = f"{name:<22}"
        steps = {}
        for label, compile_fn in (
            ("fwd", lambda l: compiled_forward(l, True, args.xla)),
            (
                "fwd+bwd",
                lambda l: compiled_train_step(
                    l, args.xla, input_gradient=True
                ),
            ),
        ):
            steps = {"moe": compile_fn(moe), "dense": compile_fn(baseline)}
            times = interleaved_median_times(steps, inputs, rounds=args.rounds)
            line += (
                f" {label} {times['moe'] * 1e3:7.1f} ms / dense "
                f"{times['dense'] * 1e3:7.1f} ms = "
                f"{times['moe'] / times['dense']:.2f}x |"
            )
        memory = peak_memory_bytes(moe, steps["moe"], inputs)
        if memory is not None:
            dense_memory = peak_memory_bytes(baseline, steps["dense"], inputs)
            line += (
                f" peak mem {memory / 2**20:.1f} MiB / dense "
                f"{dense_memory / 2**20:.1f} MiB = "
                f"{memory / dense_memory:.2f}x"
            )
        if keras.backend.backend() == "jax":
            temp = jax_temp_memory_bytes(moe, inputs)
            dense_temp = jax_temp_memory_bytes(baseline, inputs)
            line += (
                f" | activations {temp / 2**20:.1f} MiB / dense "
                f"{dense_temp / 2**20:.1f} MiB = {temp / dense_temp:.2f}x"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
