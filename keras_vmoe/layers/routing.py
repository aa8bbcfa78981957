"""Routing math: top-k gates, routing groups, expert capacity, slot plans.

Pure functions of tensors, written with `keras.ops` only, so tests can call
them directly on tiny hand-made inputs.

Axis letters used in comments:
    G  routing groups (1 unless `group_size` is set)
    S  items in one routing group (tokens for token routing, images for
       image routing)
    E  experts
    K  experts chosen per item (top-k)
    C  capacity: slots per expert in one group
"""

import math

from keras import ops

from keras_vmoe.layers import backends


def _as_int(value):
    """Returns a Python int when `value` is static, else the tensor itself."""
    if isinstance(value, int) or backends.is_symbolic_dim(value):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def compute_capacity(num_items, num_experts, top_k, capacity_factor, multiple_of=None):
    """Slots per expert, `C = ceil(K * S * capacity_factor / E)`.

    With `multiple_of=m`, C is then rounded up to a multiple of m, as vmoe's
    `compute_capacity` does (its default is m = 4). The result is clamped to
    `[1, S]`: an expert never receives an item twice (top-k experts of an
    item are distinct), so more than `S` slots would only hold padding and
    the clamp never changes which choices are kept.

    Args:
        num_items: S, the number of items in the routing group. A Python int,
            or a scalar tensor when the batch size is only known at run time.
        num_experts: E.
        top_k: K.
        capacity_factor: float > 0, or `None` for dropless routing
            (`C = S`: no item is ever dropped).
        multiple_of: None, or a positive int the capacity is rounded up to
            a multiple of (before the clamp).

    Returns:
        The capacity, a Python int when `num_items` is static.
    """
    num_items = _as_int(num_items)
    if capacity_factor is None:
        return num_items
    if isinstance(num_items, int):
        capacity = math.ceil(top_k * num_items * capacity_factor / num_experts)
        if multiple_of:
            capacity += -capacity % multiple_of
        return max(1, min(capacity, num_items))
    capacity = ops.ceil(
        ops.cast(num_items, "float32") * (top_k * capacity_factor / num_experts)
    )
    if multiple_of:
        capacity = ops.ceil(capacity / multiple_of) * multiple_of
    capacity = ops.cast(capacity, "int32")
    return ops.clip(capacity, 1, num_items)


def check_group_size(name, value):
    """Checks a routing group size argument: "image" (every image its own
    group), None (the whole batch) or a positive int (items per group).

    Raises:
        ValueError: naming `name` and the value otherwise.
    """
    if value == "image" or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be 'image' (every image its own routing group), "
            "None (the whole batch) or a positive integer (items per "
            f"group). Received: {name}={value!r}"
        )


def group_items(items, group_size, argument="group_size"):
    """Splits [N, ...] items into [G, S, ...] routing groups of `group_size`.

    Groups are contiguous runs of the flattened batch, so on a data-parallel
    mesh every device holds whole groups and routing never depends on how
    many devices run the model.

    Args:
        items: [N, ...] tensor.
        group_size: S, items per group, or None for one group of all N.
        argument: the name used in error messages.

    Returns:
        [G, S, ...] with G = N / S.

    Raises:
        ValueError: if N is static and not a multiple of `group_size`.
    """
    shape = ops.shape(items)
    if group_size is None:
        return ops.expand_dims(items, 0)
    num_items = _as_int(shape[0])
    if isinstance(num_items, int) and num_items % group_size:
        raise ValueError(
            f"The number of routed items ({num_items}) must be a multiple of "
            f"`{argument}`. Received: {argument}={group_size}"
        )
    return ops.reshape(items, (-1, group_size) + tuple(shape[1:]))


def expert_mask(index, num_experts, mask=None):
    """[..., E] bool: True at each item's expert `index` (a one-hot).

    One comparison with `arange(E)` (`ops.one_hot` costs several ops on
    some backends); `index` must lie in [0, E). Where the optional [...]
    bool `mask` is False the row is all False.
    """
    hot = ops.equal(ops.expand_dims(index, -1), ops.arange(num_experts, dtype="int32"))
    if mask is None:
        return hot
    return ops.logical_and(hot, ops.expand_dims(mask, -1))


def top_k_gates(probs, top_k, normalize=False):
    """Chooses the `top_k` experts of every item.

    Args:
        probs: [..., E] router probabilities (softmax over experts).
        top_k: K, number of experts per item.
        normalize: if True the K chosen gates are rescaled to sum to one
            (needed for exact parity when all experts are equal).

    Returns:
        `(gates, expert_index)`, both [..., K]; `gates` in descending order.
        Ties choose the lower expert index on every backend (K passes of
        a first-maximum argmax, `backends.first_argmax`; torch's `topk` does not
        promise an order among ties). K is small, so this costs little.
    """
    probs = ops.convert_to_tensor(probs)
    num_experts = ops.shape(probs)[-1]
    remaining = probs
    gates, indices = [], []
    for _ in range(top_k):
        index = backends.first_argmax(remaining)
        chosen = ops.cast(expert_mask(index, num_experts), probs.dtype)
        gates.append(ops.sum(probs * chosen, axis=-1))
        indices.append(index)
        if len(indices) < top_k:
            # Probabilities are >= 0: -1 removes the chosen expert.
            remaining = remaining - 2.0 * chosen
    gates = ops.stack(gates, axis=-1)
    expert_index = ops.stack(indices, axis=-1)
    if normalize:
        gates = normalize_gates(gates)
    return gates, ops.cast(expert_index, "int32")


