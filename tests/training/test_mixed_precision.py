"""A few training steps under each mixed-precision policy stay finite."""

import keras
import numpy as np
import pytest

from keras_vmoe.training import create_optimizer
from keras_vmoe.training import set_precision
from keras_vmoe.training.metrics import top_k_layers
from keras_vmoe.training.recipes import build_classifier


@pytest.mark.parametrize("model_name", ["vimoe_mnist", "convnext_moe_mnist"])
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_training_steps_are_finite_with_float32_routing(model_name, precision):
    set_precision(precision)
    keras.utils.set_random_seed(0)
    model = build_classifier(model_name, num_classes=10)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 28, 28, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 10, 16), 10)
    model.compile(
        optimizer=create_optimizer(model, total_steps=4, learning_rate=1e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[],
    )
    if precision == "mixed_float16":
        # Keras wraps the optimizer for dynamic loss scaling.
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    for weight in model.weights:
        assert np.isfinite(keras.ops.convert_to_numpy(weight)).all(), weight.path
    for layer in top_k_layers(model):
        assert layer.router.compute_dtype == "float32"
        assert layer.compute_dtype == precision.split("_")[1]
    assert keras.backend.standardize_dtype(model(x[:2]).dtype) in (
        "float16", "bfloat16", "float32",
    )
