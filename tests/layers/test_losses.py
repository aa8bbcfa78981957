"""Auxiliary losses against values computed by hand."""

import math

import numpy as np
import pytest
from keras import ops

from keras_vmoe.layers import losses

PROBS = np.array([[0.8, 0.2], [0.6, 0.4]], "float32")


def _value(x):
    return float(ops.convert_to_numpy(x))


def test_load_balance_loss_hand_value():
    # f = [1, 0] (both items chose expert 0), P = [0.7, 0.3]:
    # N * sum f_i P_i = 2 * 0.7.
    index = np.array([[0], [0]], "int32")
    assert _value(losses.load_balance_loss(PROBS, index)) == pytest.approx(1.4)


def test_load_balance_loss_is_one_when_uniform():
    probs = np.full((8, 4), 0.25, "float32")
    index = np.array([[0], [1], [2], [3]] * 2, "int32")
    assert _value(losses.load_balance_loss(probs, index)) == pytest.approx(1.0)


def test_load_balance_loss_counts_first_choices_only():
    # GShard / vmoe: f counts first choices. Both items choose (0, 1):
    # f = [1, 0] (counting all K choices would give [0.5, 0.5] -> 1.0).
    index = np.array([[0, 1], [0, 1]], "int32")
    assert _value(losses.load_balance_loss(PROBS, index)) == pytest.approx(
        2 * (1.0 * 0.7 + 0.0 * 0.3)
    )


def test_losses_average_over_routing_groups():
    # Group 0 is PROBS (f = [1, 0], P = [0.7, 0.3] -> 1.4); group 1 sends
    # one item to each expert with P = [0.5, 0.5] -> 2 * 0.5 = 1.0.
    probs = np.stack([PROBS, np.full((2, 2), 0.5, "float32")])
    index = np.array([[[0], [0]], [[0], [1]]], "int32")
    assert _value(losses.load_balance_loss(probs, index)) == pytest.approx(1.2)
    # Importance per group: 0.16 and 0 -> mean 0.08.
    assert _value(losses.importance_loss(probs)) == pytest.approx(0.08, rel=1e-5)


def test_importance_loss_hand_value():
    # Importance [1.4, 0.6]: mean 1.0, population variance 0.16.
    assert _value(losses.importance_loss(PROBS)) == pytest.approx(0.16, rel=1e-5)


def test_importance_loss_zero_when_balanced():
    probs = np.array([[0.5, 0.5], [0.3, 0.7], [0.7, 0.3]], "float32")
    assert _value(losses.importance_loss(probs)) == pytest.approx(0.0, abs=1e-7)


def test_router_z_loss_hand_value():
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4.
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]], "float32")
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert _value(losses.router_z_loss(logits)) == pytest.approx(expected)


def test_load_loss_hand_value():
    def normal_sf(z):
        return 0.5 * (1 - math.erf(z / math.sqrt(2)))

    logits = np.array([[1.0, 0.0], [0.0, 0.0]], "float32")
    noisy = np.array([[1.0, 0.0], [0.5, 0.0]], "float32")
    # Item 0: 1st noisy value 1.0 -> noise to win [0, 1];
    # item 1: 1st noisy value 0.5 -> noise to win [0.5, 0.5].
    load = np.array(
        [
            normal_sf(0.0) + normal_sf(0.5),
            normal_sf(1.0) + normal_sf(0.5),
        ]
    )
    expected = load.var() / load.mean() ** 2
    value = _value(losses.load_loss(logits, noisy, noise_std=1.0, top_k=1))
    assert value == pytest.approx(expected, rel=1e-5)
