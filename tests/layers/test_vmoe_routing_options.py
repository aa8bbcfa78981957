"""vmoe's routing options: capacity rounding, E^3 ensemble routing, padded
partial groups at inference.

Hand tables for the capacity, an exact equality between an ensemble layer
and M independent layers, the per-member auxiliary losses, and the
guarantee that a padded partial group routes its real items exactly as the
start of a full group.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import losses
from keras_vmoe.layers import routing
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

RNG = np.random.default_rng(7)


def _np(x):
    return ops.convert_to_numpy(x)


# --- Capacity rounded to a multiple -----------------------------------------


@pytest.mark.parametrize(
    "items, experts, top_k, factor, multiple, expected",
    [
        # ceil(10 * 1 * 1.0 / 4) = 3 -> 4 (vmoe's multiple of 4).
        (10, 4, 1, 1.0, 4, 4),
        (10, 4, 1, 1.0, None, 3),
        # ceil(34 * 1 * 1.25 / 4) = 11 -> 12.
        (34, 4, 1, 1.25, 4, 12),
        # ceil(400 * 2 * 1.05 / 8) = 105 -> 108 (V-MoE S/32, 8 images).
        (400, 8, 2, 1.05, 4, 108),
        # Already a multiple: unchanged. 8 * 2 * 1.0 / 8 = 2 -> 2 (m = 2).
        (8, 8, 2, 1.0, 2, 2),
        # Never more than the items: ceil(3 * 1 / 2) = 2 -> 4 -> 3.
        (3, 2, 1, 1.0, 4, 3),
    ],
)
def test_capacity_rounded_up_to_a_multiple(
    items, experts, top_k, factor, multiple, expected
):
    assert (
        routing.compute_capacity(items, experts, top_k, factor, multiple)
        == expected
    )


def test_capacity_multiple_of_changes_what_is_kept():
    # 6 tokens all prefer expert 0 of 4; ceil(6 * 1 / 4) = 2 keeps 2,
    # rounded to 4 keeps 4 (the first four positions).
    kernel = np.zeros((3, 4), "float32")
    kernel[:, 0] = 1.0
    inputs = np.ones((1, 6, 3), "float32")
    kept = []
    for multiple in (None, 4):
        layer = MoEFeedForward(
            4,
            8,
            routing="token",
            eval_capacity_factor=1.0,
            capacity_multiple_of=multiple,
            batch_prioritized_routing=False,
            return_routing=True,
        )
        layer.build(inputs.shape)
        layer.router.kernel.assign(kernel)
        _, info = layer(inputs)
        kept.append(~_np(info["dropped"])[0, :, 0])
    np.testing.assert_array_equal(kept[0], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(kept[1], [1, 1, 1, 1, 0, 0])


def test_capacity_multiple_of_is_checked():
    with pytest.raises(ValueError, match="capacity_multiple_of"):
        MoEFeedForward(4, 8, capacity_multiple_of=0)


# --- E^3 ensemble routing ---------------------------------------------------


def _ensemble_layer(**kwargs):
    arguments = dict(
        num_experts=4,
        hidden_dim=8,
        routing="token",
        ensemble_size=2,
        capacity_factor=None,
        eval_capacity_factor=None,
    )
    arguments.update(kwargs)
    return MoEFeedForward(**arguments)


def test_ensemble_member_routes_among_its_own_experts():
    layer = _ensemble_layer(return_routing=True)
    tokens = RNG.standard_normal((3, 5, 6)).astype("float32")
    _, info = layer(np.repeat(tokens, 2, axis=0))
    index = _np(info["expert_index"])[..., 0]  # [B*M, T]
    member = np.arange(6) % 2
    np.testing.assert_array_equal(
        index // 2, np.broadcast_to(member[:, None], (6, 5))
    )
    probs = _np(info["router_probs"])  # 0 outside the member's block
    np.testing.assert_array_equal(probs[0::2, :, 2:], 0)
    np.testing.assert_array_equal(probs[1::2, :, :2], 0)
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-6)


def test_ensemble_equals_independent_members():
    # Member m is exactly a layer holding expert block m and router block m,
    # run on member m's copies (dropless, so groups do not interact).
    ensemble = _ensemble_layer()
    tokens = RNG.standard_normal((3, 5, 6)).astype("float32")
    outputs = _np(ensemble(np.repeat(tokens, 2, axis=0)))
    weights = {w.path.split("/")[-1]: _np(w) for w in ensemble.weights}
    for m in range(2):
        member = MoEFeedForward(
            2,
            8,
            routing="token",
            capacity_factor=None,
            eval_capacity_factor=None,
        )
        member.build(tokens.shape)
        block = slice(2 * m, 2 * m + 2)
        member.router.kernel.assign(weights["kernel"][:, block])
        for name in (
            "expert_kernel_1",
            "expert_bias_1",
            "expert_kernel_2",
            "expert_bias_2",
        ):
            getattr(member, name).assign(weights[name][block])
        np.testing.assert_allclose(
            outputs[m::2], _np(member(tokens)), rtol=1e-5, atol=1e-6
        )


def test_ensemble_groups_tokens_member_minor_as_vmoe():
    # Capacity 1 per expert in a group of 2 images x 2 tokens x 2 members
    # = 8 tokens: each expert keeps the first token (image, token, member
    # order) that chose it. All tokens of member 0 choose expert 0, all of
    # member 1 expert 2: only (image 0, token 0) is kept for each member.
    layer = _ensemble_layer(
        eval_capacity_factor=0.5,
        group_size=8,
        eval_group_size=8,
        return_routing=True,
        batch_prioritized_routing=False,
    )
    inputs = np.ones((4, 2, 3), "float32")
    layer.build(inputs.shape)
    kernel = np.zeros((3, 4), "float32")
    kernel[:, 0] = kernel[:, 2] = 1.0
    layer.router.kernel.assign(kernel)
    _, info = layer(inputs)
    kept = ~_np(info["dropped"])[..., 0]  # [B*M, T]: rows img0m0, img0m1, ...
    np.testing.assert_array_equal(kept, [[1, 0], [1, 0], [0, 0], [0, 0]])


def test_ensemble_aux_losses_are_per_member():
    layer = _ensemble_layer(
        load_balance_loss_weight=1.0,
        importance_loss_weight=1.0,
        capacity_factor=2.0,
    )
    tokens = RNG.standard_normal((2, 4, 6)).astype("float32")
    inputs = np.repeat(tokens, 2, axis=0)
    layer(inputs, training=True)
    total = sum(float(_np(loss)) for loss in layer.losses)
    # By hand: member m's block of logits, [S/M, E/M], as its own group.
    logits = _np(layer.router(ops.reshape(inputs, (-1, 6))))
    items = logits.reshape(2, 2, 4, 4).transpose(0, 2, 1, 3)  # [B, T, M, E]
    blocks = np.stack(
        [items[:, :, m, 2 * m : 2 * m + 2].reshape(-1, 2) for m in range(2)]
    )  # [M, S/M, E/M]
    probs = np.exp(blocks) / np.exp(blocks).sum(-1, keepdims=True)
    index = probs.argmax(-1)[..., None].astype("int32")
    expected = float(_np(losses.load_balance_loss(probs, index))) + float(
        _np(losses.importance_loss(probs))
    )
    np.testing.assert_allclose(total, expected, rtol=1e-5)


@pytest.mark.slow
def test_ensemble_gradients_config_and_saving(tmp_path):
    layer = _ensemble_layer(
        capacity_factor=1.5,
        eval_capacity_factor=1.5,
        group_size=10,
        capacity_multiple_of=4,
        importance_loss_weight=0.01,
    )
    inputs = np.repeat(RNG.standard_normal((2, 5, 6)).astype("float32"), 2, 0)
    layer(inputs)
    assert_every_weight_has_gradient(layer, inputs)
    config = layer.get_config()
    assert (config["ensemble_size"], config["capacity_multiple_of"]) == (2, 4)
    model = keras.Sequential([keras.Input((5, 6)), layer])
    assert_keras_round_trip(model, inputs, tmp_path, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=3), "multiple of `ensemble_size`"),
        (dict(top_k=3), "top_k"),
        (dict(routing="image"), "routing='token'"),
        (dict(group_size=5), "group_size"),
        (dict(ensemble_size=0), "ensemble_size"),
    ],
)
def test_ensemble_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _ensemble_layer(**kwargs)


# --- Partial groups padded at inference --------------------------------------


def _padded_layer(**kwargs):
    arguments = dict(
        num_experts=4,
        hidden_dim=8,
        top_k=2,
        routing="token",
        eval_capacity_factor=1.0,
        capacity_factor=1.0,
        group_size=20,
        eval_group_size=20,
        partial_groups="pad",
        batch_prioritized_routing=False,
        return_routing=True,
    )
    arguments.update(kwargs)
    return MoEFeedForward(**arguments)


def test_top1_padded_partial_group_equals_the_start_of_a_full_group():
    # Top-1 without batch priority: an item never competes with later ones.
    layer = _padded_layer(top_k=1)
    tokens = RNG.standard_normal((8, 5, 6)).astype("float32")  # 2 groups
    full, full_info = layer(tokens)
    for count in (1, 3):
        outputs, info = layer(tokens[:count])
        np.testing.assert_allclose(_np(outputs), _np(full)[:count], atol=1e-6)
        np.testing.assert_array_equal(
            _np(info["dropped"]), _np(full_info["dropped"])[:count]
        )
    # 5 images: a full group, then one image padded to a group of its own.
    outputs, _ = layer(tokens[:5])
    np.testing.assert_allclose(_np(outputs)[:4], _np(full)[:4], atol=1e-6)
    alone, _ = layer(tokens[4:5])
    np.testing.assert_allclose(_np(outputs)[4:], _np(alone), atol=1e-6)


def test_top2_padding_is_a_group_whose_other_items_claim_nothing():
    # With K = 2 the other items' first choices come before an item's
    # second choice, so padding is not "the start of a full group": it is
    # a full group whose other items are invalid (NaN), which claim no slot.
    layer = _padded_layer(eval_capacity_factor=0.5)
    tokens = RNG.standard_normal((8, 5, 6)).astype("float32")
    full, _ = layer(tokens)
    padded, info = layer(tokens[:2])
    invalid = np.concatenate(
        [tokens[:2], np.full((2, 5, 6), np.nan, "float32")]
    )
    strict = _padded_layer(eval_capacity_factor=0.5, partial_groups="error")
    strict.build(tokens.shape)
    for source, target in zip(layer.weights, strict.weights):
        target.assign(source)
    reference, reference_info = strict(invalid)
    np.testing.assert_allclose(_np(padded), _np(reference)[:2], atol=1e-6)
    np.testing.assert_array_equal(
        _np(info["dropped"]), _np(reference_info["dropped"])[:2]
    )
    # ... and here differs from the start of the full group (drops change).
    assert np.abs(_np(padded) - _np(full)[:2]).max() > 1e-5


def test_padding_claims_no_slot_and_load_counts_real_items():
    # All tokens prefer expert 0; capacity ceil(20 * 2 / 4) = 10 per group.
    layer = _padded_layer()
    tokens = np.ones((1, 5, 6), "float32")
    layer.build(tokens.shape)
    kernel = np.zeros((6, 4), "float32")
    kernel[:, 0] = 1.0
    layer.router.kernel.assign(kernel)
    _, info = layer(tokens)
    assert not _np(info["dropped"]).any()  # 10 choices fit both experts
    np.testing.assert_allclose(_np(layer.expert_load).sum(), 1.0, rtol=1e-6)


def test_partial_groups_error_by_default_and_in_training():
    tokens = RNG.standard_normal((3, 5, 6)).astype("float32")
    with pytest.raises(ValueError, match="multiple of `eval_group_size`"):
        _padded_layer(partial_groups="error")(tokens)
    with pytest.raises(ValueError, match="at inference only"):
        _padded_layer()(tokens, training=True)
    with pytest.raises(ValueError, match="partial_groups"):
        _padded_layer(partial_groups="drop")


def test_padded_groups_in_a_compiled_predict():
    layer = _padded_layer(top_k=1, return_routing=False)
    model = keras.Sequential([keras.Input((5, 6)), layer])
    tokens = RNG.standard_normal((8, 5, 6)).astype("float32")
    full = model.predict(tokens, batch_size=8, verbose=0)
    partial = model.predict(tokens, batch_size=3, verbose=0)
    np.testing.assert_allclose(partial[:3], full[:3], atol=1e-6)
    # Images 3-5 form the second batch: the start of the group 3-6.
    np.testing.assert_allclose(
        partial[3:6], _np(model(tokens[3:7]))[:3], atol=1e-6
    )
