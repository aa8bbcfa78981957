"""Input pipelines on `tf.data` — the one module of keras_vmoe that imports
TensorFlow (and `tensorflow_datasets`).

`tf.data` feeds `model.fit` on every Keras backend (JAX and PyTorch included),
so the pipelines are backend-neutral even though they are built with
TensorFlow. Layers and models never import it.

Images come out as float32 in [0, 255] unless `normalize` says otherwise:
keras-vmoe classifiers normalise inside their preprocessor, as KerasHub
models do.
"""

import os

import numpy as np
import tensorflow as tf

from keras_vmoe.models.normalization import IMAGENET_MEAN
from keras_vmoe.models.normalization import IMAGENET_STD

# ImageNet statistics in pixel units ([0, 255] images).
IMAGENET_MEAN = tuple(255 * mean for mean in IMAGENET_MEAN)
IMAGENET_STD = tuple(255 * std for std in IMAGENET_STD)
NORMALIZATIONS = (None, "imagenet", "unit")

# Out-of-distribution ImageNet test sets, by tfds name, with their split.
OOD_DATASETS = {
    "imagenet_v2": "test",
    "imagenet_a": "test",
    "imagenet_r": "test",
    "imagenet_sketch": "test",
}


def _check_args(image_size, batch_size, normalize):
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(
            "`image_size` must be a positive integer. Received: "
            f"image_size={image_size!r}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            "`batch_size` must be a positive integer. Received: "
            f"batch_size={batch_size!r}"
        )
    if isinstance(normalize, dict):
        # {"mean", "std"} of `keras_vmoe.models.preset_normalization`.
        from keras_vmoe.models.normalization import normalization_scale_offset

        if set(normalize) != {"mean", "std"}:
            raise ValueError(
                "A `normalize` dict must have exactly the keys 'mean' and "
                f"'std'. Received: normalize={normalize!r}"
            )
        normalization_scale_offset(normalize["mean"], normalize["std"])
    elif normalize not in NORMALIZATIONS:
        raise ValueError(
            f"`normalize` must be one of {NORMALIZATIONS} or a "
            "`{'mean': ..., 'std': ...}` dict (`keras_vmoe.models."
            f"preset_normalization(name)`). Received: normalize={normalize!r}"
        )


def check_labels(labels, num_classes=None):
    """Integer class ids [N] in `[0, num_classes)` (>= 0 without it).

    Raises:
        ValueError: naming `labels` and the first bad value, or
            `num_classes`.
    """
    if num_classes is not None and (
        not isinstance(num_classes, (int, np.integer))
        or isinstance(num_classes, bool)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer or None. Received: "
            f"num_classes={num_classes!r}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            "`labels` must be integer class ids of shape [N]. Received: "
            f"labels with shape {labels.shape}"
        )
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            bad = labels[~whole][0]
            raise ValueError(
                "`labels` must be integer class ids. Received: a label "
                f"{bad!r} in labels"
            )
    elif labels.dtype.kind not in "iub":
        raise ValueError(
            "`labels` must be integer class ids. Received: labels of dtype "
            f"{labels.dtype}"
        )
    upper = np.inf if num_classes is None else num_classes
    outside = (labels < 0) | (labels >= upper)
    if outside.any():
        bad = labels[outside][0].item()
        raise ValueError(
            f"`labels` must be in [0, {upper}) (num_classes="
            f"{num_classes}). Received: a label {bad!r} in labels, at "
            f"index {int(np.argmax(outside))}"
        )


def _normalize(images, normalize):
    if isinstance(normalize, dict):
        mean = tuple(255.0 * float(value) for value in normalize["mean"])
        std = tuple(255.0 * float(value) for value in normalize["std"])
        return (images - mean) / std
    if normalize == "imagenet":
        return (images - IMAGENET_MEAN) / IMAGENET_STD
    if normalize == "unit":
        return images / 255.0
    return images


