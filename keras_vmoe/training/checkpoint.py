"""Sharded, resumable training checkpoints on Orbax.

A checkpoint folder holds one sub-folder per saved step. Each step holds:

- `variables`: every model variable (trainable weights, non-trainable
  state such as normalization statistics and the random-seed states of
  dropout and router noise), by variable path;
- `optimizer`: every optimizer variable (slots, iteration count, loss
  scale);
- metadata: the global step, epoch, step in the epoch, steps per epoch and
  the run's `settings` (global batch size, seed, ...).

The folder's root metadata holds the model's Keras config, so
`export_preset` can rebuild the model without the training code.

With several processes (`keras_vmoe.cluster`), every process writes the
shards its devices hold; nothing is gathered on one host. Orbax writes a
step into a temporary folder and renames it once every process has
finished, so an interrupted save is never taken for a checkpoint
(`latest_step` lists only finished steps). Restoring reads every array
into the layout of the variables it restores into: a checkpoint written
on 2 processes x 4 devices restores on 1 process with 4 devices, 1 device
or any other mesh.

`fit_resumable` drives `model.fit` with these checkpoints: it restores the
latest one (weights, optimizer, step) and continues from the exact batch
(see `keras_vmoe.training.tf_data.ShardedArrays`).
"""

import json
import logging
import os
import re

import keras
import numpy as np

VARIABLES = "variables"
OPTIMIZER = "optimizer"
FORMAT = "keras_vmoe.training_checkpoint.v1"


def _orbax():
    """`orbax.checkpoint.v1` (the API Keras' own Orbax callback uses)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise ImportError(
            "Training checkpoints need orbax-checkpoint: `pip install "
            "orbax-checkpoint` (a dependency of keras-vmoe)."
        ) from error
    return ocp.v1


def _key(index):
    return f"{index:06d}"


def _flat(variables, numpy):
    """`{"000000": value, ...}` in the order of `variables`.

    Keys are positions, not variable paths: paths carry counters of
    auto-generated names (`seed_generator_7`, `adamw_2`) that differ
    between two instances of the same model. The paths are recorded in
    the metadata for the checks and messages of `restore`.
    """
    return {
        _key(index): (
            keras.ops.convert_to_numpy(variable.value)
            if numpy
            else variable.value
        )
        for index, variable in enumerate(variables)
    }


def _signature(variables):
    """`[[path, shape], ...]`, recorded with every step."""
    return [
        [variable.path, [int(d) for d in variable.shape]]
        for variable in variables
    ]


_COUNTER = re.compile(r"_\d+$")


def _same_path(saved, current):
    """Paths agree up to the counters of auto-generated names."""
    strip = lambda path: [_COUNTER.sub("", part) for part in path.split("/")]
    return strip(saved) == strip(current)


def _check_signature(saved, variables, what, directory):
    current = _signature(variables)
    if len(saved) != len(current):
        raise ValueError(
            f"The checkpoint holds {len(saved)} {what} variables, the "
            f"model {len(current)}: it was written by a different model, "
            "optimizer or configuration. Received: "
            f"directory={directory!r}"
        )
    for (saved_path, saved_shape), (path, shape) in zip(saved, current):
        if list(saved_shape) != shape or not _same_path(saved_path, path):
            raise ValueError(
                f"The checkpoint's {what} variable {saved_path!r} "
                f"{tuple(saved_shape)} does not match the model's {path!r} "
                f"{tuple(shape)}: it was written by a different model, "
                "optimizer or configuration. Received: "
                f"directory={directory!r}"
            )


def _on_jax():
    return keras.backend.backend() == "jax"


def _state(model, optimizer=True):
    """The tree that is saved: backend arrays on JAX (sharded, never
    gathered), NumPy on the other backends."""
    numpy = not _on_jax()
    if _on_jax() and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    state = {VARIABLES: _flat(model.variables, numpy)}
    if optimizer:
        state[OPTIMIZER] = _flat(model.optimizer.variables, numpy)
    return state


def _target(value):
    """A restore target in the layout of `value` (a variable's value)."""
    import jax

    if _on_jax():
        return jax.ShapeDtypeStruct(
            value.shape, value.dtype, sharding=value.sharding
        )
    return jax.ShapeDtypeStruct(
        tuple(value.shape),
        np.dtype(keras.backend.standardize_dtype(value.dtype)),
        sharding=jax.sharding.SingleDeviceSharding(
            jax.local_devices(backend="cpu")[0]
        ),
    )


def _check_directory(directory):
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            "The checkpoint directory must be a folder, not a file. "
            f"Received: directory={directory!r}"
        )
    return os.path.abspath(directory)


