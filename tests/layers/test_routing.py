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


# Exact ties in router probabilities (an all-zero router, as upcycling
# recipes may start from): every backend must keep the same choices, the
# lower positions first.


def _zero_router_plan(num_items, capacity_factor, compiled=False):
    logits = np.zeros((num_items, 4), "float32")  # E = 4
    capacity = routing.compute_capacity(num_items, 4, 2, capacity_factor)

    def plan(logits):
        return routing.route(
            ops.softmax(logits, axis=-1), 2, capacity, batch_prioritized=True
        )

    if compiled:
        plan = _compiled(plan)
    return capacity, {k: _np(v) for k, v in plan(logits).items()}


def _compiled(function):
    """`function` under XLA where the backend compiles (JAX, TensorFlow)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(function)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    return function


@pytest.mark.parametrize("compiled", [False, True])
def test_zero_router_ties_keep_the_lowest_positions(compiled):
    # 8 tokens, E = 4, top-2, capacity ceil(2 * 8 * 0.75 / 4) = 3. Every
    # probability is 0.25: each token picks experts 0 then 1 (lower expert
    # first), every priority ties, so tokens claim slots in position
    # order: token s is at position s in both queues; tokens 0-2 are kept.
    capacity, plan = _zero_router_plan(8, 0.75, compiled)
    assert capacity == 3
    np.testing.assert_array_equal(plan["expert_index"], [[0, 1]] * 8)
    np.testing.assert_array_equal(
        plan["position"],
        [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6], [7, 7]],
    )
    np.testing.assert_array_equal(
        plan["kept"],
        [[True, True]] * 3 + [[False, False]] * 5,
    )
    np.testing.assert_allclose(
        plan["gates"], [[0.25, 0.25]] * 3 + [[0.0, 0.0]] * 5
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_zero_router_ties_at_64_tokens(compiled):
    # 64 tokens (128 choices): capacity ceil(2 * 64 * 0.75 / 4) = 24, so
    # tokens 0-23 keep both choices and tokens 24-63 none. Large enough
    # for an unstable sort (torch's `topk`) to reorder the ties.
    capacity, plan = _zero_router_plan(64, 0.75, compiled)
    assert capacity == 24
    positions = np.arange(64)
    np.testing.assert_array_equal(
        plan["position"], np.stack([positions, positions], axis=-1)
    )
    np.testing.assert_array_equal(
        plan["kept"], np.repeat((positions < 24)[:, None], 2, axis=-1)
    )


def test_priority_order_breaks_ties_by_position():
    # Descending priority; equal priorities keep their position order.
    priority = np.array(
        [[0.5, 0.7, 0.5, 0.7, 0.5, 0.9, 0.7, 0.5], [0.25] * 8], "float32"
    )
    order = _np(routing.priority_order(priority, batch_prioritized=True))
    np.testing.assert_array_equal(
        order, [[5, 1, 3, 6, 0, 2, 4, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    )
    assert order.dtype == np.int32


def test_invalid_items_with_tied_priorities_go_last_in_position_order():
    # Invalid items have priority -1: after every valid one, and among
    # themselves in position order.
    priority = np.array([[-1.0, 0.3, -1.0, 0.3, 0.6, -1.0]], "float32")
    order = _np(routing.priority_order(priority, batch_prioritized=True))
    np.testing.assert_array_equal(order, [[4, 1, 3, 0, 2, 5]])
