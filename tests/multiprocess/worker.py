"""One process of the multi-process tests (run by test_multiprocess.py).

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/multiprocess/worker.py train --num-processes 2 \
        --process-id 0 --coordinator-address 127.0.0.1:PORT \
        --checkpoint DIR --out DIR

`train`: a small ViT-MoE (8 experts, token routing, groups of 2 images),
expert parallelism over every device of every process, `fit_resumable`
with a checkpoint every 2 steps; writes `losses.json` and the final
weights (`weights.npz`, gathered) from process 0. `--step-seconds` slows
every step so a test can kill a process mid-epoch.
`predict`: one process restores the checkpoint folder's latest step onto
its own devices (`--expert-shards`, 0 = no distribution) and writes the
predictions of fixed images.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.abspath(ROOT))

NUM_IMAGES, BATCH, EPOCHS, SAVE_EVERY = 64, 16, 2, 2


def build_model():
    import keras

    from keras_vmoe.models import ViTMoEBackbone
    from keras_vmoe.models import ViTMoEImageClassifier

    keras.utils.set_random_seed(0)
    backbone = ViTMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=24,
        moe_layers="last-2",
        num_experts=8,
        top_k=2,
        routing="token",
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        group_size=2 * 17,
    )
    return ViTMoEImageClassifier(backbone, num_classes=3)


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    images = (rng.random((NUM_IMAGES, 16, 16, 3)) * 255).astype("uint8")
    return images, np.arange(NUM_IMAGES) % 3


def compile_model(model):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def distribute(model, expert_shards):
    import keras

    from keras_vmoe import distribution

    dist = distribution.expert_parallel(model, expert_shards=expert_shards)
    model = distribution.distribute_model(model, dist)
    keras.distribution.set_distribution(dist)
    return model


class SlowSteps:
    """A callback that sleeps after every step and prints the step."""

    def __new__(cls, seconds):
        import keras

        class _Slow(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                print(f"step done {batch}", flush=True)
                time.sleep(seconds)

        return _Slow()


def train(args):
    import keras
    import numpy as np

    from keras_vmoe import cluster
    from keras_vmoe.training.checkpoint import TrainingCheckpoint
    from keras_vmoe.training.checkpoint import fit_resumable
    from keras_vmoe.training.tf_data import ShardedArrays

    count, index = cluster.initialize_cluster(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        initialization_timeout=args.timeout,
        heartbeat_timeout=args.heartbeat_timeout,
    )
    print(f"process {index} of {count}: ready", flush=True)
    model = distribute(build_model(), len(keras.distribution.list_devices()))
    compile_model(model)
    images, labels = data()
    inputs = ShardedArrays(images, labels, BATCH, 16, seed=1)
    checkpoint = TrainingCheckpoint(
        args.checkpoint,
        inputs.steps_per_epoch,
        save_every=SAVE_EVERY,
        settings={"global_batch_size": BATCH, "seed": 1},
    )
    callbacks = [SlowSteps(args.step_seconds)] if args.step_seconds else []
    history, restored = fit_resumable(
        model,
        inputs.dataset,
        EPOCHS,
        checkpoint,
        callbacks=callbacks,
        verbose=0,
    )
    checkpoint.close()
    weights = cluster.gather_weights(model)
    if cluster.is_primary():
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, "weights.npz"), *weights)
        with open(os.path.join(args.out, "losses.json"), "w") as file:
            json.dump({"loss": history["loss"], "restored": restored}, file)
    print(f"process {index}: finished (restored {restored})", flush=True)


def predict(args):
    import keras
    import numpy as np

    from keras_vmoe.training.checkpoint import restore

    model = build_model()
    if args.expert_shards:
        model = distribute(model, args.expert_shards)
    compile_model(model)
    metadata = restore(model, args.checkpoint)
    images, _ = data()
    outputs = model.predict(images, batch_size=BATCH, verbose=0)
    os.makedirs(args.out, exist_ok=True)
    np.save(os.path.join(args.out, "predictions.npy"), np.asarray(outputs))
    print(
        f"restored step {metadata['step']} on "
        f"{len(keras.distribution.list_devices())} devices",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "predict"])
    parser.add_argument("--coordinator-address", default=None)
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--heartbeat-timeout", type=int, default=10)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--expert-shards", type=int, default=0)
    args = parser.parse_args()
    (train if args.mode == "train" else predict)(args)


if __name__ == "__main__":
    main()
