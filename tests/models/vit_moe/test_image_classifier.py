import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe.models.vit_moe import ViTMoEBackbone
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier
from keras_vmoe.models.vit_moe import ViTMoEImageClassifierPreprocessor
from keras_vmoe.models.vit_moe import ViTMoEImageConverter
from tests.helpers import assert_keras_round_trip

TINY = dict(
    image_shape=(32, 32, 3),
    patch_size=8,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
    num_register_tokens=2,
    moe_layers="last-1",
    num_experts=4,
    top_k=2,
    routing="token",
)


def images(batch=4, seed=0):
    return (
        np.random.default_rng(seed)
        .normal(size=(batch, 32, 32, 3))
        .astype("float32")
    )


@pytest.mark.parametrize("pooling", ["cls", "cls+mean"])
def test_head_reads_cls_or_cls_and_mean_patch_token(pooling):
    backbone = ViTMoEBackbone(**TINY)
    classifier = ViTMoEImageClassifier(backbone, num_classes=3, pooling=pooling)
    tokens = keras.ops.convert_to_numpy(backbone(images()))
    features = tokens[:, 0]
    if pooling == "cls+mean":
        # Patch tokens only: CLS and the 2 registers are left out.
        features = np.concatenate([features, tokens[:, 3:].mean(axis=1)], -1)
    kernel, bias = (
        keras.ops.convert_to_numpy(w) for w in classifier.output_dense.weights
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(classifier(images())),
        features @ kernel + bias,
        atol=1e-5,
    )


def test_unknown_pooling_raises():
    with pytest.raises(ValueError, match="pooling='avg'"):
        ViTMoEImageClassifier(
            ViTMoEBackbone(**TINY), num_classes=3, pooling="avg"
        )


def test_training_loss_includes_the_moe_aux_losses():
    backbone = ViTMoEBackbone(**dict(TINY, load_balance_loss_weight=10.0))
    classifier = ViTMoEImageClassifier(backbone, num_classes=3)
    classifier.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[],
    )
    x, y = images(), np.array([0, 1, 2, 1])
    logits = classifier(x, training=True)
    aux = float(sum(keras.ops.convert_to_numpy(l) for l in classifier.losses))
    cross_entropy = float(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    )
    assert aux > 1.0  # 10 x a load-balance loss of about 1
    loss = classifier.train_on_batch(x, y, return_dict=True)["loss"]
    np.testing.assert_allclose(loss, cross_entropy + aux, rtol=1e-5)


def test_fit_trains_the_classifier():
    classifier = ViTMoEImageClassifier(ViTMoEBackbone(**TINY), num_classes=3)
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y = images(batch=8), np.arange(8) % 3
    history = classifier.fit(x, y, batch_size=4, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # Routing health is logged: the aux loss and the MoE layer's load.
    assert history.history["aux_loss"][0] > 0
    load = history.history["block_1_mlp_max_load"]
    assert all(1.0 <= value <= 4.0 for value in load)


def test_keras_round_trip_is_bit_exact(tmp_path):
    classifier = ViTMoEImageClassifier(
        ViTMoEBackbone(**TINY), num_classes=3, pooling="cls+mean"
    )
    restored = assert_keras_round_trip(classifier, images(), tmp_path)
    assert restored.pooling == "cls+mean"


def test_preset_directory_round_trip_is_bit_exact(tmp_path):
    preprocessor = ViTMoEImageClassifierPreprocessor(
        ViTMoEImageConverter.imagenet((32, 32))
    )
    classifier = ViTMoEImageClassifier(
        ViTMoEBackbone(**TINY),
        num_classes=3,
        pooling="cls+mean",
        preprocessor=preprocessor,
    )
    classifier.save_to_preset(str(tmp_path / "preset"))
    restored = ViTMoEImageClassifier.from_preset(str(tmp_path / "preset"))
    assert isinstance(restored.preprocessor, ViTMoEImageClassifierPreprocessor)
    # KerasHub's generic entry point finds the class from the preset.
    generic = keras_hub.models.ImageClassifier.from_preset(
        str(tmp_path / "preset")
    )
    assert isinstance(generic, ViTMoEImageClassifier)
    raw = (
        np.random.default_rng(0)
        .integers(0, 256, (2, 32, 32, 3))
        .astype("float32")
    )
    np.testing.assert_array_equal(
        restored.predict(raw, verbose=0), classifier.predict(raw, verbose=0)
    )


def test_imagenet_converter_normalises_with_mean_and_std():
    converter = ViTMoEImageConverter.imagenet((2, 2))
    pixels = np.full((1, 2, 2, 3), 255.0, "float32")
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225]
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(converter(pixels))[0, 0, 0],
        expected,
        rtol=1e-5,
    )
