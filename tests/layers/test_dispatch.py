"""Dispatch paths: the sorted dispatch equals the slot dispatch."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import backends
from keras_vmoe.layers.dispatch import StaticLayout
from keras_vmoe.layers.dispatch import resolve_dispatch
from keras_vmoe.layers.dispatch import slot_dispatch
from keras_vmoe.layers.dispatch import sorted_dispatch
from keras_vmoe.layers.routing import compute_capacity
from keras_vmoe.layers.routing import route
from tests.helpers import assert_keras_round_trip
from tests.helpers import gradients

RNG = np.random.default_rng(0)
WIDTH = 3
NUM_EXPERTS = 4
BACKEND = keras.backend.backend()


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _experts(num_experts=NUM_EXPERTS, width=WIDTH, seed=1):
    """Affine experts: expert e maps x to x @ W[e] + b[e]."""
    rng = np.random.default_rng(seed)
    kernels = rng.standard_normal((num_experts, width, width)).astype("float32")
    biases = rng.standard_normal((num_experts, width)).astype("float32")

    def run_slots(x):  # [E, N, d]
        return keras.ops.einsum("end,edh->enh", x, kernels) + biases[:, None]

    def run_rows(x, experts):  # [R, d]
        return experts.matmul(x, kernels, biases)

    return kernels, biases, run_slots, run_rows


def _probs(rows):
    """[G, S, E] probabilities from hand-written per-item scores."""
    scores = np.asarray(rows, "float32")
    return scores / scores.sum(-1, keepdims=True)


# Hand-built routing cases, [G, S, E] scores.
CASES = {
    # Expert 0 gets every first choice: capacity drops, experts 2-3 empty.
    "drops_and_empty_experts": ([[[5, 1, 0.5, 0.5]] * 6], 1, 1.0),
    # Ties between experts (lower index wins) and between items.
    "ties": (
        [[[1, 1, 1, 1], [2, 2, 1, 1], [1, 1, 1, 1], [1, 3, 3, 1]]],
        2,
        1.0,
    ),
    # Dropless: one expert receives every token, top-2.
    "one_expert_takes_all": ([[[9, 1, 1, 1]] * 5], 2, None),
    # Two routing groups with different loads and drops.
    "groups": (
        [
            [[4, 1, 1, 1], [4, 1, 1, 1], [1, 4, 1, 1], [1, 1, 1, 4]],
            [[1, 1, 4, 1], [1, 1, 4, 1], [1, 1, 4, 1], [1, 1, 4, 1]],
        ],
        2,
        0.75,
    ),
}


def _case(name, per_item):
    scores, top_k, capacity_factor = CASES[name]
    probs = _probs(scores)
    groups, num_items = probs.shape[:2]
    capacity = compute_capacity(num_items, NUM_EXPERTS, top_k, capacity_factor)
    plan = route(probs, top_k, capacity)
    items = RNG.standard_normal((groups, num_items, per_item, WIDTH))
    return items.astype("float32"), plan, capacity


@pytest.mark.parametrize(
    "static,tile",
    [(False, None), (True, 1), (True, 2), (True, 3), (True, None)],
)
@pytest.mark.parametrize("per_item", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_sorted_dispatch_equals_slot_dispatch(case, per_item, static, tile):
    items, plan, capacity = _case(case, per_item)
    _, _, run_slots, run_rows = _experts()
    expected = _np(
        slot_dispatch(items, plan, capacity, NUM_EXPERTS, run_slots)
    )
    outputs = _np(
        sorted_dispatch(
            items, plan, capacity, NUM_EXPERTS, run_rows, static, tile
        )
    )
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    # Items with every choice dropped are exact zeros on both paths.
    all_dropped = ~_np(plan["kept"]).any(-1)
    assert (outputs[all_dropped] == 0).all()
    assert (expected[all_dropped] == 0).all()


def test_sorted_dispatch_hand_computed_outputs():
    """Expert e outputs the constant e + 1: the output is the gate sum."""
    items, plan, capacity = _case("drops_and_empty_experts", 1)
    biases = np.arange(1, NUM_EXPERTS + 1, dtype="float32")[:, None]
    biases = np.repeat(biases, WIDTH, axis=1)
    kernels = np.zeros((NUM_EXPERTS, WIDTH, WIDTH), "float32")
    for static in (False, True):
        outputs = _np(
            sorted_dispatch(
                items,
                plan,
                capacity,
                NUM_EXPERTS,
                lambda x, experts: experts.matmul(x, kernels, biases),
                static,
            )
        )
        # 6 items all pick expert 0 (gate 5/7); capacity C = 2 keeps two
        # of them (which two, among equal priorities, is routing's choice).
        kept = _np(plan["kept"])[0, :, 0]
        assert kept.sum() == 2
        expected = np.zeros((1, 6, 1, WIDTH), "float32")
        expected[0, kept] = 1.0 * 5 / 7
        np.testing.assert_allclose(outputs, expected, rtol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_non_finite_item_never_reaches_other_items(static):
    items, plan, capacity = _case("groups", 2)
    items[0, 1] = np.nan
    items[1, 0, 0] = np.inf
    _, _, _, run_rows = _experts()
    outputs = _np(
        sorted_dispatch(
            items, plan, capacity, NUM_EXPERTS, run_rows, static, 2
        )
    )
    bad = np.zeros(outputs.shape[:2], bool)
    bad[0, 1] = bad[1, 0] = True
    assert np.isfinite(outputs[~bad]).all()


# --- The layer ----------------------------------------------------------------

LAYER_CASES = [
    dict(routing="token", top_k=1, capacity_factor=1.25),
    dict(routing="token", top_k=2, capacity_factor=0.5, group_size=7),
    dict(routing="token", top_k=2, capacity_factor=None),
    dict(routing="image", top_k=1, capacity_factor=1.0, shared_expert=True),
    dict(routing="image", top_k=2, capacity_factor=None),
]
INPUTS = RNG.standard_normal((4, 7, 8)).astype("float32")


def _layers(kwargs, dispatches=("slots", "sorted", "auto")):
    layers = {}
    for dispatch in dispatches:
        layer = MoEFeedForward(
            4,
            6,
            return_routing=True,
            eval_capacity_factor=kwargs.get("capacity_factor", 1.25),
            dispatch=dispatch,
            **kwargs,
        )
        layer.build(INPUTS.shape)
        layers[dispatch] = layer
    weights = layers["slots"].get_weights()
    # A wide router so that every expert gets items and some are dropped.
    weights[0] = RNG.standard_normal(weights[0].shape).astype("float32")
    for layer in layers.values():
        layer.set_weights(weights)
    return layers


@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=str)
@pytest.mark.parametrize("training", [False, True])
def test_every_dispatch_gives_the_same_routing_and_outputs(kwargs, training):
    layers = _layers(kwargs)
    results = {
        name: layer(INPUTS, training=training) for name, layer in layers.items()
    }
    expected, expected_info = results["slots"]
    for name in ("sorted", "auto"):
        outputs, info = results[name]
        np.testing.assert_allclose(
            _np(outputs), _np(expected), rtol=1e-5, atol=1e-5
        )
        for key in ("expert_index", "gates", "dropped"):
            np.testing.assert_array_equal(
                _np(info[key]), _np(expected_info[key])
            )
    if kwargs["capacity_factor"] == 0.5:
        assert _np(expected_info["dropped"]).any(), "case needs drops"


def _dense(grads):
    """numpy arrays, also from TensorFlow's IndexedSlices (gathered weights)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return [
            np.asarray(tf.convert_to_tensor(g.item()))
            if g is not None and g.dtype == object
            else g
            for g in grads
        ]
    return grads


