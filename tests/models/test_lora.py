"""LoRA on the backbones (Dense layers and stacked experts), merging,
saving, and frozen routers."""

import re

import keras
import numpy as np
import pytest

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import find_moe_layers
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.models import freeze_routers
from keras_vmoe.models import merge_lora
from tests.helpers import TINY_VIT
from tests.helpers import gradients

VIT = TINY_VIT
MOE_CONFIGS = {
    "top_k_token": dict(
        router_type="top_k", routing="token", top_k=2, shared_expert=True
    ),
    "top_k_image": dict(router_type="top_k", routing="image", top_k=1),
    "soft": dict(router_type="soft"),
    "expert_choice": dict(router_type="expert_choice"),
}
CONVNEXT = dict(
    depths=[2],
    hidden_dims=[16],
    patch_size=8,
    stem_norm=False,
    layer_scale_init_value=None,
    image_shape=(16, 16, 3),
    moe_layers=[1],
    num_experts=4,
    expert_mlp_ratio=2,
)
IMAGES = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
LABELS = np.array([0, 2])


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def vit(name="top_k_token", **kwargs):
    return ViTMoEBackbone(**VIT, **MOE_CONFIGS[name], **kwargs)


def lora_paths(model):
    return sorted(v.path for v in model.weights if "lora" in v.path)


def trainable_paths(model):
    return sorted(v.path for v in model.trainable_weights)


def perturb_adapters(backbone, seed=0):
    """Nonzero A and B everywhere (as after some training)."""
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if "lora" in variable.path:
            variable.assign(
                0.1 * rng.normal(size=variable.shape).astype("float32")
            )


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_enable_lora_adapts_and_freezes_the_rest(name):
    backbone = vit(name)
    before = numpy(backbone(IMAGES))
    backbone.enable_lora(2, verbose=False)
    # B starts at zero: the outputs do not change.
    np.testing.assert_array_equal(numpy(backbone(IMAGES)), before)
    # The trainable weights are exactly the adapters: 2 per Dense layer
    # (qkv, proj, fc1, fc2, shared expert) and 4 per MoE layer.
    assert trainable_paths(backbone) == lora_paths(backbone)
    dense = [
        layer
        for layer in backbone._flatten_layers()
        if isinstance(layer, keras.layers.Dense)
    ]
    moe_layers = find_moe_layers(backbone)
    assert moe_layers and all(layer.lora_enabled for layer in dense)
    assert all(layer.lora_enabled for layer in moe_layers)
    assert len(lora_paths(backbone)) == 2 * len(dense) + 4 * len(moe_layers)
    for moe in moe_layers:
        assert moe.router_variables
        assert not any(v.trainable for v in moe.router_variables)
        assert not moe._expert_kernel_1.trainable
        assert not moe.expert_bias_1.trainable


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_gradients_reach_every_adapter(name):
    backbone = vit(name)
    backbone.enable_lora(
        2,
        b_initializer=keras.initializers.RandomNormal(0.0, 0.1),
        verbose=False,
    )
    grads = gradients(backbone, IMAGES)
    paths = [v.path for v in backbone.trainable_variables]
    missing = [p for p, g in zip(paths, grads) if g is None or not np.any(g)]
    assert not missing, f"no gradient reached: {missing}"
    assert any("expert_kernel_1_lora_a" in p for p in paths)
    assert any("expert_kernel_2_lora_b" in p for p in paths)


