"""Files saved by keras-vmoe 0.1 load and predict unchanged.

`tests/fixtures/layers/` holds one small model per MoE layer type (and its
int8-quantized form) with the output the writing version computed on
TensorFlow (`tests/fixtures/make_layer_fixtures.py`). TensorFlow must give
the same values to 1e-6 (the last bits of a float32 matmul depend on the
CPU's kernels), the other backends to 1e-5.
"""

import os

import keras
import numpy as np
import pytest

import keras_vmoe.layers  # noqa: F401  (registers the layers)

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "layers")
NAMES = sorted(
    name[: -len(".keras")]
    for name in os.listdir(FIXTURES)
    if name.endswith(".keras")
)


def test_every_layer_type_has_a_fixture():
    assert NAMES == [
        f"{name}{suffix}"
        for name in ("expert_choice", "soft", "top_k_image", "top_k_token")
        for suffix in ("", "_int8")
    ]


@pytest.mark.parametrize("name", NAMES)
def test_saved_layer_loads_and_predicts_as_written(name):
    model = keras.saving.load_model(os.path.join(FIXTURES, f"{name}.keras"))
    data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    outputs = keras.ops.convert_to_numpy(model(data["inputs"], training=False))
    if keras.backend.backend() == "tensorflow":
        np.testing.assert_allclose(
            outputs, data["outputs"], rtol=1e-6, atol=1e-6
        )
    else:
        np.testing.assert_allclose(
            outputs, data["outputs"], rtol=1e-5, atol=1e-5
        )
