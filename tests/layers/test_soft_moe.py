"""SoftMoEFeedForward: routing weights, parity, gradients, saving, errors."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from scipy.special import erf

from keras_vmoe.layers import SoftMoEFeedForward
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

RNG = np.random.default_rng(0)
TOKENS = RNG.standard_normal((3, 7, 16)).astype("float32")
FEATURE_MAP = RNG.standard_normal((2, 3, 4, 16)).astype("float32")
LN2, LN3 = math.log(2.0), math.log(3.0)


def _np(x):
    return keras.ops.convert_to_numpy(x)


# --- Routing weights by hand -------------------------------------------------

# 2 images x 3 tokens, d = 2, 2 experts x 2 slots (N = 4), no normalisation.
HAND_TOKENS = np.array(
    [[[1, 0], [0, 1], [0, 0]], [[1, 1], [0, 0], [-1, 0]]], "float32"
)
HAND_PHI = np.array([[LN2, 0, LN3, 0], [0, LN2, LN3, 0]], "float32")
# exp(logits) per token and slot:
#   image 0: t0 [2, 1, 3, 1]  t1 [1, 2, 3, 1]    t2 [1, 1, 1, 1]
#   image 1: t0 [2, 2, 9, 1]  t1 [1, 1, 1, 1]    t2 [1/2, 1, 1/3, 1]
# Dispatch: each slot (column) normalised over the 3 tokens of its image.
HAND_DISPATCH = np.array(
    [
        [
            [2 / 4, 1 / 4, 3 / 7, 1 / 3],
            [1 / 4, 2 / 4, 3 / 7, 1 / 3],
            [1 / 4, 1 / 4, 1 / 7, 1 / 3],
        ],
        [
            [4 / 7, 2 / 4, 27 / 31, 1 / 3],
            [2 / 7, 1 / 4, 3 / 31, 1 / 3],
            [1 / 7, 1 / 4, 1 / 31, 1 / 3],
        ],
    ]
)
# Combine: each token (row) normalised over the 4 slots.
HAND_COMBINE = np.array(
    [
        [[2 / 7, 1 / 7, 3 / 7, 1 / 7], [1 / 7, 2 / 7, 3 / 7, 1 / 7], [1 / 4] * 4],
        [
            [2 / 14, 2 / 14, 9 / 14, 1 / 14],
            [1 / 4] * 4,
            [3 / 17, 6 / 17, 2 / 17, 6 / 17],
        ],
    ]
)


def _hand_layer(**kwargs):
    moe = SoftMoEFeedForward(
        2, 3, slots_per_expert=2, normalize=False, return_routing=True,
        **kwargs,
    )
    moe.build(HAND_TOKENS.shape)
    moe.phi.assign(HAND_PHI)
    return moe


def test_dispatch_and_combine_weights_equal_the_hand_table():
    _, info = _hand_layer()(HAND_TOKENS)
    np.testing.assert_allclose(
        _np(info["dispatch_weights"]).reshape(2, 3, 4), HAND_DISPATCH,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        _np(info["combine_weights"]).reshape(2, 3, 4), HAND_COMBINE,
        rtol=1e-6,
    )
    assert info["dispatch_weights"].shape == (2, 3, 2, 2)


def test_routing_statistics_equal_the_hand_values():
    _, info = _hand_layer()(HAND_TOKENS)
    # Expert 0 owns slots 0, 1; expert 1 slots 2, 3.
    entropy = -(HAND_DISPATCH * np.log(HAND_DISPATCH)).sum(axis=1)  # [B, N]
    np.testing.assert_allclose(
        _np(info["slot_entropy"]), entropy.reshape(2, 2, 2).mean((0, 2)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        _np(info["dispatch_weights_max"]),
        HAND_DISPATCH.max(axis=1).reshape(2, 2, 2).mean((0, 2)),
        rtol=1e-6,
    )
    load = HAND_COMBINE.reshape(6, 2, 2).sum(-1).mean(0)
    np.testing.assert_allclose(_np(info["expert_load"]), load, rtol=1e-6)
    assert _np(info["expert_load"]).sum() == pytest.approx(1.0)
    # A slot that averages all T tokens has entropy log(T).
    assert entropy[0, 3] == pytest.approx(math.log(3))


def test_constant_experts_give_combine_weighted_outputs():
    """Expert e outputs the constant c_e: y_t = sum_n C[t, n] c_{n // S}."""
    moe = _hand_layer()
    moe.expert_kernel_2.assign(np.zeros(moe.expert_kernel_2.shape))
    moe.expert_bias_2.assign(np.array([[1.0, 10.0], [100.0, 1000.0]]))
    outputs, _ = moe(HAND_TOKENS)
    per_expert = HAND_COMBINE.reshape(2, 3, 2, 2).sum(-1)  # [B, T, E]
    np.testing.assert_allclose(
        _np(outputs), per_expert @ np.array([[1, 10], [100, 1000]]),
        rtol=1e-6,
    )


# --- Parity with an explicit loop -----------------------------------------------


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _numpy_soft_moe(moe, x):
    """Explicit per-image, per-slot loop over the layer's weights."""
    w = {v.path.split("/")[-1]: _np(v).astype("float64") for v in moe.weights}
    e, s = moe.num_experts, moe.slots_per_expert
    tokens = x.reshape(x.shape[0], -1, x.shape[-1]).astype("float64")
    outputs = np.zeros_like(tokens)
    phi = w["phi"]
    if moe.normalize:
        phi = phi / np.sqrt((phi**2).sum(0, keepdims=True) + 1e-6)
    for b, image in enumerate(tokens):
        normed = image
        if moe.normalize:
            normed = image / np.sqrt((image**2).sum(-1, keepdims=True) + 1e-6)
        logits = normed @ phi * (w["scale"] if moe.normalize else 1.0)
        dispatch = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
        combine = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        for n in range(e * s):
            expert = n // s
            slot = dispatch[:, n] @ image  # [d]
            hidden = _gelu(slot @ w["expert_kernel_1"][expert] + w["expert_bias_1"][expert])
            out = hidden @ w["expert_kernel_2"][expert] + w["expert_bias_2"][expert]
            outputs[b] += combine[:, n : n + 1] * out[None, :]
    return outputs.reshape(x.shape)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("inputs", [TOKENS, FEATURE_MAP], ids=["tokens", "map"])
def test_output_equals_an_explicit_loop_over_slots(normalize, inputs):
    moe = SoftMoEFeedForward(3, 8, slots_per_expert=2, normalize=normalize)
    moe.build(inputs.shape)
    for variable in moe.weights:  # non-zero biases, a non-trivial scale
        variable.assign(RNG.standard_normal(variable.shape) * 0.5)
    np.testing.assert_allclose(
        _np(moe(inputs)), _numpy_soft_moe(moe, inputs), rtol=1e-4, atol=1e-5
    )


def test_each_image_is_routed_independently_of_the_batch():
    moe = SoftMoEFeedForward(4, 8, slots_per_expert=2, shared_expert=True)
    together = _np(moe(TOKENS))
    for b in range(len(TOKENS)):
        alone = _np(moe(TOKENS[b : b + 1]))
        np.testing.assert_allclose(alone[0], together[b], rtol=1e-5, atol=1e-6)
    # Changing another image leaves image 0 unchanged.
    other = TOKENS.copy()
    other[1:] = RNG.standard_normal(other[1:].shape)
    np.testing.assert_allclose(
        _np(moe(other))[0], together[0], rtol=1e-5, atol=1e-6
    )


def test_normalisation_makes_routing_invariant_to_token_scale():
    moe = SoftMoEFeedForward(4, 8, return_routing=True)
    _, info = moe(TOKENS)
    _, scaled = moe(TOKENS * 10.0)
    np.testing.assert_allclose(
        _np(scaled["combine_weights"]), _np(info["combine_weights"]),
        rtol=1e-5, atol=1e-7,
    )


# --- Training ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(shared_expert=True), dict(normalize=False, slots_per_expert=2)],
    ids=str,
)
def test_every_trainable_weight_receives_gradient(kwargs):
    moe = SoftMoEFeedForward(4, 8, **kwargs)
    moe.build(TOKENS.shape)
    assert_every_weight_has_gradient(
        moe, TOKENS, loss_fn=lambda y: keras.ops.mean(keras.ops.sin(y) * y)
    )