def test_optimizer_steps_change_only_adapters_and_head():
    backbone = vit()
    classifier = ViTMoEImageClassifier(backbone, num_classes=3)
    backbone.enable_lora(2, verbose=False)
    head = sorted(v.path for v in classifier.output_dense.weights)
    assert trainable_paths(classifier) == sorted(lora_paths(backbone) + head)
    classifier.compile(
        # Adam: updates of about the learning rate however small the
        # gradient (A's first gradient is tiny: B has just left zero).
        optimizer=keras.optimizers.Adam(learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    start = {v.path: numpy(v) for v in classifier.weights}
    classifier.train_on_batch(IMAGES, LABELS)
    classifier.train_on_batch(IMAGES, LABELS)
    changed = {
        v.path
        for v in classifier.weights
        if not np.array_equal(numpy(v), start[v.path])
    }
    # Routing statistics are state, not parameters.
    changed = {path for path in changed if "expert_load" not in path}
    assert changed == set(trainable_paths(classifier))


@pytest.mark.parametrize("name", ["top_k_token", "soft", "expert_choice"])
def test_merge_lora_equals_the_adapted_model(name, tmp_path):
    backbone = vit(name)
    classifier = ViTMoEImageClassifier(backbone, num_classes=3)
    backbone.enable_lora(2, verbose=False)
    classifier.compile(
        optimizer=keras.optimizers.Adam(learning_rate=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    classifier.train_on_batch(IMAGES, LABELS)
    b_values = [numpy(v) for v in backbone.weights if v.path.endswith("lora_b")]
    assert all(np.any(value) for value in b_values)
    adapted = numpy(classifier(IMAGES))
    assert merge_lora(classifier) is classifier
    assert not backbone.lora_enabled
    assert lora_paths(backbone) == []
    assert "lora_config" not in backbone.get_config()
    np.testing.assert_allclose(
        numpy(classifier(IMAGES)), adapted, rtol=1e-5, atol=1e-5
    )
    # The merged model saves and loads as a plain model.
    path = str(tmp_path / "merged.keras")
    classifier.save(path)
    restored = keras.saving.load_model(path)
    assert not restored.backbone.lora_enabled
    assert lora_paths(restored) == []
    np.testing.assert_allclose(
        numpy(restored(IMAGES)), adapted, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "dispatch, routing, capacity_factor, expected_path",
    [
        ("slots", "token", 1.25, "slots"),
        ("sorted", "token", 1.25, "sorted"),
        ("sorted", "token", None, "sorted"),
        ("slots", "image", None, "gather"),
        pytest.param(
            "grouped",
            "token",
            1.25,
            "grouped",
            marks=pytest.mark.skipif(
                keras.backend.backend() == "tensorflow",
                reason="grouped matmul: JAX and torch only",
            ),
        ),
        ("slots", "image", 2.0, "slots"),
    ],
)
def test_every_dispatch_path_uses_the_adapted_experts(
    dispatch, routing, capacity_factor, expected_path
):
    layer = MoEFeedForward(
        4,
        16,
        top_k=2,
        routing=routing,
        dispatch=dispatch,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,
    )
    inputs = np.random.default_rng(1).normal(size=(2, 6, 8)).astype("float32")
    plain = numpy(layer(inputs))
    layer.enable_lora(
        2, b_initializer=keras.initializers.RandomNormal(0.0, 0.1)
    )
    adapted = numpy(layer(inputs))
    assert layer.dispatch_path == expected_path
    assert not np.allclose(adapted, plain, atol=1e-4)
    grads = dict(
        zip(
            (v.path for v in layer.trainable_variables),
            gradients(layer, inputs),
        )
    )
    for name in ("1_lora_a", "1_lora_b", "2_lora_a", "2_lora_b"):
        (grad,) = [g for p, g in grads.items() if p.endswith(name)]
        assert grad is not None and np.any(grad), name
    layer.merge_lora()
    # Kernels, biases, router, expert_load: no adapter left.
    assert not layer.lora_enabled and len(layer.weights) == 6
    np.testing.assert_allclose(numpy(layer(inputs)), adapted, atol=1e-5)


def test_moe_layer_config_carries_lora_rank():
    layer = MoEFeedForward(4, 16, lora_rank=3, lora_alpha=6)
    layer.build((None, 5, 8))
    assert layer.lora_enabled
    assert layer.expert_kernel_1_lora_a.shape == (4, 8, 3)
    assert layer.expert_kernel_2_lora_b.shape == (4, 3, 8)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (3, 6)
    restored = MoEFeedForward.from_config(config)
    restored.build((None, 5, 8))
    assert restored.lora_enabled and restored.lora_alpha == 6
    assert "lora_rank" not in MoEFeedForward(4, 16).get_config()


def test_keras_and_preset_round_trips_keep_lora(tmp_path):
    backbone = vit("top_k_token")
    classifier = ViTMoEImageClassifier(backbone, num_classes=3)
    backbone.enable_lora(2, lora_alpha=4, verbose=False)
    perturb_adapters(backbone)
    expected = numpy(classifier(IMAGES))
    expected_adapters = {
        v.path: numpy(v) for v in backbone.weights if "lora" in v.path
    }

    def check(restored_backbone, outputs):
        np.testing.assert_array_equal(outputs, expected)
        assert isinstance(restored_backbone, ViTMoEBackbone)
        assert restored_backbone.lora_enabled
        assert restored_backbone.lora_config["lora_alpha"] == 4
        assert trainable_paths(restored_backbone) == lora_paths(backbone)
        for v in restored_backbone.weights:
            if "lora" in v.path:
                np.testing.assert_array_equal(
                    numpy(v), expected_adapters[v.path]
                )

    path = str(tmp_path / "lora.keras")
    classifier.save(path)
    restored = keras.saving.load_model(path)
    check(restored.backbone, numpy(restored(IMAGES)))

    backbone.save_to_preset(str(tmp_path / "backbone"))
    restored = ViTMoEBackbone.from_preset(str(tmp_path / "backbone"))
    restored_classifier = ViTMoEImageClassifier(restored, num_classes=3)
    for source, target in zip(
        classifier.output_dense.weights,
        restored_classifier.output_dense.weights,
    ):
        target.assign(source)
    check(restored, numpy(restored_classifier(IMAGES)))

    classifier.save_to_preset(str(tmp_path / "classifier"))
    restored = ViTMoEImageClassifier.from_preset(str(tmp_path / "classifier"))
    check(restored.backbone, numpy(restored(IMAGES)))


def test_save_and_load_lora_weights(tmp_path):
    backbone = vit("top_k_token")
    backbone.save_to_preset(str(tmp_path / "base"))
    backbone.enable_lora(2, train_routers=True, verbose=False)
    perturb_adapters(backbone)
    expected = numpy(backbone(IMAGES))
    with pytest.raises(ValueError, match=r"must end in `\.lora\.h5`"):
        backbone.save_lora_weights(str(tmp_path / "adapters.h5"))
    path = str(tmp_path / "adapters.lora.h5")
    backbone.save_lora_weights(path)

    fresh = ViTMoEBackbone.from_preset(str(tmp_path / "base"))
    fresh.load_lora_weights(path)
    assert fresh.lora_enabled and fresh.lora_config["train_routers"]
    np.testing.assert_array_equal(numpy(fresh(IMAGES)), expected)

    other = ViTMoEBackbone.from_preset(str(tmp_path / "base"))
    other.enable_lora(3, verbose=False)
    with pytest.raises(ValueError, match="LoRA arguments"):
        other.load_lora_weights(path)


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_train_routers_makes_every_router_trainable(name):
    backbone = vit(name)
    backbone.enable_lora(2, train_routers=True, verbose=False)
    routers = [
        v.path
        for moe in find_moe_layers(backbone)
        for v in moe.router_variables
    ]
    assert routers
    assert trainable_paths(backbone) == sorted(lora_paths(backbone) + routers)
    grads = dict(
        zip(
            (v.path for v in backbone.trainable_variables),
            gradients(backbone, IMAGES),
        )
    )
    for path in routers:
        if not path.endswith("scale"):  # Soft MoE's scale can be flat
            assert grads[path] is not None and np.any(grads[path]), path


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_freeze_routers_without_lora(name):
    backbone = vit(name)
    classifier = ViTMoEImageClassifier(backbone, num_classes=3)
    everything = trainable_paths(classifier)
    count = freeze_routers(classifier)
    routers = [
        v for moe in find_moe_layers(backbone) for v in moe.router_variables
    ]
    assert routers and count == sum(int(np.prod(v.shape)) for v in routers)
    assert trainable_paths(classifier) == sorted(
        set(everything) - {v.path for v in routers}
    )
    with pytest.raises(ValueError, match="no MoE layer"):
        freeze_routers(ViTMoEBackbone(**dict(VIT, moe_layers=None)))


def test_convnext_lora_adapts_pointwise_layers_and_experts(tmp_path):
    backbone = ConvNeXtMoEBackbone(**CONVNEXT, shared_expert=True)
    before = numpy(backbone(IMAGES))
    backbone.enable_lora(2, verbose=False)
    np.testing.assert_array_equal(numpy(backbone(IMAGES)), before)
    assert trainable_paths(backbone) == lora_paths(backbone)
    names = {path.split("/")[-2] for path in lora_paths(backbone)}
    assert {"fc1", "fc2"} <= names
    assert any("expert_kernel_1_lora_a" in p for p in lora_paths(backbone))
    perturb_adapters(backbone)
    adapted = numpy(backbone(IMAGES))
    grads = gradients(backbone, IMAGES)
    assert len(grads) == len(lora_paths(backbone))
    assert all(g is not None and np.any(g) for g in grads)
    backbone.save_to_preset(str(tmp_path / "preset"))
    restored = ConvNeXtMoEBackbone.from_preset(str(tmp_path / "preset"))
    assert restored.lora_enabled
    np.testing.assert_array_equal(numpy(restored(IMAGES)), adapted)
    backbone.merge_lora()
    np.testing.assert_allclose(
        numpy(backbone(IMAGES)), adapted, rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow  # quantization is backend independent; runs on TF
@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_lora_on_quantized_experts(mode, tmp_path):
    backbone = vit("top_k_token")
    backbone.quantize(mode)
    before = numpy(backbone(IMAGES))
    moe = find_moe_layers(backbone)[0]
    targets = None
    if mode == "float8":
        # Keras' float8 Dense has no LoRA: a clear error, then the experts.
        with pytest.raises(ValueError, match="target_layer_names"):
            backbone.enable_lora(2, verbose=False)
        targets = [moe.name]
    backbone.enable_lora(2, target_layer_names=targets, verbose=False)
    np.testing.assert_allclose(numpy(backbone(IMAGES)), before, atol=1e-6)
    assert moe.quantization_mode == mode and moe.lora_enabled
    perturb_adapters(backbone)
    adapted = numpy(backbone(IMAGES))
    assert not np.allclose(adapted, before, atol=1e-3)
    path = str(tmp_path / "quantized.keras")
    backbone.save(path)
    restored = keras.saving.load_model(path)
    assert restored.lora_enabled
    np.testing.assert_allclose(numpy(restored(IMAGES)), adapted, atol=1e-6)
    with pytest.raises(ValueError, match="merge the adapters first"):
        backbone.quantize(mode)
    backbone.merge_lora()
    assert lora_paths(backbone) == []
    assert moe.quantization_mode == mode
    # Requantized kernels: close to the adapted model on average (a token
    # near a routing tie may change experts).
    assert np.mean(np.abs(numpy(backbone(IMAGES)) - adapted)) < 0.05


def test_lora_summary_line(capsys):
    backbone = vit()
    with pytest.raises(ValueError, match="not enabled"):
        backbone.lora_summary()
    backbone.enable_lora(4)
    line = capsys.readouterr().out.strip()
    assert line == backbone.lora_summary()
    match = re.fullmatch(
        r"LoRA rank 4: ([\d,]+) trainable of ([\d,]+) parameters "
        r"\((\d+\.\d\d) %\); ([\d,]+) of them in expert adapters",
        line,
    )
    assert match, line
    trainable, total = (int(g.replace(",", "")) for g in match.groups()[:2])
    assert trainable == sum(
        int(np.prod(v.shape)) for v in backbone.trainable_weights
    )
    assert total == sum(int(np.prod(v.shape)) for v in backbone.weights)
    # 4 experts, rank 4: 4 * 4 * (16 + 32) per kernel pair, two pairs.
    assert int(match.group(4).replace(",", "")) == 2 * 4 * 4 * (16 + 32)


def test_lora_errors():
    backbone = vit()
    with pytest.raises(ValueError, match="rank=0"):
        backbone.enable_lora(0)
    with pytest.raises(ValueError, match="lora_alpha=-1"):
        backbone.enable_lora(2, lora_alpha=-1)
    with pytest.raises(ValueError, match="adapt nothing"):
        backbone.enable_lora(2, target_layer_names=[])
    with pytest.raises(ValueError, match=r"\['query'\]"):
        backbone.enable_lora(2, target_layer_names=["query"])
    with pytest.raises(ValueError, match="nothing to merge"):
        backbone.merge_lora()
    with pytest.raises(ValueError, match="not enabled"):
        backbone.save_lora_weights("adapters.lora.h5")
    backbone.enable_lora(2, target_layer_names=["qkv"], verbose=False)
    assert {p.split("/")[-2] for p in lora_paths(backbone)} == {"qkv"}
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(2)
    with pytest.raises(ValueError, match="merge the adapters first"):
        backbone.quantize("int8")
    moe = find_moe_layers(vit())[0]
    moe.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        moe.enable_lora(2)
    with pytest.raises(ValueError, match="before it is built"):
        MoEFeedForward(4, 16).enable_lora(2)
