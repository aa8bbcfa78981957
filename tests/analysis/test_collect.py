"""`collect_routing` on tiny ViT-MoE models: shapes, order, errors."""

import keras
import numpy as np
import pytest

from keras_vmoe.analysis import accuracy
from keras_vmoe.analysis import collect_routing
from keras_vmoe.models import ViTMoEBackbone
from tests.analysis.tiny_models import IMAGE_SHAPE
from tests.analysis.tiny_models import NUM_CLASSES
from tests.analysis.tiny_models import tiny_classifier
from tests.analysis.tiny_models import tiny_data


def test_image_routing_records_one_choice_per_image():
    images, labels = tiny_data(10)
    model = tiny_classifier()
    result = collect_routing(model, (images, labels), batch_size=4)
    assert [r.index for r in result.layers] == [0, 1]
    assert [r.name for r in result.layers] == [
        model.backbone.get_layer(f"block_{i}").mlp.path for i in (1, 2)
    ]
    for record in result.layers:
        assert record.expert_index.shape == (10, 1)
        assert record.router_probs.shape == (10, 4)
        assert record.class_expert_counts.shape == (NUM_CLASSES, 4)
        assert record.class_expert_counts.sum() == 10
        np.testing.assert_allclose(record.load.sum(), 1.0)
        np.testing.assert_allclose(record.importance.sum(), 1.0, rtol=1e-5)
        assert 0.0 <= record.specialization <= 1.0
        assert record.top_expert_map(IMAGE_SHAPE[:2]).shape == (10, 1, 1)
    assert result.routing_degree == 16
    assert 1 <= result.distinct_routes <= 10
    assert result.images.shape == (10, *IMAGE_SHAPE)


def test_token_routing_records_patch_maps_without_prefix_tokens():
    images, labels = tiny_data(6)
    model = tiny_classifier(routing="token", top_k=2)
    result = collect_routing(
        model, (images, labels), max_batches=1, batch_size=4
    )
    record = result.layers[0]
    assert record.expert_index.shape == (4, 17, 2)  # CLS + 4x4 patches
    assert record.top_expert_map(IMAGE_SHAPE[:2]).shape == (4, 4, 4)
    assert record.expert_counts.shape == (4, 4)
    assert record.expert_counts.sum() == 4 * 16 * 2
    assert result.routing_degree is None and result.distinct_routes is None


def test_labels_are_optional_and_one_hot_labels_are_accepted():
    images, labels = tiny_data(4)
    model = tiny_classifier()
    unlabelled = collect_routing(model, images)
    assert unlabelled.layers[0].specialization is None
    with pytest.raises(ValueError, match="labels"):
        unlabelled.specialization_ranking()
    one_hot = np.eye(NUM_CLASSES)[labels]
    labelled = collect_routing(model, (images, one_hot))
    np.testing.assert_array_equal(labelled.labels, labels)


def test_tf_data_input():
    tf = pytest.importorskip("tensorflow")
    images, labels = tiny_data(8)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(3)
    result = collect_routing(tiny_classifier(), dataset, max_batches=2)
    assert result.num_images == 6
    np.testing.assert_array_equal(result.labels, labels[:6])


def test_model_without_moe_layer_is_rejected():
    dense = ViTMoEBackbone(
        image_shape=IMAGE_SHAPE,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    with pytest.raises(ValueError, match="no MoE layer"):
        collect_routing(dense, tiny_data(2)[0])


def test_empty_data_is_rejected():
    empty = np.zeros((0, *IMAGE_SHAPE), "float32")
    with pytest.raises(ValueError, match="no image"):
        collect_routing(tiny_classifier(), (empty, np.zeros((0,), "int64")))


@pytest.mark.parametrize("index", [2, -3, "block_7/mlp"])
def test_layer_index_out_of_range_is_rejected(index):
    result = collect_routing(tiny_classifier(), tiny_data(2)[0])
    with pytest.raises(ValueError, match="out of range|must be MoE layers"):
        result.layer(index)


def test_bad_arguments_name_the_value():
    images = tiny_data(2)[0]
    with pytest.raises(ValueError, match="max_batches=0"):
        collect_routing(tiny_classifier(), images, max_batches=0)
    with pytest.raises(ValueError, match="3 images, 2 labels"):
        collect_routing(tiny_classifier(), (tiny_data(3)[0], np.zeros(2)))


def test_accuracy_of_a_classifier():
    images, labels = tiny_data(6)
    model = tiny_classifier()
    predicted = keras.ops.convert_to_numpy(model(images)).argmax(axis=-1)
    expected = float((predicted == labels).mean())
    assert accuracy(model, (images, labels), batch_size=4) == pytest.approx(
        expected
    )
    with pytest.raises(ValueError, match="labelled"):
        accuracy(model, images)


def test_convnext_feature_map_routing():
    from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone

    backbone = ConvNeXtMoEBackbone(
        depths=[1, 1],
        hidden_dims=[8, 16],
        moe_layers="last-2",
        num_experts=4,
        image_shape=(32, 32, 3),
    )
    images, labels = tiny_data(3)
    images = np.tile(images, (1, 2, 2, 1))  # 32 x 32
    result = collect_routing(backbone, (images, labels))
    shapes = [r.top_expert_map((32, 32)).shape for r in result.layers]
    assert shapes == [(3, 8, 8), (3, 4, 4)]
    assert result.layers[1].expert_counts.sum() == 3 * 16


def test_collect_routing_applies_the_task_preprocessor():
    """KerasHub applies preprocessors in fit/predict only; analysis calls the
    model directly and must normalise the images the same way."""
    from keras_vmoe.models import ViTMoEImageClassifier
    from keras_vmoe.models.vit_moe.image_classifier import (
        ViTMoEImageClassifierPreprocessor,
    )
    from keras_vmoe.models.vit_moe.image_classifier import ViTMoEImageConverter

    backbone = ViTMoEBackbone(
        image_shape=(16, 16, 3), patch_size=8, num_layers=1, num_heads=2,
        hidden_dim=16, mlp_dim=32, moe_layers="last-1", num_experts=4,
    )
    preprocessor = ViTMoEImageClassifierPreprocessor(
        ViTMoEImageConverter(image_size=(16, 16), scale=1 / 255)
    )
    model = ViTMoEImageClassifier(backbone, num_classes=3, preprocessor=preprocessor)
    images = np.random.default_rng(0).uniform(0, 255, (6, 16, 16, 3)).astype("float32")
    raw = collect_routing(model, images).layers[0].router_probs
    model.preprocessor = None
    scaled = collect_routing(model, images / 255).layers[0].router_probs
    np.testing.assert_allclose(raw, scaled, rtol=1e-5, atol=1e-6)
