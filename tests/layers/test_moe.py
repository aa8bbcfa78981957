"""MoEFeedForward: routing semantics, parity, gradients, saving, errors."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_vmoe.converters import upcycle_feed_forward
from keras_vmoe.layers import FeedForward
from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import losses
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

RNG = np.random.default_rng(0)
TOKENS = RNG.standard_normal((3, 7, 16)).astype("float32")
FEATURE_MAP = RNG.standard_normal((2, 3, 4, 16)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _constant_experts(moe, values):
    """Makes expert e output the constant vector values[e] for any input."""
    moe.expert_kernel_1.assign(np.zeros(moe.expert_kernel_1.shape))
    moe.expert_kernel_2.assign(np.zeros(moe.expert_kernel_2.shape))
    moe.expert_bias_2.assign(np.asarray(values, "float32"))


def _expert_ids_as_outputs(moe, inputs):
    """Expert e outputs e + 1 in every feature: the output reveals routing."""
    moe.build(inputs.shape)
    values = np.arange(1, moe.num_experts + 1, dtype="float32")[:, None]
    _constant_experts(moe, np.repeat(values, inputs.shape[-1], axis=1))


# --- Routing semantics ------------------------------------------------------


@pytest.mark.parametrize("inputs", [TOKENS, FEATURE_MAP], ids=["tokens", "map"])
def test_token_routing_sends_each_token_to_its_own_expert(inputs):
    moe = MoEFeedForward(
        4, 8, routing="token", eval_capacity_factor=None, return_routing=True
    )
    _expert_ids_as_outputs(moe, inputs)
    outputs, info = moe(inputs)
    index, gates = _np(info["expert_index"]), _np(info["gates"])
    assert index.shape == inputs.shape[:-1] + (1,)
    expected = (index + 1) * gates  # expert e outputs (e + 1) * gate
    np.testing.assert_allclose(_np(outputs), np.broadcast_to(expected, inputs.shape), rtol=1e-6)
    assert len(np.unique(index)) > 1, "test needs tokens on several experts"


@pytest.mark.parametrize("router_input", ["cls", "mean"])
def test_image_routing_sends_all_tokens_of_an_image_to_one_expert(router_input):
    moe = MoEFeedForward(
        4,
        8,
        routing="image",
        image_router_input=router_input,
        eval_capacity_factor=None,
        return_routing=True,
    )
    _expert_ids_as_outputs(moe, TOKENS)
    outputs, info = moe(TOKENS)
    index, gates = _np(info["expert_index"]), _np(info["gates"])
    assert index.shape == (3, 1)
    expected = ((index + 1) * gates)[:, None, :]
    np.testing.assert_allclose(_np(outputs), np.broadcast_to(expected, TOKENS.shape), rtol=1e-6)
    # The decision is a function of the CLS token (or the mean) only.
    probs = _np(
        keras.ops.softmax(
            moe.router(TOKENS[:, 0] if router_input == "cls" else TOKENS.mean(1))
        )
    )
    np.testing.assert_array_equal(index[:, 0], probs.argmax(-1))


def test_image_routing_on_feature_maps_uses_the_mean_token():
    moe = MoEFeedForward(4, 8, routing="image", return_routing=True)
    _, info = moe(FEATURE_MAP)
    probs = _np(keras.ops.softmax(moe.router(FEATURE_MAP.mean((1, 2)))))
    np.testing.assert_allclose(_np(info["router_probs"]), probs, rtol=1e-5)


@pytest.mark.parametrize("routing", ["token", "image"])
@pytest.mark.parametrize("shared", [False, True])
def test_dropped_items_get_zero_routed_output(routing, shared):
    moe = MoEFeedForward(
        2,
        8,
        routing=routing,
        shared_expert=shared,
        eval_capacity_factor=0.5,
        eval_group_size=None,  # the batch competes: drops
        return_routing=True,
    )
    _expert_ids_as_outputs(moe, TOKENS)
    outputs, info = moe(TOKENS)
    dropped = _np(info["dropped"])[..., 0]
    assert dropped.any() and not dropped.all()
    routed = _np(outputs)
    if shared:
        routed = routed - _np(moe.shared_ffn(TOKENS))
    if routing == "image":
        dropped = np.broadcast_to(dropped[:, None], TOKENS.shape[:2])
    np.testing.assert_allclose(routed[dropped], 0.0, atol=1e-6)
    assert np.all(np.abs(routed[~dropped]) > 0.1)


def test_capacity_per_expert_is_respected():
    # 21 tokens in one group, E = 4, K = 2, factor 1.0: C = ceil(2 * 21 / 4)
    # = 11 slots.
    moe = MoEFeedForward(
        4,
        8,
        top_k=2,
        eval_capacity_factor=1.0,
        eval_group_size=None,
        return_routing=True,
    )
    _, info = moe(TOKENS)
    index = _np(info["expert_index"]).reshape(-1)
    kept = ~_np(info["dropped"]).reshape(-1)
    counts = np.bincount(index[kept], minlength=4)
    assert counts.max() <= 11
    np.testing.assert_allclose(_np(info["expert_load"]), counts / index.size)


@pytest.mark.parametrize("routing", ["token", "image"])
def test_dropless_routing_drops_nothing(routing):
    moe = MoEFeedForward(
        4, 8, top_k=2, routing=routing, eval_capacity_factor=None,
        return_routing=True,
    )
    _, info = moe(TOKENS)
    assert not _np(info["dropped"]).any()


def test_noisy_gating_changes_routing_only_in_training():
    moe = MoEFeedForward(
        4, 8, noisy_gating=True, noise_std=10.0, seed=1,
        capacity_factor=None, eval_capacity_factor=None,
        return_routing=True,
    )
    clean = _np(moe(TOKENS)[1]["expert_index"])
    np.testing.assert_array_equal(_np(moe(TOKENS)[1]["expert_index"]), clean)
    noisy = _np(moe(TOKENS, training=True)[1]["expert_index"])
    assert (noisy != clean).any()


# --- Parity with a dense FFN -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(routing="token", top_k=1),
        dict(routing="token", top_k=2, router="cosine"),
        dict(routing="image", top_k=1),
        dict(routing="image", top_k=2, router="l2", shared_expert=True),
        dict(routing="token", top_k=2, shared_expert=True),
        dict(routing="image", top_k=1, eval_capacity_factor=None),
    ],
    ids=str,
)
@pytest.mark.parametrize("inputs", [TOKENS, FEATURE_MAP], ids=["tokens", "map"])
def test_equal_experts_reproduce_the_dense_ffn(kwargs, inputs):
    kwargs.setdefault("eval_capacity_factor", 4.0)  # large: nothing dropped
    dense = FeedForward(32)
    dense.build(inputs.shape)
    for variable in dense.weights:  # non-zero biases too
        variable.assign(RNG.standard_normal(variable.shape) * 0.3)
    moe = MoEFeedForward(4, 32, normalize_gates=True, **kwargs)
    moe.build(inputs.shape)
    upcycle_feed_forward(dense, moe)
    np.testing.assert_allclose(
        _np(moe(inputs)), _np(dense(inputs)), rtol=1e-5, atol=1e-5
    )


def test_upcycling_noise_makes_experts_differ():
    dense = FeedForward(32)
    dense.build(TOKENS.shape)
    moe = MoEFeedForward(4, 32)
    moe.build(TOKENS.shape)
    upcycle_feed_forward(dense, moe, noise_std=0.1, seed=0)
    kernels = _np(moe.expert_kernel_1)
    assert not np.allclose(kernels[0], kernels[1])
    np.testing.assert_allclose(kernels.mean(0), _np(dense.fc1.kernel), atol=0.05)


def test_upcycling_rejects_mismatched_shapes():
    dense = FeedForward(16)
    dense.build(TOKENS.shape)
    moe = MoEFeedForward(4, 32)
    moe.build(TOKENS.shape)
    with pytest.raises(ValueError, match=r"\(16, 16\).*\(16, 32\)"):
        upcycle_feed_forward(dense, moe)


# --- Training ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(routing="token", top_k=2, shared_expert=True),
        dict(routing="image", top_k=1, shared_expert=True, router="cosine"),
        dict(routing="token", top_k=1, router="l2", capacity_factor=None),
        dict(routing="image", top_k=2, capacity_factor=None),
    ],
    ids=str,
)
def test_every_trainable_weight_receives_gradient(kwargs):
    inputs = RNG.standard_normal((16, 5, 16)).astype("float32")
    moe = MoEFeedForward(4, 8, seed=0, **kwargs)
    moe.build(inputs.shape)
    # A wide router init so that every expert receives some items.
    router_kernel = moe.router.trainable_weights[0]
    router_kernel.assign(RNG.standard_normal(router_kernel.shape))
    assert_every_weight_has_gradient(moe, inputs)


def _toy_model(**kwargs):
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16)(inputs)
    x = x + MoEFeedForward(4, 16, name="moe", **kwargs)(x)
    outputs = keras.layers.Dense(1)(keras.ops.mean(x, axis=1))
    return keras.Model(inputs, outputs)


def test_aux_losses_are_part_of_the_training_loss():
    model = _toy_model(
        routing="token", top_k=2, load_balance_loss_weight=0.5,
        importance_loss_weight=0.25, z_loss_weight=0.125,
        noisy_gating=True, load_loss_weight=0.0625,
    )
    model.compile(loss="mse")
    x = RNG.standard_normal((4, 6, 8)).astype("float32")
    y = RNG.standard_normal((4, 1)).astype("float32")
    y_pred = model(x, training=True)
    assert len(model.losses) == 4
    aux = sum(float(_np(loss)) for loss in model.losses)
    assert aux > 0.5  # the load-balance term alone is >= 0.5 * 1
    total = float(_np(model.compute_loss(x=x, y=y, y_pred=y_pred)))
    mse = float(np.mean((_np(y_pred) - y) ** 2))
    assert total == pytest.approx(mse + aux, rel=1e-5)
    model(x, training=False)
    assert not model.losses, "aux losses are training-only"


def test_added_losses_equal_the_weighted_pure_functions():
    moe = MoEFeedForward(
        4, 8, top_k=2, load_balance_loss_weight=0.5, z_loss_weight=2.0,
        return_routing=True,
    )
    _, info = moe(TOKENS, training=True)
    probs = np.reshape(_np(info["router_probs"]), (-1, 4))
    index = np.reshape(_np(info["expert_index"]), (-1, 2))
    logits = _np(moe.router(TOKENS.reshape(-1, 16)))
    expected = [
        0.5 * float(_np(losses.load_balance_loss(probs, index))),
        2.0 * float(_np(losses.router_z_loss(logits))),
    ]
    np.testing.assert_allclose([float(_np(v)) for v in moe.losses], expected, rtol=1e-5)


def test_fit_lowers_the_loss():
    keras.utils.set_random_seed(0)
    model = _toy_model(routing="token", top_k=2, shared_expert=True)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    x = RNG.standard_normal((64, 6, 8)).astype("float32")
    y = np.sin(x.sum(axis=(1, 2)))[:, None]
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    losses_per_epoch = history.history["loss"]
    assert losses_per_epoch[-1] < 0.7 * losses_per_epoch[0]


# --- Precision ----------------------------------------------------------------


def test_mixed_bfloat16_keeps_routing_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    moe = MoEFeedForward(4, 8, top_k=2, shared_expert=True, return_routing=True)
    outputs, info = moe(TOKENS, training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(info["router_probs"].dtype) == "float32"
    assert keras.backend.standardize_dtype(info["gates"].dtype) == "float32"
    assert all(v.dtype == "float32" for v in moe.router.weights)
    assert all(v.dtype == "float32" for v in moe.weights)  # variables
    assert all(np.isfinite(float(_np(v))) for v in moe.losses)
    assert np.isfinite(_np(keras.ops.cast(outputs, "float32"))).all()


# --- Serialization --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(routing="token", top_k=2, router="cosine", shared_expert=True),
        dict(routing="image", router="l2", eval_capacity_factor=None),
    ],
    ids=str,
)
def test_config_round_trip_gives_identical_outputs(kwargs):
    moe = MoEFeedForward(4, 8, **kwargs)
    outputs = _np(moe(TOKENS))
    clone = MoEFeedForward.from_config(moe.get_config())
    clone.build(TOKENS.shape)
    clone.set_weights(moe.get_weights())
    assert clone.get_config() == moe.get_config()
    np.testing.assert_array_equal(_np(clone(TOKENS)), outputs)


def test_router_instance_round_trips_through_config():
    from keras_vmoe.layers import CosineRouter

    moe = MoEFeedForward(4, 8, router=CosineRouter(4, router_dim=5))
    clone = MoEFeedForward.from_config(moe.get_config())
    assert isinstance(clone.router, CosineRouter)
    assert clone.router.router_dim == 5


@pytest.mark.parametrize("routing", ["token", "image"])
def test_keras_file_round_trip_gives_identical_outputs(routing, tmp_path):
    inputs = keras.Input((7, 16))
    outputs = MoEFeedForward(4, 8, routing=routing, top_k=2, shared_expert=True)(inputs)
    model = keras.Model(inputs, outputs)
    assert_keras_round_trip(model, TOKENS, tmp_path)


@pytest.mark.slow
def test_tensorflow_and_jax_give_the_same_outputs(tmp_path):
    """The same weights give the same outputs on TF and JAX (subprocesses)."""
    script = (
        "import sys, numpy as np, keras\n"
        "import keras_vmoe\n"
        "from keras_vmoe.layers import MoEFeedForward\n"
        "path = sys.argv[1]\n"
        "x = np.load(path + '/inputs.npy')\n"
        "if sys.argv[2] == 'save':\n"
        "    keras.utils.set_random_seed(0)\n"
        "    i = keras.Input((7, 16))\n"
        "    h = MoEFeedForward(4, 8, top_k=2, shared_expert=True)(i)\n"
        "    o = MoEFeedForward(4, 8, routing='image', router='cosine')(h)\n"
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


# --- Bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=2, top_k=3), "top_k=3, num_experts=2"),
        (dict(num_experts=0), "num_experts=0"),
        (dict(num_experts=4, router="softmax"), "router='softmax'"),
        (dict(num_experts=4, capacity_factor=0.0), "capacity_factor=0.0"),
        (dict(num_experts=4, eval_capacity_factor=-1), "eval_capacity_factor=-1"),
        (dict(num_experts=4, routing="patch"), "routing='patch'"),
        (dict(num_experts=4, activation="relu"), "activation='relu'"),
        (dict(num_experts=4, z_loss_weight=-1.0), "z_loss_weight=-1.0"),
        (dict(num_experts=4, load_loss_weight=0.1), "noisy_gating=False"),
        (dict(num_experts=4, noise_std=-1.0), "noise_std=-1.0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MoEFeedForward(hidden_dim=8, **kwargs)


@pytest.mark.parametrize("shape", [(4, 16), (1, 2, 3, 4, 16)])
def test_wrong_input_rank_is_rejected(shape):
    with pytest.raises(ValueError, match=r"inputs.shape=\(" + str(shape[0])):
        MoEFeedForward(4, 8)(np.zeros(shape, "float32"))


def test_mismatched_width_is_rejected():
    moe = MoEFeedForward(4, 8)
    moe(TOKENS)
    with pytest.raises(ValueError, match=r"width 16.*inputs.shape=\(3, 7, 12\)"):
        moe(np.zeros((3, 7, 12), "float32"))


def test_cls_routing_on_a_feature_map_is_rejected():
    moe = MoEFeedForward(4, 8, routing="image", image_router_input="cls")
    with pytest.raises(ValueError, match="image_router_input='cls'"):
        moe(FEATURE_MAP)


def test_expert_load_statistic_tracks_the_last_batch():
    moe = MoEFeedForward(4, 8, top_k=2, return_routing=True)
    np.testing.assert_array_equal(_np(moe(TOKENS[:1])[1]["expert_load"]), _np(moe.expert_load))
    _, info = moe(TOKENS, training=True)
    load = _np(moe.expert_load)
    np.testing.assert_allclose(load, _np(info["expert_load"]))
    assert load.sum() == pytest.approx(1.0 - _np(info["dropped"]).mean())
    assert all(v is not moe.expert_load for v in moe.trainable_weights)


def test_routing_observers_see_the_routing_of_nested_layers():
    inputs = keras.Input((7, 16))
    moe = MoEFeedForward(4, 8, top_k=2, name="inner")
    model = keras.Model(inputs, moe(keras.layers.Dense(16)(inputs)))
    seen = []

    def observer(layer, routing):
        seen.append((layer.name, keras.ops.convert_to_numpy(routing["expert_index"])))

    moe.add_routing_observer(observer)
    outputs = model(TOKENS)
    moe.remove_routing_observer(observer)
    model(TOKENS)
    assert len(seen) == 1 and seen[0][0] == "inner"
    assert seen[0][1].shape == (3, 7, 2)
    assert outputs.shape == TOKENS.shape  # outputs unchanged
