"""Training throughput under `model.fit`: dense ViT-S/14 vs ViMoE-S N8 L2
shared (DINOv2 architecture, image routing, top-1), same run, same backend.

Usage:
    python benchmarks/train.py                       # CPU, float32
    python benchmarks/train.py --precision mixed_float16 --batch 64  # GPU

Prints images/s of each model (median over interleaved rounds of
`--steps` fit steps) and the ratio MoE / dense.
"""

import argparse
import statistics
import time

import keras
import numpy as np

from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.training import create_optimizer
from keras_vmoe.training import set_precision

MODELS = {
    "dense ViT-S/14": "vit_small_patch14_dinov2",
    "ViMoE-S N8 L2 shared": "vimoe_small_patch14_e8_last2_shared",
}


def build(preset, image_size, steps):
    model = ViTMoEImageClassifier.from_preset(
        preset,
        load_weights=False,
        num_classes=1000,
        image_shape=(image_size, image_size, 3),
    )
    model.preprocessor = None
    model.compile(
        optimizer=create_optimizer(model, total_steps=10 * steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[],
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="float32")
    args = parser.parse_args()

    policy = set_precision(args.precision)
    rng = np.random.default_rng(0)
    count = args.batch * args.steps
    x = rng.uniform(-1, 1, (count, args.image_size, args.image_size, 3)).astype(
        "float32"
    )
    y = rng.integers(0, 1000, count)
    models = {name: build(preset, args.image_size, args.steps) for name, preset in MODELS.items()}
    for model in models.values():  # compile the train step
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
    samples = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
            samples[name].append(count / (time.perf_counter() - start))
    rates = {name: statistics.median(values) for name, values in samples.items()}
    devices = ",".join(keras.distribution.list_devices())
    print(
        f"backend={keras.backend.backend()} devices={devices} policy={policy} "
        f"batch={args.batch} image={args.image_size}"
    )
    for name, rate in rates.items():
        print(f"{name:<22} {rate:8.1f} images/s (train, model.fit)")
    dense, moe = rates.values()
    print(f"ratio ViMoE / dense: {moe / dense:.2f}x")


if __name__ == "__main__":
    main()
