"""Expert parallelism on 2, 4 and 8 devices against one device.

The multi-device tests need the JAX backend and 8 (virtual) devices; run
them in their own process:

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m pytest -q tests/distribution

Under any other backend only the "needs JAX" test runs.
"""

import re

import keras
import numpy as np
import pytest

from keras_vmoe import distribution as vmoe_distribution
from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier

ON_JAX = keras.backend.backend() == "jax"
if ON_JAX:
    import jax

    NUM_DEVICES = jax.device_count()
else:
    NUM_DEVICES = 1

needs_8_devices = pytest.mark.skipif(
    not ON_JAX or NUM_DEVICES < 8,
    reason="needs KERAS_BACKEND=jax and "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8",
)

WIDTH, HIDDEN = 8, 24  # distinct, so an [E, d, h] all-gather is visible
RNG = np.random.default_rng(0)
TOKENS = RNG.standard_normal((16, 6, WIDTH)).astype("float32")
IMAGES = RNG.random((16, 16, 16, 3)).astype("float32")
LABELS = np.arange(16) % 3


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _moe_model(num_experts, **kwargs):
    """A functional model around one token-routing MoE layer with drops:
    K = 2, capacity factor 1, groups of 12 tokens (2 images), the same
    groups at inference (unless `eval_group_size` is given)."""
    keras.utils.set_random_seed(0)
    config = dict(
        top_k=2,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        group_size=12,
        return_routing=True,
    )
    config.update(kwargs)
    config.setdefault("eval_group_size", config["group_size"])
    inputs = keras.Input((6, WIDTH))
    outputs = MoEFeedForward(num_experts, HIDDEN, name="moe", **config)(inputs)
    return keras.Model(inputs, outputs)


def _vit(num_experts, routing="token", group_size=2 * 17):
    keras.utils.set_random_seed(0)
    backbone = ViTMoEBackbone(
        image_shape=(16, 16, 3),
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=WIDTH,
        mlp_dim=HIDDEN,
        moe_layers="last-2",
        num_experts=num_experts,
        top_k=2,
        routing=routing,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        group_size=group_size,
    )
    return ViTMoEImageClassifier(backbone, num_classes=3)


def _loss_and_grads(model, inputs, distribution=None):
    """Forward outputs, a scalar loss and its gradients, jit-compiled."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable, non_trainable, x):
        outputs, _ = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        first = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        return keras.ops.sum(keras.ops.sin(first)), outputs

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    if distribution is None:
        return step(trainable, non_trainable, inputs), step
    with distribution.scope():
        layout = distribution.get_data_layout(inputs.shape).backend_layout
        inputs = jax.device_put(inputs, layout)
        return step(trainable, non_trainable, inputs), step


def _forward(model, inputs, distribution=None):
    """Inference outputs of a jit-compiled stateless call."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    step = jax.jit(
        lambda t, n, x: model.stateless_call(t, n, x, training=False)[0]
    )
    if distribution is None:
        return step(trainable, non_trainable, inputs)
    with distribution.scope():
        layout = distribution.get_data_layout(inputs.shape).backend_layout
        return step(trainable, non_trainable, jax.device_put(inputs, layout))


def _assert_tree_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(_np(a), _np(e), rtol=1e-5, atol=1e-5)


# --- Backends other than JAX ------------------------------------------------


@pytest.mark.skipif(ON_JAX, reason="checks the error on TF and torch")
def test_expert_parallel_needs_the_jax_backend():
    model = _moe_model(4)
    with pytest.raises(ValueError, match="needs the JAX backend"):
        vmoe_distribution.expert_parallel(model)


def test_cli_train_has_device_flags():
    from keras_vmoe import cli

    args = cli.build_parser().parse_args(
        ["train", "--devices", "8", "--expert-parallel", "4"]
    )
    assert (args.devices, args.expert_parallel) == (8, 4)


@pytest.mark.skipif(ON_JAX, reason="checks the error on TF and torch")
def test_distributed_training_needs_the_jax_backend():
    model = _moe_model(4)
    with pytest.raises(ValueError, match="needs the JAX backend"):
        vmoe_distribution.distribute_for_training(model, expert_shards=2)
    with pytest.raises(ValueError, match="needs the JAX backend"):
        vmoe_distribution.distribute_for_training(model, devices=2)


# --- Parity with one device -------------------------------------------------


