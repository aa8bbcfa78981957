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


def _scatter_rows(num_rows, index, values):
    """A [num_rows + 1] int32 vector with `values` written at `index`.

    Row `num_rows` is a spare row that absorbs writes nobody reads.
    """
    return ops.scatter_update(
        ops.zeros((num_rows + 1,), "int32"),
        ops.reshape(index, (-1, 1)),
        ops.reshape(values, (-1,)),
    )


def slot_dispatch(items, plan, capacity, num_experts, run_experts, constrain=None):
    """Capacity-based dispatch through an [E, G*C*P, d] slot buffer.

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
    num_slots = e * capacity
    kept = plan["kept"]
    slot = plan["expert_index"] * capacity + plan["position"]  # [G, S, K]
    group_ids = ops.arange(groups, dtype="int32")[:, None, None]
    # Flat slot id over all groups; dropped choices write a spare row.
    spare = groups * num_slots
    target = ops.where(kept, group_ids * num_slots + slot, spare)
    item_ids = group_ids * num_items + ops.broadcast_to(
        ops.arange(num_items, dtype="int32")[None, :, None], ops.shape(slot)
    )
    slot_item = _scatter_rows(spare, target, item_ids)[:spare]
    slot_used = _scatter_rows(spare, target, ops.ones_like(item_ids))[:spare]
    flat_items = ops.reshape(items, (-1, per_item, width))
    expert_inputs = ops.take(flat_items, slot_item, axis=0)  # [G*E*C, P, d]
    expert_inputs = ops.where(
        ops.cast(slot_used, "bool")[:, None, None],
        expert_inputs,
        ops.zeros_like(expert_inputs),
    )
    buffer = ops.reshape(expert_inputs, (groups, e, capacity, per_item, width))
    buffer = constrain(buffer, "dispatch_groups")
    buffer = constrain(ops.transpose(buffer, (1, 0, 2, 3, 4)), "dispatch_experts")
    outputs = run_experts(ops.reshape(buffer, (e, -1, width)))
    outputs = ops.reshape(outputs, (e, groups, capacity, per_item, width))
    outputs = constrain(outputs, "combine_experts")
    outputs = constrain(ops.transpose(outputs, (1, 0, 2, 3, 4)), "combine_groups")
    outputs = ops.reshape(outputs, (-1, per_item, width))  # [G*E*C, P, d]
    # Each choice reads its own slot; dropped choices read slot 0 of their
    # group and are replaced by an exact zero.
    read = group_ids * num_slots + ops.where(kept, slot, 0)
    gathered = ops.take(outputs, read, axis=0)  # [G, S, K, P, d]
    gates = ops.cast(plan["gates"], outputs.dtype)[:, :, :, None, None]
    kept_mask = kept[:, :, :, None, None]
    weighted = ops.where(kept_mask, gathered * gates, ops.zeros_like(gathered))
    return ops.sum(weighted, axis=2)