def normalize_gates(gates):
    """Rescales the K gates of every item to sum to one ([..., K])."""
    return gates / ops.maximum(ops.sum(gates, axis=-1, keepdims=True), 1e-9)


def priority_order(priority, batch_prioritized):
    """The order in which the items of each group claim expert slots.

    Batch-prioritized routing (Riquelme et al., 2021, "Scaling Vision with
    Sparse Mixture of Experts", Sec. 3.1) lets the items with the largest
    router probability claim slots first, so capacity drops hit the items
    the router is least sure about. Otherwise items go in their position
    order.

    Args:
        priority: [..., S] the largest router probability of every item
            (before any gate renormalisation).
        batch_prioritized: bool.

    Returns:
        [..., S] int32 permutation per group; among equal priorities the
        lower position goes first, on every backend (a stable sort of
        `-priority`; torch's `topk` and unstable sorts order ties
        arbitrarily).
    """
    shape = ops.shape(priority)
    num_items = shape[-1]
    if not batch_prioritized:
        return ops.broadcast_to(ops.arange(num_items, dtype="int32"), shape)
    return backends.stable_argsort(ops.negative(priority), axis=-1)


def expert_positions(expert_index, order, num_experts, valid=None):
    """Position of every (item, choice) in its expert's queue, per group.

    Choices are served k-major: every item's first choice is placed before
    any item's second choice (as in vmoe), and within one k items follow
    `order`.

    Args:
        expert_index: [G, S, K] int32 chosen experts.
        order: [G, S] int32 permutation from `priority_order`.
        num_experts: E.
        valid: optional [G, S] bool; invalid items take no place in any
            queue (their position is -1).

    Returns:
        [G, S, K] int32: 0 for the first item an expert receives in its
        group, 1 for the second, and so on.
    """
    shape = ops.shape(expert_index)
    num_items, top_k = shape[1], shape[2]
    # [G, K, S] in serving order, then flattened k-major to [G, K*S].
    served = ops.take_along_axis(expert_index, order[:, :, None], axis=1)
    served = ops.reshape(ops.transpose(served, (0, 2, 1)), (-1, top_k * num_items))
    served_valid = None
    if valid is not None:
        served_valid = ops.take_along_axis(valid, order, axis=1)
        served_valid = ops.tile(served_valid, (1, top_k))
    one_hot = ops.cast(expert_mask(served, num_experts, served_valid), "int32")
    # Running count per expert, read at each choice's own expert.
    position = ops.sum(ops.cumsum(one_hot, axis=1) * one_hot, axis=-1) - 1
    position = ops.transpose(ops.reshape(position, (-1, top_k, num_items)), (0, 2, 1))
    # Back from serving order to item order: the inverse permutation.
    inverse = ops.cast(ops.argsort(order, axis=-1), "int32")
    return ops.take_along_axis(position, inverse[:, :, None], axis=1)


def route(probs, top_k, capacity, normalize=False, batch_prioritized=True):
    """Turns router probabilities into a dispatch plan.

    Items whose probabilities are not finite (NaN or inf router input) claim
    no slot and are marked dropped, so they can never take capacity from the
    other items; `valid` reports them (see `expert_load`).

    Args:
        probs: [S, E] or [G, S, E] float32 router probabilities; with a group
            axis, capacity and priority are per group.
        top_k: K.
        capacity: C, slots per expert in one group (`compute_capacity`).
        normalize: renormalise the K gates to sum to one. Priority still
            follows the raw router probability.
        batch_prioritized: fill slots by descending top router probability.

    Returns:
        A dict of [..., S, K] tensors shaped like `probs` without E:
            `gates` (float32, zero where the choice was dropped),
            `expert_index` (int32), `position` (int32 slot within the
            expert, meaningless where dropped), `kept` (bool);
        and `valid` ([..., S] bool: the item's probabilities are finite).
    """
    probs = ops.convert_to_tensor(probs)
    ungrouped = len(probs.shape) == 2
    if ungrouped:
        probs = ops.expand_dims(probs, 0)
    num_experts = ops.shape(probs)[-1]
    valid = ops.all(ops.isfinite(probs), axis=-1)  # [G, S]
    safe_probs = ops.where(valid[:, :, None], probs, 0.0)
    raw_gates, expert_index = top_k_gates(safe_probs, top_k)
    priority = ops.where(valid, raw_gates[:, :, 0], -1.0)
    order = priority_order(priority, batch_prioritized)
    position = expert_positions(expert_index, order, num_experts, valid)
    kept = ops.logical_and(position < capacity, valid[:, :, None])
    gates = normalize_gates(raw_gates) if normalize else raw_gates
    plan = {
        "gates": ops.where(kept, gates, 0.0),
        "expert_index": expert_index,
        "position": position,
        "kept": kept,
        "valid": valid,
    }
    if ungrouped:
        plan = {name: value[0] for name, value in plan.items()}
    return plan


def expert_load(expert_index, kept, num_experts, valid=None):
    """Fraction of all K*S choices that each expert received (after drops).

    Args:
        expert_index: [..., K] int32.
        kept: [..., K] bool.
        num_experts: E.
        valid: optional [...] bool from `route`. If any item is invalid
            (non-finite router input) every entry is NaN: bad data shows as
            NaN load, never as a collapse onto one expert.

    Returns:
        [E] float32; sums to `1 - dropped fraction`.
    """
    hot = expert_mask(
        ops.reshape(expert_index, (-1,)), num_experts, ops.reshape(kept, (-1,))
    )
    load = ops.mean(ops.cast(hot, "float32"), axis=0)
    if valid is None:
        return load
    all_valid = ops.all(valid)
    return ops.where(all_valid, load, float("nan"))