def _prepare_image(image, image_size, training, channels, crop_fraction):
    """uint8 HxWxC -> float32 image_size x image_size x channels.

    Training: plain resize (random crops and flips are augmentation).
    Evaluation: resize the short side to image_size / crop_fraction, then
    centre crop (0.875 is the standard ImageNet evaluation transform; 1.0
    keeps the whole image).
    """
    image = tf.cast(image, "float32")
    if image.shape.rank == 2:
        image = image[..., None]
    if channels == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    if training or crop_fraction == 1.0:
        return tf.image.resize(image, (image_size, image_size))
    shape = tf.cast(tf.shape(image)[:2], "float32")
    scale = image_size / crop_fraction / tf.reduce_min(shape)
    resized = tf.cast(tf.round(shape * scale), "int32")
    image = tf.image.resize(image, resized)
    return tf.image.resize_with_crop_or_pad(image, image_size, image_size)


def _one_hot(labels, num_classes):
    """One-hot labels; a label outside [0, num_classes) raises (tf.one_hot
    would silently give it an all-zero row)."""
    labels = tf.cast(labels, "int32")
    in_range = tf.reduce_all((labels >= 0) & (labels < num_classes))
    check = tf.debugging.Assert(
        in_range,
        [
            f"Labels must be in [0, num_classes) with num_classes="
            f"{num_classes}. Received labels:",
            labels,
        ],
        summarize=16,
    )
    with tf.control_dependencies([check]):
        return tf.one_hot(labels, num_classes)


def _finish(
    dataset,
    image_size,
    batch_size,
    training,
    normalize,
    channels,
    augment,
    shuffle_buffer,
    seed,
    num_classes,
    crop_fraction,
):
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(
            "`crop_fraction` must be in (0, 1]. Received: "
            f"crop_fraction={crop_fraction!r}"
        )
    if training and shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)

    def prepare(image, label):
        image = _prepare_image(
            image, image_size, training, channels, crop_fraction
        )
        return image, label

    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch_size, drop_remainder=bool(training))
    if num_classes is not None:
        dataset = dataset.map(lambda x, y: (x, _one_hot(y, num_classes)))
    if augment is not None and training:
        dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(
        lambda x, y: (_normalize(x, normalize), y),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def tfds_dataset(
    name,
    split="train",
    image_size=224,
    batch_size=32,
    training=None,
    data_dir=None,
    download=False,
    normalize=None,
    channels=3,
    augment=None,
    num_classes=None,
    shuffle_buffer=10_000,
    seed=None,
    crop_fraction=0.875,
):
    """A `tensorflow_datasets` image-classification split, ready for `fit`.

    Args:
        name: tfds name, e.g. "imagenet2012", "cifar100", "mnist", or an
            OOD set ("imagenet_v2", "imagenet_a", "imagenet_r",
            "imagenet_sketch").
        split: tfds split string ("train", "validation", "test[:10%]" ...).
        image_size: output side length.
        batch_size: batch size (training batches drop the remainder).
        training: shuffle + training transform; default: `split` starts
            with "train".
        data_dir: where tfds looks for prepared data.
        download: let tfds download and prepare missing data. False by
            default: a missing dataset then fails at once with a clear error
            instead of trying the network.
        normalize: None (values in [0, 255]), "imagenet" (mean / std),
            "unit" ([0, 1]), or a preset's statistics
            `keras_vmoe.models.preset_normalization(name)`.
        channels: 3 (grayscale is converted to RGB) or 1.
        augment: optional function `(images, labels) -> (images, labels)`
            applied to training batches (see `augmentation`).
        num_classes: if given, labels are one-hot encoded (needed by MixUp
            and CutMix).
        shuffle_buffer: shuffle buffer size for training.
        seed: shuffle seed.
        crop_fraction: evaluation centre-crop fraction (0.875 for
            ImageNet-style data, 1.0 for small centred images like MNIST).

    Returns:
        A batched, prefetched `tf.data.Dataset` of `(images, labels)`.

    Raises:
        ValueError: if the dataset or split is not available locally.
    """
    import tensorflow_datasets as tfds

    _check_args(image_size, batch_size, normalize)
    if training is None:
        training = split.startswith("train")
    try:
        dataset = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=download,
            as_supervised=True,
            shuffle_files=bool(training),
        )
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as error:
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
        raise ValueError(
            f"tfds dataset {name!r} (split {split!r}) is not available in "
            f"{where}. Prepare it first (`tfds build {name}`, or pass "
            "download=True where the network is reachable), or pass "
            f"data_dir=... Received: name={name!r}, split={split!r}, "
            f"download={download}"
        ) from error
    return _finish(
        dataset,
        image_size,
        batch_size,
        training,
        normalize,
        channels,
        augment,
        shuffle_buffer,
        seed,
        num_classes,
        crop_fraction,
    )