def _toy_model(**kwargs):
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16)(inputs)
    x = x + SoftMoEFeedForward(4, 16, name="moe", **kwargs)(x)
    outputs = keras.layers.Dense(1)(keras.ops.mean(x, axis=1))
    return keras.Model(inputs, outputs)


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    model = _toy_model(slots_per_expert=2, shared_expert=True)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    x = RNG.standard_normal((64, 6, 8)).astype("float32")
    y = np.tanh(x[:, :, :2].sum(axis=(1, 2)))[:, None]
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def test_mixed_bfloat16_keeps_the_router_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    moe = SoftMoEFeedForward(4, 8, shared_expert=True, return_routing=True)
    outputs, info = moe(TOKENS, training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    for name in ("dispatch_weights", "combine_weights", "slot_entropy"):
        assert keras.backend.standardize_dtype(info[name].dtype) == "float32"
    assert all(v.dtype == "float32" for v in moe.weights)
    combine = _np(info["combine_weights"]).sum(axis=(-2, -1))
    np.testing.assert_allclose(combine, 1.0, rtol=1e-6)


# --- Serialization --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(slots_per_expert=2, shared_expert=True, activation="gelu_tanh"),
        dict(normalize=False, dropout=0.1, seed=3),
    ],
    ids=str,
)
def test_config_round_trip_gives_identical_outputs(kwargs):
    moe = SoftMoEFeedForward(4, 8, **kwargs)
    outputs = _np(moe(TOKENS))
    clone = SoftMoEFeedForward.from_config(moe.get_config())
    clone.build(TOKENS.shape)
    clone.set_weights(moe.get_weights())
    assert clone.get_config() == moe.get_config()
    np.testing.assert_array_equal(_np(clone(TOKENS)), outputs)


