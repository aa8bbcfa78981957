"""Pruning, merging and distillation on MoE-ConvNeXt.

The tiny model: two stages (widths 8, 16) of two blocks, MoE in the
second block of each ("every-2": global blocks 1 and 3), token routing,
top-1, experts of ratio 2 (16 and 32 hidden units) beside a dense MLP of
ratio 4, the Sweet-spot skip around each MoE. LayerScale is 1 and the
skip scales are random, so every branch moves the outputs well above the
1e-5 tolerance.
"""

import keras
import numpy as np
import pytest

from keras_vmoe.analysis import DistillationModel
from keras_vmoe.analysis import LayerRouting
from keras_vmoe.analysis import RoutingResult
from keras_vmoe.analysis import distillation_loss
from keras_vmoe.analysis import merge_experts
from keras_vmoe.analysis import prune_moe_layers
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from tests.analysis.tiny_models import make_experts_identical

IMAGE_SHAPE = (16, 16, 3)
NUM_CLASSES = 3
MOE_BLOCKS = (1, 3)  # global block indices


def tiny_convnext(identical_experts=False, seed=0, **overrides):
    keras.utils.set_random_seed(seed)
    config = dict(
        depths=[2, 2],
        hidden_dims=[8, 16],
        patch_size=4,
        mlp_ratio=4.0,
        layer_scale_init_value=1.0,
        moe_layers="every-2",
        num_experts=4,
        top_k=1,
        expert_mlp_ratio=2.0,
        routing="token",
        normalize_gates=True,
        eval_capacity_factor=None,
        image_shape=IMAGE_SHAPE,
    )
    config.update(overrides)
    backbone = ConvNeXtMoEBackbone(**config)
    rng = np.random.default_rng(2)
    for block in backbone.blocks:
        if block.skip_scale is not None:
            block.skip_scale.assign(
                rng.uniform(0.5, 1.5, block.skip_scale.shape).astype("float32")
            )
        if identical_experts and block.is_moe:
            make_experts_identical(block.mlp)
    return ConvNeXtMoEImageClassifier(backbone, num_classes=NUM_CLASSES)


def tiny_data(num_images=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((num_images, *IMAGE_SHAPE)).astype("float32")
    return images, np.arange(num_images) % NUM_CLASSES


def outputs(model, images):
    return keras.ops.convert_to_numpy(model(images, training=False))


def moe_block_indices(model):
    return tuple(i for i, b in enumerate(model.backbone.blocks) if b.is_moe)


def dense_weights(model, block):
    mlp = model.backbone.blocks[block].mlp
    return [
        keras.ops.convert_to_numpy(w)
        for w in (mlp.fc1.kernel, mlp.fc1.bias, mlp.fc2.kernel, mlp.fc2.bias)
    ]


def test_the_tiny_model_is_sensitive_to_the_moe_branch():
    # Guards the tolerance of the tests below: dropping the skip of block 3
    # or zeroing its experts moves the logits far above 1e-5.
    images, _ = tiny_data(4)
    model = tiny_convnext(identical_experts=True)
    reference = outputs(model, images)
    block = model.backbone.blocks[3]
    block.skip_scale.assign(np.zeros((16,), "float32"))
    assert np.abs(outputs(model, images) - reference).max() > 1e-3


@pytest.mark.parametrize("strategy", ["most_used", "load_weighted"])
def test_pruning_identical_experts_keeps_outputs(strategy):
    images, labels = tiny_data(8)
    model = tiny_convnext(identical_experts=True)
    pruned = prune_moe_layers(
        model, (images, labels), layers=[0], strategy=strategy
    )
    assert isinstance(pruned, ConvNeXtMoEImageClassifier)
    assert moe_block_indices(pruned) == (3,)
    block = pruned.backbone.blocks[1]
    # Its own MLP width: the experts' 2 * 8, not the dense MLP's 4 * 8.
    assert block.mlp.hidden_dim == 16
    assert pruned.backbone.blocks[0].mlp.hidden_dim == 32
    assert block.skip_scale is not None
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(block.skip_scale),
        keras.ops.convert_to_numpy(model.backbone.blocks[1].skip_scale),
    )
    np.testing.assert_allclose(
        outputs(pruned, images), outputs(model, images), atol=1e-5
    )


def test_pruning_drops_the_computed_parameter_count():
    images, labels = tiny_data(4)
    model = tiny_convnext(identical_experts=True)
    pruned = prune_moe_layers(model, (images, labels), layers=[-1])
    # Block 3: d = 16, expert width h = 32, E = 4, linear router without
    # bias. MoE: router d*E = 64, experts E*(d*h + h + h*d + d)
    # = 4 * (512 + 32 + 512 + 16) = 4288, load statistic E = 4 -> 4356.
    # Dense FFN of width 32: 512 + 32 + 512 + 16 = 1072. The skip scale
    # (16) stays.
    assert model.count_params() - pruned.count_params() == 4356 - 1072
    # Block 1 (d = 8, h = 16): MoE 32 + 4 * (128 + 16 + 128 + 8) + 4 = 1156,
    # FFN 280.
    both = prune_moe_layers(model, (images, labels), layers=[0, 1])
    assert model.count_params() - both.count_params() == 3284 + 1156 - 280
    assert moe_block_indices(both) == ()


def test_merging_identical_experts_keeps_outputs():
    images, labels = tiny_data(8)
    model = tiny_convnext(identical_experts=True, top_k=2)
    merged = merge_experts(model, (images, labels))
    assert moe_block_indices(merged) == ()
    widths = [block.mlp.hidden_dim for block in merged.backbone.blocks]
    assert widths == [32, 16, 64, 32]
    assert merged.backbone.dense_skip_blocks == [1, 3]
    np.testing.assert_allclose(
        outputs(merged, images), outputs(model, images), atol=1e-5
    )


