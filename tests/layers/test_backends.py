"""The backend adapter seam: registry, fallback, and the portable defaults
of `BackendAdapter` against the active backend's own adapter."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import backends

BACKEND = keras.backend.backend()
EXPECTED = {
    "tensorflow": "TensorFlowAdapter",
    "jax": "JaxAdapter",
    "torch": "TorchAdapter",
    "numpy": "NumpyAdapter",
}


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture
def registry():
    """Restores the registry and the adapter cache after a test."""
    adapters = dict(backends.ADAPTERS)
    instances = dict(backends._INSTANCES)
    yield
    backends.ADAPTERS.clear()
    backends.ADAPTERS.update(adapters)
    backends._INSTANCES.clear()
    backends._INSTANCES.update(instances)


def test_active_backend_uses_its_registered_adapter():
    adapter = backends.get_adapter()
    assert type(adapter).__name__ == EXPECTED[BACKEND]
    assert type(adapter).__module__ == f"keras_vmoe.layers.backends.{BACKEND}"
    assert isinstance(adapter, backends.BackendAdapter)
    assert backends.get_adapter(BACKEND) is adapter  # cached


def test_register_adapter_by_name_and_unknown_backend_fallback(registry):
    class Custom(backends.BackendAdapter):
        def tiles_fuse_mlp(self):
            return True

    backends.register_adapter("custom", Custom)
    assert type(backends.get_adapter("custom")) is Custom
    assert backends.get_adapter("custom").tiles_fuse_mlp()
    # A "module:Class" path is imported on first use.
    backends.register_adapter(
        "by_path", "keras_vmoe.layers.backends:BackendAdapter"
    )
    assert type(backends.get_adapter("by_path")) is backends.BackendAdapter
    # Re-registering replaces the cached adapter.
    backends.register_adapter("custom", backends.BackendAdapter)
    assert type(backends.get_adapter("custom")) is backends.BackendAdapter
    # No adapter for a backend: the portable base.
    adapter = backends.get_adapter("no_such_backend")
    assert type(adapter) is backends.BackendAdapter
    assert not adapter.in_xla_context()
    assert not adapter.tiles_fuse_mlp()


def test_module_functions_delegate_to_the_active_adapter(registry):
    class Spy(backends.BackendAdapter):
        def sorted_beats_slots(self):
            return "spy"

    backends.register_adapter(BACKEND, Spy)
    assert backends.sorted_beats_slots() == "spy"


def _pair():
    return backends.BackendAdapter(), backends.get_adapter()


def test_segment_matmul_base_agrees():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 3)).astype("float32")
    kernels = rng.standard_normal((3, 3, 4)).astype("float32")
    biases = rng.standard_normal((3, 4)).astype("float32")
    counts = keras.ops.convert_to_tensor(np.array([2, 0, 4], "int32"))
    base, active = _pair()
    want = base.segment_matmul(rows, kernels, biases, counts)
    got = active.segment_matmul(
        keras.ops.convert_to_tensor(rows), kernels, biases, counts
    )
    np.testing.assert_allclose(_np(got), _np(want), rtol=1e-5, atol=1e-5)


def _tiles(rng, num_tiles=4, tile=2, e=3, d=3, h=5):
    tiles = rng.standard_normal((num_tiles, tile, d)).astype("float32")
    weights = (
        rng.standard_normal((e, d, h)).astype("float32"),
        rng.standard_normal((e, h)).astype("float32"),
        rng.standard_normal((e, h, d)).astype("float32"),
        rng.standard_normal((e, d)).astype("float32"),
    )
    tile_expert = np.array([0, 2, 2, 1], "int32")[:num_tiles]
    # Every tile live: dead tiles' rows differ (never read back).
    live = np.ones((num_tiles,), bool)
    return tiles, weights, tile_expert, live


def test_tile_matmul_base_agrees():
    tiles, (k1, b1, _, _), tile_expert, live = _tiles(np.random.default_rng(1))
    base, active = _pair()
    args = [
        keras.ops.convert_to_tensor(v)
        for v in (tiles, k1, b1, tile_expert, live)
    ]
    np.testing.assert_allclose(
        _np(active.tile_matmul(*args)),
        _np(base.tile_matmul(*args)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_tile_mlp_base_agrees(activation):
    tiles, weights, tile_expert, live = _tiles(np.random.default_rng(2))
    base, active = _pair()
    args = [
        keras.ops.convert_to_tensor(v)
        for v in (tiles, *weights, tile_expert, live)
    ]
    np.testing.assert_allclose(
        _np(active.tile_mlp(*args, activation)),
        _np(base.tile_mlp(*args, activation)),
        rtol=1e-5,
        atol=1e-5,
    )


# Rows 0..2 of x read by 5 output rows; output row 3 is not valid.
INDEX = np.array([2, 0, 2, 1, 1], "int32")
VALID = np.array([True, True, True, False, True])
INVERSE = np.array([[1, 5], [4, 5], [0, 2]], "int32")


@pytest.mark.parametrize("valid", [VALID, None])
def test_gather_rows_base_agrees(valid):
    x = np.random.default_rng(3).standard_normal((3, 2, 4)).astype("float32")
    inverse = INVERSE if valid is not None else np.array(
        [[1, 5], [3, 4], [0, 2]], "int32"
    )
    args = [keras.ops.convert_to_tensor(v) for v in (x, INDEX)]
    valid = None if valid is None else keras.ops.convert_to_tensor(valid)
    inverse = keras.ops.convert_to_tensor(inverse)
    base, active = _pair()
    np.testing.assert_allclose(
        _np(active.gather_rows(*args, valid, inverse)),
        _np(base.gather_rows(*args, valid, inverse)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_sum_rows_base_agrees():
    y = np.random.default_rng(4).standard_normal((5, 2, 4)).astype("float32")
    args = [
        keras.ops.convert_to_tensor(v) for v in (y, INVERSE, INDEX, VALID)
    ]
    base, active = _pair()
    got = _np(active.sum_rows(*args))
    np.testing.assert_allclose(got, _np(base.sum_rows(*args)), rtol=1e-5)
    # x[0] = y[1], x[1] = y[4], x[2] = y[0] + y[2] (5: the zero row).
    np.testing.assert_allclose(
        got, np.stack([y[1], y[4], y[0] + y[2]]), rtol=1e-5
    )


def test_stable_argsort_keeps_ties_in_index_order():
    # Long runs of ties (an unstable sort reorders them), along both axes.
    x = np.tile(np.array([3, 1, 2, 1, 3, 2, 1, 3], "float32"), 8)
    want = np.argsort(x, kind="stable")
    base, active = _pair()
    adapters = [active, backends]
    if BACKEND != "numpy":  # NumPy's default quicksort is not stable
        adapters.append(base)
    for adapter in adapters:
        got = _np(adapter.stable_argsort(keras.ops.convert_to_tensor(x)))
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32
    x2 = np.stack([x, -x, np.zeros_like(x)], axis=0)
    for axis in (-1, 0):
        got = _np(backends.stable_argsort(x2, axis=axis))
        np.testing.assert_array_equal(
            got, np.argsort(x2, axis=axis, kind="stable")
        )
