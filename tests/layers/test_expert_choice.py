"""Expert Choice routing: selection, capacity, gradients, saving, errors."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_vmoe.layers import ExpertChoiceFeedForward
from keras_vmoe.layers.expert_choice import expert_choice_capacity
from keras_vmoe.layers.expert_choice import expert_choice_gates
from keras_vmoe.layers.expert_choice import top_items_per_expert
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

RNG = np.random.default_rng(0)
TOKENS = RNG.standard_normal((3, 8, 16)).astype("float32")
FEATURE_MAP = RNG.standard_normal((2, 3, 4, 16)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


# --- Pure routing functions -------------------------------------------------------

# One group of 4 tokens, 2 experts, C = 2, with ties.
HAND_PROBS = np.array(
    [[[0.5, 0.5], [0.75, 0.25], [0.5, 0.5], [0.125, 0.875]]], "float32"
)
# Expert 0 scores [.5, .75, .5, .125]: t1, then the tie t0 = t2 -> t0.
# Expert 1 scores [.5, .25, .5, .875]: t3, then the tie t0 = t2 -> t0.
HAND_ITEMS = [[[1, 0], [3, 0]]]
HAND_GATES = [[[0.75, 0.5], [0.875, 0.5]]]
# Token 0 gets both experts, token 2 none.
HAND_DENSE = [[[0.5, 0.5], [0.75, 0.0], [0.0, 0.0], [0.0, 0.875]]]


def test_selection_equals_the_hand_table_with_ties():
    gates, items = top_items_per_expert(HAND_PROBS, 2)
    np.testing.assert_array_equal(_np(items), HAND_ITEMS)
    np.testing.assert_array_equal(_np(gates), HAND_GATES)
    dense = expert_choice_gates(gates, items, 4)
    np.testing.assert_array_equal(_np(dense), HAND_DENSE)


def test_groups_are_routed_independently():
    probs = np.concatenate([HAND_PROBS, HAND_PROBS[:, ::-1]], axis=0)
    _, items = top_items_per_expert(probs, 2)
    np.testing.assert_array_equal(_np(items)[0], HAND_ITEMS[0])
    # Reversed token order: expert 0 takes t2 (0.75) then t1 (tie, lower).
    np.testing.assert_array_equal(_np(items)[1], [[2, 1], [0, 1]])


@pytest.mark.parametrize(
    "group_size, experts, factor, expected",
    [(4, 2, 1.0, 2), (10, 4, 1.0, 3), (10, 4, 2.0, 5), (3, 8, 0.1, 1),
     (4, 2, 8.0, 4)],
)
def test_capacity_is_ceil_of_s_cf_over_e_clamped(
    group_size, experts, factor, expected
):
    assert expert_choice_capacity(group_size, experts, factor) == expected


# --- Layer -----------------------------------------------------------------------


def _numpy_expert_choice(moe, x):
    """Reference: per group, each expert takes its top-C tokens (stable)."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = _np(moe.router_probs(tokens)).astype("float64")
    size = (
        {"image": int(np.prod(x.shape[1:-1])), None: len(tokens)}.get(
            moe.group_size, moe.group_size
        )
    )
    capacity = expert_choice_capacity(size, moe.num_experts, moe.capacity_factor)
    w = {v.path.split("/")[-1]: _np(v).astype("float64") for v in moe.weights}
    outputs = np.zeros(tokens.shape)
    for start in range(0, len(tokens), size):
        for e in range(moe.num_experts):
            order = np.argsort(-probs[start : start + size, e], kind="stable")
            for t in start + order[:capacity]:
                h = tokens[t] @ w["expert_kernel_1"][e] + w["expert_bias_1"][e]
                h = keras.ops.convert_to_numpy(
                    keras.activations.gelu(h.astype("float32"), approximate=False)
                ).astype("float64")
                y = h @ w["expert_kernel_2"][e] + w["expert_bias_2"][e]
                outputs[t] += probs[t, e] * y
    return outputs.reshape(x.shape)


@pytest.mark.parametrize("group", ["image", None, 12])
@pytest.mark.parametrize("inputs", [TOKENS, FEATURE_MAP], ids=["tokens", "map"])
def test_output_equals_an_explicit_loop_over_experts(group, inputs):
    moe = ExpertChoiceFeedForward(
        4, 8, capacity_factor=1.5, group_size=group, eval_group_size=group
    )
    moe.build(inputs.shape)
    for variable in moe.weights:
        variable.assign(RNG.standard_normal(variable.shape) * 0.5)
    np.testing.assert_allclose(
        _np(moe(inputs)), _numpy_expert_choice(moe, inputs),
        rtol=1e-4, atol=1e-5,
    )


