"""Dispatch: moving routed items into expert slots and their results back.

Pure functions of tensors (`keras.ops` only). A dispatch function takes the
grouped items, a routing plan from `keras_vmoe.layers.routing.route` and a
function that runs every expert on its own rows, and returns every item's
gate-weighted sum of its experts' outputs.

Axis letters: G groups, S items per group, P tokens per item (1 for token
routing, T for image routing), d width, E experts, C slots per expert and
group, K choices per item.

Two paths:
- `slot_dispatch` fills an [E, G*C*P, d] buffer of capacity slots: its cost
  follows E*C, whether or not the slots are used.
- `sorted_dispatch` sorts the kept (item, choice) pairs by expert and runs
  every expert only on its own rows: exactly the routed rows where shapes
  may be dynamic (TensorFlow without XLA, torch), and under XLA a static
  number of tiles, each expert's rows padded to a whole tile (MegaBlocks'
  block-sparse layout): at most K*S + E*(tile-1) rows. The experts get the
  rows through a `RowExperts` (`matmul`, `mlp`), so the layout can run the
  whole expert MLP of a tile at once (the JAX tile loop does).

Samples never mix through padding: slots no item claims hold exact zeros
(not a copy of another item), and a dropped choice contributes an exact
zero: selected with `where` on the slot path (not a product with a zero
gate, which would turn a neighbour's NaN or inf into NaN); on the sorted
path it reads a spare row of zeros, with the zero gate `route` gives it.
"""

import math

from keras import ops

from keras_vmoe.layers import backends
from keras_vmoe.layers.feed_forward import apply_activation
from keras_vmoe.layers.routing import _as_int
from keras_vmoe.layers.routing import expert_mask

DISPATCH_MODES = ("auto", "slots", "sorted")

