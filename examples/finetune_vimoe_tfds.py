"""Fine-tune a ViMoE preset on a tensorflow_datasets dataset.

The ViMoE recipe (DINOv2 ViT-S/14 upcycled, image routing, shared expert):
AdamW, lr 1e-4, weight decay 0.05, layer-wise lr decay 0.65, warmup then
cosine, label smoothing, mixed precision.

    python examples/finetune_vimoe_tfds.py \
        --preset vimoe_small_patch14_e8_last2_shared --dataset cifar100 \
        --epochs 10 --precision auto
    python examples/finetune_vimoe_tfds.py --smoke   # seconds, no data/network

`--smoke` uses `tfds.testing.mock_data` and a 2-block model at 56x56.
"""

import argparse
import contextlib

import keras

from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.training import create_optimizer
from keras_vmoe.training import set_precision
from keras_vmoe.training import tf_data

SMOKE_OVERRIDES = dict(
    image_shape=(56, 56, 3),
    num_layers=2,
    num_heads=2,
    hidden_dim=32,
    mlp_dim=64,
    position_embedding_shape=(56, 56),
)


def assert_trained(model):
    """A run that trained nothing fails (e.g. no full training batch)."""
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if steps < 1:
        raise RuntimeError("No training step ran: the training set gave no "
                           "full batch.")
    print(f"trained {steps} steps")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vimoe_small_patch14_e8_last2_shared")
    parser.add_argument("--dataset", default="cifar100")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--weights-path", default=None,
                        help="local dense .safetensors instead of the hub download")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    set_precision("float32" if args.smoke else args.precision)
    overrides = SMOKE_OVERRIDES if args.smoke else {}
    if args.weights_path:
        overrides = dict(overrides, weights_path=args.weights_path)
    image_size = 56 if args.smoke else 224
    if args.smoke:
        # 16 mock examples in batches of 8: two training steps per epoch
        # (training batches drop their remainder).
        args.batch_size, args.epochs = 8, 1

    data_context = (
        __import__("tensorflow_datasets").testing.mock_data(num_examples=16)
        if args.smoke
        else contextlib.nullcontext()
    )
    with data_context:
        import tensorflow_datasets as tfds

        # Mock data draws labels from the real dataset's label feature.
        builder = tfds.builder(args.dataset, data_dir=args.data_dir)
        num_classes = builder.info.features["label"].num_classes
        augment = tf_data.augmentation(
            image_size, rand_augment=True, mixup_alpha=0.8, cutmix_alpha=1.0,
            random_erasing=0.25,
        )
        train = tf_data.tfds_dataset(
            args.dataset, "train", image_size, args.batch_size,
            data_dir=args.data_dir, augment=augment, num_classes=num_classes,
        )
        test = tf_data.tfds_dataset(
            args.dataset, "test", image_size, args.batch_size,
            data_dir=args.data_dir, num_classes=num_classes,
        )
        model = ViTMoEImageClassifier.from_preset(
            args.preset,
            load_weights=not args.smoke,
            num_classes=num_classes,
            **overrides,
        )
        steps = max(1, int(train.cardinality())) * args.epochs
        model.compile(
            optimizer=create_optimizer(
                model,
                total_steps=steps,
                learning_rate=args.learning_rate,
                weight_decay=0.05,
                layer_decay=0.65,
                warmup_steps=steps // 10,
            ),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=0.1
            ),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        model.fit(train, validation_data=test, epochs=args.epochs, shuffle=False)
        results = model.evaluate(test, return_dict=True, verbose=0)
    assert_trained(model)
    print(f"test accuracy: {results['accuracy']:.4f}")
    return results


if __name__ == "__main__":
    main()
