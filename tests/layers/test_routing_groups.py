"""Routing groups, priority with renormalised gates, non-finite inputs.

Hand tables for grouped capacity / batch-prioritized routing, the exact-zero
padding guarantee (one sample never leaks into another through a slot), and
what happens to NaN router inputs.
"""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import losses
from keras_vmoe.layers import routing

RNG = np.random.default_rng(1)
TOKENS = RNG.standard_normal((4, 5, 16)).astype("float32")

# Four items all prefer expert 0 of two; capacity 2.
# Top probabilities: item 0: 0.6, item 1: 0.9, item 2: 0.7, item 3: 0.8.
CROWDED = np.array([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]], "float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


# --- Priority follows the router probability, not renormalised gates --------


def test_batch_prioritized_top1_with_normalized_gates_ranks_by_probability():
    # Renormalised top-1 gates are all 1.0; the order must still be
    # 0.9 (item 1), 0.8 (item 3), ... and not position order.
    plan = routing.route(CROWDED, 1, capacity=2, normalize=True)
    np.testing.assert_array_equal(_np(plan["kept"])[:, 0], [False, True, False, True])
    np.testing.assert_allclose(_np(plan["gates"])[:, 0], [0, 1, 0, 1])


def test_batch_prioritized_top2_with_normalized_gates_ranks_by_probability():
    # item 0 [0.5, 0.45, 0.05]: p1 = 0.5, p1 / (p1 + p2) = 0.526
    # item 1 [0.6, 0.05, 0.35]: p1 = 0.6, p1 / (p1 + p2) = 0.632
    # item 2 [0.55, 0.0, 0.45]: p1 = 0.55, ratio 0.55
    # By probability: item 1, item 2, item 0. (By renormalised gate it would
    # be the same here, so make item 0's ratio largest:)
    probs = np.array(
        [[0.52, 0.08, 0.40], [0.60, 0.05, 0.35], [0.55, 0.45, 0.0]], "float32"
    )
    # Ratios p1/(p1+p2): 0.565, 0.632, 0.55 -> renormalised order 1, 0, 2.
    # Probability order: 1 (0.60), 2 (0.55), 0 (0.52).
    plan = routing.route(probs, 2, capacity=2, normalize=True)
    # Expert 0 is everyone's first choice: slots go to items 1 and 2.
    np.testing.assert_array_equal(_np(plan["kept"])[:, 0], [False, True, True])


# --- Routing groups -----------------------------------------------------------


