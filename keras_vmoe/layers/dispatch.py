"""Dispatch: moving routed items to their experts and the results back.

The seam between routing and experts. A router decides a plan (which item
goes to which expert, with which weight); a `Dispatcher` takes the items,
the plan and the expert bank (`keras_vmoe.layers.experts.StackedExperts`)
and returns every item's weighted sum of its experts' outputs. The MoE
layers never know which dispatcher runs: `choose_dispatcher` picks one
per call from the layer's `dispatch` argument, the backend, whether the
step is compiled by XLA, the distribution, the capacity and the batch.

Dispatchers (`DISPATCHERS`, by name):
- "slots" (`SlotDispatcher`): an [E, G*C*P, d] buffer of capacity slots,
  one batched matmul per expert weight; its cost follows E*C, whether or
  not the slots are used. Laid out per routing group, so under expert
  parallelism the only cross-device traffic is the all-to-all of
  `expert_exchange`.
- "sorted" (`SortedDispatcher`): the kept (item, choice) pairs sorted by
  expert, every expert on its own rows only: exactly the routed rows
  where shapes may be dynamic (TensorFlow without XLA, torch), and under
  XLA a static number of tiles, each expert's rows padded to a whole tile
  (MegaBlocks' block-sparse layout): at most K*S + E*(t-1) rows.
- "gather" (`GatherDispatcher`): dropless image routing, every image
  through the weights of its K experts, gathered per image.
- "expert_choice" and "soft": the plans of `ExpertChoiceFeedForward`
  (every expert picks C items) and `SoftMoEFeedForward` (dense dispatch
  and combine weights).

A new path is one `Dispatcher` subclass registered with
`register_dispatcher` (plus the backend adapter functions it needs in
`keras_vmoe.layers.backends`); its `preferred` hook lets "auto" pick it.

Samples never mix through padding: slots no item claims hold exact zeros
(not a copy of another item), and a dropped choice contributes an exact
zero: selected with `where` on the slot path (not a product with a zero
gate, which would turn a neighbour's NaN or inf into NaN); on the sorted
path it reads a spare row of zeros, with the zero gate `route` gives it.

Axis letters: see `docs/glossary.md` (G groups, S items per group, P
tokens per item, d width, E experts, C slots per expert and group, K
choices per item, R rows of the sorted layout, L tiles of t rows).
"""

import math

from keras import ops

