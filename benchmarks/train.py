"""Training throughput under `model.fit`: dense ViT-S/14 vs ViMoE-S N8 L2
shared (DINOv2 architecture, image routing, top-1), same run, same backend.

Usage:
    python benchmarks/train.py                       # CPU, float32
    python benchmarks/train.py --precision mixed_float16 --batch 64  # GPU

Prints images/s of each model (median over interleaved rounds of
`--steps` fit steps) and the ratio MoE / dense.

    python benchmarks/train.py --small               # 28x28, with validation

`--small`: a 4-block, width-64 ViT on 28x28 images (patch 4) against the
same ViT in the ViMoE configuration (image routing, dropless, shared
expert, MoE in the last 2 blocks, 4 experts), each trained with
`model.fit(x, y, validation_data=...)`; prints the median epoch time
(wall clock and process CPU time, so a busy machine shows in the gap)
and the ratio ViMoE / dense. The first epoch (tracing) is left out.
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


class _EpochTimer(keras.callbacks.Callback):
    """Wall-clock and CPU seconds of every epoch (validation included)."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(
            (
                time.perf_counter() - self.start[0],
                time.process_time() - self.start[1],
            )
        )


def small_ratio(num_train=8000, num_validation=1000, epochs=4, batch=128):
    """Median epoch seconds (fit with validation) of a small dense ViT and
    its ViMoE variant, built and run in the same process, interleaved."""
    from keras_vmoe.models import ViTMoEBackbone

    def build(moe):
        config = dict(
            image_shape=(28, 28, 3), patch_size=4, num_layers=4,
            num_heads=4, hidden_dim=64, mlp_dim=128,
        )
        if moe:
            config.update(
                moe_layers="last-2", num_experts=4, top_k=1,
                routing="image", shared_expert=True, capacity_factor=None,
                eval_capacity_factor=None,
            )
        model = ViTMoEImageClassifier(ViTMoEBackbone(**config), num_classes=10)
        model.compile(
            optimizer=keras.optimizers.AdamW(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (num_train, 28, 28, 3)).astype("float32")
    y = rng.integers(0, 10, num_train)
    xv = rng.uniform(0, 255, (num_validation, 28, 28, 3)).astype("float32")
    yv = rng.integers(0, 10, num_validation)
    models = {"dense ViT": build(False), "ViMoE": build(True)}
    timers = {name: _EpochTimer() for name in models}
    for epoch in range(epochs):
        for name, model in models.items():
            model.fit(
                x, y, batch_size=batch, epochs=1, verbose=0,
                validation_data=(xv, yv), callbacks=[timers[name]],
            )
    medians = {}
    for name, timer in timers.items():
        kept = timer.times[1:] or timer.times  # the first epoch traces
        medians[name] = tuple(
            statistics.median(t[i] for t in kept) for i in (0, 1)
        )
        print(
            f"{name:<10} epoch {medians[name][0]:6.2f} s wall, "
            f"{medians[name][1]:6.2f} s CPU (fit, {num_train} images + "
            f"{num_validation} validation, median of {len(kept)})"
        )
    (dense_wall, dense_cpu), (moe_wall, moe_cpu) = medians.values()
    print(
        f"ratio ViMoE / dense epoch (with validation): "
        f"{moe_wall / dense_wall:.2f}x wall, {moe_cpu / dense_cpu:.2f}x CPU"
    )
    return moe_wall / dense_wall, moe_cpu / dense_cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="float32")
    parser.add_argument(
        "--small",
        action="store_true",
        help="the small ViMoE vs dense ViT epoch ratio, with validation",
    )
    parser.add_argument("--epochs", type=int, default=4, help="with --small")
    parser.add_argument(
        "--train-images", type=int, default=8000, help="with --small"
    )
    args = parser.parse_args()
    if args.small:
        set_precision(args.precision)
        small_ratio(num_train=args.train_images, epochs=args.epochs)
        return

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