def test_grouped_route_hand_table():
    # Two groups of two items, E = 2, K = 1, C = 1.
    # Group 0: item 0 (0.6 -> e0), item 1 (0.9 -> e0): item 1 wins e0.
    # Group 1: item 0 (0.3 -> e1 with 0.7), item 1 (0.8 -> e0): no conflict.
    probs = np.array(
        [[[0.6, 0.4], [0.9, 0.1]], [[0.3, 0.7], [0.8, 0.2]]], "float32"
    )
    plan = routing.route(probs, 1, capacity=1)
    np.testing.assert_array_equal(_np(plan["expert_index"])[..., 0], [[0, 0], [1, 0]])
    np.testing.assert_array_equal(_np(plan["position"])[..., 0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(
        _np(plan["kept"])[..., 0], [[False, True], [True, True]]
    )
    # One group of all four items, C = 2: e0 is claimed by 0.9, 0.8 first.
    plan = routing.route(probs.reshape(4, 2), 1, capacity=2)
    np.testing.assert_array_equal(_np(plan["kept"])[:, 0], [False, True, True, True])


def test_group_items_rejects_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match=r"\(10\).*group_size=4"):
        routing.group_items(np.zeros((10, 3)), 4)


@pytest.mark.parametrize("routing_mode", ["token", "image"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_group_size_equals_routing_each_group_alone(routing_mode, top_k):
    """With groups, a sample's output depends only on its own group."""
    group_size = 10 if routing_mode == "token" else 2  # 2 images = 10 tokens
    kwargs = dict(
        num_experts=4, hidden_dim=8, top_k=top_k, routing=routing_mode,
        eval_capacity_factor=0.75, return_routing=True,
    )
    grouped = MoEFeedForward(
        group_size=group_size, eval_group_size=group_size, **kwargs
    )
    single = MoEFeedForward(eval_group_size=None, **kwargs)
    grouped.build(TOKENS.shape)
    single.build(TOKENS.shape)
    if routing_mode == "image":
        # A uniform router sends every image to expert 0 (ties pick the
        # lower expert): one slot per group, so each group drops one image.
        for weight in grouped.router.weights:
            weight.assign(np.zeros(weight.shape))
    single.set_weights(grouped.get_weights())
    outputs, info = grouped(TOKENS)
    for half in (slice(0, 2), slice(2, 4)):
        expected, expected_info = single(TOKENS[half])
        np.testing.assert_allclose(_np(outputs)[half], _np(expected), atol=1e-6)
        np.testing.assert_array_equal(
            _np(info["dropped"])[half], _np(expected_info["dropped"])
        )
    assert _np(info["dropped"]).any(), "test needs capacity drops"


def test_grouped_layer_rejects_batch_not_divisible():
    moe = MoEFeedForward(4, 8, routing="image", group_size=3)
    with pytest.raises(ValueError, match=r"\(4\).*group_size=3"):
        moe(TOKENS, training=True)
    moe = MoEFeedForward(4, 8, routing="image", eval_group_size=3)
    with pytest.raises(ValueError, match=r"\(4\).*eval_group_size=3"):
        moe(TOKENS)


def test_grouped_aux_loss_is_the_mean_over_groups():
    moe = MoEFeedForward(4, 8, group_size=10, return_routing=True)
    _, info = moe(TOKENS, training=True)
    probs = _np(info["router_probs"]).reshape(2, 10, 4)
    index = _np(info["expert_index"]).reshape(2, 10, 1)
    per_group = [
        float(_np(losses.load_balance_loss(probs[g], index[g]))) for g in (0, 1)
    ]
    assert float(_np(moe.losses[0])) == pytest.approx(0.01 * np.mean(per_group), rel=1e-5)


# --- Samples never mix through padding ---------------------------------------


@pytest.mark.parametrize("routing_mode", ["token", "image"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_one_nan_sample_does_not_poison_the_others(routing_mode, top_k):
    moe = MoEFeedForward(
        4, 8, top_k=top_k, routing=routing_mode, capacity_factor=0.5,
        eval_capacity_factor=0.5, eval_group_size=None, return_routing=True,
    )
    moe.build(TOKENS.shape)
    for weight in moe.router.weights:  # everyone queues for expert 0
        weight.assign(np.zeros(weight.shape))
    x = TOKENS.copy()
    x[0] = np.nan
    for training in (False, True):
        outputs, info = moe(x, training=training)
        assert _np(info["dropped"])[1:].any(), "test needs capacity drops"
        assert np.isfinite(_np(outputs)[1:]).all()
        assert np.isnan(_np(outputs)[0]).all()


def test_unclaimed_slots_hold_zeros_not_another_sample():
    # Constant experts: an expert's output on a zero row is its bias; the
    # result is read only by the item that claimed the slot.
    moe = MoEFeedForward(4, 8, eval_capacity_factor=4.0, return_routing=True)
    x = TOKENS.copy()
    x[0, 0] = np.inf
    outputs, _ = moe(x)
    assert np.isfinite(_np(outputs)[1:]).all()
    assert np.isfinite(_np(outputs)[0, 1:]).all()


# --- Non-finite router input is visible, not a fake collapse ------------------


def test_nan_router_input_gives_nan_load_and_claims_no_slot():
    moe = MoEFeedForward(
        4, 8, routing="image", eval_capacity_factor=4.0, return_routing=True
    )
    x = TOKENS.copy()
    x[2] = np.nan
    outputs, info = moe(x)
    assert np.isnan(_np(info["expert_load"])).all()
    assert np.isnan(_np(moe.expert_load)).all()
    assert _np(info["dropped"])[2].all()
    assert not _np(info["dropped"])[[0, 1, 3]].any()
    assert np.isfinite(_np(outputs)[[0, 1, 3]]).all()


def test_expert_load_is_nan_only_when_an_item_is_invalid():
    index = np.array([[0], [1]], "int32")
    kept = np.array([[True], [True]])
    np.testing.assert_allclose(
        _np(routing.expert_load(index, kept, 2, np.array([True, True]))), [0.5, 0.5]
    )
    assert np.isnan(_np(routing.expert_load(index, kept, 2, np.array([True, False])))).all()


# --- Loss conventions in the layer --------------------------------------------


def test_importance_loss_uses_the_clean_probabilities_with_noisy_gating():
    moe = MoEFeedForward(
        4, 8, noisy_gating=True, noise_std=5.0, seed=3,
        load_balance_loss_weight=0.0, importance_loss_weight=1.0,
    )
    moe(TOKENS, training=True)
    clean = keras.ops.softmax(moe.router(TOKENS.reshape(-1, 16)))
    expected = float(_np(losses.importance_loss(clean)))
    assert float(_np(moe.losses[0])) == pytest.approx(expected, rel=1e-5)


# --- Bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(capacity_factor=float("nan")), "capacity_factor=nan"),
        (dict(eval_capacity_factor=float("inf")), "eval_capacity_factor=inf"),
        (dict(load_balance_loss_weight=float("nan")), "load_balance_loss_weight=nan"),
        (dict(z_loss_weight=float("inf")), "z_loss_weight=inf"),
        (dict(noise_std=float("nan")), "noise_std=nan"),
        (dict(group_size=0), "group_size=0"),
        (dict(group_size=2.5), "group_size=2.5"),
        (dict(capacity_factor="1.25"), "capacity_factor='1.25'"),
        (dict(dropout=float("nan")), "dropout=nan"),
        (dict(top_k=True), "top_k=True"),
    ],
)
def test_non_finite_and_malformed_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEFeedForward(4, 8, **kwargs)


@pytest.mark.parametrize("routing_mode", ["token", "image"])
def test_empty_batch_gives_empty_output(routing_mode):
    moe = MoEFeedForward(4, 8, routing=routing_mode, return_routing=True)
    moe.build(TOKENS.shape)
    outputs, info = moe(np.zeros((0, 5, 16), "float32"))
    assert tuple(outputs.shape) == (0, 5, 16)
    assert tuple(info["expert_index"].shape)[0] == 0