@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=str)
def test_every_dispatch_gives_the_same_gradients(kwargs):
    layers = _layers(kwargs, ("slots", "sorted"))

    def loss(y):
        return keras.ops.mean(keras.ops.square(y[0]))

    expected = _dense(gradients(layers["slots"], INPUTS, loss))
    got = _dense(gradients(layers["sorted"], INPUTS, loss))
    variables = layers["slots"].trainable_variables
    for variable, e, g in zip(variables, expected, got):
        assert g is not None and np.any(g), variable.path
        np.testing.assert_allclose(
            g, e, rtol=1e-4, atol=1e-6, err_msg=variable.path
        )


def test_hidden_dropout_is_applied_between_the_expert_matmuls(monkeypatch):
    """With dropout in training the sorted path runs the two matmuls with
    the dropout between them (never the fused MLP, which has none); at
    inference, or without dropout, it asks the layout for the whole MLP."""
    from keras_vmoe.layers import dispatch

    calls = []

    def spy(mlp):
        def call(self, *args):
            calls.append(type(self).__name__)
            return mlp(self, *args)

        return call

    for cls in (dispatch.RowExperts, dispatch.TiledExperts):
        monkeypatch.setattr(cls, "mlp", spy(cls.mlp))
    for rate, training, expected in [
        (0.5, True, 0),
        (0.5, False, 1),
        (0.0, True, 1),
    ]:
        calls.clear()
        layer = MoEFeedForward(4, 6, dropout=rate, dispatch="sorted")
        layer(INPUTS, training=training)
        assert len(calls) == expected, (rate, training, calls)


