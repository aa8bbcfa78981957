"""MoE layer speed and memory against a dense FFN of equal *active* params.

Usage:
    python benchmarks/moe_layer.py                  # TensorFlow (default)
    KERAS_BACKEND=jax python benchmarks/moe_layer.py

Prints, for B=32, T=197, d=384, h=1536, E=8 and capacity factor 1.0 and
1.25, the ratio of each MoE configuration's time to the dense baseline
measured in the same run (forward, and forward + backward), and the peak
memory of the compiled layer (XLA memory analysis; JAX backend only).

Soft MoE runs with S = ceil(T / E) slots per expert, so its E*S slots
match the T tokens of an image (200 for T=197, E=8) and its active cost
is one dense FFN; it has no capacity factor and is printed once. Expert
Choice (per-image groups) processes E*ceil(T*cf/E) tokens per image,
about cf dense FFNs, and is compared with one.
`--configs` picks lines by name, e.g. `--configs soft "expert choice"`.
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
from keras_vmoe.layers import SoftMoEFeedForward  # noqa: E402
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
# name: (layer factory of (args, capacity factor), dense FFNs of equal cost)
OTHER_ROUTERS = {
    "soft": (
        lambda args, _: SoftMoEFeedForward(
            args.experts,
            args.hidden,
            slots_per_expert=math.ceil(args.tokens / args.experts),
        ),
        1,
    ),
    "expert choice": (
        lambda args, capacity_factor: ExpertChoiceFeedForward(
            args.experts, args.hidden, capacity_factor=capacity_factor
        ),
        1,
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
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="names of the lines to run (default: all)",
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
    factories = {
        name: (
            lambda args, cf, kwargs=kwargs: MoEFeedForward(
                args.experts,
                args.hidden,
                capacity_factor=cf,
                eval_capacity_factor=cf,
                **kwargs,
            ),
            copies,
        )
        for name, (kwargs, copies) in CONFIGS.items()
    }
    factories.update(OTHER_ROUTERS)
    for index, capacity_factor in enumerate(args.capacity_factors):
        for name, (factory, copies) in factories.items():
            if args.configs is not None and name not in args.configs:
                continue
            if name == "soft" and index > 0:
                continue  # no capacity factor: measured once
            moe = factory(args, capacity_factor)
            moe.build(shape)
            line = f"cf={capacity_factor:<5} {name:<22}"
            print(line + measure(moe, dense[copies], inputs, args), flush=True)


def measure(moe, baseline, inputs, args):
    """Times (and, on JAX, peak memory) of `moe` against `baseline`."""
    line = ""
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
    return line


if __name__ == "__main__":
    main()
