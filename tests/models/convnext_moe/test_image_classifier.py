"""ConvNeXtMoEImageClassifier: training with aux losses, saving, presets."""

import keras
import numpy as np

from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier
from keras_vmoe.models.convnext_moe import (
    ConvNeXtMoEImageClassifierPreprocessor,
)
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageConverter
from tests.helpers import assert_keras_round_trip

IMAGES = (
    np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
)
LABELS = np.array([0, 1, 2, 1])


def small_classifier(preprocessor=None, **kwargs):
    backbone = ConvNeXtMoEBackbone(
        **kwargs,
        depths=[1, 1, 2, 1],
        hidden_dims=[8, 16, 16, 24],
        moe_layers="last-2",
        num_experts=4,
        expert_mlp_ratio=2,
        image_shape=(32, 32, 3),
    )
    return ConvNeXtMoEImageClassifier(
        backbone, num_classes=3, preprocessor=preprocessor
    )


def test_fit_trains_the_classifier_with_the_weighted_aux_losses():
    plain = small_classifier(load_balance_loss_weight=0.0)
    weighted = small_classifier(load_balance_loss_weight=10.0)
    weighted.set_weights(plain.get_weights())
    router = weighted.backbone.blocks[-1].mlp.router.kernel
    before = keras.ops.convert_to_numpy(router).copy()
    losses = []
    for classifier in (plain, weighted):
        classifier.compile(optimizer="sgd")
        history = classifier.fit(
            IMAGES / 255.0, LABELS, batch_size=4, verbose=0
        )
        losses.append(history.history["loss"][0])
    assert np.all(np.isfinite(losses))
    assert not np.allclose(keras.ops.convert_to_numpy(router), before)
    # Two MoE blocks whose load-balance losses are about 1 (1 = balanced).
    assert losses[1] - losses[0] > 2 * 10.0 * 0.5


def test_keras_round_trip_is_bit_exact(tmp_path):
    assert_keras_round_trip(small_classifier(), IMAGES / 255.0, tmp_path)


def test_preset_directory_round_trip_is_bit_exact(tmp_path):
    converter = ConvNeXtMoEImageConverter(image_size=(32, 32), scale=1 / 255.0)
    classifier = small_classifier(
        ConvNeXtMoEImageClassifierPreprocessor(converter)
    )
    classifier.save_to_preset(str(tmp_path))
    restored = ConvNeXtMoEImageClassifier.from_preset(str(tmp_path))
    np.testing.assert_array_equal(
        restored.predict(IMAGES, verbose=0),
        classifier.predict(IMAGES, verbose=0),
    )
    backbone = ConvNeXtMoEBackbone.from_preset(str(tmp_path))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(backbone(IMAGES)),
        keras.ops.convert_to_numpy(classifier.backbone(IMAGES)),
    )