def _checkpointer(directory, model_config=None):
    ocp = _orbax()
    kwargs = {}
    if model_config is not None:
        kwargs["custom_metadata"] = {
            "format": FORMAT,
            "model_config": model_config,
        }
    return ocp.training.Checkpointer(directory, **kwargs)


def latest_step(directory):
    """The last finished step in `directory`, or None (no checkpoint).

    Unfinished saves (temporary folders of a process that died) are never
    returned.
    """
    directory = _check_directory(directory)
    if not os.path.isdir(directory):
        return None
    checkpointer = _checkpointer(directory)
    try:
        latest = checkpointer.latest
        return None if latest is None else int(latest.step)
    finally:
        checkpointer.close()


class _QuietMetadataWarning(logging.Filter):
    """Orbax warns that a step folder has no TensorStore files when it
    reads a step's metadata (they are one level down): not a fault."""

    def filter(self, record):
        return "TensorStore data files not found" not in record.getMessage()


def _step_metadata(checkpointer, step, directory):
    """`(custom metadata, array tree metadata)` of a finished step."""
    finished = [int(metadata.step) for metadata in checkpointer.checkpoints]
    if step not in finished:
        raise ValueError(
            f"The checkpoint folder has no finished step {step}. Finished "
            f"steps: {finished}. Received: directory={directory!r}, "
            f"step={step}"
        )
    quiet = _QuietMetadataWarning()
    logging.getLogger().addFilter(quiet)
    try:
        metadata = checkpointer.pytree_metadata(step)
    finally:
        logging.getLogger().removeFilter(quiet)
    custom = dict(metadata.custom_metadata or {})
    if custom.get("format") != FORMAT:
        raise ValueError(
            f"Step {step} in {directory} is not a keras-vmoe training "
            f"checkpoint (no {FORMAT!r} metadata). Received: "
            f"directory={directory!r}"
        )
    return custom, metadata.metadata


def read_model_config(directory):
    """The Keras config of the model a checkpoint folder was written for."""
    directory = _check_directory(directory)
    if latest_step(directory) is None:
        raise ValueError(
            "No finished checkpoint in this folder. Received: "
            f"directory={directory!r}"
        )
    checkpointer = _checkpointer(directory)
    try:
        root = checkpointer.root_metadata()
    finally:
        checkpointer.close()
    custom = dict(getattr(root, "custom_metadata", None) or {})
    if custom.get("format") != FORMAT or "model_config" not in custom:
        raise ValueError(
            "The checkpoint folder has no keras-vmoe model config (it was "
            "not written by `TrainingCheckpoint`). Received: "
            f"directory={directory!r}"
        )
    return custom["model_config"]


