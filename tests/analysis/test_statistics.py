"""Routing statistics against small hand-computed tables."""

import math

import numpy as np
import pytest

from keras_vmoe.analysis import statistics


def test_expert_load_counts_kept_choices_only():
    index = np.array([[0, 1], [0, 2], [0, 1]])
    dropped = np.array([[False, False], [False, True], [True, False]])
    np.testing.assert_allclose(
        statistics.expert_load(index, 4, dropped), [2 / 4, 2 / 4, 0, 0]
    )
    np.testing.assert_allclose(
        statistics.expert_load(index, 4), [3 / 6, 2 / 6, 1 / 6, 0]
    )


def test_expert_load_rejects_out_of_range_experts():
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        statistics.expert_load(np.array([[2]]), 2)


def test_importance_is_mean_router_probability():
    probs = np.array([[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.5, 0.5]]])
    np.testing.assert_allclose(statistics.expert_importance(probs), [0.5, 0.5])


def test_dropped_fraction_and_gate_entropy():
    assert (
        statistics.dropped_fraction(np.array([True, False, False, False]))
        == 0.25
    )
    uniform = np.full((3, 4), 0.25)
    certain = np.eye(4)[:3]
    assert statistics.gate_entropy(uniform) == pytest.approx(1.0)
    assert statistics.gate_entropy(certain) == pytest.approx(0.0)
    half = np.array([[0.5, 0.5, 0.0, 0.0]])
    assert statistics.gate_entropy(half) == pytest.approx(0.5)


def test_class_expert_counts_token_routing_counts_every_token():
    labels = np.array([0, 1])
    index = np.array([[[0], [0], [1]], [[2], [2], [2]]])  # [N=2, T=3, K=1]
    counts = statistics.class_expert_counts(labels, index, 2, 3)
    np.testing.assert_array_equal(counts, [[2, 1, 0], [0, 0, 3]])


def test_class_expert_counts_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        statistics.class_expert_counts(np.array([3]), np.array([[0]]), 2, 2)
    with pytest.raises(ValueError, match="first axis"):
        statistics.class_expert_counts(np.array([0, 1]), np.array([[0]]), 2, 2)


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([[5, 0], [0, 5]], 1.0),  # one expert per class
        ([[5, 5], [5, 5]], 0.0),  # independent of the class
        ([[4, 0], [4, 0]], 0.0),  # one expert for everything
        (
            [[3, 0, 0], [0, 3, 0], [0, 0, 3], [0, 0, 3]],
            1.0,
        ),  # expert = f(class)
        ([[2, 2, 0, 0], [0, 0, 2, 2]], 1.0),  # class = f(expert)
    ],
)
def test_specialization_score_extremes(counts, expected):
    assert statistics.specialization_score(np.array(counts)) == pytest.approx(
        expected
    )


def test_specialization_score_partial_value():
    # Joint p = [[3/8, 1/8], [1/8, 3/8]]: H(c) = H(e) = log 2,
    # I = log 2 - H(3/4, 1/4).
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = (math.log(2) - h) / math.log(2)
    score = statistics.specialization_score(np.array([[3, 1], [1, 3]]))
    assert score == pytest.approx(expected)


def test_specialization_arithmetic_normalization():
    # 4 classes onto 2 experts, each class to one expert: I = H(e) = log 2,
    # H(c) = log 4. min: log 2 / log 2; arithmetic: log 2 / (1.5 log 2).
    counts = np.array([[5, 0], [5, 0], [0, 5], [0, 5]])
    assert statistics.specialization_score(counts) == pytest.approx(1.0)
    assert statistics.specialization_score(
        counts, normalization="arithmetic"
    ) == pytest.approx(2 / 3)
    # H(c) = H(e): both normalisations agree.
    square = np.array([[3, 1], [1, 3]])
    assert statistics.specialization_score(
        square, normalization="arithmetic"
    ) == pytest.approx(statistics.specialization_score(square))
    with pytest.raises(ValueError, match="normalization='max'"):
        statistics.specialization_score(counts, normalization="max")


def test_specialization_score_rejects_negative_counts():
    with pytest.raises(ValueError, match="counts"):
        statistics.specialization_score(np.array([[-1, 2]]))


def test_routing_degree_matches_vimoe_table():
    # ViMoE Sec. 3.2: N=2, L=5 -> 32; N=4, L=3 -> 64; N=8, L=2 -> 64.
    assert statistics.routing_degree(2, 1, 5) == 32
    assert statistics.routing_degree(4, 1, 3) == 64
    assert statistics.routing_degree(8, 1, 2) == 64
    assert statistics.routing_degree(4, 2, 2) == 36


def test_routing_degree_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k=3"):
        statistics.routing_degree(2, 3, 1)


def test_distinct_routes_ignores_order_within_a_layer():
    layer_1 = np.array([[0, 1], [1, 0], [2, 3], [0, 1]])
    layer_2 = np.array([[1], [1], [1], [0]])
    # Routes: (01,1) (01,1) (23,1) (01,0) -> 3 distinct.
    assert statistics.distinct_routes([layer_1, layer_2]) == 3


def test_distinct_routes_errors():
    with pytest.raises(ValueError, match="at least one layer"):
        statistics.distinct_routes([])
    with pytest.raises(ValueError, match="same items"):
        statistics.distinct_routes([np.zeros((2, 1)), np.zeros((3, 1))])


