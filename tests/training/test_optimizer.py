"""Layer-wise lr decay, weight-decay exclusions, schedule, precision."""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.training import LayerDecayAdamW
from keras_vmoe.training import create_optimizer
from keras_vmoe.training import layer_decay_multipliers
from keras_vmoe.training import no_weight_decay_variables
from keras_vmoe.training import set_precision
from keras_vmoe.training import warmup_cosine_schedule
from keras_vmoe.training.optimizer import default_layer_id


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _blocks_model():
    inputs = keras.Input((4, 8))
    x = keras.layers.Dense(8, name="patch_embedding")(inputs)
    x = keras.layers.Dense(8, name="block_0")(x)
    x = MoEFeedForward(2, 8, name="block_1")(x)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("backbone/patch_embedding/kernel", 0),
        ("backbone/cls_token", 0),
        ("backbone/block_0/attention/kernel", 1),
        ("backbone/transformer_block_11/mlp/fc1/kernel", 12),
        ("backbone/block_1/moe/router/kernel", 13),  # routers: top rate
        ("backbone/final_norm/gamma", 13),
        ("head/kernel", 13),
    ],
)
def test_default_layer_id(path, expected):
    assert default_layer_id(path, num_layers=12) == expected


def test_layer_decay_multipliers_follow_depth():
    model = _blocks_model()
    multipliers = layer_decay_multipliers(model, 0.5, num_layers=2)
    # 2 blocks: embeddings 0.5**3, block_0 0.5**2, block_1 0.5, top 1.
    assert multipliers["patch_embedding/kernel"] == 0.125
    assert multipliers["block_0/kernel"] == 0.25
    assert multipliers["block_1/expert_kernel_1"] == 0.5
    assert multipliers["block_1/router/kernel"] == 1.0
    assert multipliers["head/kernel"] == 1.0


def test_layer_decay_needs_num_layers():
    with pytest.raises(ValueError, match="num_layers"):
        layer_decay_multipliers(_blocks_model(), 0.5)
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        layer_decay_multipliers(_blocks_model(), 1.5, num_layers=2)


def test_multiplier_scales_the_adamw_step_and_the_decay():
    a = keras.Variable(np.ones(3, "float32"), name="a")
    b = keras.Variable(np.ones(3, "float32"), name="b")
    optimizer = LayerDecayAdamW(
        learning_rate=0.1,
        weight_decay=0.5,
        lr_multipliers={a.path: 0.5, b.path: 0.0},
    )
    grads = [np.full(3, 2.0, "float32")] * 2
    optimizer.apply_gradients(zip(grads, [a, b]))
    # Decay first: 1 - 1 * 0.5 * (0.1 * 0.5) = 0.975; then the first Adam
    # step moves by lr * m_hat / (sqrt(v_hat) + eps) = 0.05 * ~1.
    np.testing.assert_allclose(_np(a), 0.975 - 0.05, rtol=1e-5)
    np.testing.assert_array_equal(_np(b), 1.0)  # multiplier 0: frozen


def test_optimizer_config_round_trip():
    optimizer = LayerDecayAdamW(lr_multipliers={"x/kernel": 0.25})
    clone = LayerDecayAdamW.from_config(optimizer.get_config())
    assert clone.lr_multipliers == {"x/kernel": 0.25}


def test_no_weight_decay_on_norms_biases_and_expert_biases():
    model = _blocks_model()
    excluded = {v.path for v in no_weight_decay_variables(model)}
    assert "block_1/expert_bias_1" in excluded
    assert "final_norm/gamma" in excluded and "head/bias" in excluded
    assert "block_1/expert_kernel_1" not in excluded
    assert "head/kernel" not in excluded


def test_warmup_then_cosine():
    schedule = warmup_cosine_schedule(1e-3, total_steps=110, warmup_steps=10, min_learning_rate=1e-5)
    values = [float(_np(schedule(step))) for step in (0, 5, 10, 60, 110)]
    np.testing.assert_allclose(
        values, [0.0, 5e-4, 1e-3, (1e-3 + 1e-5) / 2, 1e-5], rtol=1e-4, atol=1e-9
    )
    with pytest.raises(ValueError, match="warmup_steps=20, total_steps=10"):
        warmup_cosine_schedule(1e-3, total_steps=10, warmup_steps=20)


def test_create_optimizer_trains_a_model():
    model = _blocks_model()
    optimizer = create_optimizer(
        model, total_steps=20, learning_rate=1e-2, warmup_steps=2, num_layers=2
    )
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).standard_normal((16, 4, 8)).astype("float32")
    history = model.fit(x, x[..., :3], epochs=5, batch_size=4, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_set_precision():
    assert set_precision("auto") == "mixed_bfloat16"  # no GPU here
    assert keras.config.dtype_policy().name == "mixed_bfloat16"
    with pytest.raises(ValueError, match="precision='fp8'"):
        set_precision("fp8")


@pytest.mark.parametrize(
    "path, expected",
    [
        ("backbone/stem_conv/kernel", 0),
        ("backbone/stage_0_block_1/depthwise_conv/kernel", 2),
        ("backbone/stage_1_downsample_conv/kernel", 3),  # first block of stage 1
        ("backbone/stage_2_block_0/mlp/fc1/kernel", 5),
        ("backbone/stage_2_block_1/moe/router/kernel", 8),
        ("head_norm/gamma", 8),
    ],
)
def test_staged_layer_id_numbers_blocks_globally(path, expected):
    from keras_vmoe.training.optimizer import staged_layer_id

    assert staged_layer_id([2, 2, 3])(path, 7) == expected
