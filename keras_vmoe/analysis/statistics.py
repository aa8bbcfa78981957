"""Routing statistics as small numpy functions of routing tables.

Every function takes plain arrays (the routing decisions of one MoE layer
over a dataset) and returns arrays or numbers, so tests can check them on
hand-built tables. `collect_routing` gathers the tables from a model.

Axis letters (see docs/glossary.md): N images (collected over all
batches) · T tokens per image · K experts per item · E experts; the number
of classes is `num_classes`.
"""

import math

import keras
import numpy as np


def to_numpy(values, dtype=None):
    """A numpy array from numpy data or a backend tensor of any backend.

    Backend tensors go through `keras.ops.convert_to_numpy`, which moves
    them to the host and detaches torch tensors that require grad (where
    `np.asarray` raises).

    Args:
        values: array-like, Keras variable or backend tensor.
        dtype: optional numpy dtype.

    Returns:
        numpy array.
    """
    if isinstance(values, keras.Variable) or (
        not isinstance(values, np.ndarray) and keras.ops.is_tensor(values)
    ):
        values = keras.ops.convert_to_numpy(values)
    return np.asarray(values, dtype=dtype)


def _check_expert_index(expert_index, num_experts):
    expert_index = to_numpy(expert_index)
    if expert_index.size and (
        expert_index.min() < 0 or expert_index.max() >= num_experts
    ):
        raise ValueError(
            f"`expert_index` values must be in [0, {num_experts}). Received "
            f"values in [{expert_index.min()}, {expert_index.max()}]"
        )
    return expert_index


def expert_load(expert_index, num_experts, dropped=None):
    """Fraction of the kept routing choices each expert processed.

    Args:
        expert_index: int array [..., K] of chosen experts.
        num_experts: E.
        dropped: optional bool array like `expert_index`, True where the
            choice was dropped for lack of capacity (not counted).

    Returns:
        float array [E] summing to 1 (all zeros if nothing was kept).

    Example:
    >>> expert_load(np.array([[0], [0], [2]]), num_experts=3)
    array([0.667, 0., 0.333])
    """
    expert_index = _check_expert_index(expert_index, num_experts)
    kept = (
        expert_index if dropped is None else expert_index[~to_numpy(dropped)]
    )
    counts = np.bincount(kept.ravel(), minlength=num_experts).astype("float64")
    total = counts.sum()
    return counts / total if total else counts


def expert_importance(router_probs):
    """Share of the router's probability mass each expert receives.

    Args:
        router_probs: float array [..., E] of softmax router outputs.

    Returns:
        float array [E]: the mean router probability of every expert over
        all items (Shazeer et al., 2017, "importance"), summing to 1.
    """
    router_probs = to_numpy(router_probs, dtype="float64")
    return router_probs.reshape(-1, router_probs.shape[-1]).mean(axis=0)


def dropped_fraction(dropped):
    """Fraction of routing choices dropped for lack of capacity."""
    dropped = to_numpy(dropped)
    return float(dropped.mean()) if dropped.size else 0.0


def gate_entropy(router_probs):
    """Mean entropy of the router distribution, normalised to [0, 1].

    Args:
        router_probs: float array [..., E].

    Returns:
        `mean(H(p)) / log(E)`: 1 for a uniform router, 0 for a router that
        is certain about every item (0 when E = 1).
    """
    router_probs = to_numpy(router_probs, dtype="float64")
    num_experts = router_probs.shape[-1]
    if num_experts == 1:
        return 0.0
    safe = np.where(router_probs > 0, router_probs, 1.0)  # 0 log 0 = 0
    entropy = -np.sum(router_probs * np.log(safe), axis=-1)
    return float(entropy.mean() / math.log(num_experts))


