"""ViT-MoE with Soft MoE and Expert Choice blocks: build, save, stats, upcycle."""

import keras
import numpy as np
import pytest

from keras_vmoe.converters.vit import dense_twin
from keras_vmoe.converters.vit import upcycle_vit
from keras_vmoe.layers import ExpertChoiceFeedForward
from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import SoftMoEFeedForward
from keras_vmoe.models import model_stats
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe.presets import PRESETS
from keras_vmoe.models.vit_moe.presets import analytic_stats
from tests.helpers import assert_every_weight_has_gradient
from tests.helpers import assert_keras_round_trip

TINY = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=4,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
)
ROUTER_TYPES = {
    "soft": dict(router_type="soft", slots_per_expert=2, shared_expert=True),
    "expert_choice": dict(
        router_type="expert_choice", capacity_factor=2.0, router="cosine"
    ),
}
IMAGES = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")


def _backbone(router_type, **overrides):
    config = dict(TINY, moe_layers="last-2", num_experts=4)
    config.update(ROUTER_TYPES[router_type], **overrides)
    return ViTMoEBackbone(**config)


@pytest.mark.parametrize(
    "router_type, layer_class",
    [("soft", SoftMoEFeedForward), ("expert_choice", ExpertChoiceFeedForward)],
)
def test_moe_blocks_use_the_router_type_layer(router_type, layer_class):
    backbone = _backbone(router_type)
    mlps = [block.mlp for block in backbone.transformer_layers]
    assert [type(m) for m in mlps[2:]] == [layer_class] * 2
    assert not any(isinstance(m, layer_class) for m in mlps[:2])
    assert mlps[3].num_experts == 4
    if router_type == "soft":
        assert mlps[3].slots_per_expert == 2 and mlps[3].shared_expert
    else:
        assert mlps[3].capacity_factor == 2.0
        assert mlps[3].router_name == "cosine"
    assert backbone(IMAGES).shape == (2, 17, 16)


def test_default_router_type_is_top_k():
    backbone = ViTMoEBackbone(**TINY, moe_layers="last-1", num_experts=2)
    assert backbone.router_type == "top_k"
    assert isinstance(backbone.transformer_layers[-1].mlp, MoEFeedForward)


@pytest.mark.parametrize("router_type", sorted(ROUTER_TYPES))
def test_config_and_keras_round_trips_are_identical(router_type, tmp_path):
    backbone = _backbone(router_type)
    config = backbone.get_config()
    assert config["router_type"] == router_type
    clone = ViTMoEBackbone.from_config(config)
    assert clone.get_config() == config
    assert_keras_round_trip(backbone, IMAGES, tmp_path)


@pytest.mark.parametrize("router_type", sorted(ROUTER_TYPES))
def test_gradient_reaches_every_weight(router_type):
    backbone = _backbone(router_type)
    assert_every_weight_has_gradient(backbone, IMAGES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(router_type="hash"), "router_type='hash'"),
        (dict(router_type="soft", top_k=2), "top_k=2"),
        (dict(router_type="soft", router="cosine"), "router='cosine'"),
        (dict(router_type="expert_choice", routing="token"), "routing='token'"),
        (dict(router_type="expert_choice", z_loss_weight=0.1), "z_loss_weight"),
        (dict(router_type="top_k", slots_per_expert=2), "slots_per_expert=2"),
        (dict(router_type="soft", slots_per_expert=0), "slots_per_expert=0"),
    ],
)
def test_bad_router_type_arguments_raise_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTMoEBackbone(**TINY, moe_layers="last-1", num_experts=2, **overrides)


# --- Stats ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(router_type="soft"),
        dict(router_type="soft", slots_per_expert=3, shared_expert=True),
        dict(router_type="expert_choice", capacity_factor=1.0),
        dict(router_type="expert_choice", capacity_factor=2.0, router="l2",
             router_dim=8, shared_expert=True),
    ],
    ids=str,
)
def test_formula_matches_the_measured_model(overrides):
    config = dict(TINY, moe_layers="every-2", num_experts=3, **overrides)
    assert model_stats(ViTMoEBackbone(**config), 32) == analytic_stats(config)


def test_soft_moe_flops_are_hand_computed():
    config = dict(TINY, moe_layers=[3], num_experts=4, router_type="soft")
    dense = dict(TINY)
    tokens, d, h, slots = 17, 16, 32, 4
    extra = (
        3 * tokens * d * slots  # logits, dispatch and combine einsums
        + slots * 2 * d * h  # one expert row per slot
        - tokens * 2 * d * h  # instead of the dense MLP on every token
    )
    assert analytic_stats(config)["flops"] == (
        analytic_stats(dense)["flops"] + extra
    )


