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


class RecordingSGD(keras.optimizers.SGD):
    """SGD that keeps the last gradient of each variable in an optimizer
    variable (so it works inside compiled and stateless train steps)."""

    def build(self, variables):
        super().build(variables)
        self.last_gradients = [
            self.add_variable_from_reference(variable, "last_gradient")
            for variable in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        self.assign(self.last_gradients[index], gradient)
        super().update_step(gradient, variable, learning_rate)

    def gradients(self):
        return [keras.ops.convert_to_numpy(g) for g in self.last_gradients]


def test_variables_are_the_students_with_unique_paths():
    student = tiny_classifier(seed=2)
    # Built like the student: every teacher path equals a student path.
    teacher = tiny_classifier(seed=1)
    assert {v.path for v in teacher.weights} == {
        v.path for v in student.weights
    }
    distiller = DistillationModel(student, teacher)
    distiller(tiny_data(2)[0])
    paths = [v.path for v in distiller.variables]
    assert len(paths) == len(set(paths))
    assert [id(v) for v in distiller.trainable_weights] == [
        id(v) for v in student.trainable_weights
    ]
    assert distiller.teacher is teacher and not teacher.trainable


def test_gradients_are_identical_across_consecutive_steps():
    # With a zero learning rate the weights never move, so every step must
    # see the same gradients; gradients accumulated across steps (a teacher
    # shadowing the student's parameters on torch) would double them.
    images, labels = tiny_data(8)
    student = tiny_classifier(seed=2)
    teacher = tiny_classifier(seed=1)
    distiller = DistillationModel(student, teacher, temperature=2.0)
    optimizer = RecordingSGD(learning_rate=0.0)
    distiller.compile(optimizer=optimizer)
    recorded = []
    for _ in range(2):  # one step each
        distiller.fit(images, labels, batch_size=8, epochs=1, verbose=0)
        recorded.append(optimizer.gradients())
    assert int(optimizer.iterations) == 2
    first, second = recorded
    assert len(first) == len(student.trainable_weights)
    assert sum(float(np.abs(grad).sum()) for grad in first) > 0
    for grad_1, grad_2 in zip(first, second):
        np.testing.assert_allclose(grad_2, grad_1, rtol=1e-5, atol=1e-7)


def test_fit_moves_the_student_and_not_the_teacher():
    images, labels = tiny_data(8)
    student = tiny_classifier(seed=2)
    teacher = tiny_classifier(seed=1)
    distiller = DistillationModel(student, teacher)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    student_before = [
        keras.ops.convert_to_numpy(w) for w in student.trainable_weights
    ]
    teacher_before = [keras.ops.convert_to_numpy(w) for w in teacher.weights]
    distiller.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    moved = [
        not np.array_equal(before, keras.ops.convert_to_numpy(weight))
        for before, weight in zip(student_before, student.trainable_weights)
    ]
    # Every trainable student weight moves (the router included).
    assert sum(moved) == len(student.trainable_weights)
    for before, weight in zip(teacher_before, teacher.weights):
        if weight.path.endswith("expert_load"):
            continue  # a statistic of the last batch, not a parameter
        np.testing.assert_array_equal(
            before, keras.ops.convert_to_numpy(weight)
        )


def _functional():
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(4, name="dense")(inputs))


def test_duplicate_student_paths_are_refused():
    # Functional models add no name scope: both kernels are "dense/kernel".
    inputs = keras.Input((4,))
    outputs = _functional()(_functional()(inputs))
    student = keras.Model(inputs, outputs)
    teacher = tiny_classifier(moe_layers=None)
    with pytest.raises(ValueError, match="dense/kernel"):
        DistillationModel(student, teacher)


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
    # The untracked teacher is saved and loaded too.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.teacher(images)),
        keras.ops.convert_to_numpy(distiller.teacher(images)),
        atol=1e-6,
    )
