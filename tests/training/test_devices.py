"""`set_precision("auto")` and the GPU checks answer on every backend."""

import importlib.util

import keras
import pytest

from keras_vmoe.training import set_precision
from keras_vmoe.training.devices import _parse_capability
from keras_vmoe.training.devices import auto_precision
from keras_vmoe.training.devices import gpu_compute_capability
from keras_vmoe.training.devices import has_gpu


def test_auto_precision_on_the_current_backend():
    expected = auto_precision()
    assert set_precision("auto") == expected
    assert keras.config.dtype_policy().name == expected
    keras.config.set_dtype_policy("float32")


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


@pytest.mark.parametrize(
    "capability, expected",
    [
        ((7, 5), "mixed_float16"),  # T4
        ((7, 0), "mixed_float16"),  # V100
        ((8, 0), "mixed_bfloat16"),  # A100
        ((9, 0), "mixed_bfloat16"),  # H100
    ],
)
def test_auto_precision_takes_bfloat16_from_ampere_on(
    monkeypatch, capability, expected
):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda *args: capability
    )

    assert gpu_compute_capability("torch") == capability
    assert auto_precision("torch") == expected


def test_capability_strings_parse():

    assert _parse_capability("8.6") == (8, 6)
    assert _parse_capability((9, 0)) == (9, 0)
    assert _parse_capability(None) is None


def test_no_gpu_means_bfloat16_and_no_capability():

    assert gpu_compute_capability("numpy") is None
    assert auto_precision("numpy") == "mixed_bfloat16"
