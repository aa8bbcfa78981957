"""Test settings: no network, quiet TensorFlow, a fixed dtype policy."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def reset_dtype_policy():
    """Tests that set a global mixed-precision policy must not leak it."""
    yield
    keras.config.set_dtype_policy("float32")
