"""Routing health (aux loss, per-layer max load) appears in the fit logs."""

import keras
import numpy as np
import pytest

from keras_vmoe.training.metrics import top_k_layers
from keras_vmoe.training.recipes import build_classifier


@pytest.mark.parametrize("model_name", ["vimoe_mnist", "convnext_moe_mnist"])
def test_fit_logs_aux_loss_and_expert_load_per_layer(model_name):
    keras.utils.set_random_seed(0)
    model = build_classifier(model_name, num_classes=10)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 28, 28, 3)).astype("float32")
    y = rng.integers(0, 10, 16)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[],
    )
    history = model.fit(
        x, y, batch_size=8, epochs=1, validation_data=(x, y), verbose=0
    ).history
    assert history["aux_loss"][0] > 0
    names = sorted(key for key in history if key.endswith("max_load"))
    # One metric per MoE layer, for training and validation.
    assert len(names) == 4, names
    num_experts = top_k_layers(model)[0].num_experts
    for key in names:
        # E * max_i load_i: 1 when balanced, E when collapsed.
        assert 1.0 <= history[key][0] <= num_experts + 1e-5, key