def image_folder_dataset(
    directory,
    image_size=224,
    batch_size=32,
    training=True,
    validation_split=None,
    subset=None,
    normalize=None,
    channels=3,
    augment=None,
    num_classes=None,
    shuffle_buffer=1_000,
    seed=0,
    crop_fraction=0.875,
):
    """Images laid out as `directory/<class name>/<image file>`.

    Class indices follow the sorted class-folder names. Args as
    `tfds_dataset`; `validation_split` and `subset` ("training" or
    "validation") split the folder reproducibly with `seed`.

    Returns:
        `(dataset, class_names)`.
    """
    _check_args(image_size, batch_size, normalize)
    if not os.path.isdir(directory):
        raise ValueError(
            f"`directory` must be a folder of class folders. Received: "
            f"directory={directory!r}"
        )
    files = tf.keras.utils.image_dataset_from_directory(
        directory,
        labels="inferred",
        label_mode="int",
        color_mode="rgb" if channels == 3 else "grayscale",
        batch_size=None,
        image_size=(image_size, image_size),
        crop_to_aspect_ratio=True,
        # Shuffles the file list once, with `seed`: the validation split
        # then samples every class, and the order is reproducible.
        shuffle=True,
        validation_split=validation_split,
        subset=subset,
        seed=seed,
    )
    class_names = files.class_names
    return (
        _finish(
            files,
            image_size,
            batch_size,
            training,
            normalize,
            channels,
            augment,
            shuffle_buffer,
            seed,
            num_classes,
            crop_fraction,
        ),
        class_names,
    )


def array_dataset(
    images,
    labels,
    image_size,
    batch_size=32,
    training=True,
    normalize=None,
    channels=3,
    augment=None,
    num_classes=None,
    shuffle_buffer=10_000,
    seed=None,
    crop_fraction=0.875,
):
    """The same pipeline over in-memory uint8 arrays ([N, H, W(, C)]).

    Labels are integer class ids [N]; with `num_classes` they must lie in
    `[0, num_classes)` (a ValueError names the first one that does not:
    `tf.one_hot` would turn it into an all-zero target).
    """
    _check_args(image_size, batch_size, normalize)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim not in (3, 4) or not len(images):
        raise ValueError(
            "`images` must be a non-empty array [N, H, W] or [N, H, W, C]. "
            f"Received: images with shape {images.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            "`images` and `labels` must have the same length. Received: "
            f"len(images)={len(images)}, len(labels)={len(labels)}"
        )
    check_labels(labels, num_classes)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    return _finish(
        dataset,
        image_size,
        batch_size,
        training,
        normalize,
        channels,
        augment,
        shuffle_buffer,
        seed,
        num_classes,
        crop_fraction,
    )


