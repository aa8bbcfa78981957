"""`fit(x, y, shuffle=True)` on arrays sees a new order every epoch."""

import keras
import numpy as np
import pytest

from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier

NUM = 16
# The order comes from the tf.data pipeline, the same on every backend;
# the labels are read back in an eager loss, which JAX traces even with
# `run_eagerly=True`.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="reads labels in the loss, which JAX traces",
)


def vit():
    backbone = ViTMoEBackbone(
        image_shape=(8, 8, 3), patch_size=4, num_layers=1, num_heads=2,
        hidden_dim=8, mlp_dim=16, moe_layers="last-1", num_experts=2,
    )
    return ViTMoEImageClassifier(backbone, num_classes=NUM)


def convnext():
    backbone = ConvNeXtMoEBackbone(
        depths=[1], hidden_dims=[8], patch_size=4, image_shape=(8, 8, 3),
        moe_layers=[0], num_experts=2,
    )
    return ConvNeXtMoEImageClassifier(backbone, num_classes=NUM)


def seen_orders(model, shuffle, **fit_kwargs):
    """Labels of every batch, in order, recorded by an eager loss."""
    seen = []

    def loss(y_true, y_pred):
        seen.append(np.asarray(y_true).ravel().astype(int).tolist())
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True
        )

    model.compile(optimizer="sgd", loss=loss, run_eagerly=True)
    x = np.random.default_rng(0).random((NUM, 8, 8, 3), dtype="float32")
    # Some backends (torch) call the loss once on placeholder data while
    # building the step: keep only the calls made during training.
    forget_build_calls = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: seen.clear()
    )
    model.fit(
        x, np.arange(NUM), batch_size=4, epochs=2, shuffle=shuffle,
        verbose=0, callbacks=[forget_build_calls], **fit_kwargs,
    )
    return seen


@pytest.mark.parametrize("build", [vit, convnext])
def test_two_epochs_see_different_orders(build):
    keras.utils.set_random_seed(1)
    seen = seen_orders(build(), shuffle=True)
    first = sum(seen[:4], [])
    second = sum(seen[4:8], [])
    # Every sample once per epoch, in two different orders.
    assert sorted(first) == sorted(second) == list(range(NUM))
    assert first != second
    assert first != list(range(NUM))


def test_shuffle_false_keeps_the_order():
    seen = seen_orders(vit(), shuffle=False)
    assert sum(seen[:4], []) == sum(seen[4:8], []) == list(range(NUM))


def test_validation_split_takes_the_tail_before_shuffling():
    keras.utils.set_random_seed(2)
    seen = seen_orders(vit(), shuffle=True, validation_split=0.25)
    train = [batch for batch in seen if len(batch) == 4]
    trained = sorted(sum(train[:3], []))
    # 12 training samples (0..11) in 3 batches; 12..15 only in validation.
    assert trained == list(range(12))
    assert any(set(batch) <= set(range(12, 16)) for batch in seen)
