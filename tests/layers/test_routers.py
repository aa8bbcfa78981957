"""Routers: formulas, float32 compute, config round trips, errors."""

import math

import keras
import numpy as np
import pytest

from keras_vmoe.layers import CosineRouter
from keras_vmoe.layers import L2Router
from keras_vmoe.layers import LinearRouter
from keras_vmoe.layers.routers import get_router

X = np.random.default_rng(0).standard_normal((5, 12)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_linear_router_is_a_matmul():
    router = LinearRouter(3)
    np.testing.assert_allclose(
        _np(router(X)), X @ _np(router.kernel), rtol=1e-5, atol=1e-6
    )


def test_cosine_router_is_cosine_over_temperature():
    router = CosineRouter(4, router_dim=6, temperature=0.5)
    logits = _np(router(X))
    features = X @ _np(router.projection)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    codes = _np(router.codes)
    codes /= np.linalg.norm(codes, axis=-1, keepdims=True)
    # atol: a logit near 0 has no meaningful relative error in float32.
    np.testing.assert_allclose(
        logits, features @ codes.T / 0.5, rtol=1e-5, atol=1e-6
    )


def test_cosine_router_temperature_is_clamped():
    router = CosineRouter(4, router_dim=6, temperature=0.2, min_temperature=0.1)
    router.build(X.shape)
    router.log_temperature.assign(math.log(1e-6))
    # |cos| <= 1, so with the clamp at 0.1 no logit exceeds 10.
    assert np.abs(_np(router(X))).max() <= 10.0 + 1e-4


def test_projected_router_never_widens_features():
    router = CosineRouter(4, router_dim=256)
    router.build((None, 12))
    assert tuple(router.projection.shape) == (12, 12)


def test_l2_router_is_negative_squared_distance():
    router = L2Router(3, router_dim=4)
    logits = _np(router(X))
    features = X @ _np(router.projection)
    codes = _np(router.codes)
    expected = -((features[:, None, :] - codes[None]) ** 2).sum(-1)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [LinearRouter, CosineRouter, L2Router])
def test_router_runs_in_float32_under_mixed_precision(cls):
    keras.config.set_dtype_policy("mixed_bfloat16")
    router = cls(4)
    logits = router(X.astype("float32"))
    assert router.compute_dtype == "float32"
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert all(v.dtype == "float32" for v in router.weights)


@pytest.mark.parametrize("cls", [LinearRouter, CosineRouter, L2Router])
def test_router_config_round_trip(cls):
    router = cls(4)
    logits = _np(router(X))
    clone = cls.from_config(router.get_config())
    clone.build(X.shape)
    clone.set_weights(router.get_weights())
    np.testing.assert_array_equal(_np(clone(X)), logits)


def test_get_router_rejects_unknown_name():
    with pytest.raises(ValueError, match="router='softmax'"):
        get_router("softmax", 4)


@pytest.mark.parametrize("value", [0, -1, 2.5])
def test_router_rejects_bad_num_experts(value):
    with pytest.raises(ValueError, match=f"num_experts={value}"):
        LinearRouter(value)


def test_cosine_router_rejects_temperature_outside_clamp():
    with pytest.raises(ValueError, match="temperature=2.0"):
        CosineRouter(4, temperature=2.0)
