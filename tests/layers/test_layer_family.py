"""The MoE layer family: one base, one registry, one dispatcher seam.

Checks what the three layers share through `MoELayer` (argument checks,
seeded dropout, router noise, router layers, routing statistics, empty
batches), the registry of layer types, and that a new dispatch path plugs
in by registering one `Dispatcher`.
"""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import ExpertChoiceFeedForward
from keras_vmoe.layers import LinearRouter
from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import MoELayer
from keras_vmoe.layers import SoftMoEFeedForward
from keras_vmoe.layers import dispatch
from keras_vmoe.layers import find_moe_layers
from keras_vmoe.layers.moe_types import MOE_LAYERS
from keras_vmoe.layers.moe_types import build_moe_layer
from tests.helpers import assert_keras_round_trip

RNG = np.random.default_rng(0)
TOKENS = RNG.standard_normal((2, 5, 8)).astype("float32")

LAYERS = {
    "top_k": lambda **kw: MoEFeedForward(4, 16, top_k=2, **kw),
    "soft": lambda **kw: SoftMoEFeedForward(4, 16, **kw),
    "expert_choice": lambda **kw: ExpertChoiceFeedForward(4, 16, **kw),
}


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_registry_names_every_layer_type():
    assert MOE_LAYERS == {
        "top_k": MoEFeedForward,
        "soft": SoftMoEFeedForward,
        "expert_choice": ExpertChoiceFeedForward,
    }
    for router_type, cls in MOE_LAYERS.items():
        assert issubclass(cls, MoELayer) and cls.router_type == router_type
        layer = build_moe_layer(
            {"router_type": router_type, "num_experts": 2}, hidden_dim=4
        )
        assert type(layer) is cls


def test_find_moe_layers_finds_each_type_in_call_order():
    inputs = keras.Input((5, 8))
    x = inputs
    layers = [LAYERS[name]() for name in ("top_k", "soft", "expert_choice")]
    for layer in layers:
        x = layer(x)
    model = keras.Model(inputs, x)
    assert find_moe_layers(model) == layers
    assert find_moe_layers(model, router_type="soft") == [layers[1]]
    assert find_moe_layers(layers[2]) == [layers[2]]
    with pytest.raises(ValueError, match="router_type='dense'"):
        find_moe_layers(model, router_type="dense")


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dropout="0.1"), "dropout='0.1'"),
        (dict(dropout=1.0), "dropout=1.0"),
        (dict(shared_expert=1), "shared_expert=1"),
        (dict(return_routing="yes"), "return_routing='yes'"),
        (dict(activation="relu"), "activation='relu'"),
        (dict(seed=-1), "seed=-1"),
    ],
)
def test_common_arguments_are_checked_alike(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LAYERS[name](**kwargs)


@pytest.mark.parametrize("name", ["top_k", "expert_choice"])
def test_noise_std_means_the_same_in_every_layer(name):
    extra = {"noisy_gating": True} if name == "top_k" else {}
    with pytest.raises(ValueError, match="noise_std=-0.5"):
        LAYERS[name](noise_std=-0.5, **extra)
    # None: 1 / E, as vmoe; 0: no noise.
    assert LAYERS[name](noise_std=None, **extra)._noise_std == 0.25
    quiet = LAYERS[name](noise_std=0.0, **extra)
    assert quiet._noise_std == 0.0
    first = _np(quiet(TOKENS, training=True))
    np.testing.assert_array_equal(_np(quiet(TOKENS, training=True)), first)
    noisy = LAYERS[name](noise_std=None, seed=3, **extra)
    noisy(TOKENS)
    noisy.set_weights(quiet.get_weights())
    clean = _np(quiet(TOKENS, training=False))
    np.testing.assert_array_equal(_np(noisy(TOKENS, training=False)), clean)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_dropout_is_seeded_in_every_layer(name):
    first = LAYERS[name](dropout=0.5, seed=11)
    second = LAYERS[name](dropout=0.5, seed=11)
    first(TOKENS)
    second(TOKENS)
    second.set_weights(first.get_weights())
    np.testing.assert_array_equal(
        _np(first(TOKENS, training=True)), _np(second(TOKENS, training=True))
    )


@pytest.mark.parametrize("name", ["top_k", "expert_choice"])
def test_every_routed_layer_takes_a_router_layer(name, tmp_path):
    layer = LAYERS[name](router=LinearRouter(4, name="router"))
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, layer(inputs))
    assert layer.router_name == "LinearRouter"
    restored = assert_keras_round_trip(model, TOKENS, tmp_path)
    assert isinstance(restored.layers[1].router, LinearRouter)