def augmentation(
    image_size,
    flip=True,
    crop_padding=0,
    rand_augment=False,
    rand_augment_magnitude=0.5,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    random_erasing=0.0,
    value_range=(0, 255),
    seed=None,
):
    """Batch augmentation from Keras core preprocessing layers.

    Keras core has everything the papers' recipes use (DeiT / ConvNeXt:
    RandAugment, MixUp, CutMix, RandomErasing, flips, crops), so keras-cv is
    not needed.

    Args:
        image_size: side of the (square) training images.
        flip: random horizontal flips (turn off for digits and text).
        crop_padding: if > 0, pad by this many pixels and crop back at a
            random position (the CIFAR / MNIST "random crop").
        rand_augment: apply RandAugment with `rand_augment_magnitude`.
        mixup_alpha / cutmix_alpha: > 0 enables MixUp / CutMix. When both
            are on, each batch uses one of them, chosen at random (as timm).
            Labels must be one-hot: pass `num_classes` to the pipeline.
        random_erasing: RandomErasing factor (0 = off).
        value_range: pixel range of the incoming images.
        seed: seed of the random layers.

    Returns:
        A function `(images, labels) -> (images, labels)` for batches,
        to pass as `augment=` to the pipelines above.
    """
    import keras

    image_layers = []
    if flip:
        image_layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if crop_padding:
        pad = [[0, 0], [crop_padding] * 2, [crop_padding] * 2, [0, 0]]
        image_layers.append(lambda images, training: tf.pad(images, pad))
        image_layers.append(
            keras.layers.RandomCrop(image_size, image_size, seed=seed)
        )
    if rand_augment:
        image_layers.append(
            keras.layers.RandAugment(
                value_range=value_range,
                factor=rand_augment_magnitude,
                seed=seed,
            )
        )
    if random_erasing:
        image_layers.append(
            keras.layers.RandomErasing(
                factor=random_erasing, value_range=value_range, seed=seed
            )
        )
    mixers = []
    if mixup_alpha:
        mixers.append(keras.layers.MixUp(alpha=mixup_alpha, seed=seed))
    if cutmix_alpha:
        mixers.append(keras.layers.CutMix(factor=cutmix_alpha, seed=seed))

    def mix(mixer, images, labels):
        mixed = mixer({"images": images, "labels": labels})
        return mixed["images"], mixed["labels"]

    def apply(images, labels):
        for layer in image_layers:
            images = layer(images, training=True)
        if len(mixers) == 1:
            return mix(mixers[0], images, labels)
        if len(mixers) == 2:
            return tf.cond(
                tf.random.uniform((), seed=seed) < 0.5,
                lambda: mix(mixers[0], images, labels),
                lambda: mix(mixers[1], images, labels),
            )
        return images, labels

    return apply


