"""Routing analysis and fit logs for Soft MoE and Expert Choice layers."""

import json
import math
import os

import keras
import numpy as np
import pytest

from keras_vmoe.analysis import collect_routing
from keras_vmoe.analysis import write_report
from keras_vmoe.analysis.collect import ExpertChoiceLayerRouting
from keras_vmoe.analysis.collect import SoftLayerRouting
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from tests.analysis.tiny_models import IMAGE_SHAPE
from tests.analysis.tiny_models import NUM_CLASSES
from tests.analysis.tiny_models import tiny_data

NUM_TOKENS = 17  # 16 patches of 4x4 + CLS


def _classifier(router_type, **kwargs):
    keras.utils.set_random_seed(0)
    backbone = ViTMoEBackbone(
        image_shape=IMAGE_SHAPE,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        moe_layers="last-2",
        num_experts=4,
        router_type=router_type,
        **kwargs,
    )
    return ViTMoEImageClassifier(backbone, num_classes=NUM_CLASSES)


def _moe_layers(model):
    backbone = model.backbone
    return [
        backbone.get_layer(f"block_{i}").mlp
        for i in backbone.moe_layer_indices
    ]


def test_soft_moe_statistics_of_uniform_weights_are_hand_computed():
    # phi = 0: every logit is 0, so each slot averages the 17 tokens
    # (dispatch 1/17, entropy log 17) and each token spreads its combine
    # weight evenly over the 4 experts x 2 slots (load 1/4 per expert,
    # combine entropy log 8).
    model = _classifier("soft", slots_per_expert=2)
    for layer in _moe_layers(model):
        layer.phi.assign(np.zeros(layer.phi.shape, "float32"))
    images, labels = tiny_data(6)
    result = collect_routing(model, (images, labels), batch_size=4)
    assert result.num_images == 6
    assert len(result.layers) == 2
    for r in result.layers:
        assert isinstance(r, SoftLayerRouting)
        assert r.num_tokens == NUM_TOKENS
        np.testing.assert_allclose(r.load, [0.25] * 4, atol=1e-6)
        np.testing.assert_allclose(
            r.expert_slot_entropy, [math.log(NUM_TOKENS)] * 4, atol=1e-5
        )
        np.testing.assert_allclose(r.dispatch_max, 1 / NUM_TOKENS, atol=1e-6)
        np.testing.assert_allclose(r.combine_entropy, math.log(8), atol=1e-5)
        np.testing.assert_allclose(r.combine_max, 1 / 8, atol=1e-6)
        summary = r.summary()
        assert "heatmaps" in summary["skipped"]
        json.dumps(summary)
    assert result.routing_degree is None
    assert result.top_k_layers == []


def test_soft_moe_statistics_match_the_layer_routing_outputs():
    model = _classifier("soft")
    images, labels = tiny_data(4)
    result = collect_routing(model, (images, labels))
    layer = _moe_layers(model)[-1]
    seen = {}
    layer.add_routing_observer(lambda lay, info: seen.update(info))
    model(images, training=False)
    r = result.layers[-1]
    np.testing.assert_allclose(
        r.expert_slot_entropy,
        keras.ops.convert_to_numpy(seen["slot_entropy"]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        r.load, keras.ops.convert_to_numpy(seen["expert_load"]), rtol=1e-5
    )
    np.testing.assert_allclose(r.combine_mass.sum(axis=-1), 1.0, atol=1e-5)
    # Trained-free router: the load is not exactly uniform.
    assert not np.allclose(r.load, 0.25, atol=1e-4)
    # One batch: the fit log's max load is E * max of that load.
    assert r.fit_statistics == {
        "max_load": pytest.approx(4 * r.load.max(), rel=1e-5)
    }


def test_expert_choice_counts_tokens_per_expert_and_unrouted_tokens():
    # C = ceil(17 * 0.5 / 4) = 3 tokens per expert and image: 12 picks for
    # 17 tokens, so at least 5 tokens of every image get no expert.
    model = _classifier("expert_choice", capacity_factor=0.5)
    images, labels = tiny_data(5)
    result = collect_routing(model, (images, labels), batch_size=2)
    for r in result.layers:
        assert isinstance(r, ExpertChoiceLayerRouting)
        np.testing.assert_array_equal(r.tokens_per_expert, 3)
        np.testing.assert_allclose(r.load, [0.25] * 4)
        assert r.experts_per_token.shape == (5, NUM_TOKENS)
        picks = r.experts_per_token.sum(axis=1)
        np.testing.assert_array_equal(picks, 12)
        unrouted = (r.experts_per_token == 0).mean()
        assert r.unrouted_fraction == pytest.approx(unrouted)
        assert r.unrouted_fraction >= 5 / NUM_TOKENS
        # The fit log's value, from the layer's `routing_statistics()`.
        assert r.fit_statistics == {"unrouted": pytest.approx(unrouted)}
        summary = r.summary()
        assert summary["tokens_per_expert"] == [15] * 4
        assert sum(summary["experts_per_token_histogram"]) == pytest.approx(1)
        assert summary["experts_per_token_histogram"][0] == pytest.approx(
            unrouted
        )
        json.dumps(summary)


@pytest.mark.parametrize("router_type", ["soft", "expert_choice"])
def test_write_report_skips_top_k_figures_with_a_note(router_type, tmp_path):
    images, labels = tiny_data(4)
    report = write_report(
        _classifier(router_type), (images, labels), str(tmp_path), dpi=30
    )
    names = sorted(os.listdir(tmp_path))
    assert "load.png" in names
    assert not [name for name in names if name.startswith("heatmap")]
    assert not [name for name in names if name.startswith("gating")]
    with open(tmp_path / "index.md") as handle:
        index = handle.read()
    title = "## Soft MoE layers" if router_type == "soft" else (
        "## Expert Choice layers"
    )
    assert title in index
    other = "## Expert Choice layers" if router_type == "soft" else (
        "## Soft MoE layers"
    )
    assert other not in index
    assert "heatmaps" in index and "## MoE layers" not in index
    with open(tmp_path / "report.json") as handle:
        saved = json.load(handle)
    for layer in saved["routing"]["layers"]:
        assert layer["routing"] == router_type
        assert "skipped" in layer
    assert report["routing"]["routing_degree"] is None


@pytest.mark.parametrize(
    "router_type, suffix", [("soft", "max_load"), ("expert_choice", "unrouted")]
)
def test_fit_logs_routing_metrics_of_the_new_layers(router_type, suffix):
    model = _classifier(router_type, capacity_factor=0.5) if (
        router_type == "expert_choice"
    ) else _classifier(router_type)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    images, labels = tiny_data(4)
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    keys = [key for key in history.history if key.endswith(suffix)]
    assert len(keys) == 2, history.history.keys()
    for key in keys:
        value = history.history[key][0]
        if suffix == "max_load":
            assert 1.0 <= value <= 4.0
        else:
            assert 5 / NUM_TOKENS <= value <= 1.0


@pytest.mark.parametrize("router_type", ["soft", "expert_choice"])
def test_surgery_refuses_soft_and_expert_choice_layers(router_type):
    from keras_vmoe.analysis import merge_experts
    from keras_vmoe.analysis import prune_moe_layers

    model = _classifier(router_type)
    data = tiny_data(4)
    with pytest.raises(ValueError, match=f"router_type='{router_type}'"):
        prune_moe_layers(model, data, layers=[0])
    with pytest.raises(ValueError, match="not supported"):
        merge_experts(model, data)
