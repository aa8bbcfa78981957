"""Train an MoE-ConvNeXt on an image folder (`root/<class>/<image>`).

    python examples/train_convnext_moe_folder.py --data path/to/folder \
        --preset convnext_moe_tiny_e4_last2 --epochs 30 --image-size 224
    python examples/train_convnext_moe_folder.py --smoke   # seconds

`--smoke` writes a small folder of synthetic images (bright squares in
different corners, one class per corner) and trains a 3-stage MoE-ConvNeXt
on it.
"""

import argparse
import os
import tempfile

import keras
import numpy as np

from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.training import create_optimizer
from keras_vmoe.training import set_precision
from keras_vmoe.training import tf_data

SMOKE_OVERRIDES = dict(depths=[1, 1, 1], hidden_dims=[16, 32, 48], image_shape=(32, 32, 3))


def assert_trained(model):
    """A run that trained nothing fails (e.g. no full training batch)."""
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if steps < 1:
        raise RuntimeError("No training step ran: the training set gave no "
                           "full batch.")
    print(f"trained {steps} steps")


def write_synthetic_folder(root, images_per_class=12, size=32, seed=0):
    """Four classes: a bright square in one of the four corners."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    half = size // 2
    for label, (row, col) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        folder = os.path.join(root, f"corner_{label}")
        os.makedirs(folder, exist_ok=True)
        for i in range(images_per_class):
            image = rng.integers(0, 60, (size, size, 3)).astype("uint8")
            image[row : row + half, col : col + half] = 220
            Image.fromarray(image).save(os.path.join(folder, f"{i}.png"))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of class folders")
    parser.add_argument("--preset", default="convnext_moe_tiny_e4_last2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=4e-3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)

    overrides = {}
    if args.smoke:
        args.data = write_synthetic_folder(tempfile.mkdtemp())
        args.image_size, args.epochs, args.batch_size = 32, 2, 16
        args.precision = "float32"
        overrides = SMOKE_OVERRIDES
    elif not args.data:
        parser.error("--data is required (or use --smoke)")
    set_precision(args.precision)

    probe, class_names = tf_data.image_folder_dataset(
        args.data, image_size=args.image_size, batch_size=args.batch_size
    )
    num_classes = len(class_names)
    augment = tf_data.augmentation(args.image_size, rand_augment=not args.smoke)
    train, _ = tf_data.image_folder_dataset(
        args.data, args.image_size, args.batch_size, training=True,
        validation_split=0.25, subset="training", augment=augment,
        num_classes=num_classes,
    )
    validation, _ = tf_data.image_folder_dataset(
        args.data, args.image_size, args.batch_size, training=False,
        validation_split=0.25, subset="validation", num_classes=num_classes,
        crop_fraction=1.0,
    )
    model = ConvNeXtMoEImageClassifier.from_preset(
        args.preset, load_weights=False, num_classes=num_classes, **overrides
    )
    steps = max(1, int(train.cardinality())) * args.epochs
    model.compile(
        optimizer=create_optimizer(
            model, total_steps=steps, learning_rate=args.learning_rate,
            layer_decay=1.0, warmup_steps=steps // 10,
        ),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    model.fit(train, validation_data=validation, epochs=args.epochs, shuffle=False)
    results = model.evaluate(validation, return_dict=True, verbose=0)
    assert_trained(model)
    print(f"validation accuracy: {results['accuracy']:.4f} ({class_names})")
    return results


if __name__ == "__main__":
    main()
