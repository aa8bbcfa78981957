"""Dense-to-experts distillation: train a MoE student on a dense teacher."""

import keras
from keras import ops


def distillation_loss(teacher_logits, student_logits, temperature=1.0):
    """Per-example `T^2 * KL(softmax(t / T) || softmax(s / T))`.

    The `T^2` factor keeps the gradient scale independent of the
    temperature (Hinton et al., 2015, "Distilling the Knowledge in a
    Neural Network").

    Args:
        teacher_logits: [B, classes].
        student_logits: [B, classes].
        temperature: T > 0.

    Returns:
        float32 tensor [B].
    """
    teacher_logits = ops.cast(teacher_logits, "float32") / temperature
    student_logits = ops.cast(student_logits, "float32") / temperature
    teacher_log_probs = ops.log_softmax(teacher_logits, axis=-1)
    student_log_probs = ops.log_softmax(student_logits, axis=-1)
    kl = ops.sum(
        ops.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs),
        axis=-1,
    )
    return kl * temperature**2


def _check_unique_paths(variables):
    """Raises if two variables share a path (the torch backend keys
    parameters by path, so one would silently shadow the other)."""
    seen = set()
    duplicates = []
    for variable in variables:
        if variable.path in seen:
            duplicates.append(variable.path)
        seen.add(variable.path)
    if duplicates:
        raise ValueError(
            "The student's variables must have unique paths. Received "
            f"duplicated paths: {sorted(set(duplicates))[:5]}"
        )


@keras.saving.register_keras_serializable(package="keras_vmoe")
class DistillationModel(keras.Model):
    """Trains a MoE student with `fit` against a dense teacher's logits.

    The loss is
    `alpha * T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(y, s)`
    plus the student's auxiliary MoE losses, with `t` the frozen teacher's
    logits and `s` the student's; labels are sparse class ids. This lets a
    user upcycle a dense model into a MoE student and distill the dense
    model into it in one script (dense-to-experts distillation, as in
    RepMoE-style work). Calling the model returns the student's logits, so
    `evaluate` and `predict` measure the student.

    The model's variables are the student's alone (their paths must be
    unique): the teacher is not one of its tracked layers, so a teacher
    built like the student cannot shadow the student's parameters on the
    torch backend. Saving writes the teacher's weights all the same.

    Args:
        student: a Keras model returning logits [B, classes].
        teacher: a Keras model returning logits [B, classes]; frozen.
        temperature: T > 0, softening both distributions.
        alpha: weight in [0, 1] of the distillation term.

    Example:
    >>> teacher = ViTMoEImageClassifier(dense_backbone, num_classes=10)
    >>> student = ViTMoEImageClassifier(upcycled_backbone, num_classes=10)
    >>> distiller = DistillationModel(student, teacher, temperature=2.0)
    >>> distiller.compile(optimizer="adam", metrics=["accuracy"])
    >>> distiller.fit(images, labels, epochs=1)
    """

    def __init__(self, student, teacher, temperature=2.0, alpha=0.5, **kwargs):
        if not temperature > 0:
            raise ValueError(
                f"`temperature` must be > 0. Received: temperature={temperature!r}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"`alpha` must be in [0, 1]. Received: alpha={alpha!r}"
            )
        super().__init__(**kwargs)
        self.student = student
        # The teacher is kept out of the model's tracked layers, so the
        # model's variables are the student's alone. Tracked, a teacher
        # built like the student has the same variable paths; the torch
        # backend keys parameters by path, so the teacher's entries would
        # shadow the student's and their gradients would never be zeroed.
        # `.keras` saving still writes and reads the teacher's weights: it
        # walks every attribute, tracked or not (see `teacher`).
        teacher.trainable = False
        object.__setattr__(self, "_teacher", teacher)
        _check_unique_paths(self.variables)
        self.temperature = temperature
        self.alpha = alpha
        self.distillation_tracker = keras.metrics.Mean(name="distillation_loss")
        self.label_tracker = keras.metrics.Mean(name="label_loss")

    @property
    def teacher(self):
        """The frozen teacher; not one of the model's tracked layers."""
        return self._teacher

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
        distillation = ops.mean(
            distillation_loss(teacher_logits, y_pred, self.temperature)
        )
        label = ops.mean(
            keras.losses.sparse_categorical_crossentropy(
                y, ops.cast(y_pred, "float32"), from_logits=True
            )
        )
        self.distillation_tracker.update_state(distillation)
        self.label_tracker.update_state(label)
        loss = self.alpha * distillation + (1.0 - self.alpha) * label
        for aux_loss in self.losses:
            loss = loss + ops.cast(aux_loss, "float32")
        return loss

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "student": keras.saving.serialize_keras_object(self.student),
                "teacher": keras.saving.serialize_keras_object(self.teacher),
                "temperature": self.temperature,
                "alpha": self.alpha,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("student", "teacher"):
            config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)