# Token rows of a full-size tile of the static sorted layout (shorter tiles
# were measured slower per row on a CPU; they serve small batches only).
MIN_TILE_TOKENS = 128


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
    counts = ops.sum(
        ops.cast(expert_mask(expert_index, e, kept), "int32"), axis=(1, 2)
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
    expert_inputs = ops.where(used, expert_inputs, 0.0)
    buffer = ops.reshape(expert_inputs, (groups, e, capacity, per_item, width))
    buffer = constrain(buffer, "dispatch_groups")
    buffer = constrain(ops.transpose(buffer, (1, 0, 2, 3, 4)), "dispatch_experts")
    outputs = run_experts(ops.reshape(buffer, (e, -1, width)))
    outputs = ops.reshape(outputs, (e, groups, capacity, per_item, width))
    outputs = constrain(outputs, "combine_experts")
    outputs = constrain(ops.transpose(outputs, (1, 0, 2, 3, 4)), "combine_groups")
    outputs = ops.reshape(outputs, (groups, -1, per_item, width))
    # Every slot times its occupant's gate (zero in unused slots), then
    # every item adds the slots its kept choices read; dropped choices read
    # slot 0 and are replaced by an exact zero.
    gates = ops.reshape(ops.cast(plan["gates"], outputs.dtype), (groups, -1))
    slot_gates = ops.where(
        used[:, :, 0, 0], ops.take_along_axis(gates, choice, axis=1), 0.0
    )  # [G, E*C]
    outputs = backends.scale_rows(outputs, slot_gates)
    read = ops.where(kept, expert_index * capacity + position, 0)
    total = None
    for k in range(top_k):
        slot = ops.take_along_axis(outputs, read[:, :, k, None, None], axis=1)
        slot = ops.where(kept[:, :, k, None, None], slot, 0.0)  # [G, S, P, d]
        total = slot if total is None else total + slot
    return total


def resolve_dispatch(
    dispatch, dropless_tokens=False, static_shape=True, layout=None
):
    """The path `dispatch` ("auto", "slots" or "sorted") runs in this trace.

    "auto" takes the sorted path where shapes may be dynamic (TensorFlow
    without XLA, the Keras default on a CPU; torch eager, where it was
    measured faster on a CPU at every capacity): experts run on exactly
    the routed rows.

    Under XLA (JAX; TensorFlow with `jit_compile=True`) the sorted path is
    a static layout of row tiles: the kept rows plus each expert's padding
    to a whole tile, about E*(tile-1)/2 rows, where the slot path computes
    all E*C capacity slots, used or not. "auto" takes the sorted path when
    its expected rows (`layout`, a `StaticLayout`) are no more than the
    slots (ties go to it: it never computes a dropped choice), and on JAX,
    whose fused tile MLP keeps far less activation memory, when they are
    at most 10 % more with full-size tiles. So: dropless token routing;
    capacity factors above 1 unless the batch is small; on JAX capacity
    1.0 at large batches. Measured on a CPU, B=32 of 197 tokens, E=8,
    forward + backward against dense: capacity 1.0 top-1 / top-2 sorted
    1.02x / 0.78x with 0.81x / 0.72x its memory, slots 0.90-1.04x / 1.11x
    with 1.27x / 1.35x; B=1 at capacity 1.25: slots 2.4x, sorted 3.5x
    with 16-row tiles, 5.7x with 128-row tiles. `jax.lax.ragged_dot` is
    never used: on a CPU it is a dense masked matmul.

    Under a `keras.distribution` (data or expert parallelism) "auto" takes
    the slot path: its buffers are laid out per routing group, so every
    device works on its own groups, while the sorted layout orders rows
    across all groups (devices) and would gather them everywhere.

    The static layout needs the number of items at trace time: under XLA
    with `static_shape=False` (TensorFlow traces `fit` steps with an
    unknown batch size) both "auto" and "sorted" run the slot path, which
    gives the same results.
    """
    if dispatch == "slots":
        return dispatch
    if dispatch == "auto" and backends.distributed():
        return "slots"
    if not backends.in_xla_context():
        if dispatch == "sorted" or dropless_tokens:
            return "sorted"
        return "sorted" if backends.sorted_beats_slots() else "slots"
    if not static_shape:
        return "slots"
    if dispatch == "sorted":
        return "sorted"
    if layout is None:
        return "slots"
    # The fused JAX tile MLP holds about a third of the slot path's
    # activation memory, and the bound counts dropped choices as rows:
    # with full-size tiles (short ones cost more per row) it takes up to
    # 10 % more expected rows.
    full_tiles = layout.tile * layout.per_item >= MIN_TILE_TOKENS
    slack = 1.1 if full_tiles and backends.tiles_fuse_mlp() else 1.0
    if layout.expected_rows <= slack * layout.slot_rows:
        return "sorted"
    return "slots"


class StaticLayout:
    """Sizes of the static (XLA) sorted layout, known at trace time.

    Attributes:
        per_item: P, matmul rows per item.
        tile: items per tile.
        num_tiles: tiles of the layout (the worst case: every expert's
            last tile holds a single row).
        num_rows: `num_tiles * tile` items.
        expected_rows: matmul rows the sorted path computes in the mean:
            every routed (item, choice) pair's P rows plus (tile - 1) / 2
            items of padding per expert.
        slot_rows: matmul rows of the slot path, E*G*C*P.
    """

    def __init__(
        self,
        groups,
        num_items,
        per_item,
        top_k,
        capacity,
        num_experts,
        tile_size=None,
    ):
        e = num_experts
        num_choices = groups * num_items * top_k
        capacity = _as_int(capacity)
        if isinstance(capacity, int):
            num_choices = min(num_choices, e * groups * capacity)
        self.per_item = per_item
        self.tile = tile_size or tile_items(num_choices, e, per_item)
        self.num_tiles = (num_choices + e * (self.tile - 1)) // self.tile
        self.num_rows = self.num_tiles * self.tile
        self.expected_rows = (num_choices + e * (self.tile - 1) / 2) * per_item
        self.slot_rows = (
            e * groups * capacity * per_item
            if isinstance(capacity, int)
            else float("inf")
        )

    @classmethod
    def of(cls, items_shape, top_k, capacity, num_experts, tile_size=None):
        """The layout of [G, S, P, d] items, or None when not static."""
        sizes = [_as_int(v) for v in items_shape[:3]]
        if not all(isinstance(v, int) for v in sizes):
            return None
        return cls(*sizes, top_k, capacity, num_experts, tile_size)


def _sorted_rows(plan, num_experts, tile):
    """Row of every kept (item, choice) in the expert-sorted layout.

    Rows are ordered by expert, then group, then slot position (the order
    of the slot path). Expert e's rows start at a multiple of `tile`.

    Returns:
        `(row, totals, padded_ends)`: [G, S, K] int32 rows (meaningless
        where dropped), [E] kept choices per expert, and [E] the end of
        each expert's padded segment.
    """
    expert_index = plan["expert_index"]
    kept_hot = expert_mask(expert_index, num_experts, plan["kept"])
    counts = ops.sum(ops.cast(kept_hot, "int32"), axis=(1, 2))  # [G, E]
    group_start = ops.cumsum(counts, axis=0) - counts
    totals = ops.sum(counts, axis=0)  # [E]
    padded = (totals + (tile - 1)) // tile * tile
    padded_ends = ops.cumsum(padded)
    start = group_start + (padded_ends - padded)[None, :]  # [G, E]
    shape = ops.shape(expert_index)
    row = ops.take_along_axis(
        start, ops.reshape(expert_index, (shape[0], -1)), axis=1
    )
    row = ops.reshape(row, shape)
    return row + plan["position"], totals, padded_ends


def tile_items(num_choices, num_experts, per_item):
    """Items per tile of the static sorted path.

    About 1/16 of an expert's balanced share of token rows, a power of two
    in [128, 512] tokens (smaller tiles were measured slower per row on a
    CPU), so at large batches the padding (at most E*(tile-1) rows, half
    that on average) stays a few percent of the routed rows; but never
    more than that balanced share (rounded down to a power of two), so a
    small batch pads each expert by at most its own share of rows.
    """
    share = num_choices * per_item / num_experts
    tokens = 2 ** int(math.log2(max(share / 16, 1)))
    tokens = min(
        max(tokens, MIN_TILE_TOKENS),
        4 * MIN_TILE_TOKENS,
        2 ** int(math.log2(max(share, 1))),
    )
    return max(1, tokens // per_item)


class RowExperts:
    """How `sorted_dispatch` applies each row's expert (given to `run_rows`).

    `matmul(x [R, a], kernels [E, a, c], biases [E, c]) -> [R, c]` applies
    each row's expert kernel and bias; `mlp(x, kernel_1, bias_1, kernel_2,
    bias_2, activation) -> [R, d]` its whole MLP `fc2(act(fc1(x)))`, which
    a layout may run fused (the JAX tile loop does).
    """

    def matmul(self, x, kernels, biases):
        raise NotImplementedError

    def mlp(self, x, kernel_1, bias_1, kernel_2, bias_2, activation):
        hidden = self.matmul(x, kernel_1, bias_1)
        hidden = apply_activation(hidden, activation)
        return self.matmul(hidden, kernel_2, bias_2)


class SegmentExperts(RowExperts):
    """Exactly the routed rows: one matmul per expert segment."""

    def __init__(self, counts):
        self.counts = counts

    def matmul(self, x, kernels, biases):
        return backends.segment_matmul(x, kernels, biases, self.counts)


class TiledExperts(RowExperts):
    """The static XLA layout: tiles of rows, each tile one expert's.

    Static shapes, differentiable on every backend (Keras' TensorFlow
    `scan` cannot be differentiated under XLA, so the backend adapter
    picks the form). `live` marks the tiles before the last routed row;
    the others are never read back.
    """

    def __init__(self, tile_expert, live):
        self.tile_expert = tile_expert
        self.live = live

    def _tiles(self, x):
        return ops.reshape(x, (self.live.shape[0], -1, x.shape[-1]))

    def matmul(self, x, kernels, biases):
        outputs = backends.tile_matmul(
            self._tiles(x), kernels, biases, self.tile_expert, self.live
        )
        return ops.reshape(outputs, (-1, kernels.shape[-1]))

    def mlp(self, x, kernel_1, bias_1, kernel_2, bias_2, activation):
        outputs = backends.tile_mlp(
            self._tiles(x),
            kernel_1,
            bias_1,
            kernel_2,
            bias_2,
            self.tile_expert,
            self.live,
            activation,
        )
        return ops.reshape(outputs, (-1, kernel_2.shape[-1]))


def sorted_dispatch(
    items,
    plan,
    capacity,
    num_experts,
    run_rows,
    static=None,
    tile_size=None,
):
    """Dispatch whose cost follows the routed rows, not the capacity slots.

    Same routing, outputs and exact zeros as `slot_dispatch`: the kept
    (item, choice) pairs are laid out sorted by expert (then group, then
    slot position), every expert runs on its own rows only, and every
    choice reads its row back.

    Args:
        items: [G, S, P, d] routed items.
        plan: dict of [G, S, K] `expert_index`, `position`, `kept`, `gates`
            (zero where dropped, as `route` returns them).
        capacity: C, used for the static row bound.
        num_experts: E.
        run_rows: callable `(rows [R, d], experts) -> [R, d]` running the
            expert MLP, where `experts` is a `RowExperts`: its `matmul` and
            `mlp` apply each row's expert.
        static: True for the XLA layout (a static number of tiles), False
            for exactly the routed rows (dynamic shapes), None to decide
            from the backend and compile mode.
        tile_size: items per tile of the static layout (default
            `tile_items`).

    Returns:
        [G, S, P, d]: `sum_k gate_k * expert_k(item)` over kept choices.
    """
    if static is None:
        static = backends.in_xla_context()
    e = num_experts
    shape = ops.shape(items)
    groups, num_items, per_item, width = shape[0], shape[1], shape[2], shape[3]
    kept = plan["kept"]
    top_k = kept.shape[-1]
    tile = 1
    if static:
        layout = StaticLayout.of(shape, top_k, capacity, e, tile_size)
        groups, num_items, per_item = (_as_int(v) for v in shape[:3])
        tile, num_tiles, num_rows = (
            layout.tile,
            layout.num_tiles,
            layout.num_rows,
        )
    row, totals, padded_ends = _sorted_rows(plan, e, tile)
    if not static:
        # tile == 1: the rows are exactly the kept choices.
        counts, num_rows = backends.segment_sizes(totals, per_item)
    # (item, choice) pairs numbered item * K + k, over all groups.
    choice_ids = ops.reshape(
        ops.arange(groups * num_items * top_k, dtype="int32"), ops.shape(row)
    )
    # Dropped choices write (and read) the spare row `num_rows`.
    target = ops.where(kept, row, num_rows)
    readers = ops.reshape(target, (-1, top_k))  # [N, K]: each item's rows
    # The choice in each row, -1 in padding rows (no choice writes there).
    row_choice = _scatter_rows(num_rows, target, choice_ids + 1)[:num_rows] - 1
    row_item = ops.maximum(row_choice, 0) // top_k
    # Padding rows of the static layout hold exact zeros, not a copy of
    # item 0; the dynamic layout has none.
    used = row_choice >= 0 if static else None
    flat_items = ops.reshape(items, (-1, per_item, width))
    rows = backends.gather_rows(
        flat_items, row_item, used, readers
    )  # [R, P, d]
    if static:
        tile_start = ops.arange(num_tiles, dtype="int32") * tile
        tile_expert = ops.sum(
            ops.cast(padded_ends[None, :] <= tile_start[:, None], "int32"),
            axis=1,
        )
        tile_expert = ops.minimum(tile_expert, e - 1)
        live = tile_start < padded_ends[-1]
        experts = TiledExperts(tile_expert, live)
    else:
        experts = SegmentExperts(counts)
    outputs = run_rows(ops.reshape(rows, (-1, width)), experts)
    outputs = ops.reshape(outputs, (-1, per_item, width))
    # Every row times its choice's gate (zero in padding rows), then each
    # item sums its rows; dropped choices read a spare row of exact zeros.
    gates = ops.cast(ops.reshape(plan["gates"], (-1,)), outputs.dtype)
    row_gate = backends.gather_rows(
        gates, ops.maximum(row_choice, 0), used, ops.reshape(target, (-1, 1))
    )
    outputs = backends.scale_rows(outputs, row_gate)
    routed = backends.sum_rows(outputs, readers, row_item, used)
    return ops.reshape(routed, (groups, num_items, per_item, width))