@needs_8_devices
@pytest.mark.parametrize("num_devices", [2, 4, 8])
@pytest.mark.parametrize("num_experts", [4, 8, 16])
def test_layer_forward_and_gradients_match_one_device(
    num_devices, num_experts
):
    model = _moe_model(num_experts)
    ((ref_loss, (ref_out, ref_info)), ref_grads), _ = _loss_and_grads(
        model, TOKENS
    )
    assert _np(ref_info["dropped"]).any(), "test needs capacity drops"
    assert (~_np(ref_info["dropped"])).any()
    dist = vmoe_distribution.expert_parallel(model, devices=num_devices)
    assert dist.expert_shards == min(num_devices, num_experts)
    sharded = vmoe_distribution.distribute_model(model, dist)
    (loss, (out, info)), grads = _loss_and_grads(sharded, TOKENS, dist)[0]
    np.testing.assert_allclose(_np(out), _np(ref_out), rtol=1e-5, atol=1e-5)
    # atol: the loss is ~1e-3; summation order across devices moves its
    # last bits (~1e-8).
    np.testing.assert_allclose(_np(loss), _np(ref_loss), rtol=1e-5, atol=1e-7)
    _assert_tree_close(grads, ref_grads)
    # Routing does not depend on the number of devices.
    for name in ("expert_index", "dropped"):
        np.testing.assert_array_equal(_np(info[name]), _np(ref_info[name]))


@needs_8_devices
@pytest.mark.parametrize(
    "num_devices, num_experts",
    [(2, 16), (4, 4), (8, 4)],
    ids=["fewer-devices", "equal", "more-devices"],
)
def test_vit_classifier_forward_and_gradients_match_one_device(
    num_devices, num_experts
):
    model = _vit(num_experts)
    (_, ref_out), ref_grads = _loss_and_grads(model, IMAGES)[0]
    dist = vmoe_distribution.expert_parallel(model, devices=num_devices)
    sharded = vmoe_distribution.distribute_model(model, dist)
    (_, out), grads = _loss_and_grads(sharded, IMAGES, dist)[0]
    np.testing.assert_allclose(_np(out), _np(ref_out), rtol=1e-5, atol=1e-5)
    _assert_tree_close(grads, ref_grads)


@needs_8_devices
def test_identical_image_routing_assignments_on_1_and_8_devices():
    model = _moe_model(8, routing="image", group_size=2)
    ref_out, ref_info = _forward(model, TOKENS)
    assert _np(ref_info["dropped"]).any(), "test needs capacity drops"
    dist = vmoe_distribution.expert_parallel(model, devices=8)
    sharded = vmoe_distribution.distribute_model(model, dist)
    out, info = _forward(sharded, TOKENS, dist)
    np.testing.assert_allclose(_np(out), _np(ref_out), rtol=1e-5, atol=1e-5)
    for name in ("expert_index", "dropped"):
        np.testing.assert_array_equal(_np(info[name]), _np(ref_info[name]))


@needs_8_devices
def test_convnext_classifier_works_with_expert_parallel():
    keras.utils.set_random_seed(0)
    backbone = ConvNeXtMoEBackbone(
        depths=[1, 2],
        hidden_dims=[8, 16],
        image_shape=(16, 16, 3),
        moe_layers="last-2",
        num_experts=4,
        top_k=2,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        group_size=4,  # 2x2 map: 1 image per group
    )
    model = ConvNeXtMoEImageClassifier(backbone, num_classes=3)
    reference = _np(_forward(model, IMAGES))
    dist = vmoe_distribution.expert_parallel(model, devices=8)
    sharded = vmoe_distribution.distribute_model(model, dist)
    outputs = _np(_forward(sharded, IMAGES, dist))
    np.testing.assert_allclose(outputs, reference, rtol=1e-5, atol=1e-5)


@needs_8_devices
def test_data_parallel_works_without_groups():
    model = _moe_model(4, group_size=None)
    reference = _np(_forward(model, TOKENS)[0])
    dist = keras.distribution.DataParallel(
        devices=keras.distribution.list_devices()[:8]
    )
    sharded = vmoe_distribution.distribute_model(model, dist)
    outputs = _np(_forward(sharded, TOKENS, dist)[0])
    np.testing.assert_allclose(outputs, reference, rtol=1e-5, atol=1e-5)


# --- Compiled program and shardings -----------------------------------------


def _collectives(hlo_text):
    return {
        op: len(re.findall(rf" {op}\(", hlo_text))
        for op in ("all-to-all", "all-gather", "all-reduce")
    }