def _zero_router(layer):
    """Every router weight zero: all experts tie for every token."""
    layer(TOKENS)
    weights = layer.router.weights if layer.router else [layer.phi]
    for weight in weights:
        weight.assign(np.zeros(weight.shape, weight.dtype))
    return layer


def test_routing_statistics_by_hand():
    # Top-1 of tied probabilities is expert 0 for all 10 tokens; at
    # inference every image is its own group of 5 tokens, and capacity 2.0
    # gives it C = ceil(5 * 2 / 4) = 3 slots: 6 of 10 tokens kept, load
    # [0.6, 0, 0, 0], max load E * 0.6 = 2.4. Whole-batch groups: C = 5 of
    # 10, max load 2.
    top_k = _zero_router(MoEFeedForward(4, 16, eval_capacity_factor=2.0))
    top_k(TOKENS)
    np.testing.assert_allclose(
        _np(top_k.routing_statistics()["max_load"]), 2.4, rtol=1e-6
    )
    batch = _zero_router(
        MoEFeedForward(4, 16, eval_capacity_factor=2.0, eval_group_size=None)
    )
    batch(TOKENS)
    np.testing.assert_allclose(
        _np(batch.routing_statistics()["max_load"]), 2.0
    )
    # Soft MoE with phi = 0 (no normalisation: logits 0): every token gives
    # every slot the same combine weight, max load 1.
    soft = _zero_router(SoftMoEFeedForward(4, 16, normalize=False))
    soft(TOKENS)
    np.testing.assert_allclose(_np(soft.routing_statistics()["max_load"]), 1.0)
    # Expert Choice, per image: C = ceil(5 * 1.0 / 4) = 2, ties go to the
    # lower position, so every expert takes tokens 0 and 1: 3 of 5 unrouted.
    choice = _zero_router(ExpertChoiceFeedForward(4, 16, capacity_factor=1.0))
    choice(TOKENS)
    np.testing.assert_allclose(
        _np(choice.routing_statistics()["unrouted"]), 0.6, rtol=1e-6
    )


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_batch_gives_empty_outputs_and_routing(name):
    layer = LAYERS[name](return_routing=True)
    layer(TOKENS)
    outputs, routing = layer(np.zeros((0, 5, 8), "float32"))
    assert tuple(outputs.shape) == (0, 5, 8)
    _, shapes = layer.compute_output_shape((0, 5, 8))
    assert {k: tuple(v.shape) for k, v in routing.items()} == {
        k: tuple(v) for k, v in shapes.items()
    }


class _CountingDispatcher(dispatch.SlotDispatcher):
    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


def test_a_registered_dispatcher_plugs_into_the_layer(monkeypatch):
    monkeypatch.setattr(dispatch, "DISPATCHERS", dict(dispatch.DISPATCHERS))
    monkeypatch.setattr(dispatch, "DISPATCH_MODES", dispatch.DISPATCH_MODES)
    with pytest.raises(ValueError, match="dispatch='counting'"):
        MoEFeedForward(4, 16, dispatch="counting")
    dispatch.register_dispatcher("counting", _CountingDispatcher())
    layer = MoEFeedForward(4, 16, top_k=2, dispatch="counting")
    outputs = _np(layer(TOKENS, training=True))
    assert _CountingDispatcher.calls == 1
    slots = MoEFeedForward(4, 16, top_k=2, dispatch="slots")
    slots(TOKENS)
    slots.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        _np(slots(TOKENS, training=True)), outputs, rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="Dispatcher"):
        dispatch.register_dispatcher("bad", object())


def test_moe_layers_functions_are_deprecated_aliases():
    from keras_vmoe import distribution
    from keras_vmoe.training import metrics

    inputs = keras.Input((5, 8))
    top_k, soft = LAYERS["top_k"](), LAYERS["soft"]()
    model = keras.Model(inputs, soft(top_k(inputs)))
    with pytest.warns(DeprecationWarning, match="top_k_layers"):
        assert metrics.moe_layers(model) == [top_k]
    with pytest.warns(DeprecationWarning, match="find_moe_layers"):
        assert distribution.moe_layers(model) == [top_k, soft]
    assert metrics.top_k_layers(model) == [top_k]