def test_expert_counts_per_image_and_cdf():
    index = np.array([[[0], [0], [0], [1]], [[1], [1], [1], [1]]])
    counts = statistics.expert_counts_per_image(index, 3)
    np.testing.assert_array_equal(counts, [[3, 1, 0], [0, 4, 0]])
    values, cdf = statistics.patches_per_expert_cdf(counts)
    np.testing.assert_array_equal(values, [1, 3, 4])
    np.testing.assert_allclose(cdf, [1 / 3, 2 / 3, 1.0])


def test_cdf_is_the_fraction_at_most_each_value_with_ties():
    # Pairs with 3, 3 and 1 patches: F(1) = 1/3, F(3) = 3/3 (not 2/3 at
    # the first of the tied threes).
    values, cdf = statistics.patches_per_expert_cdf(np.array([[3, 3], [1, 0]]))
    np.testing.assert_array_equal(values, [1, 3])
    np.testing.assert_allclose(cdf, [1 / 3, 1.0])
    lookup = dict(zip(values.tolist(), cdf.tolist()))
    assert lookup[3] == pytest.approx(1.0)


def test_cdf_of_nothing_is_empty():
    values, cdf = statistics.patches_per_expert_cdf(np.zeros((2, 3)))
    assert values.size == 0 and cdf.size == 0


def test_jaccard_over_images():
    # Expert 0 gets images {0, 1}, expert 1 {1, 2}, expert 2 nothing.
    counts = np.array([[2, 0, 0], [1, 3, 0], [0, 1, 0]])
    similarity = statistics.expert_similarity(counts, by="images")
    expected = [[1.0, 1 / 3, 0.0], [1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(similarity, expected)


def test_weighted_jaccard_over_patches():
    counts = np.array([[2, 0, 0], [1, 3, 0], [0, 1, 0]])
    similarity = statistics.expert_similarity(counts, by="patches")
    # min: (0 + 1 + 0) = 1; max: (2 + 3 + 1) = 6.
    assert similarity[0, 1] == pytest.approx(1 / 6)
    assert similarity[1, 0] == pytest.approx(1 / 6)
    assert similarity[1, 1] == pytest.approx(1.0)


def test_sweetspot_similarity_is_the_papers_weighted_dice():
    # Expert 0 gets [2, 1, 0] patches per image, expert 1 [0, 3, 1]:
    # the paper's sum over the shared image 1 is 1 + 3 - |1 - 3| = 2, over
    # all images 3 + 4 = 7.
    counts = np.array([[2, 0], [1, 3], [0, 1]])
    similarity = statistics.sweetspot_similarity(counts)
    np.testing.assert_allclose(similarity, [[1.0, 2 / 7], [2 / 7, 1.0]])
    # Dice = 2J / (1 + J) with J the weighted Jaccard index (1/6 here).
    jaccard = statistics.expert_similarity(counts, by="patches")[0, 1]
    assert jaccard == pytest.approx(1 / 6)
    assert similarity[0, 1] == pytest.approx(2 * jaccard / (1 + jaccard))
    empty = statistics.sweetspot_similarity(np.zeros((2, 2)))
    np.testing.assert_array_equal(empty, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="counts"):
        statistics.sweetspot_similarity(np.array([[-1, 2]]))


def test_expert_similarity_rejects_unknown_mode():
    with pytest.raises(ValueError, match="by='tokens'"):
        statistics.expert_similarity(np.zeros((1, 2)), by="tokens")


def _tracked_tensor(array):
    """A backend tensor computed from a variable: on torch it requires
    grad, where `np.asarray` raises."""
    import keras

    variable = keras.Variable(np.asarray(array, dtype="float32"))
    return keras.ops.add(variable, 0.0)


def test_statistics_accept_backend_tensors_that_require_grad():
    import keras

    index = np.array([[0, 1], [0, 2], [0, 1]])
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    counts = np.array([[3, 1], [0, 4]])
    as_index = keras.ops.cast(_tracked_tensor(index), "int32")
    checks = [
        (statistics.expert_load, (index, 4), (as_index, 4)),
        (statistics.expert_importance, (probs,), (_tracked_tensor(probs),)),
        (statistics.gate_entropy, (probs,), (_tracked_tensor(probs),)),
        (
            statistics.specialization_score,
            (counts,),
            (_tracked_tensor(counts),),
        ),
        (
            statistics.expert_similarity,
            (counts,),
            (_tracked_tensor(counts),),
        ),
        (
            statistics.class_expert_counts,
            (np.array([0, 1, 1]), index, 2, 4),
            (np.array([0, 1, 1]), as_index, 2, 4),
        ),
        (statistics.distinct_routes, ([index],), ([as_index],)),
    ]
    for function, numpy_args, tensor_args in checks:
        expected = function(*numpy_args)
        np.testing.assert_allclose(
            function(*tensor_args), expected, err_msg=function.__name__
        )
    values, cdf = statistics.patches_per_expert_cdf(_tracked_tensor(counts))
    np.testing.assert_array_equal(values, [1, 3, 4])


def test_to_numpy_of_a_variable_and_a_list():
    import keras

    variable = keras.Variable(np.array([1.0, 2.0], dtype="float32"))
    np.testing.assert_array_equal(statistics.to_numpy(variable), [1.0, 2.0])
    assert statistics.to_numpy([1, 2], dtype="float64").dtype == np.float64