from keras_vmoe.layers import backends
from keras_vmoe.layers.feed_forward import apply_activation
from keras_vmoe.layers.routing import _as_int
from keras_vmoe.layers.routing import expert_mask

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
    shape = ops.shape(items)
    groups, num_items, per_item, width = shape[0], shape[1], shape[2], shape[3]
    choice, used = _slot_occupants(plan, num_items, capacity, num_experts)
    slot_item = ops.cast(choice // plan["kept"].shape[-1], "int32")
    expert_inputs = ops.take_along_axis(
        items, _two_axes(slot_item), axis=1
    )  # [G, E*C, P, d]
    expert_inputs = ops.where(_two_axes(used), expert_inputs, 0.0)
    buffer = ops.reshape(
        expert_inputs, (groups, num_experts, capacity, per_item, width)
    )
    outputs = expert_exchange(buffer, run_experts, constrain)
    outputs = ops.reshape(outputs, (groups, -1, per_item, width))
    return _combine_slots(outputs, plan, choice, used, capacity)


def _two_axes(x):
    """[G, S] -> [G, S, 1, 1]. Two `expand_dims`, not `x[:, :, None, None]`:
    TensorFlow's strided slice with new axes is no LiteRT builtin."""
    return ops.expand_dims(ops.expand_dims(x, -1), -1)


def _slot_occupants(plan, num_items, capacity, num_experts):
    """The (item, choice) in every capacity slot of every group.

    Returns:
        `(choice, used)`, both [G, E*C]: the flat id `item * K + k` of each
        slot's occupant (0 where unused) and whether the slot is used.
    """
    kept, expert_index = plan["kept"], plan["expert_index"]
    groups = ops.shape(kept)[0]
    # Kept choices sorted by (expert, position): expert e's choices then
    # form one run, in slot order (positions of kept choices are 0, 1, ...
    # without gaps and < C <= S). Dropped choices sort last.
    key = ops.where(
        kept, expert_index * num_items + plan["position"], num_experts * num_items
    )
    order = ops.argsort(ops.reshape(key, (groups, -1)), axis=-1)  # [G, S*K]
    counts = ops.sum(
        ops.cast(expert_mask(expert_index, num_experts, kept), "int32"),
        axis=(1, 2),
    )  # [G, E]
    starts = ops.cumsum(counts, axis=-1) - counts
    slots = ops.arange(capacity, dtype="int32")[None, None, :]
    used = slots < counts[:, :, None]  # [G, E, C]
    rank = ops.where(used, starts[:, :, None] + slots, 0)
    choice = ops.take_along_axis(order, ops.reshape(rank, (groups, -1)), axis=1)
    return choice, ops.reshape(used, (groups, -1))


def _combine_slots(outputs, plan, choice, used, capacity):
    """[G, E*C, P, d] slot outputs -> [G, S, P, d] gated sums per item.

    Every slot times its occupant's gate (zero in unused slots), then every
    item adds the slots its kept choices read; dropped choices read slot 0
    and are replaced by an exact zero.
    """
    kept, groups = plan["kept"], ops.shape(outputs)[0]
    gates = ops.reshape(ops.cast(plan["gates"], outputs.dtype), (groups, -1))
    slot_gates = ops.where(
        used, ops.take_along_axis(gates, choice, axis=1), 0.0
    )  # [G, E*C]
    outputs = backends.scale_rows(outputs, slot_gates)
    read = ops.where(kept, plan["expert_index"] * capacity + plan["position"], 0)
    total = None
    for k in range(kept.shape[-1]):
        slot = ops.take_along_axis(outputs, _two_axes(read[:, :, k]), axis=1)
        slot = ops.where(_two_axes(kept[:, :, k]), slot, 0.0)  # [G, S, P, d]
        total = slot if total is None else total + slot
    return total


def resolve_dispatch(
    dispatch,
    dropless_tokens=False,
    static_shape=True,
    layout=None,
    expert_parallel=False,
    accelerator=None,
    grouped_fast=False,
):
    """The path `dispatch` ("auto", "slots", "sorted", "grouped" or a
    registered name) runs in this trace, by name.

    On a GPU or TPU (`accelerator`, default `backends.accelerator()`)
    "auto" takes "grouped" where the grouped matmul runs as a grouped GEMM
    kernel for this dtype and these shapes (`grouped_fast`, from
    `backends.grouped_matmul_is_fast`), else "slots": one batched matmul
    per weight, no per-tile loop and no read of the routing back to the
    host. Dropless token routing without a grouped kernel is the
    exception: its slot path would give every expert a slot for every
    token (E times the work), so it follows the rules below, which are
    the CPU rules.

    Without XLA (TensorFlow's default graph mode, torch) shapes may be
    dynamic: "auto" takes the sorted path, whose experts run on exactly
    the routed rows, on the backends whose adapter says it beats the slot
    path (`sorted_beats_slots`), and always for dropless token routing.

    Under XLA (JAX; TensorFlow with `jit_compile=True`) the sorted path is
    a static layout of row tiles: the kept rows plus each expert's padding
    to a whole tile, about E*(t-1)/2 rows, where the slot path computes
    all E*C capacity slots, used or not. "auto" takes the sorted path when
    its expected rows (`layout`, a `StaticLayout`) are no more than the
    slots (ties go to it: it never computes a dropped choice), and, where
    the adapter fuses the tile MLP (less activation memory), when they are
    at most 10 % more with full-size tiles. The static layout needs the
    number of items at trace time: with `static_shape=False` both "auto"
    and "sorted" run the slot path, which gives the same results.

    Under a `keras.distribution` "auto" takes the slot path: its buffers
    are laid out per routing group, so every device works on its own
    groups, while the sorted layout orders rows across all groups. Under
    expert parallelism (`expert_parallel`) an explicit "sorted" is an
    error.

    A dispatcher registered with `register_dispatcher` is taken by "auto"
    when its `preferred(context)` says so (before the rules above).

    Raises:
        ValueError: `dispatch="sorted"` under expert parallelism.
    """
    if dispatch not in ("auto", "slots", "sorted"):
        return dispatch
    if dispatch == "sorted" and expert_parallel:
        raise ValueError(
            "`dispatch='sorted'` cannot run under expert parallelism (its "
            "rows are not laid out per group and expert); use 'slots' or "
            "'auto'. Received: dispatch='sorted'"
        )
    if dispatch == "slots":
        return dispatch
    if dispatch == "auto":
        if accelerator is None:
            accelerator = backends.accelerator()
        context = DispatchContext(
            dropless_tokens,
            static_shape,
            layout,
            expert_parallel,
            accelerator,
            grouped_fast,
        )
        for name, dispatcher in DISPATCHERS.items():
            if dispatcher.preferred(context):
                return name
        if expert_parallel or backends.distributed():
            return "slots"
        if accelerator != "cpu" and (grouped_fast or not dropless_tokens):
            return "grouped" if grouped_fast else "slots"
    if not backends.in_xla_context():
        if dispatch == "sorted" or dropless_tokens:
            return "sorted"
        return "sorted" if backends.sorted_beats_slots() else "slots"
    if not static_shape:
        return "slots"
    return _xla_rule(dispatch, layout)


def _xla_rule(dispatch, layout):
    """"sorted" or "auto" under XLA with static shapes."""
    if dispatch == "sorted":
        return "sorted"
    if layout is None:
        return "slots"
    # The fused tile MLP holds far less activation memory than the slot
    # path, and the bound counts dropped choices as rows: with full-size
    # tiles (short ones cost more per row) it takes up to 10 % more
    # expected rows.
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


class GroupedExperts(RowExperts):
    """Rows sorted by expert, no padding between experts: one grouped
    matmul (`backends.grouped_matmul`) per weight, the group sizes kept as
    a tensor."""

    def __init__(self, group_sizes):
        self.group_sizes = group_sizes

    def matmul(self, x, kernels, biases):
        outputs = backends.grouped_matmul(x, kernels, self.group_sizes)
        ends = ops.cumsum(self.group_sizes)
        rows = ops.arange(ops.shape(x)[0], dtype="int32")
        row_expert = ops.sum(
            ops.cast(ends[None, :] <= rows[:, None], "int32"), axis=1
        )
        row_expert = ops.minimum(row_expert, ops.shape(kernels)[0] - 1)
        return outputs + ops.take(biases, row_expert, axis=0)


def sorted_dispatch(
    items,
    plan,
    capacity,
    num_experts,
    run_rows,
    static=None,
    tile_size=None,
    grouped=False,
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
        grouped: no tiles: the experts' rows follow each other without
            padding and run as grouped matmuls (`GroupedExperts`).

    Returns:
        [G, S, P, d]: `sum_k gate_k * expert_k(item)` over kept choices.
    """
    if static is None:
        static = backends.in_xla_context()
    # The grouped layout always has a static number of rows (every kept
    # choice at most): its group sizes stay on the device.
    static = static or grouped
    shape = ops.shape(items)
    width = shape[3]
    layout = _row_layout(
        plan, shape, capacity, num_experts, static, tile_size, grouped
    )
    per_item = layout.per_item
    rows = backends.gather_rows(
        ops.reshape(items, (-1, per_item, width)),
        layout.row_item,
        layout.used,
        layout.readers,
    )  # [R, P, d]
    outputs = run_rows(ops.reshape(rows, (-1, width)), layout.experts)
    outputs = ops.reshape(outputs, (-1, per_item, width))
    # Every row times its choice's gate (zero in padding rows), then each
    # item sums its rows; dropped choices read a spare row of exact zeros.
    gates = ops.cast(ops.reshape(plan["gates"], (-1,)), outputs.dtype)
    row_gate = backends.gather_rows(
        gates,
        ops.maximum(layout.row_choice, 0),
        layout.used,
        ops.reshape(layout.target, (-1, 1)),
    )
    outputs = backends.scale_rows(outputs, row_gate)
    routed = backends.sum_rows(
        outputs, layout.readers, layout.row_item, layout.used
    )
    return ops.reshape(routed, (layout.groups, layout.num_items, per_item, width))


class RowLayout:
    """The expert-sorted rows of one call (see `_row_layout`): plain
    attributes, set from the keyword arguments."""

    def __init__(self, **fields):
        for name, value in fields.items():
            setattr(self, name, value)


def _row_layout(
    plan, shape, capacity, num_experts, static, tile_size, grouped=False
):
    """Where every kept (item, choice) sits in the expert-sorted rows.

    Returns a `RowLayout`: `groups`, `num_items`, `per_item` (G, S, P);
    `target` [G, S, K] row of each choice (the spare row R where dropped);
    `readers` [N, K] the rows of each item; `row_choice` [R] the choice in
    each row (-1 in padding rows); `row_item` [R] its item; `used` [R] bool
    (None in the dynamic layout, which has no padding); `experts`, the
    `RowExperts` of the layout (`GroupedExperts` when `grouped`: no
    padding between experts).
    """
    kept = plan["kept"]
    top_k = kept.shape[-1]
    groups, num_items, per_item = shape[0], shape[1], shape[2]
    tile = 1
    if static:
        layout = StaticLayout.of(
            shape, top_k, capacity, num_experts, 1 if grouped else tile_size
        )
        groups, num_items, per_item = (_as_int(v) for v in shape[:3])
        tile, num_rows = layout.tile, layout.num_rows
    row, totals, padded_ends = _sorted_rows(plan, num_experts, tile)
    if grouped:
        experts = GroupedExperts(totals * per_item)
    elif static:
        experts = _tiled_experts(padded_ends, layout.num_tiles, tile, num_experts)
    else:
        # tile == 1: the rows are exactly the kept choices.
        counts, num_rows = backends.segment_sizes(totals, per_item)
        experts = SegmentExperts(counts)
    # (item, choice) pairs numbered item * K + k, over all groups.
    choice_ids = ops.reshape(
        ops.arange(groups * num_items * top_k, dtype="int32"), ops.shape(row)
    )
    # Dropped choices write (and read) the spare row `num_rows`.
    target = ops.where(kept, row, num_rows)
    # The choice in each row, -1 in padding rows (no choice writes there).
    row_choice = _scatter_rows(num_rows, target, choice_ids + 1)[:num_rows] - 1
    return RowLayout(
        groups=groups,
        num_items=num_items,
        per_item=per_item,
        target=target,
        readers=ops.reshape(target, (-1, top_k)),
        row_choice=row_choice,
        row_item=ops.maximum(row_choice, 0) // top_k,
        # Padding rows of the static layout hold exact zeros, not a copy
        # of item 0.
        used=row_choice >= 0 if static else None,
        experts=experts,
    )


def _tiled_experts(padded_ends, num_tiles, tile, num_experts):
    """The `TiledExperts` of L tiles: each tile's expert, and which tiles
    lie before the end of the last expert's padded rows."""
    tile_start = ops.arange(num_tiles, dtype="int32") * tile
    tile_expert = ops.sum(
        ops.cast(padded_ends[None, :] <= tile_start[:, None], "int32"), axis=1
    )
    tile_expert = ops.minimum(tile_expert, num_experts - 1)
    return TiledExperts(tile_expert, tile_start < padded_ends[-1])


def expert_exchange(buffer, run_experts, constrain=None):
    """Runs the experts on a [G, E, ...] buffer laid out per group.

    `[G, E, ..., d] -> [E, G, ..., d]`, every expert on its own rows
    (`run_experts`: [E, N, d] -> [E, N, d]), and back to `[G, E, ..., d]`.
    Under expert parallelism `constrain(tensor, name)` places the four
    buffers ("dispatch_groups", "dispatch_experts", "combine_experts",
    "combine_groups"): groups sharded on the data axis, experts on the
    expert axis, so the two transposes are the all-to-all exchanges.
    """
    constrain = constrain or (lambda x, name: x)
    axes = (1, 0) + tuple(range(2, len(buffer.shape)))
    buffer = constrain(buffer, "dispatch_groups")
    buffer = constrain(ops.transpose(buffer, axes), "dispatch_experts")
    shape = ops.shape(buffer)
    outputs = run_experts(ops.reshape(buffer, (shape[0], -1, shape[-1])))
    outputs = constrain(ops.reshape(outputs, shape), "combine_experts")
    return constrain(ops.transpose(outputs, axes), "combine_groups")


class DispatchContext:
    """What "auto" knows when it picks a dispatcher for a top-k plan.

    Attributes:
        dropless_tokens: token routing without capacity.
        static_shape: every items dimension is known at trace time.
        layout: the `StaticLayout` of the sorted path, or None.
        expert_parallel: a distribution places the dispatch buffers.
        accelerator: "cpu", "gpu" or "tpu" (`backends.accelerator`).
        grouped_fast: the grouped matmul runs as a grouped GEMM kernel
            for this call's dtype and shapes.
    """

    def __init__(
        self,
        dropless_tokens,
        static_shape,
        layout,
        expert_parallel,
        accelerator="cpu",
        grouped_fast=False,
    ):
        self.dropless_tokens = dropless_tokens
        self.static_shape = static_shape
        self.layout = layout
        self.expert_parallel = expert_parallel
        self.accelerator = accelerator
        self.grouped_fast = grouped_fast


class Dispatcher:
    """Moves routed items to the experts and combines their outputs.

    `dispatcher(items, plan, experts, training, constrain=None)` returns
    every item's weighted sum of its experts' outputs, shaped like
    `items`. `plan` is a dict of the router's tensors (each subclass says
    which), `experts` a `StackedExperts` (the MoE layer), `constrain` the
    distribution's placement hook (see `expert_exchange`) or None.
    """

    # Its name in `DISPATCHERS` (set by `register_dispatcher`); a layer's
    # `dispatch_path` after a call.
    name = None
    # The plan this dispatcher reads: "top_k", "expert_choice" or "soft".
    plan_kind = "top_k"
    # Whether it lays its buffers out per group, so that expert
    # parallelism can place them (`expert_exchange`).
    expert_parallel = True

    @classmethod
    def preferred(cls, context):
        """Whether "auto" should pick this dispatcher (a `DispatchContext`).

        The built-in top-k paths are chosen by `resolve_dispatch`'s rules;
        a registered path may claim the cases it is best at."""
        return False

    def __call__(self, items, plan, experts, training=None, constrain=None):
        raise NotImplementedError


class SlotDispatcher(Dispatcher):
    """Capacity slots (`slot_dispatch`). Plan: [G, S, K] `expert_index`,
    `position`, `kept`, `gates`, and `capacity`; items [G, S, P, d]."""

    def __call__(self, items, plan, experts, training=None, constrain=None):
        return slot_dispatch(
            items,
            plan,
            plan["capacity"],
            experts.num_experts,
            lambda x: experts.run_experts(x, training),
            constrain=constrain,
        )


class SortedDispatcher(Dispatcher):
    """Rows sorted by expert (`sorted_dispatch`); plan as `SlotDispatcher`."""

    expert_parallel = False
    grouped = False

    def __call__(self, items, plan, experts, training=None, constrain=None):
        return sorted_dispatch(
            items,
            plan,
            plan["capacity"],
            experts.num_experts,
            lambda rows, row_experts: experts.run_expert_rows(
                rows, row_experts, training
            ),
            grouped=self.grouped,
        )


class GroupedDispatcher(SortedDispatcher):
    """Rows sorted by expert without padding, every expert weight applied
    as one grouped matmul (`jax.lax.ragged_dot` on JAX, `grouped_mm` on
    torch); plan as `SlotDispatcher`. The rows are a static bound (every
    choice that capacity allows, the kept ones first in expert order) and
    the group sizes stay on the device: no read back to the host, so the
    call traces once per shape (`jax.jit`, `torch.compile` without graph
    breaks). TensorFlow has no grouped matmul: the call raises, naming
    the backends that do."""

    grouped = True

    def __call__(self, items, plan, experts, training=None, constrain=None):
        backends.require_grouped_matmul()
        return super().__call__(items, plan, experts, training, constrain)


class GatherDispatcher(Dispatcher):
    """Every item through the weights of its K experts, gathered per item
    (dropless image routing: no capacity, no slot buffer). Plan as
    `SlotDispatcher` (every choice kept)."""

    def __call__(self, items, plan, experts, training=None, constrain=None):
        shape = ops.shape(items)
        top_k = plan["expert_index"].shape[-1]
        flat = ops.reshape(items, (-1, shape[2], shape[3]))
        outputs = experts.run_gathered_experts(
            flat,
            ops.reshape(plan["expert_index"], (-1, top_k)),
            ops.reshape(plan["gates"], (-1, top_k)),
            training,
        )
        return ops.reshape(outputs, shape)


class ExpertChoiceDispatcher(Dispatcher):
    """Every expert's C chosen items. Plan: [G, E, C] `item_index` (item
    within its group) and `gates`; items [G, S, d].

    On one device the chosen items of all groups are gathered into
    [E, G*C, d] and the gated outputs summed back per item
    (`segment_sum`). Under expert parallelism every index operation is
    batched over the groups, so each device fills and reads only its own
    groups, around the `expert_exchange`.
    """

    plan_kind = "expert_choice"

    def __call__(self, items, plan, experts, training=None, constrain=None):
        if constrain is None:
            return self._flat(items, plan, experts, training)
        return self._grouped(items, plan, experts, training, constrain)

    @staticmethod
    def _flat(items, plan, experts, training):
        e = experts.num_experts
        shape = ops.shape(items)
        num_groups, group_size, width = shape[0], shape[1], shape[2]
        rows = plan["item_index"] + ops.reshape(
            ops.arange(num_groups, dtype="int32") * group_size, (-1, 1, 1)
        )
        rows = ops.reshape(ops.transpose(rows, (1, 0, 2)), (-1,))
        flat_items = ops.reshape(items, (-1, width))
        outputs = experts.run_experts(
            ops.reshape(ops.take(flat_items, rows, axis=0), (e, -1, width)),
            training,
        )
        weights = ops.reshape(ops.transpose(plan["gates"], (1, 0, 2)), (e, -1, 1))
        weighted = outputs * ops.cast(weights, outputs.dtype)
        # Each item sums the outputs of the experts that chose it.
        summed = ops.segment_sum(
            ops.reshape(weighted, (-1, width)),
            rows,
            num_segments=ops.shape(flat_items)[0],
        )
        return ops.reshape(summed, shape)

    @staticmethod
    def _grouped(items, plan, experts, training, constrain):
        e, item_index = experts.num_experts, plan["item_index"]
        shape = ops.shape(items)
        num_groups, group_size, width = shape[0], shape[1], shape[2]
        capacity = ops.shape(item_index)[-1]
        buffer = ops.take_along_axis(
            items, ops.reshape(item_index, (num_groups, -1, 1)), axis=1
        )  # [G, E*C, d]
        buffer = ops.reshape(buffer, (num_groups, e, capacity, width))
        outputs = expert_exchange(
            buffer, lambda x: experts.run_experts(x, training), constrain
        )
        # Combine weights [G, E, C, S]: the gate where slot (e, c) holds
        # item s (vmoe's dense combine tensor), summed per item.
        combine = ops.one_hot(item_index, group_size, dtype="float32")
        combine = combine * plan["gates"][..., None]
        return ops.einsum(
            "gecs,gecd->gsd", ops.cast(combine, outputs.dtype), outputs
        )


class SoftDispatcher(Dispatcher):
    """Soft MoE: dense weights. Plan: [B, T, E*C] float32 `dispatch` (sums
    to 1 over T) and `combine` (sums to 1 over E*C); items [B, T, d].

    Slot inputs `D^T x` [B, E, C, d] run through `expert_exchange` (the
    images are the groups), and every token mixes the slot outputs with
    its combine weights.
    """

    plan_kind = "soft"

    def __call__(self, items, plan, experts, training=None, constrain=None):
        e, width = experts.num_experts, ops.shape(items)[-1]
        slots = ops.einsum(
            "btn,btd->bnd", ops.cast(plan["dispatch"], items.dtype), items
        )
        outputs = expert_exchange(
            ops.reshape(slots, (ops.shape(items)[0], e, -1, width)),
            lambda x: experts.run_experts(x, training),
            constrain,
        )
        outputs = ops.reshape(outputs, ops.shape(slots))
        return ops.einsum(
            "btn,bnd->btd", ops.cast(plan["combine"], outputs.dtype), outputs
        )


# Dispatchers by name: the values of a layer's `dispatch` argument besides
# "auto", and the plans' own paths.
DISPATCHERS = {
    "slots": SlotDispatcher(),
    "sorted": SortedDispatcher(),
    "grouped": GroupedDispatcher(),
    "gather": GatherDispatcher(),
    "expert_choice": ExpertChoiceDispatcher(),
    "soft": SoftDispatcher(),
}
for _name, _dispatcher in DISPATCHERS.items():
    _dispatcher.name = _name
# Names a `MoEFeedForward(dispatch=...)` may take.
DISPATCH_MODES = ("auto", "slots", "sorted", "grouped")


def register_dispatcher(name, dispatcher, top_k_mode=True):
    """Registers a `Dispatcher` instance under `name`.

    With `top_k_mode`, `MoEFeedForward(dispatch=name)` selects it and
    "auto" may pick it through its `preferred` hook.
    """
    global DISPATCH_MODES
    if not isinstance(dispatcher, Dispatcher):
        raise ValueError(
            "`dispatcher` must be a `Dispatcher` instance. Received: "
            f"dispatcher={dispatcher!r}"
        )
    DISPATCHERS[name] = dispatcher
    dispatcher.name = name
    if top_k_mode and name not in DISPATCH_MODES:
        DISPATCH_MODES = DISPATCH_MODES + (name,)


def dispatch_modes():
    """The names `MoEFeedForward(dispatch=...)` accepts, "auto" first."""
    return DISPATCH_MODES


def choose_dispatcher(
    dispatch,
    items_shape,
    top_k,
    capacity,
    num_experts,
    routing="token",
    dropless=False,
    static_shape=True,
    expert_parallel=False,
    dtype="float32",
    hidden_dim=None,
):
    """The `Dispatcher` of a top-k plan for this call.

    Args:
        dispatch: the layer's `dispatch` argument ("auto" or a name).
        items_shape: shape of the [G, S, P, d] items (static dims as ints).
        top_k: K.
        capacity: C (int, or a scalar tensor when the batch is dynamic).
        num_experts: E.
        routing: "token" or "image".
        dropless: no capacity (`capacity_factor=None` in this mode).
        static_shape: every dimension of the items is known at trace time.
        expert_parallel: a distribution places the dispatch buffers.
        dtype: the experts' compute dtype.
        hidden_dim: the experts' hidden width h (with `dtype`, for the
            grouped-matmul check on accelerators; default d).

    Dropless image routing runs "gather" where the path would be "slots"
    (an image's expert weights gathered per image, not S slots per
    expert).
    """
    dropless_images = dropless and routing == "image"
    accelerator = backends.accelerator()
    name = resolve_dispatch(
        dispatch,
        dropless_tokens=dropless and routing == "token",
        static_shape=static_shape,
        layout=None
        if dropless_images
        else StaticLayout.of(items_shape, top_k, capacity, num_experts),
        expert_parallel=expert_parallel,
        accelerator=accelerator,
        grouped_fast=_grouped_fast(
            dispatch, accelerator, items_shape, top_k, capacity,
            num_experts, dtype, hidden_dim, expert_parallel,
        ),
    )
    if name == "slots" and dropless_images:
        name = "gather"
    dispatcher = DISPATCHERS[name]
    if expert_parallel and not dispatcher.expert_parallel:
        raise ValueError(
            f"`dispatch={name!r}` cannot run under expert parallelism (its "
            "rows are not laid out per group and expert); use 'slots' or "
            f"'auto'. Received: dispatch={dispatch!r}"
        )
    return dispatcher


def _grouped_fast(
    dispatch,
    accelerator,
    items_shape,
    top_k,
    capacity,
    num_experts,
    dtype,
    hidden_dim,
    expert_parallel,
):
    """Whether "auto" on an accelerator may take "grouped" for this call:
    a grouped GEMM kernel for the dtype and the static row bound."""
    if dispatch != "auto" or accelerator == "cpu" or expert_parallel:
        return False
    if not backends.supports_grouped_matmul():
        return False
    layout = StaticLayout.of(items_shape, top_k, capacity, num_experts, 1)
    if layout is None:
        return False
    width = _as_int(items_shape[3])
    return backends.grouped_matmul_is_fast(
        dtype,
        layout.num_rows * layout.per_item,
        width,
        hidden_dim or width,
        num_experts,
    )
