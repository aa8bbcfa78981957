"""`fit(x, y, shuffle=True)` on arrays that really shuffles every epoch.

KerasHub's `Task.fit` (its `PipelineModel`) turns NumPy inputs into an
unshuffled `tf.data` pipeline to map the preprocessor over it, so Keras'
`shuffle=True` is ignored and every epoch sees the same order.
`ShuffledFitMixin` builds the pipeline itself for array inputs: a
permutation of the indices, drawn again at every epoch, gathered in
batches. Datasets, generators and `shuffle=False` are passed on untouched.

This is the adapter module for that fix: it builds a `tf.data` pipeline
(which feeds `fit` on every Keras backend, as KerasHub's own does).
"""

import keras
import numpy as np


def _is_array_like(value):
    return isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype")
    )


def _arrays_only(structure):
    leaves = keras.tree.flatten(structure)
    return bool(leaves) and all(
        leaf is None or _is_array_like(leaf) for leaf in leaves
    )


def _split(structure, start, end):
    return keras.tree.map_structure(
        lambda leaf: None if leaf is None else leaf[start:end], structure
    )


def shuffled_array_dataset(
    x, y=None, sample_weight=None, batch_size=None, shuffle=True
):
    """A `tf.data.Dataset` of batches of `(x, y, sample_weight)` in a new
    random order every time it is iterated (every epoch).

    Args:
        x, y, sample_weight: arrays (or nested dicts / tuples of arrays)
            with the same first dimension.
        batch_size: batch size (default 32, as Keras).
        shuffle: False keeps the order (for validation data).

    Returns:
        A batched `tf.data.Dataset`; the last batch may be smaller.

    Raises:
        ValueError: naming the inputs when their lengths differ or are 0.
    """
    import tensorflow as tf

    data = keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
    data = keras.tree.map_structure(
        lambda leaf: leaf if leaf is None else np.asarray(leaf), data
    )
    lengths = {
        int(leaf.shape[0]) if leaf.ndim else 0
        for leaf in keras.tree.flatten(data)
        if leaf is not None
    }
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            "`x`, `y` and `sample_weight` must be non-empty arrays with the "
            f"same first dimension. Received: lengths {sorted(lengths)}"
        )
    length = lengths.pop()
    batch_size = batch_size or 32
    tensors = keras.tree.map_structure(
        lambda leaf: leaf if leaf is None else tf.constant(leaf), data
    )

    def gather(indices):
        return keras.tree.map_structure(
            lambda leaf: leaf if leaf is None else tf.gather(leaf, indices),
            tensors,
        )

    indices = tf.data.Dataset.range(length)
    if shuffle:
        indices = indices.shuffle(length, reshuffle_each_iteration=True)
    return indices.batch(batch_size).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE
    )


class ShuffledFitMixin:
    """Makes `fit(x, y, shuffle=True)` on arrays shuffle every epoch.

    Put it before the KerasHub `Task` class in the bases. `validation_split`
    takes the last fraction of the arrays before shuffling, as Keras does.
    """

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        sample_weight=None,
        validation_data=None,
        validation_split=None,
        shuffle=True,
        **kwargs,
    ):
        if shuffle and _arrays_only((x, y, sample_weight)):
            if validation_split and validation_data is None:
                if not 0 < validation_split < 1:
                    raise ValueError(
                        "`validation_split` must be in (0, 1). Received: "
                        f"validation_split={validation_split!r}"
                    )
                length = int(keras.tree.flatten(x)[0].shape[0])
                split_at = int(np.floor(length * (1.0 - validation_split)))
                if split_at in (0, length):
                    raise ValueError(
                        f"{length} samples cannot be split into training "
                        "and validation sets. Received: "
                        f"validation_split={validation_split!r}"
                    )
                validation_data = (
                    _split(x, split_at, length),
                    _split(y, split_at, length),
                    _split(sample_weight, split_at, length),
                )
                x, y, sample_weight = (
                    _split(part, 0, split_at)
                    for part in (x, y, sample_weight)
                )
            x = shuffled_array_dataset(x, y, sample_weight, batch_size)
            if validation_data is not None and _arrays_only(validation_data):
                # Batched like the training data, as Keras does.
                validation_data = shuffled_array_dataset(
                    *keras.utils.unpack_x_y_sample_weight(
                        tuple(validation_data)
                    ),
                    batch_size=batch_size,
                    shuffle=False,
                )
            y = sample_weight = batch_size = None
            # Done here: Keras would warn that it ignores it for a dataset.
            validation_split, shuffle = None, False
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            sample_weight=sample_weight,
            validation_data=validation_data,
            validation_split=validation_split,
            shuffle=shuffle,
            **kwargs,
        )
