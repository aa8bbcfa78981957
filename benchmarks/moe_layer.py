"""MoE layer speed and memory against a dense FFN of equal *active* params.

Usage:
    python benchmarks/moe_layer.py                  # TensorFlow (default)
    KERAS_BACKEND=jax python benchmarks/moe_layer.py

Prints, for B=32, T=197, d=384, h=1536, E=8 and capacity factor 1.0 and
1.25, the ratio of each MoE configuration's time to the dense baseline
measured in the same run (forward, and forward + backward), and the peak
memory of the compiled layer (XLA memory analysis; JAX backend only).
"""

import argparse
import os
import sys

import keras

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import compiled_forward  # noqa: E402
from _timing import compiled_train_step  # noqa: E402
from _timing import interleaved_median_times  # noqa: E402
from _timing import random_inputs  # noqa: E402

from keras_vmoe.layers import FeedForward  # noqa: E402
from keras_vmoe.layers import MoEFeedForward  # noqa: E402

# name: (MoE kwargs, number of dense FFNs with the same active parameters)
CONFIGS = {
    "token top-1": (dict(routing="token", top_k=1), 1),
    "token top-2": (dict(routing="token", top_k=2), 2),
    "image top-1": (dict(routing="image", top_k=1), 1),
    "image top-1 + shared": (
        dict(routing="image", top_k=1, shared_expert=True),
        2,
    ),
}


def peak_memory_bytes(layer, inputs):
    """Temp + output bytes of the compiled forward (JAX/XLA only)."""
    if keras.backend.backend() != "jax":
        return None
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(x):
        return layer.stateless_call(trainable, non_trainable, x)[0]

    analysis = jax.jit(forward).lower(inputs).compile().memory_analysis()
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--capacity-factors", type=float, nargs="+", default=[1.0, 1.25]
    )
    args = parser.parse_args()

    shape = (args.batch, args.tokens, args.width)
    inputs = random_inputs(shape)
    print(
        f"backend={keras.backend.backend()} B={args.batch} T={args.tokens} "
        f"d={args.width} h={args.hidden} E={args.experts}"
    )
    dense = {}
    for copies in (1, 2):
        layer = FeedForward(args.hidden * copies)
        layer.build(shape)
        dense[copies] = layer
    for capacity_factor in args.capacity_factors:
        for name, (kwargs, copies) in CONFIGS.items():
            moe = MoEFeedForward(
                args.experts,
                args.hidden,
                capacity_factor=capacity_factor,
                eval_capacity_factor=capacity_factor,
                **kwargs,
            )
            moe.build(shape)
            baseline = dense[copies]
            line = f"cf={capacity_factor:<5} {name:<22}"
            for mode, compile_fn in (
                ("fwd", compiled_forward),
                ("fwd+bwd", compiled_train_step),
            ):
                times = interleaved_median_times(
                    {"moe": compile_fn(moe), "dense": compile_fn(baseline)},
                    inputs,
                    rounds=args.rounds,
                )
                line += (
                    f" {mode} {times['moe'] * 1e3:7.1f} ms / dense "
                    f"{times['dense'] * 1e3:7.1f} ms = "
                    f"{times['moe'] / times['dense']:.2f}x |"
                )
            memory = peak_memory_bytes(moe, inputs)
            if memory is not None:
                dense_memory = peak_memory_bytes(baseline, inputs)
                line += (
                    f" peak mem {memory / 2**20:.1f} MiB / dense "
                    f"{dense_memory / 2**20:.1f} MiB = "
                    f"{memory / dense_memory:.2f}x"
                )
            print(line, flush=True)


if __name__ == "__main__":
    main()