def test_merged_model_saves_loads_and_round_trips_its_config(tmp_path):
    images, labels = tiny_data(4)
    model = tiny_convnext(identical_experts=True)
    merged = merge_experts(model, (images, labels), layers=[1])
    config = merged.backbone.get_config()
    assert config["block_mlp_dims"] == [None, None, None, 32]
    assert config["dense_skip_blocks"] == [3]
    assert config["moe_layers"] == [1]
    restored = ConvNeXtMoEBackbone.from_config(config)
    assert restored.get_config() == config
    path = str(tmp_path / "merged.keras")
    merged.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        outputs(loaded, images), outputs(model, images), atol=1e-5
    )
    merged.save_to_preset(str(tmp_path / "preset"))
    from_preset = ConvNeXtMoEImageClassifier.from_preset(
        str(tmp_path / "preset")
    )
    np.testing.assert_array_equal(
        outputs(from_preset, images), outputs(merged, images)
    )


def test_shared_expert_is_kept_beside_the_folded_experts():
    # E_s(u) + FFN(u) folds exactly into one FFN of width h_s + h.
    images, labels = tiny_data(8)
    model = tiny_convnext(identical_experts=True, shared_expert=True)
    for strategy in ("most_used", "load_weighted"):
        pruned = prune_moe_layers(
            model, (images, labels), layers=[1], strategy=strategy
        )
        assert pruned.backbone.blocks[3].mlp.hidden_dim == 64
        np.testing.assert_allclose(
            outputs(pruned, images), outputs(model, images), atol=1e-5
        )
    merged = merge_experts(model, (images, labels))
    np.testing.assert_allclose(
        outputs(merged, images), outputs(model, images), atol=1e-5
    )


def test_shared_expert_strategy_needs_no_data():
    # Routed experts that output zero: the MoE computes E_s(u) exactly.
    model = tiny_convnext(shared_expert=True)
    layer = model.backbone.blocks[3].mlp
    for weight in (layer.expert_kernel_2, layer.expert_bias_2):
        weight.assign(np.zeros(weight.shape, "float32"))
    images, _ = tiny_data(4)
    pruned = prune_moe_layers(model, layers=[-1], strategy="shared_expert")
    assert moe_block_indices(pruned) == (1,)
    assert pruned.backbone.blocks[3].mlp.hidden_dim == 32
    np.testing.assert_allclose(
        outputs(pruned, images), outputs(model, images), atol=1e-5
    )
    # A threshold still needs labelled data.
    with pytest.raises(ValueError, match="data=None"):
        prune_moe_layers(model, threshold=0.5, strategy="shared_expert")


def test_most_used_ties_keep_the_lowest_expert_index():
    model = tiny_convnext()
    layer = model.backbone.blocks[3].mlp
    # Hand-made routing of block 3: experts 2 and 1 each take half the
    # tokens (a tie), experts 0 and 3 none.
    expert_index = np.array([[[[2]], [[1]]], [[[1]], [[2]]]])  # [N, H, W, K]
    record = LayerRouting(
        name=layer.path,
        index=1,
        num_experts=4,
        top_k=1,
        routing="token",
        expert_index=expert_index,
        gates=np.ones(expert_index.shape, "float32"),
        dropped=np.zeros(expert_index.shape, bool),
        router_probs=np.full((2, 2, 1, 4), 0.25, "float32"),
    )
    np.testing.assert_allclose(record.load, [0.0, 0.5, 0.5, 0.0])
    routing = RoutingResult(
        layers=[record], images=None, labels=None, image_shape=(16, 16)
    )
    pruned = prune_moe_layers(model, routing=routing, layers=[1])
    kernel_1 = keras.ops.convert_to_numpy(layer.expert_kernel_1)
    fc1_kernel = dense_weights(pruned, 3)[0]
    np.testing.assert_array_equal(fc1_kernel, kernel_1[1])
    assert not np.array_equal(fc1_kernel, kernel_1[2])


def test_block_mlp_dims_and_dense_skip_blocks_are_checked():
    with pytest.raises(ValueError, match="block_mlp_dims=\\[4\\]"):
        tiny_convnext(block_mlp_dims=[4])
    with pytest.raises(ValueError, match="dense_skip_blocks=\\[1\\]"):
        tiny_convnext(dense_skip_blocks=[1])  # block 1 is an MoE block
    with pytest.raises(ValueError, match="dense_skip_blocks=\\[7\\]"):
        tiny_convnext(dense_skip_blocks=[7])


@pytest.mark.slow
def test_distillation_into_a_moe_convnext_student():
    images, labels = tiny_data(16)
    teacher = tiny_convnext(moe_layers=None, seed=1)
    student = tiny_convnext(seed=2)
    distiller = DistillationModel(student, teacher, temperature=2.0, alpha=0.9)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))

    def mean_kl():
        return float(
            np.mean(
                keras.ops.convert_to_numpy(
                    distillation_loss(
                        teacher(images), student(images), temperature=2.0
                    )
                )
            )
        )

    before = mean_kl()
    teacher_weights = [keras.ops.convert_to_numpy(w) for w in teacher.weights]
    distiller.fit(images, labels, batch_size=8, epochs=8, verbose=0)
    assert mean_kl() < 0.5 * before
    for old, weight in zip(teacher_weights, teacher.weights):
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(weight))
