"""Routing math against tables worked out by hand."""

import numpy as np
import pytest
from keras import ops

from keras_vmoe.layers import routing


def _np(x):
    return ops.convert_to_numpy(x)


@pytest.mark.parametrize(
    "num_items, num_experts, top_k, capacity_factor, expected",
    [
        (10, 4, 1, 1.0, 3),  # ceil(10 / 4) = ceil(2.5)
        (10, 4, 2, 1.25, 7),  # ceil(2 * 10 * 1.25 / 4) = ceil(6.25)
        (6304, 8, 1, 1.0, 788),  # B=32, T=197 tokens, balanced
        (2, 1, 1, 2.0, 2),  # ceil(4) clamped to S = 2
        (3, 8, 1, 0.1, 1),  # ceil(0.0375) = 1
        (5, 4, 1, None, 5),  # dropless: an expert may take every item
    ],
)
def test_capacity_matches_formula(
    num_items, num_experts, top_k, capacity_factor, expected
):
    assert (
        routing.compute_capacity(num_items, num_experts, top_k, capacity_factor)
        == expected
    )


def test_top_k_gates_picks_largest_and_renormalises():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], "float32")
    gates, index = routing.top_k_gates(probs, 2)
    np.testing.assert_array_equal(_np(index), [[1, 2], [0, 2]])
    np.testing.assert_allclose(_np(gates), [[0.6, 0.3], [0.5, 0.3]])
    gates, _ = routing.top_k_gates(probs, 2, normalize=True)
    np.testing.assert_allclose(
        _np(gates), [[2 / 3, 1 / 3], [0.625, 0.375]], rtol=1e-6
    )


def test_top_k_ties_choose_lower_expert():
    _, index = routing.top_k_gates(np.full((1, 4), 0.25, "float32"), 2)
    np.testing.assert_array_equal(_np(index), [[0, 1]])


# Four items all prefer expert 0 of two; capacity 2.
# Top gates: item 0: 0.6, item 1: 0.9, item 2: 0.7, item 3: 0.8.
CROWDED = np.array([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]], "float32")


def test_capacity_drop_without_priority_keeps_first_positions():
    plan = routing.route(CROWDED, 1, capacity=2, batch_prioritized=False)
    np.testing.assert_array_equal(_np(plan["position"])[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(
        _np(plan["kept"])[:, 0], [True, True, False, False]
    )
    np.testing.assert_allclose(_np(plan["gates"])[:, 0], [0.6, 0.9, 0, 0])


def test_batch_prioritized_routing_keeps_most_confident_items():
    plan = routing.route(CROWDED, 1, capacity=2, batch_prioritized=True)
    # Serving order by top gate: item 1 (0.9), 3 (0.8), 2 (0.7), 0 (0.6).
    np.testing.assert_array_equal(_np(plan["position"])[:, 0], [3, 0, 2, 1])
    np.testing.assert_array_equal(
        _np(plan["kept"])[:, 0], [False, True, False, True]
    )
    np.testing.assert_allclose(_np(plan["gates"])[:, 0], [0, 0.9, 0, 0.8])


# Three items, three experts, top-2:
#   item 0 [0.5, 0.3, 0.2] -> experts (0, 1), top gate 0.5
#   item 1 [0.2, 0.5, 0.3] -> experts (1, 2), top gate 0.5
#   item 2 [0.6, 0.1, 0.3] -> experts (0, 2), top gate 0.6
TOP2 = np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], "float32")


def test_top2_first_choices_are_served_before_second_choices():
    plan = routing.route(TOP2, 2, capacity=1, batch_prioritized=False)
    np.testing.assert_array_equal(_np(plan["expert_index"]), [[0, 1], [1, 2], [0, 2]])
    # First choices in item order: e0 <- item 0 (pos 0), e1 <- item 1 (0),
    # e0 <- item 2 (1). Then second choices: e1 <- item 0 (1),
    # e2 <- item 1 (0), e2 <- item 2 (1).
    np.testing.assert_array_equal(_np(plan["position"]), [[0, 1], [0, 0], [1, 1]])
    np.testing.assert_array_equal(
        _np(plan["kept"]), [[True, False], [True, True], [False, False]]
    )


def test_top2_batch_prioritized_order_with_tie_by_position():
    plan = routing.route(TOP2, 2, capacity=1, batch_prioritized=True)
    # Order: item 2 (0.6), then items 0 and 1 tie at 0.5 -> item 0 first.
    # First choices: e0 <- item 2 (0), e0 <- item 0 (1), e1 <- item 1 (0).
    # Second: e2 <- item 2 (0), e1 <- item 0 (1), e2 <- item 1 (1).
    np.testing.assert_array_equal(_np(plan["position"]), [[1, 1], [0, 1], [0, 0]])
    np.testing.assert_array_equal(
        _np(plan["kept"]), [[False, False], [True, False], [True, True]]
    )


def test_renormalised_gates_are_zeroed_only_where_dropped():
    plan = routing.route(
        TOP2, 2, capacity=1, normalize=True, batch_prioritized=False
    )
    np.testing.assert_allclose(
        _np(plan["gates"]), [[0.625, 0.0], [0.625, 0.375], [0.0, 0.0]], rtol=1e-6
    )


def test_expert_load_counts_kept_choices():
    index = np.array([[0, 1], [1, 2], [0, 2]], "int32")
    kept = np.array([[True, False], [True, True], [False, False]])
    # Six choices; kept: e0 once, e1 once, e2 once.
    np.testing.assert_allclose(
        _np(routing.expert_load(index, kept, 4)), [1 / 6, 1 / 6, 1 / 6, 0]
    )


def test_top_k_ties_prefer_lower_experts_after_the_first_choice():
    # Expert 2 is best; experts 0, 1 and 3 tie for second place.
    probs = np.array([[0.2, 0.2, 0.4, 0.2]], "float32")
    gates, index = routing.top_k_gates(probs, 3)
    np.testing.assert_array_equal(_np(index), [[2, 0, 1]])
    np.testing.assert_allclose(_np(gates), [[0.4, 0.2, 0.2]])