def restore(model, directory, step=None, *, optimizer=True, settings=None):
    """Loads a checkpoint into `model` (in its variables' layouts).

    Args:
        model: a built model; with `optimizer=True`, compiled (its optimizer
            is built here if it is not yet, under the current distribution).
        directory: the checkpoint folder.
        step: a finished step; default: the latest.
        optimizer: also restore the optimizer state.
        settings: optional dict the checkpoint's recorded settings must
            equal (e.g. the global batch size and seed, which fix the data
            order); a differing key is named.

    Returns:
        The step's metadata (`step`, `epoch`, `step_in_epoch`,
        `steps_per_epoch`, `settings`), or None when the folder has no
        finished checkpoint and `step` is None.
    """
    directory = _check_directory(directory)
    if step is None:
        step = latest_step(directory)
        if step is None:
            return None
    if optimizer:
        if getattr(model, "optimizer", None) is None:
            raise ValueError(
                "Restoring the optimizer state needs a compiled model: call "
                "`model.compile(...)` first (or pass optimizer=False)."
            )
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    checkpointer = _checkpointer(directory)
    try:
        metadata, saved = _step_metadata(checkpointer, step, directory)
        if settings is not None:
            _check_settings(metadata.get("settings", {}), settings)
        _check_signature(
            metadata["variables"], model.variables, "model", directory
        )
        target = {
            VARIABLES: {
                _key(index): _target(variable.value)
                for index, variable in enumerate(model.variables)
            }
        }
        if optimizer:
            _check_signature(
                metadata["optimizer"],
                model.optimizer.variables,
                "optimizer",
                directory,
            )
            target[OPTIMIZER] = {
                _key(index): _target(variable.value)
                for index, variable in enumerate(model.optimizer.variables)
            }
        else:
            # Read and dropped: one device each.
            target[OPTIMIZER] = _metadata_target(saved[OPTIMIZER])
        loaded = checkpointer.load_pytree(step, target)
    finally:
        checkpointer.close()
    for index, variable in enumerate(model.variables):
        _assign(variable, loaded[VARIABLES][_key(index)])
    if optimizer:
        for index, variable in enumerate(model.optimizer.variables):
            _assign(variable, loaded[OPTIMIZER][_key(index)])
    return metadata


def _metadata_target(tree):
    """Restore targets for arrays that are read and dropped (one device)."""
    import jax

    device = jax.local_devices()[0]
    if isinstance(tree, dict):
        return {key: _metadata_target(value) for key, value in tree.items()}
    return jax.ShapeDtypeStruct(
        tuple(tree.shape),
        tree.dtype,
        sharding=jax.sharding.SingleDeviceSharding(device),
    )


def _assign(variable, value):
    if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"The checkpoint's {variable.path!r} has shape "
            f"{tuple(value.shape)}, the model's {tuple(variable.shape)}. "
            f"Received: variable {variable.path!r}"
        )
    if not _on_jax():
        value = np.asarray(value)
    variable.assign(value)


def _check_settings(saved, expected):
    differing = {
        key: (saved.get(key), value)
        for key, value in expected.items()
        if saved.get(key) != value
    }
    if differing:
        details = ", ".join(
            f"{key}: checkpoint {old!r}, now {new!r}"
            for key, (old, new) in sorted(differing.items())
        )
        raise ValueError(
            "The checkpoint was written with other settings, and resuming "
            "with these would change the data order or the batches: "
            f"{details}. Use the checkpoint's settings or another folder."
        )


