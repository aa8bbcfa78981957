"""Resumable training checkpoints (Orbax) and per-process input, on one
process and any backend. Several processes: tests/multiprocess."""

import os

import keras
import numpy as np
import pytest

from keras_vmoe.training import tf_data
from keras_vmoe.training.checkpoint import TrainingCheckpoint
from keras_vmoe.training.checkpoint import fit_resumable
from keras_vmoe.training.checkpoint import latest_step
from keras_vmoe.training.checkpoint import read_model_config
from keras_vmoe.training.checkpoint import restore

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (48, 16, 16, 3), dtype="uint8")
LABELS = np.arange(48) % 3
SETTINGS = {"global_batch_size": 8, "seed": 3}


def _model(num_experts=4, noise=True):
    from keras_vmoe.models import ViTMoEBackbone
    from keras_vmoe.models import ViTMoEImageClassifier

    keras.utils.set_random_seed(0)
    backbone = ViTMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        moe_layers="last-1",
        num_experts=num_experts,
        top_k=2,
        # Router noise draws from a seed generator: its state is part of
        # the checkpoint.
        noisy_gating=noise,
        noise_std=1.0,
    )
    model = ViTMoEImageClassifier(backbone, num_classes=3)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy()],
    )
    return model


def _inputs(augment=True):
    return tf_data.ShardedArrays(
        IMAGES,
        LABELS,
        8,
        16,
        seed=3,
        num_classes=3,
        augment_factory=(
            (
                lambda seed: tf_data.augmentation(
                    16, flip=True, crop_padding=2, seed=seed
                )
            )
            if augment
            else None
        ),
    )


