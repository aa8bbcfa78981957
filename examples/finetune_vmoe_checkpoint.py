"""Fine-tune a published V-MoE / E^3 checkpoint with vmoe's recipe.

The checkpoint (google-research/vmoe, trained on ImageNet) is downloaded
once, converted, and given a new head (no `pre_logits`); it trains with
vmoe's fine-tuning recipe: SGD momentum 0.9, warmup then cosine decay to
1e-5, gradients clipped to global norm 10, no weight decay, capacity
factor 1.5, routing groups of 8 images (the batch must be a multiple of 8;
evaluation pads partial groups).

    python examples/finetune_vmoe_checkpoint.py \
        --preset vmoe_s32_last2_ilsvrc2012_randaug_light1 --dataset cifar10 \
        --image-size 128 --epochs 3 --learning-rate 0.0015
    # with a local copy of the checkpoint files (<name>.index, .data-*):
    python examples/finetune_vmoe_checkpoint.py --checkpoint /data/vmoe ...
    python examples/finetune_vmoe_checkpoint.py --smoke   # seconds, offline

`--smoke` uses `tfds.testing.mock_data` and the preset's architecture with
random weights at 64x64 (no download).
"""

import argparse
import contextlib

import keras

from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.training import set_precision
from keras_vmoe.training import tf_data
from keras_vmoe.training import vmoe_finetune_optimizer


def assert_trained(model):
    """A run that trained nothing fails (e.g. no full training batch)."""
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if steps < 1:
        raise RuntimeError(
            "No training step ran: the training set gave no " "full batch."
        )
    print(f"trained {steps} steps")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="vmoe_s32_last2_ilsvrc2012_randaug_light1"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="local checkpoint prefix or folder"
    )
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="a multiple of 8 (routing groups of 8 images)",
    )
    parser.add_argument("--learning-rate", type=float, default=0.0015)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    set_precision("float32" if args.smoke else args.precision)
    if args.smoke:
        # 16 mock examples in batches of 8: two training steps.
        args.batch_size, args.epochs, args.image_size = 8, 1, 64

    data_context = (
        __import__("tensorflow_datasets").testing.mock_data(num_examples=16)
        if args.smoke
        else contextlib.nullcontext()
    )
    with data_context:
        import tensorflow_datasets as tfds

        builder = tfds.builder(args.dataset, data_dir=args.data_dir)
        num_classes = builder.info.features["label"].num_classes
        augment = tf_data.augmentation(args.image_size)
        train = tf_data.tfds_dataset(
            args.dataset,
            "train",
            args.image_size,
            args.batch_size,
            data_dir=args.data_dir,
            augment=augment,
            num_classes=num_classes,
        )
        test = tf_data.tfds_dataset(
            args.dataset,
            "test",
            args.image_size,
            args.batch_size,
            data_dir=args.data_dir,
            num_classes=num_classes,
        )
        model = ViTMoEImageClassifier.from_preset(
            args.preset,
            load_weights=not args.smoke,
            checkpoint=args.checkpoint,
            num_classes=num_classes,
            image_size=args.image_size,
        )
        steps = max(1, int(train.cardinality())) * args.epochs
        model.compile(
            optimizer=vmoe_finetune_optimizer(
                steps,
                learning_rate=args.learning_rate,
                warmup_steps=min(steps // 10, steps - 1),
            ),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        model.fit(
            train, validation_data=test, epochs=args.epochs, shuffle=False
        )
        results = model.evaluate(test, return_dict=True, verbose=0)
    assert_trained(model)
    print(f"test accuracy: {results['accuracy']:.4f}")
    return results


if __name__ == "__main__":
    main()