def test_equal_probabilities_pick_the_first_tokens():
    """A zero router gives every token 1/E: each expert takes tokens 0..C-1."""
    moe = ExpertChoiceFeedForward(4, 8, capacity_factor=1.0, return_routing=True)
    moe.build(TOKENS.shape)
    moe.router.kernel.assign(np.zeros(moe.router.kernel.shape))
    _, info = moe(TOKENS)
    capacity = 2  # ceil(8 * 1.0 / 4)
    expected = np.zeros((3, 8), "int32")
    expected[:, :capacity] = 4
    np.testing.assert_array_equal(_np(info["experts_per_token"]), expected)
    assert float(_np(info["unrouted_fraction"])) == pytest.approx(0.75)
    np.testing.assert_allclose(_np(info["gates"])[:, :capacity], 0.25)


@pytest.mark.parametrize("group, capacity", [("image", 4), (None, 12)])
def test_capacity_is_respected(group, capacity):
    moe = ExpertChoiceFeedForward(
        4, 8, capacity_factor=2.0, group_size=group, return_routing=True
    )
    moe.build(TOKENS.shape)
    moe.router.kernel.assign(RNG.standard_normal(moe.router.kernel.shape))
    _, info = moe(TOKENS)
    gates = _np(info["gates"])
    np.testing.assert_array_equal(_np(info["tokens_per_expert"]), [12] * 4)
    if group == "image":
        np.testing.assert_array_equal((gates > 0).sum(axis=1), capacity)
    else:
        np.testing.assert_array_equal((gates > 0).sum(axis=(0, 1)), capacity)
    np.testing.assert_array_equal(
        _np(info["experts_per_token"]), (gates > 0).sum(-1)
    )
    # Chosen gates are the router probabilities of those tokens.
    probs = _np(info["router_probs"])
    np.testing.assert_array_equal(gates[gates > 0], probs[gates > 0])


def test_groups_of_tokens_need_a_divisible_batch():
    moe = ExpertChoiceFeedForward(4, 8, group_size=5)
    with pytest.raises(ValueError, match="group_size=5"):
        moe(TOKENS, training=True)  # 24 tokens
    moe = ExpertChoiceFeedForward(4, 8, eval_group_size=5)
    with pytest.raises(ValueError, match="eval_group_size=5"):
        moe(TOKENS)


def test_image_groups_make_images_independent_of_the_batch():
    moe = ExpertChoiceFeedForward(4, 8, group_size="image", shared_expert=True)
    together = _np(moe(TOKENS))
    for b in range(len(TOKENS)):
        np.testing.assert_allclose(
            _np(moe(TOKENS[b : b + 1]))[0], together[b], rtol=1e-5, atol=1e-6
        )


def test_noise_changes_routing_only_in_training():
    moe = ExpertChoiceFeedForward(4, 8, noise_std=10.0, seed=0)
    moe.build(TOKENS.shape)
    np.testing.assert_array_equal(_np(moe(TOKENS)), _np(moe(TOKENS)))
    assert not np.allclose(
        _np(moe(TOKENS, training=True)), _np(moe(TOKENS, training=True))
    )


# --- Training ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(shared_expert=True), dict(group_size=None, router="cosine")],
    ids=str,
)
def test_every_trainable_weight_receives_gradient(kwargs):
    moe = ExpertChoiceFeedForward(4, 8, **kwargs)
    moe.build(TOKENS.shape)
    assert_every_weight_has_gradient(moe, TOKENS)


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16)(inputs)
    x = x + ExpertChoiceFeedForward(4, 16, shared_expert=True)(x)
    model = keras.Model(
        inputs, keras.layers.Dense(1)(keras.ops.mean(x, axis=1))
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    x = RNG.standard_normal((64, 6, 8)).astype("float32")
    y = np.tanh(x[:, :, :2].sum(axis=(1, 2)))[:, None]
    losses = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    losses = losses.history["loss"]
    assert losses[-1] < 0.5 * losses[0]


def test_mixed_bfloat16_keeps_routing_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    moe = ExpertChoiceFeedForward(4, 8, shared_expert=True, return_routing=True)
    outputs, info = moe(TOKENS, training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    for name in ("gates", "router_probs"):
        assert keras.backend.standardize_dtype(info[name].dtype) == "float32"
    assert np.isfinite(_np(keras.ops.cast(outputs, "float32"))).all()


# --- Serialization --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(capacity_factor=1.0, shared_expert=True, router="l2"),
        dict(group_size=None, noise_std=0.5, seed=2, dropout=0.1),
    ],
    ids=str,
)
def test_config_round_trip_gives_identical_outputs(kwargs):
    moe = ExpertChoiceFeedForward(4, 8, **kwargs)
    outputs = _np(moe(TOKENS))
    clone = ExpertChoiceFeedForward.from_config(moe.get_config())
    clone.build(TOKENS.shape)
    clone.set_weights(moe.get_weights())
    assert clone.get_config() == moe.get_config()
    np.testing.assert_array_equal(_np(clone(TOKENS)), outputs)


