"""Routing math: top-k gates, expert capacity and slot assignment.

Pure functions of tensors, written with `keras.ops` only, so tests can call
them directly on tiny hand-made inputs.

Axis letters used in comments (see DESIGN.md):
    S  items in the routing group (tokens for token routing, images for
       image routing)
    E  experts
    K  experts chosen per item (top-k)
    C  capacity: slots per expert
"""

import math

from keras import ops


def _as_int(value):
    """Returns a Python int when `value` is static, else the tensor itself."""
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def compute_capacity(num_items, num_experts, top_k, capacity_factor):
    """Slots per expert, `C = ceil(K * S * capacity_factor / E)`.

    The result is clamped to `[1, S]`: an expert never receives an item twice
    (top-k experts of an item are distinct), so more than `S` slots would only
    hold padding.

    Args:
        num_items: S, the number of items in the routing group. A Python int,
            or a scalar tensor when the batch size is only known at run time.
        num_experts: E.
        top_k: K.
        capacity_factor: float > 0, or `None` for dropless routing
            (`C = S`: no item is ever dropped).

    Returns:
        The capacity, a Python int when `num_items` is static.
    """
    num_items = _as_int(num_items)
    if capacity_factor is None:
        return num_items
    if isinstance(num_items, int):
        capacity = math.ceil(top_k * num_items * capacity_factor / num_experts)
        return max(1, min(capacity, num_items))
    capacity = ops.ceil(
        ops.cast(num_items, "float32") * (top_k * capacity_factor / num_experts)
    )
    capacity = ops.cast(capacity, "int32")
    return ops.clip(capacity, 1, num_items)


def top_k_gates(probs, top_k, normalize=False):
    """Chooses the `top_k` experts of every item.

    Args:
        probs: [S, E] router probabilities (softmax over experts).
        top_k: K, number of experts per item.
        normalize: if True the K chosen gates are rescaled to sum to one
            (needed for exact parity when all experts are equal).

    Returns:
        `(gates, expert_index)`, both [S, K]; `gates` in descending order.
        Ties choose the lower expert index on every backend (K passes of
        `argmax`, which returns the first maximum; torch's `topk` does not
        promise an order among ties). K is small, so this costs little.
    """
    probs = ops.convert_to_tensor(probs)
    num_experts = ops.shape(probs)[-1]
    remaining = probs
    gates, indices = [], []
    for _ in range(top_k):
        index = ops.argmax(remaining, axis=-1)
        chosen = ops.one_hot(index, num_experts, dtype=probs.dtype)
        gates.append(ops.sum(probs * chosen, axis=-1))
        indices.append(index)
        # Probabilities are >= 0: -1 removes the chosen expert.
        remaining = remaining - 2.0 * chosen
    gates = ops.stack(gates, axis=-1)
    expert_index = ops.stack(indices, axis=-1)
    if normalize:
        gates = gates / ops.maximum(
            ops.sum(gates, axis=-1, keepdims=True), 1e-9
        )
    return gates, ops.cast(expert_index, "int32")


def priority_order(top_gate, batch_prioritized):
    """The order in which items claim expert slots.

    Batch-prioritized routing (Riquelme et al., 2021, "Scaling Vision with
    Sparse Mixture of Experts", Sec. 3.1) lets the items with the largest top
    gate claim slots first, so capacity drops hit the items the router is
    least sure about. Otherwise items go in their position order.

    Args:
        top_gate: [S] the largest gate of every item.
        batch_prioritized: bool.

    Returns:
        [S] int32 permutation; ties keep position order (`top_k` is stable on
        every backend, unlike `argsort` on TensorFlow).
    """
    num_items = ops.shape(top_gate)[0]
    if not batch_prioritized:
        return ops.arange(num_items, dtype="int32")
    _, order = ops.top_k(top_gate, num_items, sorted=True)
    return ops.cast(order, "int32")


def expert_positions(expert_index, order, num_experts):
    """Position of every (item, choice) in its expert's queue.

    Choices are served k-major: every item's first choice is placed before
    any item's second choice (as in vmoe), and within one k items follow
    `order`.

    Args:
        expert_index: [S, K] int32 chosen experts.
        order: [S] int32 permutation from `priority_order`.
        num_experts: E.

    Returns:
        [S, K] int32: 0 for the first item an expert receives, 1 for the
        second, and so on.
    """
    num_items = ops.shape(expert_index)[0]
    top_k = ops.shape(expert_index)[1]
    # [K, S] in serving order.
    served = ops.transpose(ops.take(expert_index, order, axis=0))
    one_hot = ops.one_hot(ops.reshape(served, (-1,)), num_experts, dtype="int32")
    # Running count per expert, read at each choice's own expert: [K*S].
    position = ops.sum(ops.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1
    position = ops.transpose(ops.reshape(position, (top_k, num_items)))
    # Back from serving order to item order: inverse permutation of `order`.
    inverse = ops.scatter_update(
        ops.zeros((num_items,), "int32"),
        ops.expand_dims(order, -1),
        ops.arange(num_items, dtype="int32"),
    )
    return ops.take(position, inverse, axis=0)


def route(probs, top_k, capacity, normalize=False, batch_prioritized=True):
    """Turns router probabilities into a dispatch plan.

    Args:
        probs: [S, E] float32 router probabilities.
        top_k: K.
        capacity: C, slots per expert (from `compute_capacity`).
        normalize: renormalise the K gates to sum to one.
        batch_prioritized: fill slots by descending top gate.

    Returns:
        A dict of [S, K] tensors:
            `gates` (float32, zero where the choice was dropped),
            `expert_index` (int32), `position` (int32 slot within the
            expert, meaningless where dropped), `kept` (bool).
    """
    num_experts = ops.shape(probs)[-1]
    gates, expert_index = top_k_gates(probs, top_k, normalize)
    order = priority_order(gates[:, 0], batch_prioritized)
    position = expert_positions(expert_index, order, num_experts)
    kept = position < capacity
    return {
        "gates": gates * ops.cast(kept, gates.dtype),
        "expert_index": expert_index,
        "position": position,
        "kept": kept,
    }


def expert_load(expert_index, kept, num_experts):
    """Fraction of all K*S choices that each expert received (after drops).

    Args:
        expert_index: [..., K] int32.
        kept: [..., K] bool.
        num_experts: E.

    Returns:
        [E] float32; sums to `1 - dropped fraction`.
    """
    one_hot = ops.one_hot(
        ops.reshape(expert_index, (-1,)), num_experts, dtype="float32"
    )
    kept = ops.cast(ops.reshape(kept, (-1, 1)), "float32")
    return ops.mean(one_hot * kept, axis=0)