def _toy_model(dispatch):
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16)(inputs)
    x = x + MoEFeedForward(
        4, 16, top_k=2, capacity_factor=None, dispatch=dispatch, name="moe"
    )(x)
    outputs = keras.layers.Dense(1)(keras.ops.mean(x, axis=1))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("dispatch", ["auto", "slots", "sorted"])
def test_keras_round_trip_and_fit_with_each_dispatch(dispatch, tmp_path):
    keras.utils.set_random_seed(0)
    model = _toy_model(dispatch)
    x = RNG.standard_normal((8, 6, 8)).astype("float32")
    y = RNG.standard_normal((8, 1)).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    restored = assert_keras_round_trip(model, x, tmp_path)
    assert restored.get_layer("moe").dispatch == dispatch


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF XLA")
@pytest.mark.parametrize("dispatch", ["sorted", "auto"])
def test_tensorflow_xla_compiles_the_static_path(dispatch):
    import tensorflow as tf

    layers = _layers(LAYER_CASES[2], ("slots", dispatch))
    seen = []

    @tf.function(jit_compile=True)
    def step(x):
        seen.append(backends.in_xla_context())
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layers[dispatch](x, training=True)[0]
            loss = tf.reduce_mean(tf.square(outputs))
        return outputs, tape.gradient(loss, x)

    outputs, grad = step(tf.constant(INPUTS))
    assert seen == [True]
    with tf.GradientTape() as tape:
        x = tf.constant(INPUTS)
        tape.watch(x)
        expected = layers["slots"](x, training=True)[0]
        loss = tf.reduce_mean(tf.square(expected))
    np.testing.assert_allclose(
        _np(outputs), _np(expected), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        _np(grad), _np(tape.gradient(loss, x)), rtol=1e-4, atol=1e-6
    )
    assert not backends.in_xla_context()


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF XLA")
@pytest.mark.parametrize("dispatch", ["sorted", "auto"])
def test_tensorflow_fit_with_jit_compile(dispatch):
    """`fit` traces an unknown batch size: XLA then takes the slot path."""
    keras.utils.set_random_seed(0)
    model = _toy_model(dispatch)
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    x = RNG.standard_normal((8, 6, 8)).astype("float32")
    y = RNG.standard_normal((8, 1)).astype("float32")
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


@pytest.mark.skipif(BACKEND != "jax", reason="JAX jit")
def test_jax_jit_compiles_the_static_path():
    import jax

    layers = _layers(LAYER_CASES[1], ("slots", "sorted"))
    layer = layers["sorted"]
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    @jax.jit
    def forward(x):
        outputs, _ = layer.stateless_call(trainable, non_trainable, x)
        return outputs[0]

    expected = layers["slots"](INPUTS)[0]
    np.testing.assert_allclose(
        _np(forward(INPUTS)), _np(expected), rtol=1e-5, atol=1e-5
    )


