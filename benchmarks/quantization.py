"""Memory and inference speed of a ViMoE model before / after quantization.

Usage:
    python benchmarks/quantization.py                    # TensorFlow
    KERAS_BACKEND=jax python benchmarks/quantization.py
    python benchmarks/quantization.py --preset vimoe_small_patch14_e8_last2_shared --batch 8

For the float32 model and its `model.quantize(mode)` copies ("int8",
"float8"), prints the bytes held by all weights and by the routed experts
alone, the forward time on one batch (compiled, median of interleaved
rounds) and the largest logit difference to the float model. Plain Keras
`model.quantize` leaves the routed experts in float (they sit in a layer
with sublayers); keras-vmoe models quantize them too.
"""

import argparse
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import compiled_forward  # noqa: E402
from _timing import interleaved_median_times  # noqa: E402
from _timing import random_inputs  # noqa: E402

from keras_vmoe.layers import MoEFeedForward  # noqa: E402
from keras_vmoe.models.vit_moe import ViTMoEBackbone  # noqa: E402


def weight_bytes(model):
    total = experts = 0
    for layer in model._flatten_layers():
        own = layer._trainable_variables + layer._non_trainable_variables
        size = sum(
            int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in own
        )
        total += size
        if isinstance(layer, MoEFeedForward):
            experts += size
    return total, experts


def build(preset, mode):
    keras.utils.set_random_seed(0)
    model = ViTMoEBackbone.from_preset(preset, load_weights=False)
    if mode != "float32":
        model.quantize(mode)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vimoe_small_patch14_e8_last2_shared")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    modes = ("float32", "int8", "float8")
    models = {mode: build(args.preset, mode) for mode in modes}
    shape = (args.batch,) + tuple(models["float32"].input_shape[1:])
    inputs = random_inputs(shape)
    forwards = {mode: compiled_forward(models[mode]) for mode in modes}
    times = interleaved_median_times(forwards, inputs, rounds=args.rounds)
    reference = keras.ops.convert_to_numpy(forwards["float32"](inputs))
    base_total, base_experts = weight_bytes(models["float32"])
    print(
        f"backend={keras.backend.backend()} preset={args.preset} "
        f"batch={args.batch}"
    )
    for mode in modes:
        seconds = times[mode]
        total, experts = weight_bytes(models[mode])
        outputs = keras.ops.convert_to_numpy(forwards[mode](inputs))
        error = np.abs(outputs - reference)
        print(
            f"{mode:8s} weights {total / 2**20:7.1f} MiB "
            f"({total / base_total:.2f}x) | routed experts "
            f"{experts / 2**20:6.1f} MiB ({experts / base_experts:.2f}x) | "
            f"forward {1000 * seconds:7.1f} ms "
            f"({seconds / times['float32']:.2f}x) | "
            f"max |diff| {error.max():.2e}"
        )


if __name__ == "__main__":
    main()
