"""Which blocks of a model are MoE: the placement rules of both families.

Pure functions of the architecture (no Keras), shared by the backbones and
the preset tables (`keras_vmoe.models.vit_moe.resolve_moe_layers`,
`keras_vmoe.models.convnext_moe.moe_block_indices` re-export them).
"""

import numbers
import re

# === ViT-MoE ===
_PLACEMENT = re.compile(r"^(last|every)-([1-9][0-9]*)$")


def resolve_moe_layers(moe_layers, num_layers):
    """Indices of the blocks that get an MoE MLP, sorted.

    Args:
        moe_layers: one of
            - None or [] : no MoE block (a dense ViT);
            - "last-L" (e.g. "last-2", "last-3") or an int L: the last L
              blocks (ViMoE; L = 0 is dense, L = num_layers is all);
            - "every-n" (e.g. "every-2"): every n-th block counted back from
              the last one, which is always MoE: blocks i with
              `(num_layers - 1 - i) % n == 0`. For 12 blocks "every-2" is
              1, 3, 5, 7, 9, 11 (V-MoE / Sweet-spot "Every-2");
            - a list or tuple of block indices in [0, num_layers).
        num_layers: depth of the ViT.

    Returns:
        A tuple of ints.

    Raises:
        ValueError: naming `moe_layers` and the value received.
    """
    if moe_layers is None:
        return ()
    received = moe_layers
    if isinstance(moe_layers, str):
        match = _PLACEMENT.match(moe_layers)
        if match is None:
            raise ValueError(
                "`moe_layers` must be 'last-L', 'every-n', an int, or a list "
                f"of block indices. Received: moe_layers={moe_layers!r}"
            )
        kind, count = match.group(1), int(match.group(2))
        if kind == "last":
            moe_layers = count
        else:
            return tuple(
                i
                for i in range(num_layers)
                if (num_layers - 1 - i) % count == 0
            )
    if isinstance(moe_layers, numbers.Integral) and not isinstance(
        moe_layers, bool
    ):
        if not 0 <= moe_layers <= num_layers:
            raise ValueError(
                f"`moe_layers` asks for the last {moe_layers} blocks but the "
                f"model has num_layers={num_layers}. Received: "
                f"moe_layers={received!r}"
            )
        return tuple(range(num_layers - int(moe_layers), num_layers))
    if not isinstance(moe_layers, (list, tuple)):
        raise ValueError(
            "`moe_layers` must be 'last-L', 'every-n', an int, or a list of "
            f"block indices. Received: moe_layers={moe_layers!r}"
        )
    indices = []
    for index in moe_layers:
        if (
            not isinstance(index, numbers.Integral)
            or isinstance(index, bool)
            or not 0 <= index < num_layers
        ):
            raise ValueError(
                f"`moe_layers` indices must be ints in [0, {num_layers}). "
                f"Received: moe_layers={moe_layers!r}"
            )
        indices.append(int(index))
    if len(set(indices)) != len(indices):
        raise ValueError(
            "`moe_layers` must not repeat a block index. Received: "
            f"moe_layers={moe_layers!r}"
        )
    return tuple(sorted(indices))


# === MoE-ConvNeXt ===
MOE_PLACEMENTS = ("every-2", "stage", "last-2", "last-3")


def _placement_error(placement, reason):
    return ValueError(
        f"`moe_layers` {reason}. It must be None, one of "
        f"{MOE_PLACEMENTS}, or a list of (stage, block) pairs / global "
        f"block indices. Received: moe_layers={placement!r}"
    )


def moe_block_indices(depths, placement):
    """The (stage, block) positions of the MoE blocks, sorted.

    Named placements (Sweet-spot §4.3.1, Tab. 3), with 0-based indices:
    - hierarchical models (several stages):
      - "every-2": every second block of each stage, j = 1, 3, 5, ...
        (ConvNeXt-T: 1 + 1 + 4 + 1 = 7 MoE blocks; this reproduces the
        paper's Tab. 5 size, 97.5M, for E = 8 and mlp_ratio 4);
      - "stage": the last block of each stage (4 for ConvNeXt);
      - "last-2": the last block of each of the last two stages;
      - "last-3": "last-2" plus the middle block of the third stage,
        j = depth // 2 (block 4 of 9, block 13 of 27).
    - isotropic models (one stage of L blocks), as V-MoE counts "every
      second layer" and "the last n even layers" (1-based even = 0-based
      odd):
      - "every-2": j = 1, 3, ..., the 0-based odd blocks;
      - "last-2": the last two of those (L-3 and L-1 when L is even);
      - "last-3": the last three of those;
      - "stage": the last block.

    Args:
        depths: blocks per stage.
        placement: None (dense), a named placement, or a list whose items
            are (stage, block) pairs or global block indices (0-based over
            all blocks in order).

    Returns:
        A sorted list of unique (stage, block) tuples.
    """
    if placement is None:
        return []
    num_stages = len(depths)
    if isinstance(placement, str):
        if placement not in MOE_PLACEMENTS:
            raise _placement_error(placement, "is unknown")
        if placement == "stage":
            return [(i, depth - 1) for i, depth in enumerate(depths)]
        if placement == "every-2":
            return [
                (i, j)
                for i, depth in enumerate(depths)
                for j in range(1, depth, 2)
            ]
        count = int(placement[-1])
        if num_stages == 1:
            positions = [(0, j) for j in range(1, depths[0], 2)][-count:]
        else:
            last = [
                (i, depths[i] - 1) for i in (num_stages - 2, num_stages - 1)
            ]
            middle = [(num_stages - 2, depths[num_stages - 2] // 2)]
            positions = sorted(set(last + middle[: count - 2]))
        if len(positions) < count:
            raise _placement_error(
                placement, f"needs more blocks than depths={tuple(depths)}"
            )
        return positions
    if not isinstance(placement, (list, tuple)):
        raise _placement_error(placement, "has an unsupported type")
    positions = []
    for item in placement:
        if isinstance(item, int) and not isinstance(item, bool):
            stage, block = _global_to_stage(depths, item, placement)
        elif (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(v, int) for v in item)
        ):
            stage, block = item
            if not (0 <= stage < num_stages and 0 <= block < depths[stage]):
                raise _placement_error(
                    placement,
                    f"has a position {tuple(item)} outside depths "
                    f"{tuple(depths)}",
                )
        else:
            raise _placement_error(placement, f"has an invalid item {item!r}")
        positions.append((stage, block))
    return sorted(set(positions))


def _global_to_stage(depths, index, placement):
    if index >= 0:
        for stage, depth in enumerate(depths):
            if index < depth:
                return stage, index
            index -= depth
    raise _placement_error(
        placement, f"has a block index outside 0..{sum(depths) - 1}"
    )
