"""Quantization of the routed experts: int8 / float8, saving, model.quantize."""

import warnings

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_vmoe.layers import ExpertChoiceFeedForward
from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import SoftMoEFeedForward
from keras_vmoe.layers import quantization
from tests.analysis.tiny_models import tiny_classifier
from tests.analysis.tiny_models import tiny_data

RNG = np.random.default_rng(0)
TOKENS = RNG.standard_normal((2, 5, 16)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _functional(moe):
    inputs = keras.Input((5, 16))
    return keras.Model(inputs, moe(inputs))


def test_int8_kernel_hand_values():
    # Expert 0, output channel 0: absmax 2.54 -> scale 0.02, values /0.02.
    kernel = np.array([[[2.54, 1.0], [-1.27, -0.5]]], "float32")  # [1, 2, 2]
    stored, scale = quantization.quantize_kernel(kernel, "int8")
    np.testing.assert_allclose(scale[0, 0], [0.02, 1.0 / 127], rtol=1e-6)
    np.testing.assert_array_equal(stored[0], [[127, 127], [-64, -64]])
    assert stored.dtype == np.int8


def test_float8_kernel_hand_values():
    # absmax 448 -> scale 1: e4m3 rounds 3.3 to 3.25 and 448 stays 448.
    kernel = np.array([[[448.0], [3.3]]], "float32")
    stored, scale = quantization.quantize_kernel(kernel, "float8")
    assert stored.dtype == np.uint8 and scale[0, 0, 0] == 1.0
    decoded = stored.view(ml_dtypes.float8_e4m3fn).astype("float32")
    np.testing.assert_array_equal(decoded[0, :, 0], [448.0, 3.25])
    dequantized = _np(quantization.dequantize_kernel(stored, scale, "float8", "float32"))
    np.testing.assert_array_equal(dequantized, decoded)


def test_zero_expert_keeps_a_finite_scale():
    stored, scale = quantization.quantize_kernel(np.zeros((2, 3, 4)), "int8")
    assert np.all(scale == 1.0) and not stored.any()


@pytest.mark.parametrize("mode, dtype, tolerance", [("int8", "int8", 0.02), ("float8", "uint8", 0.1)])
@pytest.mark.parametrize("shared", [False, True])
def test_quantized_layer_stays_close_and_stores_small_kernels(mode, dtype, tolerance, shared):
    moe = MoEFeedForward(4, 32, top_k=2, shared_expert=shared, eval_capacity_factor=None)
    model = _functional(moe)
    expected = _np(model(TOKENS))
    moe.quantize(mode)
    assert moe.quantization_mode == mode
    assert moe._expert_kernel_1.dtype == dtype and moe._expert_kernel_2.dtype == dtype
    assert tuple(moe.expert_kernel_1_scale.shape) == (4, 1, 32)
    assert tuple(moe.expert_kernel_2_scale.shape) == (4, 1, 16)
    assert np.dtype(moe._expert_kernel_1.dtype).itemsize == 1  # 4x smaller
    assert moe.router.kernel.dtype == "float32", "routers are never quantized"
    outputs = _np(model(TOKENS))
    assert np.abs(outputs - expected).max() <= tolerance * np.abs(expected).max()
    if shared:
        assert moe.shared_ffn.fc1.quantization_mode == mode


@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_quantized_layer_keras_round_trip_is_identical(mode, tmp_path):
    moe = MoEFeedForward(4, 32, shared_expert=True, eval_capacity_factor=None)
    model = _functional(moe)
    model.quantize(mode)  # Keras quantizes the shared expert's Dense leaves
    moe.quantize(mode)
    expected = _np(model(TOKENS))
    model.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(_np(loaded(TOKENS)), expected)


@pytest.mark.slow
def test_model_quantize_reaches_every_moe_layer(tmp_path):
    images, _ = tiny_data()
    model = tiny_classifier(shared_expert=True)
    expected = _np(model.predict(images, verbose=0))
    model.quantize("int8")
    moe_layers = [l for l in model._flatten_layers() if isinstance(l, MoEFeedForward)]
    assert len(moe_layers) == 2
    assert all(layer.quantization_mode == "int8" for layer in moe_layers)
    outputs = _np(model.predict(images, verbose=0))
    np.testing.assert_allclose(outputs, expected, atol=0.05)
    model.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(_np(loaded.predict(images, verbose=0)), outputs)
    with pytest.raises(ValueError, match="preset_dir="):
        model.save_to_preset(str(tmp_path / "preset"))


def test_model_quantize_filters_apply_to_moe_layers():
    model = tiny_classifier()
    model.quantize("int8", filters="block_2_mlp")
    modes = {
        l.name: l.quantization_mode
        for l in model._flatten_layers()
        if isinstance(l, MoEFeedForward)
    }
    assert modes == {"block_1_mlp": None, "block_2_mlp": "int8"}


def test_bad_quantization_requests_are_rejected():
    moe = MoEFeedForward(4, 8)
    with pytest.raises(ValueError, match="isn.t yet built"):
        moe.quantize("int8")
    moe.build(TOKENS.shape)
    with pytest.raises(ValueError, match="mode='int4'"):
        moe.quantize("int4")
    moe.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        moe.quantize("int8")


# === Soft MoE and Expert Choice: the same per-expert quantization ===
def _other_moe(kind, shared=False):
    if kind == "soft":
        return SoftMoEFeedForward(4, 32, slots_per_expert=2, shared_expert=shared)
    return ExpertChoiceFeedForward(4, 32, shared_expert=shared)


@pytest.mark.parametrize("kind", ["soft", "expert_choice"])
@pytest.mark.parametrize("mode, dtype, tolerance", [("int8", "int8", 0.02), ("float8", "uint8", 0.1)])
@pytest.mark.parametrize("shared", [False, True])
def test_soft_and_expert_choice_quantize_like_top_k(kind, mode, dtype, tolerance, shared):
    moe = _other_moe(kind, shared)
    model = _functional(moe)
    expected = _np(model(TOKENS))
    float_kernel = _np(moe.expert_kernel_2)
    moe.quantize(mode)
    assert moe.quantization_mode == mode
    assert moe._expert_kernel_1.dtype == dtype and moe._expert_kernel_2.dtype == dtype
    assert not moe._expert_kernel_1.trainable
    assert tuple(moe.expert_kernel_1_scale.shape) == (4, 1, 32)
    assert tuple(moe.expert_kernel_2_scale.shape) == (4, 1, 16)
    # One scale per expert and output channel: absmax over the input axis.
    limit = 127.0 if mode == "int8" else 448.0
    np.testing.assert_allclose(
        _np(moe.expert_kernel_2_scale),
        np.abs(float_kernel).max(axis=1, keepdims=True) / limit,
        rtol=1e-6,
    )
    # No float copy of the expert kernels is left among the weights.
    float_kernels = [
        w.path for w in moe.weights if "expert_kernel" in w.path and w.dtype == "float32" and "scale" not in w.path
    ]
    assert float_kernels == []
    outputs = _np(model(TOKENS))
    assert np.abs(outputs - expected).max() <= tolerance * np.abs(expected).max()
    assert np.abs(outputs - expected).max() > 0, "the experts must really be quantized"
    if shared:
        assert moe.shared_ffn.fc1.quantization_mode == mode
    if kind == "soft":
        assert moe.phi.dtype == "float32", "the router is never quantized"
    else:
        assert moe.router.kernel.dtype == "float32", "the router is never quantized"


@pytest.mark.parametrize("kind", ["soft", "expert_choice"])
@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_soft_and_expert_choice_keras_round_trip_is_identical(kind, mode, tmp_path):
    moe = _other_moe(kind, shared=True)
    model = _functional(moe)
    model.quantize(mode)  # Keras quantizes the shared expert's Dense leaves
    moe.quantize(mode)
    expected = _np(model(TOKENS))
    model.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras")
    loaded_moe = loaded.layers[-1]
    assert type(loaded_moe) is type(moe) and loaded_moe.quantization_mode == mode
    assert loaded_moe._expert_kernel_1.dtype == moe._expert_kernel_1.dtype
    np.testing.assert_array_equal(_np(loaded(TOKENS)), expected)


@pytest.mark.parametrize("router_type", ["soft", "expert_choice"])
@pytest.mark.slow
def test_model_quantize_reaches_soft_and_expert_choice_layers(router_type, tmp_path):
    images, _ = tiny_data()
    model = tiny_classifier(router_type=router_type, eval_capacity_factor=2.0, shared_expert=True)
    layer_type = {"soft": SoftMoEFeedForward, "expert_choice": ExpertChoiceFeedForward}[router_type]
    expected = _np(model.predict(images, verbose=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.quantize("int8")
    assert not [w for w in caught if "keep their experts in float" in str(w.message)]
    moe_layers = [l for l in model._flatten_layers() if isinstance(l, layer_type)]
    assert len(moe_layers) == 2
    assert all(layer.quantization_mode == "int8" for layer in moe_layers)
    assert all(layer._expert_kernel_1.dtype == "int8" for layer in moe_layers)
    outputs = _np(model.predict(images, verbose=0))
    np.testing.assert_allclose(outputs, expected, atol=0.05)
    model.save(tmp_path / "q.keras")
    loaded = keras.models.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(_np(loaded.predict(images, verbose=0)), outputs)


@pytest.mark.parametrize("kind", ["soft", "expert_choice"])
def test_soft_and_expert_choice_bad_quantization_requests(kind):
    moe = _other_moe(kind)
    with pytest.raises(ValueError, match="isn.t yet built"):
        moe.quantize("int8")
    moe.build(TOKENS.shape)
    with pytest.raises(ValueError, match="mode='int4'"):
        moe.quantize("int4")
    moe.quantize("float8")
    with pytest.raises(ValueError, match="already quantized"):
        moe.quantize("int8")