def test_keras_file_round_trip_gives_identical_outputs(tmp_path):
    inputs = keras.Input((8, 16))
    x = ExpertChoiceFeedForward(4, 8, shared_expert=True)(inputs)
    outputs = ExpertChoiceFeedForward(2, 8, group_size=None)(x)
    model = keras.Model(inputs, outputs)
    assert_keras_round_trip(model, TOKENS, tmp_path)


def test_return_routing_works_in_a_functional_model():
    inputs = keras.Input((8, 16))
    outputs, info = ExpertChoiceFeedForward(4, 8, return_routing=True)(inputs)
    model = keras.Model(inputs, [outputs, info["experts_per_token"]])
    y, count = model(TOKENS)
    assert y.shape == TOKENS.shape and count.shape == (3, 8)


@pytest.mark.slow
def test_tensorflow_and_jax_give_the_same_outputs(tmp_path):
    """The same weights give the same outputs on TF and JAX (subprocesses)."""
    script = (
        "import sys, numpy as np, keras\n"
        "import keras_vmoe\n"
        "from keras_vmoe.layers import ExpertChoiceFeedForward\n"
        "path = sys.argv[1]\n"
        "x = np.load(path + '/inputs.npy')\n"
        "if sys.argv[2] == 'save':\n"
        "    keras.utils.set_random_seed(0)\n"
        "    i = keras.Input((8, 16))\n"
        "    h = ExpertChoiceFeedForward(4, 8, shared_expert=True)(i)\n"
        "    o = ExpertChoiceFeedForward(3, 8, group_size=None,\n"
        "                                router='cosine')(h)\n"
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
    inputs = keras.Input((8, 16))
    moe = ExpertChoiceFeedForward(4, 8, name="inner")
    model = keras.Model(inputs, moe(keras.layers.Dense(16)(inputs)))
    seen = []
    moe.add_routing_observer(
        lambda layer, r: seen.append((layer.name, _np(r["tokens_per_expert"])))
    )
    model(TOKENS)
    assert seen[0][0] == "inner"
    np.testing.assert_array_equal(seen[0][1], [12] * 4)  # 3 images x C = 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, capacity_factor=0), "capacity_factor=0"),
        (dict(num_experts=4, group_size="token"), "group_size='token'"),
        (dict(num_experts=4, group_size=0), "group_size=0"),
        (dict(num_experts=4, router="softmax"), "router='softmax'"),
        (dict(num_experts=4, noise_std=-1.0), "noise_std=-1.0"),
        (dict(num_experts=4, activation="relu"), "activation='relu'"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExpertChoiceFeedForward(hidden_dim=8, **kwargs)


def test_wrong_input_rank_is_rejected():
    with pytest.raises(ValueError, match=r"inputs.shape=\(4, 16\)"):
        ExpertChoiceFeedForward(4, 8)(np.zeros((4, 16), "float32"))


# --- Upcycling ------------------------------------------------------------------


def test_upcycled_layer_scales_the_dense_ffn_by_the_chosen_gates():
    from keras_vmoe.converters import upcycle_feed_forward
    from keras_vmoe.layers import FeedForward

    dense = FeedForward(8)
    dense.build((None, None, 16))
    for variable in dense.weights:
        variable.assign(RNG.standard_normal(variable.shape) * 0.3)
    moe = ExpertChoiceFeedForward(
        4, 8, shared_expert=True, return_routing=True
    )
    moe.build(TOKENS.shape)
    upcycle_feed_forward(dense, moe)
    outputs, info = moe(TOKENS)
    gate_sum = _np(info["gates"]).sum(-1, keepdims=True)
    # Shared and routed copies each carry half of fc2 (upcycle convention).
    expected = (0.5 + 0.5 * gate_sum) * _np(dense(TOKENS))
    np.testing.assert_allclose(_np(outputs), expected, rtol=1e-5, atol=1e-6)
