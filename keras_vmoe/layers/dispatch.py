"""Dispatch: moving routed items into expert slots and their results back.

Pure functions of tensors (`keras.ops` only). A dispatch function takes the
grouped items, a routing plan from `keras_vmoe.layers.routing.route` and a
function that runs every expert on its own rows, and returns every item's
gate-weighted sum of its experts' outputs.

Axis letters: G groups, S items per group, P tokens per item (1 for token
routing, T for image routing), d width, E experts, C slots per expert and
group, K choices per item.

Samples never mix through padding: slots no item claims hold exact zeros
(not a copy of another item), and a dropped choice contributes an exact
zero selected with `where` (not a product with a zero gate, which would
turn a neighbour's NaN or inf into NaN).
"""

from keras import ops


def slot_dispatch(items, plan, capacity, num_experts, run_experts, constrain=None):
    """Capacity-based dispatch through a [G, E, C, P, d] slot buffer.

    Every index operation is batched over the group axis G (no index ever
    points into another group), so when G is sharded over devices each
    device fills and reads only its own groups' slots, and the only data
    that crosses devices is the [G, E, ...] <-> [E, G, ...] exchange
    (an all-to-all under expert parallelism).

    Args:
        items: [G, S, P, d] routed items.
        plan: dict of [G, S, K] `expert_index`, `position`, `kept`, `gates`.
        capacity: C (a Python int or a scalar int tensor).
        num_experts: E.
        run_experts: callable [E, N, d] -> [E, N, d]; expert e runs only on
            its own N rows.
        constrain: optional callable `(tensor, name) -> tensor` applied to
            the `[G, E, C, P, d]` buffers (`"dispatch_groups"`,
            `"combine_groups"`) and the `[E, G, C, P, d]` buffers
            (`"dispatch_experts"`, `"combine_experts"`); expert
            parallelism uses it to place sharding constraints.

    Returns:
        [G, S, P, d]: `sum_k gate_k * expert_k(item)` over kept choices.
    """
    constrain = constrain or (lambda x, name: x)
    shape = ops.shape(items)
    groups, num_items, per_item, width = shape[0], shape[1], shape[2], shape[3]
    e = num_experts
    kept = plan["kept"]
    top_k = kept.shape[-1]
    expert_index = plan["expert_index"]
    position = plan["position"]
    # Kept choices sorted by (expert, position): expert e's choices then
    # form one run, in slot order (positions of kept choices are 0, 1, ...
    # without gaps and < C <= S). Dropped choices sort last.
    key = ops.where(kept, expert_index * num_items + position, e * num_items)
    order = ops.argsort(ops.reshape(key, (groups, -1)), axis=-1)  # [G, S*K]
    kept_int = ops.cast(kept, "int32")
    counts = ops.sum(
        ops.one_hot(expert_index, e, dtype="int32") * kept_int[..., None],
        axis=(1, 2),
    )  # [G, E]
    starts = ops.cumsum(counts, axis=-1) - counts
    slots = ops.arange(capacity, dtype="int32")[None, None, :]
    used = slots < counts[:, :, None]  # [G, E, C]
    rank = ops.where(used, starts[:, :, None] + slots, 0)
    choice = ops.take_along_axis(
        order, ops.reshape(rank, (groups, -1)), axis=1
    )  # [G, E*C]: the flat (item, k) id of each slot's occupant
    slot_item = ops.cast(choice // top_k, "int32")
    expert_inputs = ops.take_along_axis(
        items, slot_item[:, :, None, None], axis=1
    )  # [G, E*C, P, d]
    used = ops.reshape(used, (groups, -1))[:, :, None, None]
    expert_inputs = ops.where(
        used, expert_inputs, ops.zeros_like(expert_inputs)
    )
    buffer = ops.reshape(expert_inputs, (groups, e, capacity, per_item, width))
    buffer = constrain(buffer, "dispatch_groups")
    buffer = constrain(ops.transpose(buffer, (1, 0, 2, 3, 4)), "dispatch_experts")
    outputs = run_experts(ops.reshape(buffer, (e, -1, width)))
    outputs = ops.reshape(outputs, (e, groups, capacity, per_item, width))
    outputs = constrain(outputs, "combine_experts")
    outputs = constrain(ops.transpose(outputs, (1, 0, 2, 3, 4)), "combine_groups")
    outputs = ops.reshape(outputs, (groups, -1, per_item, width))
    # Each choice reads its own slot of its group; dropped choices read
    # slot 0 and are replaced by an exact zero.
    read = ops.where(kept, expert_index * capacity + position, 0)
    read = ops.reshape(read, (groups, -1))[:, :, None, None]
    gathered = ops.take_along_axis(outputs, read, axis=1)  # [G, S*K, P, d]
    gathered = ops.reshape(
        gathered, (groups, num_items, top_k, per_item, width)
    )
    gates = ops.cast(plan["gates"], outputs.dtype)[:, :, :, None, None]
    kept_mask = kept[:, :, :, None, None]
    weighted = ops.where(kept_mask, gathered * gates, ops.zeros_like(gathered))
    return ops.sum(weighted, axis=2)
