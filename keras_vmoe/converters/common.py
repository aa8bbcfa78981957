"""Name-mapped weight assignment with full-coverage checks.

Every converter reads a source checkpoint into a flat `{name: np.ndarray}`
dict, then assigns tensors to Keras variables *by name* through a
`WeightAssigner`, which guarantees that:
- every requested source key exists (error names the key),
- every shape matches (error names the key and both shapes),
- at the end, every source tensor was used and every target variable set.

Checkpoints are read with `safetensors` or `numpy.load(allow_pickle=False)`:
loading never executes pickled code.
"""

import os
import zipfile

import numpy as np

from keras_vmoe.layers.moe import EXPERT_LOAD_NAME


def load_state_dict(source):
    """Reads a checkpoint into a `{name: np.ndarray}` dict.

    Args:
        source: a dict of arrays (returned as a copy of numpy arrays), a
            `.safetensors` file, or a `.npz` file.

    Raises:
        ValueError: for an unsupported file type or a missing file, and,
            naming the file, for a Git LFS pointer or a corrupt / truncated
            file (or a `.npz` holding pickled objects, which is refused).
    """
    if isinstance(source, dict):
        return {key: np.asarray(value) for key, value in source.items()}
    try:
        path = os.fspath(source)
    except TypeError:
        raise TypeError(
            "`source` must be a dict of arrays or the path of a "
            f"`.safetensors` / `.npz` file. Received: source={source!r}"
        ) from None
    if not os.path.exists(path):
        raise ValueError(f"Checkpoint file not found. Received: source={path!r}")
    if path.endswith((".safetensors", ".npz")):
        _check_not_lfs_pointer(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path!r} is not a readable `.safetensors` file (truncated "
                f"or corrupt?): {error}"
            ) from None
    if path.endswith(".npz"):
        return _load_npz(path)
    raise ValueError(
        "`source` must be a dict of arrays, a `.safetensors` or a `.npz` file "
        "(pickled PyTorch checkpoints are refused: loading them can run "
        f"arbitrary code). Received: source={path!r}"
    )


_LFS_POINTER = b"version https://git-lfs"


def _check_not_lfs_pointer(path):
    with open(path, "rb") as file:
        head = file.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        raise ValueError(
            f"{path!r} is a Git LFS pointer, not the checkpoint: run "
            "`git lfs pull` (or download the file) first."
        )


def check_h5_file(path):
    """Raises a ValueError naming `path` unless it is a readable HDF5 file."""
    import h5py

    _check_not_lfs_pointer(path)
    try:
        with h5py.File(path, "r"):
            pass
    except OSError as error:
        raise ValueError(
            f"{path!r} is not a readable HDF5 weights file (truncated or "
            f"corrupt?): {error}"
        ) from None


def _load_npz(path):
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array (`.npy`), not a `.npz` archive")
        with data:
            return {key: data[key] for key in data.files}
    except ValueError as error:
        if "allow_pickle" in str(error) or "pickle" in str(error).lower():
            raise ValueError(
                f"{path!r} holds pickled data, which is refused (loading it "
                "could run arbitrary code); save plain arrays with "
                "`numpy.savez`."
            ) from None
        raise ValueError(
            f"{path!r} is not a readable `.npz` file: {error}"
        ) from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(
            f"{path!r} is not a readable `.npz` file (truncated or "
            f"corrupt?): {error!r}"
        ) from None


def _is_float(dtype):
    # bfloat16 arrays (ml_dtypes) are not np.floating subclasses.
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def _is_routing_statistic(variable):
    return not variable.trainable and variable.path.endswith(
        "/" + EXPERT_LOAD_NAME
    )


class WeightAssigner:
    """Assigns source tensors to Keras variables by name, tracking coverage.

    Args:
        state_dict: `{name: np.ndarray}` source tensors.
        targets: the Keras variables that must all be set (usually
            `model.weights`). Routing statistics of `MoEFeedForward`
            (`expert_load`) are not parameters and are left out.

    Example:
    >>> assigner = WeightAssigner(state_dict, model.weights)
    >>> assigner.assign(layer.kernel, "fc1.weight", np.transpose)
    >>> assigner.finish()
    """

    def __init__(self, state_dict, targets):
        self.state_dict = state_dict
        self.unused = set(state_dict)
        self.targets = {
            id(variable): variable
            for variable in targets
            if not _is_routing_statistic(variable)
        }
        self.unset = set(self.targets)

    def take(self, key):
        """Returns the source tensor `key` and marks it used."""
        if key not in self.state_dict:
            raise ValueError(
                f"Source checkpoint has no tensor {key!r}. Keys that look "
                f"close: {self._close_keys(key)}"
            )
        self.unused.discard(key)
        return self.state_dict[key]

    def skip(self, key):
        """Marks `key` as deliberately unused (e.g. a head we replace)."""
        self.take(key)

    def assign(self, variable, key, transform=None):
        """Sets `variable` from source `key`, optionally transformed."""
        value = self.take(key)
        if transform is not None:
            value = transform(value)
        self.set(variable, value, key)

    def set(self, variable, value, key):
        """Sets `variable` to `value` (derived from source `key`).

        Floating-point values are cast to the variable's dtype (e.g.
        float16 / bfloat16 / float64 checkpoints); anything else (integer,
        boolean, object tensors) raises, naming the key and the dtype.
        """
        value = np.asarray(value)
        if not _is_float(value.dtype):
            raise ValueError(
                f"Source tensor {key!r} has dtype {value.dtype}, not a "
                "floating-point dtype: it is not converted silently to "
                f"{variable.dtype} (variable {variable.path!r})."
            )
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"Shape mismatch for source tensor {key!r} -> variable "
                f"{variable.path!r}: source gives {tuple(value.shape)}, "
                f"variable has {tuple(variable.shape)}"
            )
        variable.assign(value.astype(variable.dtype))
        self.unset.discard(id(variable))

    def finish(self):
        """Raises unless every source tensor was used and every target set."""
        problems = []
        if self.unused:
            problems.append(
                f"{len(self.unused)} source tensors were not used: "
                f"{sorted(self.unused)}"
            )
        if self.unset:
            names = sorted(self.targets[i].path for i in self.unset)
            problems.append(f"{len(names)} variables were not set: {names}")
        if problems:
            raise ValueError("Incomplete conversion. " + "; ".join(problems))

    def _close_keys(self, key):
        stem = key.rsplit(".", 1)[0]
        return sorted(k for k in self.state_dict if k.startswith(stem))[:8]