def test_keras_file_round_trip_gives_identical_outputs(tmp_path):
    inputs = keras.Input((7, 16))
    x = SoftMoEFeedForward(4, 8, slots_per_expert=2, shared_expert=True)(inputs)
    outputs = SoftMoEFeedForward(2, 8, normalize=False)(x)
    model = keras.Model(inputs, outputs)
    restored = assert_keras_round_trip(model, TOKENS, tmp_path)
    assert isinstance(restored.layers[1], SoftMoEFeedForward)


def test_return_routing_works_in_a_functional_model():
    inputs = keras.Input((7, 16))
    outputs, info = SoftMoEFeedForward(4, 8, return_routing=True)(inputs)
    model = keras.Model(inputs, [outputs, info["slot_entropy"]])
    y, entropy = model(TOKENS)
    assert y.shape == TOKENS.shape and entropy.shape == (4,)


@pytest.mark.slow
def test_tensorflow_and_jax_give_the_same_outputs(tmp_path):
    """The same weights give the same outputs on TF and JAX (subprocesses)."""
    script = (
        "import sys, numpy as np, keras\n"
        "import keras_vmoe\n"
        "from keras_vmoe.layers import SoftMoEFeedForward\n"
        "path = sys.argv[1]\n"
        "x = np.load(path + '/inputs.npy')\n"
        "if sys.argv[2] == 'save':\n"
        "    keras.utils.set_random_seed(0)\n"
        "    i = keras.Input((7, 16))\n"
        "    h = SoftMoEFeedForward(4, 8, slots_per_expert=2,\n"
        "                           shared_expert=True)(i)\n"
        "    o = SoftMoEFeedForward(3, 8, normalize=False)(h)\n"
        "    keras.Model(i, o).save(path + '/model.keras')\n"
        "m = keras.saving.load_model(path + '/model.keras')\n"
        "np.save(path + '/' + keras.backend.backend() + '.npy',\n"
        "        keras.ops.convert_to_numpy(m(x)))\n"
    )
    np.save(tmp_path / "inputs.npy", TOKENS)
    for backend, mode in (("tensorflow", "save"), ("jax", "load")):
        env = dict(os.environ, KERAS_BACKEND=backend)
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path), mode],
            check=True, env=env, capture_output=True,
        )
    np.testing.assert_allclose(
        np.load(tmp_path / "jax.npy"),
        np.load(tmp_path / "tensorflow.npy"),
        rtol=1e-5,
        atol=1e-5,
    )


