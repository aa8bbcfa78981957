"""Input pipelines: arrays, image folders, tfds (mocked), augmentation."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_vmoe.training import tf_data

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (10, 12, 12), dtype="uint8")
LABELS = np.arange(10) % 3


def _first_batch(dataset):
    images, labels = next(iter(dataset))
    return images.numpy(), labels.numpy()


def test_array_dataset_resizes_converts_to_rgb_and_batches():
    dataset = tf_data.array_dataset(
        IMAGES, LABELS, image_size=16, batch_size=4, training=False,
        normalize="unit",
    )
    images, labels = _first_batch(dataset)
    assert images.shape == (4, 16, 16, 3)
    assert 0.0 <= images.min() and images.max() <= 1.0
    np.testing.assert_array_equal(labels, LABELS[:4])  # eval: not shuffled
    assert sum(1 for _ in dataset) == 3  # 4 + 4 + 2: nothing dropped


def test_training_batches_drop_the_remainder_and_one_hot():
    dataset = tf_data.array_dataset(
        IMAGES, LABELS, image_size=12, batch_size=4, num_classes=3, seed=0
    )
    assert sum(1 for _ in dataset) == 2
    _, labels = _first_batch(dataset)
    assert labels.shape == (4, 3)
    np.testing.assert_array_equal(labels.sum(-1), 1.0)


@pytest.mark.parametrize("bad_label", [3, -1])
def test_labels_outside_num_classes_raise(bad_label):
    # tf.one_hot alone would give such a label an all-zero row; arrays are
    # checked when the dataset is made, naming the label and its index.
    labels = LABELS.copy()
    labels[1] = bad_label
    with pytest.raises(ValueError, match=rf"num_classes=3.*label {bad_label}"):
        tf_data.array_dataset(
            IMAGES, labels, image_size=12, batch_size=4, num_classes=3,
            training=False,
        )


def test_imagenet_normalisation():
    images = np.full((2, 4, 4, 3), 255, "uint8")
    dataset = tf_data.array_dataset(
        images, [0, 1], image_size=4, batch_size=2, training=False,
        normalize="imagenet", crop_fraction=1.0,
    )
    batch, _ = _first_batch(dataset)
    np.testing.assert_allclose(
        batch[0, 0, 0], (1 - np.array([0.485, 0.456, 0.406])) / [0.229, 0.224, 0.225],
        rtol=1e-5,
    )


def test_eval_centre_crop_zooms_by_crop_fraction():
    # A white square in the centre: the 0.5 crop keeps only white pixels.
    image = np.zeros((1, 16, 16), "uint8")
    image[:, 4:12, 4:12] = 255
    dataset = tf_data.array_dataset(
        image, [0], image_size=8, batch_size=1, training=False, crop_fraction=0.5,
    )
    batch, _ = _first_batch(dataset)
    np.testing.assert_allclose(batch, 255.0, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=0), "image_size=0"),
        (dict(batch_size=-2), "batch_size=-2"),
        (dict(normalize="zscore"), "normalize='zscore'"),
        (dict(crop_fraction=1.5), "crop_fraction=1.5"),
    ],
)
def test_bad_pipeline_arguments(kwargs, message):
    kwargs = dict(dict(image_size=12, batch_size=2), **kwargs)
    with pytest.raises(ValueError, match=message):
        tf_data.array_dataset(IMAGES, LABELS, **kwargs)


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for class_name, value in (("cat", 10), ("dog", 200)):
        os.makedirs(tmp_path / class_name)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), value, "uint8")).save(
                tmp_path / class_name / f"{i}.png"
            )
    dataset, class_names = tf_data.image_folder_dataset(
        str(tmp_path), image_size=8, batch_size=6, training=False
    )
    images, labels = _first_batch(dataset)
    assert class_names == ["cat", "dog"]
    assert images.shape == (6, 8, 8, 3)
    np.testing.assert_allclose(images[labels == 0], 10, atol=1e-3)
    np.testing.assert_allclose(images[labels == 1], 200, atol=1e-3)


def test_image_folder_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="directory=.*nowhere"):
        tf_data.image_folder_dataset(str(tmp_path / "nowhere"))


def test_tfds_dataset_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        dataset = tf_data.tfds_dataset(
            "mnist", split="train", image_size=16, batch_size=4, seed=0
        )
        images, labels = _first_batch(dataset)
    assert images.shape == (4, 16, 16, 3)
    assert labels.shape == (4,)


def test_tfds_missing_data_fails_fast_with_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'mnist'.*not available.*tfds build mnist"):
        tf_data.tfds_dataset("mnist", data_dir=str(tmp_path), download=False)


def test_tfds_unknown_name():
    with pytest.raises(ValueError, match="'no_such_dataset_xyz'"):
        tf_data.tfds_dataset("no_such_dataset_xyz")


def test_ood_sets_load_through_the_same_function():
    with tfds.testing.mock_data(num_examples=4):
        for name, split in tf_data.OOD_DATASETS.items():
            dataset = tf_data.tfds_dataset(
                name, split=split, image_size=8, batch_size=2
            )
            images, _ = _first_batch(dataset)
            assert images.shape == (2, 8, 8, 3)


def test_augmentation_mixes_labels_and_keeps_shapes():
    augment = tf_data.augmentation(
        12, flip=True, crop_padding=2, rand_augment=True, mixup_alpha=0.8,
        cutmix_alpha=1.0, random_erasing=0.25, seed=1,
    )
    dataset = tf_data.array_dataset(
        IMAGES, LABELS, image_size=12, batch_size=8, num_classes=3,
        augment=augment, seed=0,
    )
    images, labels = _first_batch(dataset)
    assert images.shape == (8, 12, 12, 3)
    assert np.isfinite(images).all()
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-5)
    assert ((labels > 0) & (labels < 1)).any(), "labels were not mixed"