class ShardedArrays:
    """This process's part of every global batch of in-memory images.

    For training with several processes (`keras_vmoe.cluster`), and
    resumable training on one: every global batch is a fixed function of
    `(seed, epoch, step)`.

    - Epoch `e` visits the images in the order of a permutation drawn from
      `numpy.random.default_rng([seed, e])` (`shuffle=False`: in order);
      the last incomplete global batch is dropped.
    - Global batch `j` holds rows `[j*B, (j+1)*B)` of that order. Process
      `p` of `n` reads only rows `[j*B + p*B/n, j*B + (p+1)*B/n)`: the rows
      its devices hold in the global array (`jax.make_array_from_process_
      local_data`, which Keras uses when the distribution's
      `auto_shard_dataset` is False). So the global batches do not depend
      on the number of processes, and a run resumed at `(epoch, step)`
      reads exactly the batches the uninterrupted run would have read.
    - Augmentation (`augment_factory(seed) -> augment`) is created for
      every epoch (on JAX and torch for every pass, see `dataset`) with a
      seed derived from `(seed, epoch, process)`, and runs in order; a
      resumed epoch augments the batches it skips, so its random draws
      match the uninterrupted run's.

    Args:
        images: uint8 array [N, H, W] or [N, H, W, C].
        labels: integer class ids [N].
        global_batch_size: images per step over all processes; a multiple
            of the number of processes.
        image_size: side of the square images the model takes.
        seed: the order's seed.
        shuffle: permute every epoch (training) or keep the order.
        num_classes: one-hot labels with this many classes (else ids).
        channels: 1 or 3 (grayscale images are repeated to 3).
        augment_factory: optional `seed -> (images, labels) -> (images,
            labels)` batch augmentation (see `augmentation`).
        process_index, process_count: default: this process in the current
            cluster (`keras_vmoe.cluster`).
    """

    def __init__(
        self,
        images,
        labels,
        global_batch_size,
        image_size,
        *,
        seed=0,
        shuffle=True,
        num_classes=None,
        channels=3,
        augment_factory=None,
        process_index=None,
        process_count=None,
    ):
        from keras_vmoe import cluster

        _check_args(image_size, global_batch_size, None)
        self.images, self.labels = np.asarray(images), np.asarray(labels)
        if self.images.ndim not in (3, 4) or len(self.images) != len(
            self.labels
        ):
            raise ValueError(
                "`images` must be [N, H, W] or [N, H, W, C] with one label "
                f"each. Received: images with shape {self.images.shape}, "
                f"{len(self.labels)} labels"
            )
        check_labels(self.labels, num_classes)
        count = cluster.process_count() if process_count is None else (
            process_count
        )
        index = cluster.process_index() if process_index is None else (
            process_index
        )
        if global_batch_size % count:
            raise ValueError(
                "`global_batch_size` must be a multiple of the number of "
                f"processes ({count}): every process reads the same number "
                f"of images per step. Received: global_batch_size="
                f"{global_batch_size}"
            )
        self.steps_per_epoch = len(self.images) // global_batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"`global_batch_size` ({global_batch_size}) is larger than "
                f"the dataset ({len(self.images)} images): no step would "
                "run. Lower it."
            )
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // count
        self.process_index, self.process_count = index, count
        self.image_size, self.seed, self.shuffle = image_size, seed, shuffle
        self.num_classes, self.channels = num_classes, channels
        self.augment_factory = augment_factory

    def indices(self, epoch, start_step=0):
        """This process's image indices, [steps - start_step, local batch]."""
        order = np.arange(len(self.images))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.images)
            )
        steps = self.steps_per_epoch
        batches = order[: steps * self.global_batch_size].reshape(steps, -1)
        start = self.process_index * self.local_batch_size
        return batches[start_step:, start : start + self.local_batch_size]

    def dataset(self, epoch, start_step=0):
        """`tf.data` of this process's batches of `epoch`, from
        `start_step` on (`steps_per_epoch - start_step` batches).

        With augmentation, the batches of one `fit` call are those of a
        fresh pass. Keras' JAX and torch trainers may iterate a dataset
        once to build the model and again to train it, and a random layer's
        state would carry over from the first pass: there (they read
        `tf.data` through Python anyway) every pass creates the
        augmentation afresh from its seed. TensorFlow's trainer reads the
        pipeline in graph, in one pass per `fit` call; one augmentation
        serves it.
        """
        if not 0 <= start_step < self.steps_per_epoch:
            raise ValueError(
                f"`start_step` must be in [0, {self.steps_per_epoch}). "
                f"Received: start_step={start_step}"
            )
        if self.augment_factory is None:
            return self._batches(epoch, start_step, None).prefetch(
                tf.data.AUTOTUNE
            )
        seed = int(
            np.random.default_rng(
                [self.seed, epoch, self.process_index]
            ).integers(2**31)
        )

        def augmented():
            import keras

            # The augmentation's random state belongs to this process's
            # input pipeline, not to the (distributed) model.
            distribution = keras.distribution.distribution()
            keras.distribution.set_distribution(None)
            try:
                augment = self.augment_factory(seed)
            finally:
                keras.distribution.set_distribution(distribution)
            return self._batches(epoch, start_step, augment)

        import keras

        if keras.backend.backend() == "tensorflow":
            return augmented().prefetch(tf.data.AUTOTUNE)
        spec = self._batches(epoch, start_step, None).element_spec
        return tf.data.Dataset.from_generator(
            lambda: augmented().as_numpy_iterator(), output_signature=spec
        ).prefetch(tf.data.AUTOTUNE)

    def _batches(self, epoch, start_step, augment):
        first = 0 if augment is not None else start_step
        rows = self.indices(epoch, first)
        images = self.images[rows.ravel()]
        labels = self.labels[rows.ravel()]
        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
        size, channels = self.image_size, self.channels

        def prepare(image, label):
            return _prepare_image(image, size, True, channels, 1.0), label

        dataset = dataset.map(prepare).batch(
            self.local_batch_size, drop_remainder=True
        )
        if self.num_classes is not None:
            classes = self.num_classes
            dataset = dataset.map(lambda x, y: (x, _one_hot(y, classes)))
        if augment is not None:
            # In order, so the random draws are reproducible; the skipped
            # batches of a resumed epoch are augmented too.
            dataset = dataset.map(augment).skip(start_step)
        return dataset
