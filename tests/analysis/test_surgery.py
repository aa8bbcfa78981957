"""Pruning and merging MoE layers into dense FFNs."""

import keras
import numpy as np
import pytest

from keras_vmoe.analysis import collect_routing
from keras_vmoe.analysis import fold_expert_weights
from keras_vmoe.analysis import merge_experts
from keras_vmoe.analysis import prune_moe_layers
from keras_vmoe.models import ViTMoEImageClassifier
from tests.analysis.tiny_models import tiny_classifier
from tests.analysis.tiny_models import tiny_data


def outputs(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


def expert_weights(model, block):
    layer = model.backbone.get_layer(f"block_{block}").mlp
    return [
        keras.ops.convert_to_numpy(w)
        for w in (
            layer.expert_kernel_1,
            layer.expert_bias_1,
            layer.expert_kernel_2,
            layer.expert_bias_2,
        )
    ]


def dense_weights(model, block):
    mlp = model.backbone.get_layer(f"block_{block}").mlp
    return [
        keras.ops.convert_to_numpy(w)
        for w in (mlp.fc1.kernel, mlp.fc1.bias, mlp.fc2.kernel, mlp.fc2.bias)
    ]


def test_fold_expert_weights_formula():
    rng = np.random.default_rng(0)
    kernel_1, bias_1 = rng.random((3, 2, 4)), rng.random((3, 4))
    kernel_2, bias_2 = rng.random((3, 4, 2)), rng.random((3, 2))
    a, o = np.array([0.5, 0.25, 0.25]), np.array([0.2, 0.1, 0.3])
    folded = fold_expert_weights(kernel_1, bias_1, kernel_2, bias_2, a, o)
    np.testing.assert_allclose(
        folded["fc1_kernel"],
        sum(a[i] * kernel_1[i] for i in range(3)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        folded["fc2_bias"], sum(o[i] * bias_2[i] for i in range(3)), rtol=1e-6
    )
    with pytest.raises(ValueError, match="input_mix.shape"):
        fold_expert_weights(kernel_1, bias_1, kernel_2, bias_2, a[:2], o)


@pytest.mark.parametrize("strategy", ["most_used", "load_weighted"])
@pytest.mark.parametrize(
    "moe_kwargs",
    [
        {"routing": "image", "top_k": 1, "normalize_gates": True},
        {"routing": "token", "top_k": 2, "normalize_gates": True},
    ],
)
def test_pruning_identical_experts_keeps_outputs(strategy, moe_kwargs):
    images, labels = tiny_data(8)
    model = tiny_classifier(identical_experts=True, **moe_kwargs)
    pruned = prune_moe_layers(
        model, (images, labels), layers=[0], strategy=strategy
    )
    assert isinstance(pruned, ViTMoEImageClassifier)
    assert pruned.backbone.moe_layer_indices == (2,)
    np.testing.assert_allclose(
        outputs(pruned, images), outputs(model, images), atol=1e-5
    )


def test_pruned_model_saves_and_loads(tmp_path):
    images, labels = tiny_data(4)
    model = tiny_classifier(identical_experts=True, normalize_gates=True)
    pruned = prune_moe_layers(model, (images, labels), layers=[0, -1])
    assert pruned.backbone.moe_layer_indices == ()
    assert pruned.count_params() < model.count_params()
    path = str(tmp_path / "pruned.keras")
    pruned.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        outputs(loaded, images), outputs(model, images), atol=1e-5
    )


def test_most_used_strategy_picks_the_top_loaded_expert():
    images, labels = tiny_data(8)
    model = tiny_classifier()
    routing = collect_routing(model, (images, labels))
    record = routing.layers[1]
    pruned = prune_moe_layers(model, routing=routing, layers=[1])
    top = int(np.argmax(record.load))
    scale = record.mean_gate.sum()
    kernel_1, bias_1, kernel_2, bias_2 = expert_weights(model, 2)
    fc1_kernel, fc1_bias, fc2_kernel, fc2_bias = dense_weights(pruned, 2)
    np.testing.assert_allclose(fc1_kernel, kernel_1[top], rtol=1e-6)
    np.testing.assert_allclose(fc2_kernel, scale * kernel_2[top], rtol=1e-5)
    np.testing.assert_allclose(
        fc2_bias, scale * bias_2[top], rtol=1e-5, atol=1e-7
    )


def test_threshold_prunes_the_layers_below_it():
    images, labels = tiny_data(8)
    model = tiny_classifier()
    routing = collect_routing(model, (images, labels))
    scores = [record.specialization for record in routing.layers]
    threshold = min(max(scores) + 1e-6, 1.0)
    pruned = prune_moe_layers(model, routing=routing, threshold=threshold)
    kept = tuple(
        block for block, score in zip((1, 2), scores) if score >= threshold
    )
    assert pruned.backbone.moe_layer_indices == kept


def test_merge_equals_gate_weighted_formula():
    images, labels = tiny_data(8)
    model = tiny_classifier(routing="token", top_k=2)
    routing = collect_routing(model, (images, labels))
    merged = merge_experts(model, routing=routing, layers=[0])
    assert merged.backbone.moe_layer_indices == (2,)
    gates = routing.layers[0].mean_gate
    kernel_1, bias_1, kernel_2, bias_2 = expert_weights(model, 1)
    fc1_kernel, fc1_bias, fc2_kernel, fc2_bias = dense_weights(merged, 1)
    np.testing.assert_allclose(
        fc1_kernel,
        np.einsum("e,edh->dh", gates / gates.sum(), kernel_1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        fc2_kernel, np.einsum("e,ehd->hd", gates, kernel_2), rtol=1e-5
    )


def test_merging_identical_experts_keeps_outputs():
    images, labels = tiny_data(8)
    model = tiny_classifier(
        identical_experts=True, routing="token", top_k=2, normalize_gates=True
    )
    merged = merge_experts(model, (images, labels))
    assert merged.backbone.moe_layer_indices == ()
    np.testing.assert_allclose(
        outputs(merged, images), outputs(model, images), atol=1e-5
    )


def test_shared_expert_layers_are_refused_by_the_folding_strategies():
    model = tiny_classifier(shared_expert=True)
    with pytest.raises(ValueError, match="shared_expert=True"):
        prune_moe_layers(model, tiny_data(2), layers=[0])
    with pytest.raises(ValueError, match="shared_expert=True"):
        merge_experts(model, tiny_data(2))
    with pytest.raises(ValueError, match="shared_expert=False"):
        prune_moe_layers(
            tiny_classifier(), layers=[0], strategy="shared_expert"
        )


def test_shared_expert_strategy_keeps_the_shared_expert_alone():
    # Routed experts that output zero: the layer computes E_s(x) exactly,
    # so keeping the shared expert alone changes nothing.
    model = tiny_classifier(shared_expert=True)
    layer = model.backbone.get_layer("block_2").mlp
    for weight in (layer.expert_kernel_2, layer.expert_bias_2):
        weight.assign(np.zeros(weight.shape, "float32"))
    images, _ = tiny_data(6)
    # No data: keeping the shared expert reads no routing.
    pruned = prune_moe_layers(model, layers=[-1], strategy="shared_expert")
    assert pruned.backbone.moe_layer_indices == (1,)
    np.testing.assert_allclose(
        outputs(pruned, images), outputs(model, images), atol=1e-5
    )


def test_surgery_errors_name_the_value():
    model = tiny_classifier()
    data = tiny_data(2)
    with pytest.raises(ValueError, match="out of range.*Received: 5"):
        prune_moe_layers(model, data, layers=[5])
    with pytest.raises(ValueError, match="strategy='best'"):
        prune_moe_layers(model, data, layers=[0], strategy="best")
    with pytest.raises(ValueError, match="layers=None, threshold=None"):
        prune_moe_layers(model, data)
    with pytest.raises(ValueError, match="threshold=2"):
        prune_moe_layers(model, data, threshold=2)
    with pytest.raises(ValueError, match="data=None"):
        prune_moe_layers(model, layers=[0])
    with pytest.raises(ValueError, match="ViTMoEBackbone"):
        prune_moe_layers(
            keras.Sequential([keras.layers.Dense(2)]), data, layers=[0]
        )


def test_pruned_model_owns_its_weights():
    # On JAX, `predict` donates the original's buffers; the pruned model
    # must hold copies.
    images, labels = tiny_data(4)
    model = tiny_classifier(identical_experts=True, normalize_gates=True)
    pruned = prune_moe_layers(model, (images, labels), layers=[0])
    expected = outputs(pruned, images)
    model.predict(images, verbose=0)
    np.testing.assert_allclose(outputs(pruned, images), expected, atol=1e-6)


def test_surgery_on_a_backbone_returns_a_backbone():
    images, _ = tiny_data(4)
    model = tiny_classifier(
        identical_experts=True, routing="token", top_k=2, normalize_gates=True
    )
    backbone = model.backbone
    name = backbone.get_layer("block_2").mlp.path
    merged = merge_experts(backbone, images, layers=[name])
    assert type(merged) is type(backbone)
    assert merged.moe_layer_indices == (1,)
    np.testing.assert_allclose(
        outputs(merged, images), outputs(backbone, images), atol=1e-5
    )