# Soft MoE paper, Table 8 (224x224): params (with a JFT head), GFLOP/img.
PAPER = {
    "vit_small_patch16": (33e6, 9.2),
    "soft_moe_small_patch16_128e": (933e6, 8.6),
    "vit_base_patch16": (108e6, 35.1),
    "soft_moe_base_patch16_128e": (3.7e9, 32.0),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_soft_moe_presets_reproduce_the_paper_table(name):
    """Paper GFLOP = 2 x (our MACs + the attention products QK^T and AV).

    Our convention leaves the attention products out; the paper counts
    FLOPs as 2 x MACs with them. Its parameter counts include the JFT
    classification head (d x ~29.6k classes), which a backbone has not.
    """
    preset = PRESETS[name]
    config = preset["config"]
    d, depth, tokens = config["hidden_dim"], config["num_layers"], 197
    attention_macs = depth * 2 * tokens * tokens * d
    gflop = 2 * (preset["flops"] + attention_macs) / 1e9
    assert gflop == pytest.approx(PAPER[name][1], abs=0.1)
    head = (d + 1) * 29_593
    assert preset["params"] + head == pytest.approx(PAPER[name][0], rel=0.01)


# --- Upcycling --------------------------------------------------------------------


def _upcycled(router_type, **overrides):
    moe = _backbone(router_type, **overrides)
    dense = dense_twin(moe)
    upcycle_vit(dense, moe)
    return dense, moe


@pytest.mark.parametrize("router_type", sorted(ROUTER_TYPES))
def test_upcycling_copies_the_dense_mlp_into_every_expert(router_type):
    dense, moe = _upcycled(router_type, shared_expert=False)
    for source, target in zip(
        dense.transformer_layers[2:], moe.transformer_layers[2:]
    ):
        kernel = keras.ops.convert_to_numpy(source.mlp.fc1.kernel)
        experts = keras.ops.convert_to_numpy(target.mlp.expert_kernel_1)
        np.testing.assert_array_equal(experts, np.repeat(kernel[None], 4, 0))
    # Blocks outside the MoE ones are copied as they are.
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(dense.transformer_layers[0](
            dense.embedding(IMAGES))),
        keras.ops.convert_to_numpy(moe.transformer_layers[0](
            moe.embedding(IMAGES))),
    )


def test_upcycled_expert_choice_scales_the_dense_mlp_by_its_gates():
    """Start-up: y_t = (sum of the gates of the experts that chose t) f(x_t)."""
    dense, moe = _upcycled("expert_choice", shared_expert=False)
    x = np.random.default_rng(1).normal(size=(2, 17, 16)).astype("float32")
    layer = moe.transformer_layers[3].mlp
    clone = ExpertChoiceFeedForward.from_config(
        dict(layer.get_config(), return_routing=True)
    )
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    outputs, info = clone(x)
    gate_sum = keras.ops.convert_to_numpy(info["gates"]).sum(-1, keepdims=True)
    expected = gate_sum * keras.ops.convert_to_numpy(
        dense.transformer_layers[3].mlp(x)
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(outputs), expected, rtol=1e-5, atol=1e-6
    )
    assert gate_sum.max() <= 1.0 + 1e-6  # probabilities over E sum to 1


def test_upcycled_soft_moe_applies_the_dense_mlp_to_slot_mixtures():
    """Start-up: y_t = sum_n C[t, n] f(slot_n), slots = D^T x.

    With a fresh router the logits are small (|logit| <= scale = 1), so
    the slots are close to the image's mean token and every token gets
    about f(mean token): the upcycled block does not start at the dense
    MLP's per-token output.
    """
    dense, moe = _upcycled("soft", shared_expert=False, slots_per_expert=1)
    x = np.random.default_rng(1).normal(size=(2, 17, 16)).astype("float32")
    layer = moe.transformer_layers[3].mlp
    f = dense.transformer_layers[3].mlp
    dispatch, combine = (
        keras.ops.convert_to_numpy(w) for w in layer.routing_weights(x)
    )
    slots = np.einsum("btn,btd->bnd", dispatch, x)
    expected = np.einsum(
        "btn,bnd->btd", combine, keras.ops.convert_to_numpy(f(slots))
    )
    outputs = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    mean_token = keras.ops.convert_to_numpy(f(x.mean(1, keepdims=True)))
    per_token = keras.ops.convert_to_numpy(f(x))
    assert np.abs(outputs - mean_token).mean() < 0.2 * np.abs(
        outputs - per_token
    ).mean()