def class_expert_counts(labels, expert_index, num_classes, num_experts):
    """Routing heatmap table: how often each class is sent to each expert.

    Args:
        labels: int array [N] of class ids.
        expert_index: int array [N, ..., K]: the experts chosen for every
            image (image routing, [N, K]) or every token of it (token
            routing, [N, T, K] or [N, H, W, K]).
        num_classes: number of classes.
        num_experts: E.

    Returns:
        int array [num_classes, E]: entry (c, e) counts the choices of
        expert `e` by images (or tokens of images) of class `c`, all K
        choices included.
    """
    labels = to_numpy(labels).astype("int64").ravel()
    expert_index = _check_expert_index(expert_index, num_experts)
    if expert_index.shape[0] != labels.shape[0]:
        raise ValueError(
            "`labels` and `expert_index` must have the same first axis. "
            f"Received: labels.shape={labels.shape}, "
            f"expert_index.shape={expert_index.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"`labels` must be in [0, {num_classes}). Received values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    per_image = expert_index.reshape(labels.shape[0], -1)
    rows = np.repeat(labels, per_image.shape[1])
    counts = np.zeros((num_classes, num_experts), dtype="int64")
    np.add.at(counts, (rows, per_image.ravel()), 1)
    return counts


def _entropy(probabilities):
    probabilities = probabilities[probabilities > 0]
    return float(-np.sum(probabilities * np.log(probabilities)))


SPECIALIZATION_NORMALIZATIONS = ("min", "arithmetic")


def specialization_score(counts, normalization="min"):
    """How much the expert choice and the class determine each other.

    The normalised mutual information between the class c and the chosen
    expert e, with their joint distribution read from a class x expert
    count table (`class_expert_counts`):

        score = I(c; e) / min(H(c), H(e))              ("min", the default)
        score = I(c; e) / ((H(c) + H(e)) / 2)          ("arithmetic")

    "arithmetic" is scikit-learn's default NMI
    (`normalized_mutual_info_score`); it is <= the "min" score and reaches
    1 only when class and expert determine each other both ways, so a layer
    with fewer experts than classes stays below 1 even when each class
    uses a single expert.

    It is 1 when every class goes to a single expert (or every expert
    serves a single class) — the "divide and conquer" routing ViMoE finds
    in the deepest MoE layers — and 0 when the expert choice is
    independent of the class, as in its shallow layers (ViMoE, Sec. 3.2,
    Fig. 5). A layer that sends everything to one expert (H(e) = 0) scores
    0. Ranking layers by this score is how `prune_moe_layers` chooses the
    non-specializing layers.

    Args:
        counts: array [num_classes, E] of non-negative counts.
        normalization: "min" or "arithmetic" (see above).

    Returns:
        float in [0, 1].

    Example:
    >>> specialization_score(np.array([[5, 0], [0, 5]]))
    1.0
    >>> specialization_score(np.array([[5, 5], [5, 5]]))
    0.0
    """
    if normalization not in SPECIALIZATION_NORMALIZATIONS:
        raise ValueError(
            f"`normalization` must be one of {SPECIALIZATION_NORMALIZATIONS}."
            f" Received: normalization={normalization!r}"
        )
    counts = to_numpy(counts, dtype="float64")
    if counts.ndim != 2 or (counts < 0).any():
        raise ValueError(
            "`counts` must be a [classes, experts] table of non-negative "
            f"counts. Received: counts.shape={counts.shape}"
        )
    total = counts.sum()
    if not total:
        return 0.0
    joint = counts / total
    class_entropy = _entropy(joint.sum(axis=1))
    expert_entropy = _entropy(joint.sum(axis=0))
    if normalization == "min":
        normaliser = min(class_entropy, expert_entropy)
    else:
        normaliser = (class_entropy + expert_entropy) / 2.0
    if min(class_entropy, expert_entropy) <= 0:
        return 0.0
    mutual_information = (
        class_entropy + expert_entropy - _entropy(joint.ravel())
    )
    return float(np.clip(mutual_information / normaliser, 0.0, 1.0))


def routing_degree(num_experts, top_k, num_layers):
    """ViMoE's routing degree D = binom(E, K)^L (the paper's C(N, K)^L,
    N experts): the number of expert combinations an image can take
    through L image-routed MoE layers.

    Example:
    >>> routing_degree(num_experts=8, top_k=1, num_layers=2)
    64
    """
    for name, value in (
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("num_layers", num_layers),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"`{name}` must be an integer >= 0. Received: {name}={value!r}"
            )
    if top_k > num_experts:
        raise ValueError(
            "`top_k` must be <= `num_experts`. Received: "
            f"top_k={top_k}, num_experts={num_experts}"
        )
    return math.comb(num_experts, top_k) ** num_layers


def distinct_routes(expert_choices):
    """Observed number of distinct routes through a stack of MoE layers.

    A route is the tuple of expert sets an item (an image, for image
    routing) takes in every layer; the order of the K experts within a
    layer does not matter. Compare with `routing_degree`, the number of
    possible routes.

    Args:
        expert_choices: a list, one entry per layer, of int arrays [N, K]
            (the same N items in every layer).

    Returns:
        int, the number of distinct routes among the N items.

    Example:
    >>> distinct_routes([np.array([[0], [1], [0]]), np.array([[2], [2], [2]])])
    2
    """
    if not expert_choices:
        raise ValueError(
            "`expert_choices` must hold at least one layer. Received: "
            f"expert_choices={expert_choices!r}"
        )
    arrays = [to_numpy(choice) for choice in expert_choices]
    num_items = {array.shape[0] for array in arrays}
    if len(num_items) != 1:
        raise ValueError(
            "Every layer of `expert_choices` must route the same items. "
            f"Received first axes {[array.shape[0] for array in arrays]}"
        )
    routes = np.concatenate(
        [
            np.sort(array.reshape(array.shape[0], -1), axis=1)
            for array in arrays
        ],
        axis=1,
    )
    return int(np.unique(routes, axis=0).shape[0])


def expert_counts_per_image(expert_index, num_experts):
    """How many routing choices of each image go to each expert.

    Args:
        expert_index: int array [N, ..., K].
        num_experts: E.

    Returns:
        int array [N, E]. For image routing every row holds K ones; for
        token routing entry (n, e) is the number of patches of image n
        that chose expert e (the c_i of Sweet-spot, Sec. 5).
    """
    expert_index = _check_expert_index(expert_index, num_experts)
    per_image = expert_index.reshape(expert_index.shape[0], -1)
    counts = np.zeros((per_image.shape[0], num_experts), dtype="int64")
    rows = np.repeat(np.arange(per_image.shape[0]), per_image.shape[1])
    np.add.at(counts, (rows, per_image.ravel()), 1)
    return counts


def patches_per_expert_cdf(counts):
    """Empirical CDF of the number of patches an expert gets in an image.

    Sweet-spot (Fig. 6): for every (image, expert) pair where the expert
    appears, the number of the image's patches routed to it.

    Args:
        counts: int array [N, E] from `expert_counts_per_image`.

    Returns:
        `(values, cdf)`: the distinct patch counts, ascending, and
        `cdf[i] = F(values[i])`, the fraction of (image, expert) pairs
        with at most `values[i]` patches (tied counts share one entry, so
        a lookup at any value is F of that value; draw it as a step
        function, `where="post"`).

    Example:
    >>> patches_per_expert_cdf(np.array([[3, 1], [0, 4]]))
    (array([1, 3, 4]), array([0.333, 0.667, 1.]))
    >>> patches_per_expert_cdf(np.array([[3, 3], [1, 0]]))
    (array([1, 3]), array([0.333, 1.]))
    """
    counts = to_numpy(counts)
    values, occurrences = np.unique(counts[counts > 0], return_counts=True)
    if not values.size:
        return values, np.zeros((0,))
    return values, np.cumsum(occurrences) / occurrences.sum()


def expert_similarity(counts, by="images"):
    """Jaccard index between what each pair of experts receives.

    - `by="images"`: the sets of images each expert gets at least one
      patch of; `S_ij = |A_i ∩ A_j| / |A_i ∪ A_j|`.
    - `by="patches"`: the multisets of patches (counted per image), with
      the weighted Jaccard index
      `S_ij = sum_n min(c_ni, c_nj) / sum_n max(c_ni, c_nj)`, which is the
      set Jaccard index when counts are 0 or 1. (The measure Sweet-spot,
      Sec. 5, calls "derived from the Jaccard index" is a weighted Dice
      coefficient: see `sweetspot_similarity` to compare with its Fig. 7
      and 8.)

    Args:
        counts: int array [N, E] from `expert_counts_per_image`.
        by: "images" or "patches".

    Returns:
        float array [E, E], symmetric, 1 on the diagonal for experts that
        receive something, 0 for pairs where neither expert receives
        anything.

    Example:
    >>> expert_similarity(np.array([[1, 1], [1, 0]]))
    array([[1. , 0.5], [0.5, 1. ]])
    """
    if by not in ("images", "patches"):
        raise ValueError(
            f"`by` must be 'images' or 'patches'. Received: by={by!r}"
        )
    counts = to_numpy(counts, dtype="float64")
    if by == "images":
        counts = (counts > 0).astype("float64")
    # One expert at a time keeps memory at [N, E] for large datasets.
    intersection = np.stack(
        [np.minimum(column[:, None], counts).sum(axis=0) for column in counts.T]
    )
    union = np.stack(
        [np.maximum(column[:, None], counts).sum(axis=0) for column in counts.T]
    )
    return np.divide(
        intersection, union, out=np.zeros_like(union), where=union > 0
    )


def sweetspot_similarity(counts):
    """The expert similarity of Sweet-spot (Sec. 5, Fig. 7 and 8).

    With `c_ni` the patches of image n routed to expert i, the paper
    defines

        S_ij = sum_{n in A_i ∩ A_j} (c_ni + c_nj - |c_ni - c_nj|)
               / sum_{n in A_i ∪ A_j} (c_ni + c_nj)

    (A_i: the images expert i is active on) and calls it "derived from the
    Jaccard index". Since `c + c' - |c - c'| = 2 min(c, c')`, it is the
    weighted Dice coefficient `2 sum_n min(c_ni, c_nj) / (sum_n c_ni +
    sum_n c_nj)` — the Dice coefficient on sets, not the Jaccard index
    (`expert_similarity`): D = 2J / (1 + J), so it reads higher. Use it to
    compare with the paper's numbers.

    Args:
        counts: int array [N, E] from `expert_counts_per_image`.

    Returns:
        float array [E, E], symmetric, 1 on the diagonal for experts that
        receive something, 0 for pairs where neither expert receives
        anything.

    Example:
    >>> sweetspot_similarity(np.array([[2, 0], [1, 3], [0, 1]]))
    array([[1., 0.286], [0.286, 1.]])
    """
    counts = to_numpy(counts, dtype="float64")
    if counts.ndim != 2 or (counts < 0).any():
        raise ValueError(
            "`counts` must be an [images, experts] table of non-negative "
            f"counts. Received: counts.shape={counts.shape}"
        )
    totals = counts.sum(axis=0)
    # The paper's sums over A_i ∩ A_j and A_i ∪ A_j: images outside them
    # add 0 to both.
    numerator = np.stack(
        [
            (column[:, None] + counts - np.abs(column[:, None] - counts)).sum(
                axis=0
            )
            for column in counts.T
        ]
    )
    denominator = totals[:, None] + totals[None, :]
    return np.divide(
        numerator,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