# Static layouts of [G, S, P] items (E=8, top-1), decided at trace time.
# B=32 images of 197 tokens at capacity 1.25: 6304 routed rows plus about
# 8 * 127 / 2 padding rows, fewer than the slot path's 8 * 986 slots.
LARGE_PADDED = StaticLayout(1, 6304, 1, 1, 986, 8)
# B=1 at capacity 1.25: tiles of 16 (an expert's share is 24.6 rows);
# 197 rows plus about 8 * 15 / 2 of padding > 8 * 31 slots.
SMALL_PADDED = StaticLayout(1, 197, 1, 1, 31, 8)
# B=1 dropless (C = S): 197 + 60 rows < 8 * 197 slots.
SMALL_DROPLESS = StaticLayout(1, 197, 1, 1, 197, 8)
# B=32 at capacity 1.0: the slot path has no unused slots to save; the
# tiles pad by 8 %.
# (Image routing, tiles of one image: no padding, a tie, sorted.)
EXACT_IMAGES = StaticLayout(1, 32, 197, 1, 4, 8)
LARGE_EXACT = StaticLayout(1, 6304, 1, 1, 788, 8)


def test_static_layout_sizes_by_hand():
    layout = LARGE_PADDED
    assert layout.tile == 128
    # (6304 + 8 * 127) // 128 tiles: every expert may end on a 1-row tile.
    assert layout.num_tiles == 57 and layout.num_rows == 57 * 128
    assert layout.expected_rows == 6304 + 8 * 127 / 2
    assert layout.slot_rows == 8 * 986
    # A small batch: tiles no longer than an expert's share of rows.
    assert SMALL_PADDED.tile == 16 and SMALL_PADDED.expected_rows == 197 + 60
    # Image routing (P = 197 tokens an item): tiles of one image, no
    # padding.
    assert EXACT_IMAGES.tile == 1
    assert EXACT_IMAGES.expected_rows == EXACT_IMAGES.slot_rows == 32 * 197
    # Capacity below the routed choices bounds the rows: 8 * 10 choices.
    small = StaticLayout(2, 100, 3, 2, 5, 8, tile_size=4)
    assert small.tile == 4 and small.num_tiles == (80 + 8 * 3) // 4
    assert small.expected_rows == (80 + 8 * 3 / 2) * 3
    assert small.slot_rows == 8 * 2 * 5 * 3


def test_auto_resolves_per_backend_and_compile_mode():
    assert resolve_dispatch("slots") == "slots"
    assert resolve_dispatch("sorted") == "sorted"
    expected = "sorted" if BACKEND in ("tensorflow", "torch") else "slots"
    assert resolve_dispatch("auto") == expected
    if BACKEND != "jax":
        # No XLA: the sorted path runs exactly the routed rows.
        assert resolve_dispatch("auto", dropless_tokens=True) == "sorted"
        for layout in (LARGE_PADDED, SMALL_PADDED, LARGE_EXACT):
            assert resolve_dispatch("auto", layout=layout) == expected
        return
    # Under XLA: the sorted tiles where they compute fewer rows than the
    # slots, the slot path for small batches and at capacity 1.0.
    assert resolve_dispatch("auto", layout=LARGE_PADDED) == "sorted"
    assert resolve_dispatch("auto", layout=SMALL_DROPLESS) == "sorted"
    assert resolve_dispatch("auto", layout=SMALL_PADDED) == "slots"
    # Capacity 1.0 at B=32: the padding adds 8 % rows; the fused JAX MLP
    # takes up to 10 % for its memory (TensorFlow XLA: see below).
    assert resolve_dispatch("auto", layout=LARGE_EXACT) == "sorted"
    # B=16 at capacity 1.0: 16 % more rows.
    half = StaticLayout(1, 3152, 1, 1, 394, 8)
    assert resolve_dispatch("auto", layout=half) == "slots"
    assert resolve_dispatch("auto", layout=EXACT_IMAGES) == "sorted"
    assert resolve_dispatch("sorted", layout=SMALL_PADDED) == "sorted"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TF XLA")
