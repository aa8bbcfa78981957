"""`set_precision("auto")` and the GPU check answer on every backend."""

import importlib.util

import keras
import pytest

from keras_vmoe.training import set_precision
from keras_vmoe.training.devices import has_gpu


def test_auto_precision_on_the_current_backend():
    expected = "mixed_float16" if has_gpu() else "mixed_bfloat16"
    assert set_precision("auto") == expected
    assert keras.config.dtype_policy().name == expected


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch", "numpy"])
def test_has_gpu_answers_for_every_backend(backend):
    module = {"tensorflow": "tensorflow"}.get(backend, backend)
    if backend != "numpy" and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    assert has_gpu(backend) in (True, False)


@pytest.mark.parametrize("available", [True, False])
def test_torch_asks_cuda(monkeypatch, available):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert has_gpu("torch") is available


def test_bad_backend_names_the_value():
    with pytest.raises(ValueError, match="backend='mxnet'"):
        has_gpu("mxnet")