# --- Observers and bad input ----------------------------------------------------


def test_routing_observers_see_the_routing_of_nested_layers():
    inputs = keras.Input((7, 16))
    moe = SoftMoEFeedForward(4, 8, name="inner")
    model = keras.Model(inputs, moe(keras.layers.Dense(16)(inputs)))
    seen = []

    def observer(layer, routing):
        seen.append((layer.name, _np(routing["dispatch_weights"])))

    moe.add_routing_observer(observer)
    outputs = model(TOKENS)
    moe.remove_routing_observer(observer)
    model(TOKENS)
    assert len(seen) == 1 and seen[0][0] == "inner"
    assert seen[0][1].shape == (3, 7, 4, 1)
    np.testing.assert_allclose(seen[0][1].sum(axis=1), 1.0, rtol=1e-5)
    assert outputs.shape == TOKENS.shape


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, slots_per_expert=0), "slots_per_expert=0"),
        (dict(num_experts=4, hidden_dim=2.5), "hidden_dim=2.5"),
        (dict(num_experts=4, activation="relu"), "activation='relu'"),
        (dict(num_experts=4, dropout=1.0), "dropout=1.0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    kwargs.setdefault("hidden_dim", 8)
    with pytest.raises(ValueError, match=message):
        SoftMoEFeedForward(**kwargs)


def test_non_bool_flag_raises_type_error():
    with pytest.raises(TypeError, match="normalize='yes'"):
        SoftMoEFeedForward(4, 8, normalize="yes")


@pytest.mark.parametrize("shape", [(4, 16), (1, 2, 3, 4, 16)])
def test_wrong_input_rank_is_rejected(shape):
    with pytest.raises(ValueError, match=r"inputs.shape=\(" + str(shape[0])):
        SoftMoEFeedForward(4, 8)(np.zeros(shape, "float32"))


def test_mismatched_width_is_rejected():
    moe = SoftMoEFeedForward(4, 8)
    moe(TOKENS)
    with pytest.raises(ValueError, match=r"width 16.*inputs.shape=\(3, 7, 12\)"):
        moe(np.zeros((3, 7, 12), "float32"))


# --- Upcycling ------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_upcycled_layer_is_the_dense_ffn_on_constant_images(shared):
    """Slots mix equal tokens into that token: y = FFN(x) for any router."""
    from keras_vmoe.converters import upcycle_feed_forward
    from keras_vmoe.layers import FeedForward

    dense = FeedForward(8)
    dense.build((None, None, 16))
    for variable in dense.weights:
        variable.assign(RNG.standard_normal(variable.shape) * 0.3)
    moe = SoftMoEFeedForward(4, 8, slots_per_expert=2, shared_expert=shared)
    moe.build(TOKENS.shape)
    upcycle_feed_forward(dense, moe)
    constant = np.repeat(TOKENS[:, :1], 7, axis=1)
    np.testing.assert_allclose(
        _np(moe(constant)), _np(dense(constant)), rtol=1e-5, atol=1e-6
    )
    # On varied tokens it is not the dense FFN (see converters.upcycle).
    assert not np.allclose(_np(moe(TOKENS)), _np(dense(TOKENS)), atol=1e-3)