def test_auto_under_tensorflow_xla():
    import tensorflow as tf

    seen = []

    @tf.function(jit_compile=True)
    def step(x):
        seen.append(
            [
                resolve_dispatch("auto"),
                resolve_dispatch("auto", layout=LARGE_PADDED),
                resolve_dispatch("auto", layout=SMALL_PADDED),
                resolve_dispatch("auto", layout=LARGE_EXACT),
                resolve_dispatch(
                    "auto", layout=LARGE_PADDED, static_shape=False
                ),
                resolve_dispatch("sorted", static_shape=False),
            ]
        )
        return x

    step(tf.constant(0.0))
    # No fused MLP on TensorFlow: capacity 1.0 keeps the slot path.
    assert seen == [["slots", "sorted", "slots", "slots", "slots", "slots"]]


def test_auto_keeps_group_local_slots_under_a_distribution(monkeypatch):
    # The sorted layout orders rows across all groups (devices).
    monkeypatch.setattr(backends, "distributed", lambda: True)
    for kwargs in ({}, {"dropless_tokens": True}, {"layout": LARGE_PADDED}):
        assert resolve_dispatch("auto", **kwargs) == "slots"
    assert resolve_dispatch("sorted") == "sorted"


@pytest.mark.skipif(BACKEND != "jax", reason="the XLA auto rule")
@pytest.mark.parametrize(
    "batch,capacity_factor,expected",
    [
        (32, 1.25, "sorted"),
        (32, 1.0, "sorted"),
        (1, 1.25, "slots"),
        (1, 1.0, "slots"),
        (1, None, "sorted"),
    ],
)
def test_auto_in_the_layer_follows_the_static_layout(
    batch, capacity_factor, expected, monkeypatch
):
    """The layer hands `resolve_dispatch` the layout of its own batch."""
    from keras_vmoe.layers import dispatch

    seen = []

    def spy(*args, **kwargs):
        seen.append(resolve_dispatch(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(dispatch, "resolve_dispatch", spy)
    layer = MoEFeedForward(8, 16, capacity_factor=capacity_factor)
    layer(np.zeros((batch, 197, 8), "float32"), training=True)
    assert seen == [expected]


def test_dispatch_is_validated_and_stored_in_config():
    with pytest.raises(ValueError, match="`dispatch` must be one of"):
        MoEFeedForward(4, 8, dispatch="fast")
    layer = MoEFeedForward(4, 8, dispatch="sorted")
    assert layer.get_config()["dispatch"] == "sorted"
    assert MoEFeedForward.from_config(layer.get_config()).dispatch == "sorted"


def _tile_matmul_vjp(tiles, kernels, biases, tile_expert, live, weights, mode):
    """`tile_matmul`'s outputs and the gradients of `sum(outputs * weights)`
    with respect to tiles, kernels and biases, as backend tensors."""
    index = [keras.ops.convert_to_tensor(v) for v in (tile_expert, live)]
    return _vjp(
        lambda *args: backends.tile_matmul(*args, *index),
        (tiles, kernels, biases),
        weights,
        mode,
    )


def _vjp(function, args, weights, mode):
    """`function(*args)` and the gradients of `sum(outputs * weights)` with
    respect to every argument, as backend tensors.

    `mode` (TensorFlow only): "eager", "function" (a plain `tf.function`)
    or "xla" (`jit_compile=True`)."""
    args = [keras.ops.convert_to_tensor(v) for v in args]
    weights = keras.ops.convert_to_tensor(weights)
    if BACKEND == "jax":
        import jax

        outputs, vjp = jax.vjp(function, *args)
        return outputs, list(vjp(weights.astype(outputs.dtype)))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def run(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                outputs = function(*args)
            weight = tf.cast(weights, outputs.dtype)
            grads = tape.gradient(outputs, args, output_gradients=weight)
            return outputs, [tf.convert_to_tensor(g) for g in grads]

        if mode != "eager":
            run = tf.function(run, jit_compile=mode == "xla")
        return run(*args)
    import torch

    args = [v.detach().requires_grad_() for v in args]
    outputs = function(*args)
    outputs.backward(weights.to(outputs.dtype))
    return outputs, [v.grad for v in args]


TF_MODES = ["eager", "function", "xla"] if BACKEND == "tensorflow" else [None]


@pytest.mark.parametrize("mode", TF_MODES)
def test_tile_matmul_uses_each_tiles_expert_and_its_gradient(mode):
    """Hand check of the XLA tile matmul: tile i uses expert tile_expert[i];
    dead tiles are never read and, on JAX and TensorFlow (the tile loops),
    output zeros and get zero gradients; the kernel gradient of expert e
    sums the x^T g of its live tiles only, and an expert without tiles
    (expert 1) gets exact zero kernel and bias gradients."""
    rng = np.random.default_rng(3)
    tiles = rng.standard_normal((5, 2, 3)).astype("float32")
    kernels = rng.standard_normal((3, 3, 5)).astype("float32")
    biases = rng.standard_normal((3, 5)).astype("float32")
    tile_expert = np.array([0, 0, 2, 2, 2], "int32")
    live = np.array([True, True, True, False, False])
    weights = rng.standard_normal((5, 2, 5)).astype("float32")
    loops = BACKEND in ("jax", "tensorflow")
    if not loops:
        # The gathered form computes dead tiles, never read back.
        weights[3:] = 0.0
    outputs, grads = _tile_matmul_vjp(
        tiles, kernels, biases, tile_expert, live, weights, mode
    )
    outputs = _np(outputs)
    d_tiles, d_kernels, d_biases = (_np(g) for g in grads)
    expected_kernels = np.zeros_like(kernels)
    expected_biases = np.zeros_like(biases)
    for i in range(3):
        e = tile_expert[i]
        np.testing.assert_allclose(
            outputs[i], tiles[i] @ kernels[e] + biases[e], rtol=1e-5
        )
        expected_kernels[e] += tiles[i].T @ weights[i]
        expected_biases[e] += weights[i].sum(0)
        np.testing.assert_allclose(
            d_tiles[i], weights[i] @ kernels[e].T, rtol=1e-5, atol=1e-6
        )
    if loops:
        assert np.all(outputs[3:] == 0.0)
    assert np.all(d_tiles[3:] == 0.0)
    np.testing.assert_allclose(
        d_kernels, expected_kernels, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        d_biases, expected_biases, rtol=1e-5, atol=1e-6
    )
    assert np.all(d_kernels[1] == 0.0) and np.all(d_biases[1] == 0.0)


@pytest.mark.skipif(
    BACKEND not in ("jax", "tensorflow"), reason="the tile loops"
)
@pytest.mark.parametrize("mode", TF_MODES)
@pytest.mark.parametrize(
    "dtypes",
    [("float16", "float32", "float32"), ("bfloat16",) * 3],
    ids=["float16 tiles", "bfloat16"],
)
def test_tile_matmul_mixed_precision_dtypes(dtypes, mode):
    """Outputs in the result type of tiles and kernels, gradients in the
    dtypes of the inputs (as autodiff of the casts would give them)."""
    tiles, kernels, biases = (
        keras.ops.cast(keras.ops.ones(shape), dtype)
        for shape, dtype in zip([(3, 2, 4), (2, 4, 3), (2, 3)], dtypes)
    )
    outputs, grads = _tile_matmul_vjp(
        tiles,
        kernels,
        biases,
        np.array([0, 1, 1], "int32"),
        np.array([True, True, False]),
        np.ones((3, 2, 3), "float32"),
        mode,
    )
    expected_dtype = "float16" if dtypes[0] == "float16" else "bfloat16"
    expected_dtype = "float32" if dtypes[1] == "float32" else expected_dtype
    assert keras.backend.standardize_dtype(outputs.dtype) == expected_dtype
    assert [keras.backend.standardize_dtype(g.dtype) for g in grads] == list(
        dtypes
    )
    np.testing.assert_array_equal(
        _np(keras.ops.cast(outputs, "float32")),
        np.array([5.0, 5.0, 0.0])[:, None, None] * np.ones((3, 2, 3)),
    )
    d_tiles, d_kernels, d_biases = (
        _np(keras.ops.cast(g, "float32")) for g in grads
    )
    np.testing.assert_array_equal(d_tiles[:2], np.full((2, 2, 4), 3.0))
    np.testing.assert_array_equal(d_tiles[2], 0.0)
    np.testing.assert_array_equal(d_kernels, np.full((2, 4, 3), 2.0))
    np.testing.assert_array_equal(d_biases, np.full((2, 3), 2.0))


def _gelu(x, activation):
    """NumPy GELU and its derivative (float64), both forms."""
    import math

    if activation == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        t = np.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (
            1 + 3 * 0.044715 * x * x
        )
    erf = np.vectorize(math.erf)
    cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
    return x * cdf, cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("mode", TF_MODES)
def test_tile_mlp_runs_each_tiles_expert_mlp_and_its_gradient(mode, activation):
    """Hand check of the tile MLP (fused into one loop with a hand-written
    backward pass on JAX): tile i runs fc2(act(fc1(x))) of expert
    tile_expert[i]; dead tiles are never read and get zero input
    gradients; expert e's weight gradients sum its live tiles only
    (worked out here in float64 with the chain rule), and an expert
    without tiles (expert 1) gets exact zeros."""
    rng = np.random.default_rng(5)
    e, d, h = 3, 3, 4
    tiles = rng.standard_normal((5, 2, d)).astype("float32")
    k1 = rng.standard_normal((e, d, h)).astype("float32")
    b1 = rng.standard_normal((e, h)).astype("float32")
    k2 = rng.standard_normal((e, h, d)).astype("float32")
    b2 = rng.standard_normal((e, d)).astype("float32")
    tile_expert = np.array([0, 2, 2, 2, 2], "int32")
    live = np.array([True, True, True, False, False])
    weights = rng.standard_normal((5, 2, d)).astype("float32")
    weights[3:] = 0.0  # dead tiles: never read back
    index = [keras.ops.convert_to_tensor(v) for v in (tile_expert, live)]
    outputs, grads = _vjp(
        lambda *w: backends.tile_mlp(*w, *index, activation),
        (tiles, k1, b1, k2, b2),
        weights,
        mode,
    )
    outputs = _np(outputs)
    grads = [_np(g) for g in grads]
    expected = [np.zeros(v.shape) for v in (tiles, k1, b1, k2, b2)]
    for i in range(3):
        x, g = tiles[i].astype("float64"), weights[i].astype("float64")
        j = tile_expert[i]
        pre = x @ k1[j] + b1[j]
        act, derivative = _gelu(pre, activation)
        np.testing.assert_allclose(
            outputs[i], act @ k2[j] + b2[j], rtol=1e-5, atol=1e-5
        )
        d_pre = (g @ k2[j].T) * derivative
        expected[0][i] = d_pre @ k1[j].T
        expected[1][j] += x.T @ d_pre
        expected[2][j] += d_pre.sum(0)
        expected[3][j] += act.T @ g
        expected[4][j] += g.sum(0)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(grads[0][3:] == 0.0)
    for g in grads[1:]:
        assert np.all(g[1] == 0.0)


@pytest.mark.skipif(BACKEND != "jax", reason="the fused JAX tile loop")
def test_tile_mlp_mixed_precision_dtypes():
    """bfloat16 tiles with float32 weights (a mixed policy's cast inputs
    and variables): outputs in float32, the result type, as the unfused
    form gives them, and gradients in the dtypes of the inputs."""
    dtypes = ("bfloat16",) + ("float32",) * 4
    shapes = [(3, 2, 4), (2, 4, 5), (2, 5), (2, 5, 4), (2, 4)]
    args = [
        keras.ops.cast(keras.ops.ones(s) * 0.5, t)
        for s, t in zip(shapes, dtypes)
    ]
    index = [np.array([0, 1, 1], "int32"), np.array([True, True, False])]
    fused, grads = _vjp(
        lambda *w: backends.tile_mlp(*w, *index, "gelu"),
        args,
        np.ones((3, 2, 4), "float32"),
        None,
    )
    unfused, unfused_grads = _vjp(
        lambda x, k1, b1, k2, b2: backends.tile_matmul(
            keras.activations.gelu(
                backends.tile_matmul(x, k1, b1, *index), False
            ),
            k2,
            b2,
            *index,
        ),
        args,
        np.ones((3, 2, 4), "float32"),
        None,
    )
    assert keras.backend.standardize_dtype(fused.dtype) == "float32"
    assert [keras.backend.standardize_dtype(g.dtype) for g in grads] == list(
        dtypes
    )
    np.testing.assert_allclose(_np(fused), _np(unfused), rtol=1e-6)
    for got, want in zip(grads, unfused_grads):
        np.testing.assert_allclose(
            _np(keras.ops.cast(got, "float32")),
            _np(keras.ops.cast(want, "float32")),
            rtol=1e-5,
            atol=1e-6,
        )


def test_segment_matmul_uses_each_segments_expert_and_its_gradient():
    """Hand check of the dynamic-shape segment matmul: rows of segment e go
    through expert e; an expert without rows (expert 1) gets exact zero
    kernel and bias gradients (torch's hand-written backward)."""
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((5, 3)).astype("float32")
    kernels = rng.standard_normal((3, 3, 4)).astype("float32")
    biases = rng.standard_normal((3, 4)).astype("float32")
    counts = np.array([2, 0, 3], "int32")
    expert = np.array([0, 0, 2, 2, 2])
    expected = np.einsum("rd,rdc->rc", rows, kernels[expert]) + biases[expert]
    outputs = backends.segment_matmul(
        keras.ops.convert_to_tensor(rows),
        kernels,
        biases,
        keras.ops.convert_to_tensor(counts),
    )
    np.testing.assert_allclose(_np(outputs), expected, rtol=1e-5, atol=1e-6)
    if BACKEND != "torch":
        return
    import torch

    weights = torch.tensor(rng.standard_normal((5, 4)).astype("float32"))
    x, k, b = (
        torch.tensor(v, requires_grad=True) for v in (rows, kernels, biases)
    )
    out = backends.segment_matmul(x, k, b, torch.tensor(counts))
    (out * weights).sum().backward()
    w = weights.numpy()
    expected_x = np.einsum("rc,rdc->rd", w, kernels[expert])
    np.testing.assert_allclose(x.grad.numpy(), expected_x, rtol=1e-5, atol=1e-6)
    expected_k = np.zeros_like(kernels)
    expected_b = np.zeros_like(biases)
    for r, e in enumerate(expert):
        expected_k[e] += np.outer(rows[r], w[r])
        expected_b[e] += w[r]
    np.testing.assert_allclose(k.grad.numpy(), expected_k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.grad.numpy(), expected_b, rtol=1e-5, atol=1e-6)
    assert np.all(k.grad.numpy()[1] == 0.0)
    assert np.all(b.grad.numpy()[1] == 0.0)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's hand-written backward")
def test_segment_matmul_gradients_keep_the_input_dtypes():
    import torch

    x = torch.ones((3, 2), dtype=torch.bfloat16, requires_grad=True)
    k = torch.ones((2, 2, 4), requires_grad=True)
    b = torch.zeros((2, 4), requires_grad=True)
    out = backends.segment_matmul(x, k, b, torch.tensor([1, 2]))
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.detach().numpy(), np.full((3, 4), 2.0))
    out.sum().backward()
    assert (x.grad.dtype, k.grad.dtype, b.grad.dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,
    )
    np.testing.assert_array_equal(x.grad.float().numpy(), np.full((3, 2), 4.0))
    np.testing.assert_array_equal(b.grad.numpy(), [[1.0] * 4, [2.0] * 4])