def _weights(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


class _Crash(keras.callbacks.Callback):
    def __init__(self, at_step):
        super().__init__()
        self.at_step = at_step
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.at_step:
            raise RuntimeError("simulated crash")


def test_a_run_resumed_mid_epoch_ends_like_an_uninterrupted_one(tmp_path):
    inputs = _inputs()
    assert inputs.steps_per_epoch == 6

    def run(directory, crash_at=None):
        model = _model()
        checkpoint = TrainingCheckpoint(
            directory, 6, save_every=4, settings=SETTINGS
        )
        callbacks = [_Crash(crash_at)] if crash_at else []
        try:
            history, restored = fit_resumable(
                model, inputs.dataset, 2, checkpoint, callbacks=callbacks,
                verbose=0,
            )
        finally:
            checkpoint.close()
        return model, history, restored

    straight, history, restored = run(str(tmp_path / "a"))
    assert restored is None and len(history["loss"]) == 2
    # Saved every 4 steps and at every epoch end: 4, 6, 8, 12 (2 kept).
    assert latest_step(tmp_path / "a") == 12
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(str(tmp_path / "b"), crash_at=7)  # dies at step 7
    assert latest_step(tmp_path / "b") == 6
    crashed = _model()
    restore(crashed, tmp_path / "b")
    resumed, history, restored = run(str(tmp_path / "b"))
    assert restored == 6 and len(history["loss"]) == 1
    differences = [
        np.abs(a - b).max() for a, b in zip(_weights(straight), _weights(resumed))
    ]
    assert max(differences) < 1e-5, max(differences)
    # The control: the state at step 6 is far from the final one.
    gap = max(
        np.abs(a - b).max()
        for a, b in zip(_weights(straight), _weights(crashed))
    )
    assert gap > 1e-3


def test_resuming_mid_epoch_reads_the_remaining_batches(tmp_path):
    inputs = _inputs()
    dataset = inputs.dataset(1)
    full = list(dataset.as_numpy_iterator())
    if keras.backend.backend() != "tensorflow":
        # Keras' JAX and torch trainers may iterate a dataset once to build
        # the model, then to train: a second pass must give the same
        # augmented batches.
        again = list(dataset.as_numpy_iterator())
        for (x, _), (x_again, _) in zip(full, again):
            np.testing.assert_array_equal(x, x_again)
    tail = list(inputs.dataset(1, start_step=4).as_numpy_iterator())
    assert len(full) == 6 and len(tail) == 2
    for (x, y), (x_tail, y_tail) in zip(full[4:], tail):
        np.testing.assert_array_equal(x, x_tail)  # augmentation included
        np.testing.assert_array_equal(y, y_tail)
    other_epoch = next(inputs.dataset(0).as_numpy_iterator())[0]
    assert np.abs(other_epoch - full[0][0]).max() > 1


@pytest.mark.parametrize("processes", [2, 4])
def test_process_batches_assemble_the_one_process_batch(processes):
    one = tf_data.ShardedArrays(IMAGES, LABELS, 8, 16, seed=5)
    parts = [
        tf_data.ShardedArrays(
            IMAGES, LABELS, 8, 16, seed=5,
            process_index=index, process_count=processes,
        )
        for index in range(processes)
    ]
    assert parts[0].local_batch_size == 8 // processes
    whole = one.indices(2)
    np.testing.assert_array_equal(
        np.concatenate([part.indices(2) for part in parts], axis=1), whole
    )
    # Every image of the epoch's batches is read by exactly one process.
    assert len(set(whole.ravel().tolist())) == whole.size == 48


def test_sharded_arrays_errors():
    with pytest.raises(ValueError, match="multiple of the number of proc"):
        tf_data.ShardedArrays(
            IMAGES, LABELS, 6, 16, process_index=0, process_count=4
        )
    with pytest.raises(ValueError, match="larger than the dataset"):
        tf_data.ShardedArrays(IMAGES, LABELS, 64, 16)
    with pytest.raises(ValueError, match="start_step"):
        tf_data.ShardedArrays(IMAGES, LABELS, 8, 16).dataset(0, 6)
    with pytest.raises(ValueError, match="labels"):
        tf_data.ShardedArrays(IMAGES, LABELS + 5, 8, 16, num_classes=3)


def test_an_unfinished_save_is_never_the_latest(tmp_path):
    model = _model(noise=False)
    checkpoint = TrainingCheckpoint(tmp_path, 6, settings=SETTINGS)
    fit_resumable(model, _inputs().dataset, 1, checkpoint, verbose=0)
    checkpoint.close()
    assert latest_step(tmp_path) == 6
    # What a process killed while saving step 9 leaves behind.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1796620000"
    partial.mkdir()
    (partial / "pytree").mkdir()
    assert latest_step(tmp_path) == 6
    assert restore(_model(noise=False), tmp_path)["step"] == 6
    config = read_model_config(tmp_path)
    assert config["class_name"] == "ViTMoEImageClassifier"


def test_restore_refuses_what_does_not_match(tmp_path):
    model = _model(noise=False)
    checkpoint = TrainingCheckpoint(tmp_path, 6, settings=SETTINGS)
    fit_resumable(model, _inputs().dataset, 1, checkpoint, verbose=0)
    checkpoint.close()
    with pytest.raises(ValueError, match="global_batch_size: checkpoint 8"):
        restore(
            _model(noise=False), tmp_path,
            settings={"global_batch_size": 16, "seed": 3},
        )
    with pytest.raises(ValueError, match="expert_kernel_1"):
        restore(_model(num_experts=2, noise=False), tmp_path)
    uncompiled = _model(noise=False)
    uncompiled.optimizer = None
    with pytest.raises(ValueError, match="compiled model"):
        restore(uncompiled, tmp_path)
    with pytest.raises(ValueError, match="no finished step 5"):
        restore(_model(noise=False), tmp_path, step=5)
    fresh = TrainingCheckpoint(tmp_path, 6, settings=SETTINGS)
    with pytest.raises(ValueError, match="resume=False"):
        fit_resumable(
            _model(noise=False), _inputs().dataset, 1, fresh, resume=False
        )
    assert restore(_model(noise=False), tmp_path / "none") is None
    assert latest_step(tmp_path / "none") is None


def test_weights_only_restore_into_an_uncompiled_model(tmp_path):
    model = _model(noise=False)
    checkpoint = TrainingCheckpoint(tmp_path, 6, settings=SETTINGS)
    fit_resumable(model, _inputs().dataset, 1, checkpoint, verbose=0)
    checkpoint.close()
    copy = _model(noise=False)
    restore(copy, tmp_path, optimizer=False)
    images = IMAGES[:4].astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(copy.predict(images, verbose=0)),
        keras.ops.convert_to_numpy(model.predict(images, verbose=0)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_checkpoint_argument_errors(tmp_path):
    for kwargs, name in (
        (dict(steps_per_epoch=0), "steps_per_epoch"),
        (dict(steps_per_epoch=2, save_every=0), "save_every"),
        (dict(steps_per_epoch=2, max_to_keep=0), "max_to_keep"),
    ):
        with pytest.raises(ValueError, match=name):
            TrainingCheckpoint(tmp_path, **kwargs)
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match="folder, not a file"):
        TrainingCheckpoint(path, 2)
    with pytest.raises(TypeError, match="TrainingCheckpoint"):
        fit_resumable(_model(), _inputs().dataset, 1, "folder")