class TrainingCheckpoint(keras.callbacks.Callback):
    """Saves the model and optimizer state every `save_every` steps and at
    every epoch end, asynchronously, with Orbax.

    Training continues while the arrays are written; a new save waits for
    the previous one. Call `wait()` (or `close()`) before reading the
    folder. Every process of a cluster must use the callback with the same
    arguments.

    Args:
        directory: the checkpoint folder (created; shared by every process).
        steps_per_epoch: steps per epoch (locates a step in its epoch).
        save_every: optional number of steps between saves (also saved at
            every epoch end).
        max_to_keep: finished checkpoints kept (the oldest are deleted).
        asynchronous: write in the background (default) or block.
        settings: a JSON-serializable dict recorded with every step (the
            run's global batch size, seed, ...), checked by `restore`.
    """

    def __init__(
        self,
        directory,
        steps_per_epoch,
        *,
        save_every=None,
        max_to_keep=2,
        asynchronous=True,
        settings=None,
    ):
        super().__init__()
        for name, value in (
            ("steps_per_epoch", steps_per_epoch),
            ("max_to_keep", max_to_keep),
        ) + ((("save_every", save_every),) if save_every is not None else ()):
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < 1
            ):
                raise ValueError(
                    f"`{name}` must be an integer >= 1. Received: "
                    f"{name}={value!r}"
                )
        self.directory = _check_directory(directory)
        self.steps_per_epoch = steps_per_epoch
        self.save_every = save_every
        self.max_to_keep = max_to_keep
        self.asynchronous = asynchronous
        self.settings = dict(settings or {})
        json.dumps(self.settings)  # fails now, not at the first save
        self._checkpointer = None
        self._step = 0
        self._epoch_start = 0
        self._last_saved = None

    def _open(self):
        if self._checkpointer is None:
            ocp = _orbax()
            config = keras.saving.serialize_keras_object(self.model)
            # The optimizer is rebuilt by the training code, not here.
            config.pop("compile_config", None)
            self._checkpointer = ocp.training.Checkpointer(
                self.directory,
                custom_metadata={"format": FORMAT, "model_config": config},
                preservation_policy=(
                    ocp.training.preservation_policies.LatestN(
                        self.max_to_keep
                    )
                ),
            )
        return self._checkpointer

    def on_train_begin(self, logs=None):
        self._step = int(
            keras.ops.convert_to_numpy(self.model.optimizer.iterations)
        )
        self._open()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self._step

    def on_train_batch_end(self, batch, logs=None):
        self._step = self._epoch_start + batch + 1
        if self.save_every and self._step % self.save_every == 0:
            self.save(self._step)

    def on_epoch_end(self, epoch, logs=None):
        if self._step != self._last_saved:
            self.save(self._step)

    def save(self, step):
        """Starts writing the current state as `step`."""
        checkpointer = self._open()
        metadata = {
            "format": FORMAT,
            "step": int(step),
            "epoch": int(step // self.steps_per_epoch),
            "step_in_epoch": int(step % self.steps_per_epoch),
            "steps_per_epoch": self.steps_per_epoch,
            "settings": self.settings,
            "variables": _signature(self.model.variables),
            "optimizer": _signature(self.model.optimizer.variables),
        }
        state = _state(self.model)
        if self.asynchronous:
            checkpointer.save_pytree_async(
                int(step), state, custom_metadata=metadata, force=True
            )
        else:
            checkpointer.save_pytree(
                int(step), state, custom_metadata=metadata, force=True
            )
        self._last_saved = step

    def wait(self):
        """Blocks until the saves in flight have finished (every process)."""
        if self._checkpointer is not None:
            self._checkpointer.wait()

    def close(self):
        """Waits for the saves in flight and releases the folder."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None


# How a collective reports a process of the cluster that is gone (gloo on
# CPUs; the distributed runtime's heartbeat and barriers elsewhere).
_PEER_FAILURE = re.compile(
    r"Connection closed by peer|Connection reset by peer|Gloo .* failed|"
    r"heartbeat|UNAVAILABLE|Barrier failed"
)


def _raise_if_peer_failed(error, directory):
    from keras_vmoe import cluster

    if not cluster.is_initialized():
        return
    message = " ".join(str(error).split())
    if not _PEER_FAILURE.search(message):
        return
    raise RuntimeError(
        f"process {cluster.process_index()} of {cluster.process_count()}: "
        "another process of the cluster stopped during training "
        f"({message[:300]}). Restart every process with the same command: "
        "training resumes from the last finished checkpoint in "
        f"{directory}."
    ) from error


def fit_resumable(
    model,
    data,
    epochs,
    checkpoint,
    *,
    validation_data=None,
    callbacks=(),
    verbose="auto",
    resume=True,
):
    """`model.fit` for `epochs` epochs, resumable at any saved step.

    Restores the latest checkpoint of `checkpoint.directory` (weights,
    optimizer state, step; the recorded settings must equal
    `checkpoint.settings`), then trains epoch by epoch from the exact
    batch after the saved step. One `model.fit` call runs per epoch
    (`initial_epoch` set, so callbacks and logs see the true epoch index);
    a resumed epoch runs its remaining steps only.

    With several processes, `data` gives this process's part of every
    batch, so the current distribution's `auto_shard_dataset` is set to
    False (it stays so: evaluate with per-process data too).

    Args:
        model: a compiled model.
        data: a function `(epoch, start_step) -> dataset` giving this
            process's batches of `epoch` from `start_step` on, e.g.
            `ShardedArrays.dataset`; `checkpoint.steps_per_epoch` of them
            for `start_step=0`.
        epochs: total number of epochs.
        checkpoint: a `TrainingCheckpoint`.
        validation_data: passed to every `fit` call.
        callbacks: further callbacks for every `fit` call.
        verbose: passed to `fit`.
        resume: False starts from step 0 and fails if `checkpoint.directory`
            already holds a checkpoint (never overwritten silently).

    Returns:
        `(history, restored_step)`: the `history` dict of every epoch run
        (lists, one entry per epoch), and the step restored (None when the
        run started fresh).
    """
    if not isinstance(checkpoint, TrainingCheckpoint):
        raise TypeError(
            "`checkpoint` must be a `TrainingCheckpoint`. Received: "
            f"checkpoint={checkpoint!r}"
        )
    steps = checkpoint.steps_per_epoch
    restored = None
    if resume:
        metadata = restore(
            model, checkpoint.directory, settings=checkpoint.settings
        )
        if metadata is not None:
            restored = metadata["step"]
            if metadata["steps_per_epoch"] != steps:
                raise ValueError(
                    "The checkpoint was written with "
                    f"{metadata['steps_per_epoch']} steps per epoch, this "
                    f"run has {steps}. Received: steps_per_epoch={steps}"
                )
    elif latest_step(checkpoint.directory) is not None:
        raise ValueError(
            "The checkpoint folder already holds a checkpoint and "
            "resume=False: use another folder or resume. Received: "
            f"directory={checkpoint.directory!r}"
        )
    start = restored or 0
    distribution = keras.distribution.distribution()
    if distribution is not None and getattr(
        distribution, "_is_multi_process", False
    ):
        # `data` gives this process's batches already.
        distribution.auto_shard_dataset = False
    history = {}
    for epoch in range(start // steps, epochs):
        first = start - epoch * steps if epoch == start // steps else 0
        try:
            result = model.fit(
                data(epoch, first),
                epochs=epoch + 1,
                initial_epoch=epoch,
                steps_per_epoch=steps - first,
                validation_data=validation_data,
                callbacks=[checkpoint, *callbacks],
                verbose=verbose,
                shuffle=False,  # `data` fixes the order
            )
        except Exception as error:
            _raise_if_peer_failed(error, checkpoint.directory)
            raise
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
    checkpoint.wait()
    return history, restored


def load_model(directory, step=None):
    """The model of a checkpoint folder, with the weights of `step` (default:
    the latest), on this process's default device (no distribution).

    Every array is read whole into this process: a single-host copy of a
    model trained on several processes.

    Returns:
        `(model, metadata)`.
    """
    config = read_model_config(directory)
    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        model = keras.saving.deserialize_keras_object(config)
        metadata = restore(model, directory, step, optimizer=False)
    finally:
        keras.distribution.set_distribution(distribution)
    if metadata is None:
        raise ValueError(
            "No finished checkpoint in this folder. Received: "
            f"directory={directory!r}"
        )
    return model, metadata


def export_preset(directory, preset_dir, step=None):
    """Writes a checkpoint's model as a KerasHub preset folder (single host).

    The preset gets the checkpoint's class names as `labels.json` when its
    settings record them (`keras-vmoe train` does).

    Args:
        directory: a checkpoint folder written by `TrainingCheckpoint`.
        preset_dir: a new or empty folder.
        step: a finished step; default: the latest.

    Returns:
        The step's metadata.
    """
    preset_dir = os.fspath(preset_dir)
    if os.path.exists(preset_dir) and (
        not os.path.isdir(preset_dir) or os.listdir(preset_dir)
    ):
        raise ValueError(
            "`preset_dir` must be a new or empty folder. Received: "
            f"preset_dir={preset_dir!r}"
        )
    model, metadata = load_model(directory, step)
    if not hasattr(model, "save_to_preset"):
        raise ValueError(
            "The checkpoint's model is not a KerasHub task or backbone "
            f"({type(model).__name__}): it cannot be saved as a preset. "
            f"Received: directory={directory!r}"
        )
    model.save_to_preset(preset_dir)
    names = metadata.get("settings", {}).get("class_names")
    if names is not None:
        from keras_vmoe.utils.io import atomic_file

        with atomic_file(os.path.join(preset_dir, "labels.json"), "w") as file:
            json.dump(names, file)
    return metadata


__all__ = [
    "TrainingCheckpoint",
    "export_preset",
    "load_model",
    "fit_resumable",
    "latest_step",
    "read_model_config",
    "restore",
]
