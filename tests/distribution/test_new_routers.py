"""Expert parallelism for Soft MoE and Expert Choice layers on 8 devices.

Run with the other distribution tests in their own process:

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m pytest -q tests/distribution
"""

import re

import keras
import numpy as np
import pytest

from keras_vmoe import distribution as vmoe_distribution
from keras_vmoe.layers import ExpertChoiceFeedForward
from keras_vmoe.layers import SoftMoEFeedForward
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from tests.distribution.test_expert_parallel import HIDDEN
from tests.distribution.test_expert_parallel import IMAGES
from tests.distribution.test_expert_parallel import TOKENS
from tests.distribution.test_expert_parallel import WIDTH
from tests.distribution.test_expert_parallel import _assert_tree_close
from tests.distribution.test_expert_parallel import _collectives
from tests.distribution.test_expert_parallel import _forward
from tests.distribution.test_expert_parallel import _loss_and_grads
from tests.distribution.test_expert_parallel import _np
from tests.distribution.test_expert_parallel import needs_8_devices

if keras.backend.backend() == "jax":
    import jax

LAYERS = {
    "soft": lambda e: SoftMoEFeedForward(
        e, HIDDEN, slots_per_expert=2, name="moe"
    ),
    # C = ceil(6 * 1.0 / E) per image: some tokens get no expert.
    "expert_choice": lambda e: ExpertChoiceFeedForward(
        e, HIDDEN, capacity_factor=1.0, router="cosine", name="moe"
    ),
}


def _layer_model(router_type, num_experts):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, WIDTH))
    outputs = LAYERS[router_type](num_experts)(inputs)
    return keras.Model(inputs, outputs)


def _sharded(model, num_devices=8):
    dist = vmoe_distribution.expert_parallel(model, devices=num_devices)
    return dist, vmoe_distribution.distribute_model(model, dist)


def _compiled_hlo(model, dist, inputs):
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    step = jax.jit(
        lambda t, n, x: model.stateless_call(t, n, x, training=False)[0]
    )
    with dist.scope():
        x = jax.device_put(
            inputs, dist.get_data_layout(inputs.shape).backend_layout
        )
        return step.lower(trainable, non_trainable, x).compile().as_text()


@needs_8_devices
@pytest.mark.parametrize("num_experts", [4, 16])
@pytest.mark.parametrize("router_type", ["soft", "expert_choice"])
def test_layer_forward_matches_one_device(router_type, num_experts):
    model = _layer_model(router_type, num_experts)
    reference = _np(_forward(model, TOKENS))
    dist, sharded = _sharded(model)
    assert dist.expert_shards == min(8, num_experts)
    outputs = _np(_forward(sharded, TOKENS, dist))
    np.testing.assert_allclose(outputs, reference, rtol=1e-5, atol=1e-5)
    # The stacked expert weights are split over the expert axis.
    specs = vmoe_distribution.expert_shardings(sharded)
    assert len(specs) == 4
    for path, spec in specs.items():
        assert spec[0] == "expert", path


@needs_8_devices
@pytest.mark.parametrize("router_type", ["soft", "expert_choice"])
def test_compiled_forward_has_all_to_all(router_type):
    model = _layer_model(router_type, 8)
    dist, sharded = _sharded(model)
    hlo = _compiled_hlo(sharded, dist, TOKENS)
    counts = _collectives(hlo)
    # Dispatch and combine of the one MoE layer; neither the expert
    # weights nor the tokens are all-gathered (without the constraints
    # Soft MoE gathers the [E, d, h] weights, Expert Choice the tokens).
    assert counts["all-to-all"] >= 2, counts
    assert counts["all-gather"] == 0, counts
    gathered = re.findall(r"= (\w+\[[\d,]*\])[^ ]* all-gather\(", hlo)
    weights = {
        f"f32[{e},{a},{b}]"
        for e in range(1, 9)
        for a, b in ((WIDTH, HIDDEN), (HIDDEN, WIDTH))
    }
    assert not set(gathered) & weights, gathered


@needs_8_devices
def test_expert_choice_on_one_device_path_matches_the_grouped_path():
    # The 1-device reference uses the flat gather / scatter-add path, the
    # sharded model the grouped one; check also with the whole batch per
    # group of 2 images (a group spans two images).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, WIDTH))
    layer = ExpertChoiceFeedForward(4, HIDDEN, group_size=12, name="moe")
    model = keras.Model(inputs, layer(inputs))
    reference = _np(_forward(model, TOKENS))
    dist, sharded = _sharded(model)
    outputs = _np(_forward(sharded, TOKENS, dist))
    np.testing.assert_allclose(outputs, reference, rtol=1e-5, atol=1e-5)


@needs_8_devices
def test_expert_choice_without_groups_cannot_be_expert_parallel():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, WIDTH))
    layer = ExpertChoiceFeedForward(4, HIDDEN, group_size=None, name="moe")
    model = keras.Model(inputs, layer(inputs))
    with pytest.raises(ValueError, match="group_size"):
        vmoe_distribution.expert_parallel(model, devices=8)


@needs_8_devices
@pytest.mark.parametrize(
    "router_type, kwargs",
    [
        ("soft", dict(slots_per_expert=1)),
        ("expert_choice", dict(capacity_factor=1.0)),
    ],
)
def test_vit_forward_and_gradients_match_one_device(router_type, kwargs):
    keras.utils.set_random_seed(0)
    backbone = ViTMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=WIDTH,
        mlp_dim=HIDDEN,
        moe_layers="last-1",
        num_experts=8,
        router_type=router_type,
        **kwargs,
    )
    model = ViTMoEImageClassifier(backbone, num_classes=3)
    (_, ref_out), ref_grads = _loss_and_grads(model, IMAGES)[0]
    dist, sharded = _sharded(model)
    (_, out), grads = _loss_and_grads(sharded, IMAGES, dist)[0]
    np.testing.assert_allclose(_np(out), _np(ref_out), rtol=1e-5, atol=1e-5)
    _assert_tree_close(grads, ref_grads)


@needs_8_devices
def test_convnext_soft_moe_forward_matches_one_device():
    keras.utils.set_random_seed(0)
    backbone = ConvNeXtMoEBackbone(
        depths=[1, 2],
        hidden_dims=[8, 16],
        image_shape=(16, 16, 3),
        moe_layers="every-2",
        num_experts=8,
        router_type="soft",
    )
    model = ConvNeXtMoEImageClassifier(backbone, num_classes=3)
    reference = _np(_forward(model, IMAGES))
    dist, sharded = _sharded(model)
    outputs = _np(_forward(sharded, IMAGES, dist))
    np.testing.assert_allclose(outputs, reference, rtol=1e-5, atol=1e-5)