@needs_8_devices
def test_compiled_step_has_all_to_all_and_never_gathers_expert_weights():
    model = _vit(8)
    dist = vmoe_distribution.expert_parallel(model, devices=8)
    sharded = vmoe_distribution.distribute_model(model, dist)
    _, step = _loss_and_grads(sharded, IMAGES, dist)
    with dist.scope():
        x = jax.device_put(
            IMAGES, dist.get_data_layout(IMAGES.shape).backend_layout
        )
        hlo = step.lower(
            [v.value for v in sharded.trainable_variables],
            [v.value for v in sharded.non_trainable_variables],
            x,
        ).compile().as_text()
    counts = _collectives(hlo)
    # Two MoE layers: dispatch and combine forward, and their transposes.
    assert counts["all-to-all"] >= 4, counts
    gathered = re.findall(r"= (\w+\[[\d,]*\])[^ ]* all-gather\(", hlo)
    weight_shapes = {f"f32[8,{WIDTH},{HIDDEN}]", f"f32[8,{HIDDEN},{WIDTH}]"}
    expert_rows = {f"f32[{e},{WIDTH},{HIDDEN}]" for e in range(1, 9)}
    assert not (set(gathered) & (weight_shapes | expert_rows)), gathered


@needs_8_devices
def test_every_stacked_expert_variable_is_sharded_on_the_expert_axis():
    model = _vit(8)
    dist = vmoe_distribution.expert_parallel(model, devices=8)
    sharded = vmoe_distribution.distribute_model(model, dist)
    with dist.scope():
        sharded.compile(optimizer="adam", loss="mse")
        sharded.optimizer.build(sharded.trainable_variables)
    rank3 = [
        v
        for v in sharded.weights
        if len(v.shape) == 3 and "expert" in v.path
    ]
    assert len(rank3) == 4  # two kernels in each of two MoE layers
    specs = vmoe_distribution.expert_shardings(sharded)
    assert len(specs) == 8
    for path, spec in specs.items():
        assert spec[0] == "expert" and all(s is None for s in spec[1:]), path
    for variable in rank3 + list(sharded.optimizer.variables):
        if len(variable.shape) == 3 and "expert_kernel" in variable.path:
            spec = variable.value.sharding.spec
            assert spec[0] == "expert", variable.path


@needs_8_devices
def test_a_layout_key_matching_no_variable_fails():
    model = _vit(8)
    with pytest.raises(ValueError, match=r"'\.\*no_such_kernel'"):
        vmoe_distribution.expert_parallel(
            model, devices=8, extra_layouts={".*no_such_kernel": (None,)}
        )


@needs_8_devices
def test_expert_parallel_needs_group_size():
    model = _vit(8, group_size=None)
    with pytest.raises(ValueError, match="set `group_size`"):
        vmoe_distribution.expert_parallel(model, devices=8)
    # Whole-batch groups at inference neither.
    model = _moe_model(4, eval_group_size=None)
    with pytest.raises(ValueError, match="'eval_group_size'"):
        vmoe_distribution.expert_parallel(model, devices=8)
    # A layer without groups called under expert parallelism raises too.
    grouped = _moe_model(4)
    dist = vmoe_distribution.expert_parallel(grouped, devices=8)
    with dist.scope():
        layer = MoEFeedForward(4, HIDDEN, group_size=None)
        with pytest.raises(ValueError, match="group_size"):
            layer(TOKENS)


@needs_8_devices
def test_experts_must_divide_into_the_expert_shards():
    model = _moe_model(4)
    with pytest.raises(ValueError, match="num_experts=4"):
        vmoe_distribution.expert_parallel(model, devices=8, expert_shards=8)


# --- Training ----------------------------------------------------------------


@needs_8_devices
def test_fit_on_8_devices_then_predict_on_one(tmp_path):
    model = _vit(8)
    dist = vmoe_distribution.expert_parallel(model, devices=8)
    sharded = vmoe_distribution.distribute_model(model, dist)
    with dist.scope():
        sharded.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss="sparse_categorical_crossentropy",
        )
        history = sharded.fit(
            IMAGES, LABELS, batch_size=16, epochs=6, verbose=0
        ).history
        predictions = _np(sharded.predict(IMAGES, batch_size=16, verbose=0))
    assert history["loss"][-1] < history["loss"][0], history["loss"]
    assert "aux_loss" in history and history["aux_loss"][-1] > 0
    loads = [name for name in history if name.endswith("_max_load")]
    assert len(loads) == 2, sorted(history)
    path = str(tmp_path / "model.keras")
    sharded.save(path)
    restored = keras.saving.load_model(path)  # no distribution: one device
    np.testing.assert_allclose(
        _np(restored.predict(IMAGES, verbose=0)),
        predictions,
        rtol=1e-5,
        atol=1e-5,
    )
