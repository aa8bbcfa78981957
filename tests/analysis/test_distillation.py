"""Dense-to-experts distillation with `fit`."""

import keras
import numpy as np
import pytest

from keras_vmoe.analysis import DistillationModel
from keras_vmoe.analysis import distillation_loss
from tests.analysis.tiny_models import NUM_CLASSES
from tests.analysis.tiny_models import tiny_classifier
from tests.analysis.tiny_models import tiny_data


def test_distillation_loss_hand_values():
    teacher = np.array([[0.0, 0.0], [2.0, 0.0]])
    student = np.array([[0.0, 0.0], [0.0, 0.0]])
    loss = keras.ops.convert_to_numpy(distillation_loss(teacher, student, 2.0))
    p = np.exp(1.0) / (np.exp(1.0) + 1.0)  # softmax([1, 0])[0]
    kl = p * np.log(p / 0.5) + (1 - p) * np.log((1 - p) / 0.5)
    np.testing.assert_allclose(loss, [0.0, 4.0 * kl], rtol=1e-5, atol=1e-7)


def mean_kl(teacher, student, images, temperature):
    return float(
        np.mean(
            keras.ops.convert_to_numpy(
                distillation_loss(teacher(images), student(images), temperature)
            )
        )
    )


def test_fit_lowers_kl_to_the_teacher():
    images, labels = tiny_data(16)
    teacher = tiny_classifier(moe_layers=None, seed=1)
    student = tiny_classifier(seed=2)
    distiller = DistillationModel(student, teacher, temperature=2.0, alpha=0.9)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = mean_kl(teacher, student, images, 2.0)
    teacher_weights = [keras.ops.convert_to_numpy(w) for w in teacher.weights]
    history = distiller.fit(images, labels, batch_size=8, epochs=8, verbose=0)
    assert mean_kl(teacher, student, images, 2.0) < 0.5 * before
    assert "distillation_loss" in history.history
    for before_weight, weight in zip(teacher_weights, teacher.weights):
        np.testing.assert_array_equal(
            before_weight, keras.ops.convert_to_numpy(weight)
        )
    assert distiller.predict(images, verbose=0).shape == (16, NUM_CLASSES)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": 0}, "temperature=0"), ({"alpha": 1.5}, "alpha=1.5")],
)
def test_bad_arguments_name_the_value(kwargs, message):
    model = tiny_classifier()
    with pytest.raises(ValueError, match=message):
        DistillationModel(model, model, **kwargs)


def test_distillation_model_saves_and_loads(tmp_path):
    images, _ = tiny_data(4)
    distiller = DistillationModel(
        tiny_classifier(seed=2), tiny_classifier(moe_layers=None, seed=1)
    )
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.temperature == distiller.temperature
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)),
        keras.ops.convert_to_numpy(distiller(images)),
        atol=1e-6,
    )
