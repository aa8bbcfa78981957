"""Backend-agnostic test helpers (tests may import the backends)."""

import keras
import numpy as np

# A tiny ViT-MoE backbone's arguments (one MoE block of 4 experts on 16x16
# images); tests override what they vary.
TINY_VIT = dict(
    image_shape=(16, 16, 3),
    patch_size=8,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
    moe_layers="last-1",
    num_experts=4,
)


def gradients(layer, inputs, loss_fn=None):
    """Gradients of `loss_fn(layer(inputs, training=True)) + layer losses`.

    Returns a list of numpy arrays aligned with `layer.trainable_variables`
    (None where the variable got no gradient).
    """
    loss_fn = loss_fn or (lambda y: keras.ops.mean(keras.ops.square(y)))
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(layer(inputs, training=True)) + sum(layer.losses)
        grads = tape.gradient(loss, layer.trainable_variables)
        return [None if g is None else np.asarray(g) for g in grads]
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss_of(weights):
            outputs, _, losses = layer.stateless_call(
                weights, non_trainable, inputs, training=True,
                return_losses=True,
            )
            return loss_fn(outputs) + sum(losses)

        return [np.asarray(g) for g in jax.grad(loss_of)(trainable)]
    if backend == "torch":
        layer.zero_grad()
        loss = loss_fn(layer(inputs, training=True)) + sum(layer.losses)
        loss.backward()
        return [
            None if v.value.grad is None else v.value.grad.cpu().numpy()
            for v in layer.trainable_variables
        ]
    raise ValueError(f"Unsupported backend {backend}")


def assert_every_weight_has_gradient(layer, inputs, loss_fn=None):
    grads = gradients(layer, inputs, loss_fn)
    assert grads, "the layer has no trainable weights"
    missing = [
        v.path
        for v, g in zip(layer.trainable_variables, grads)
        if g is None or not np.any(g)
    ]
    assert not missing, f"no gradient reached: {missing}"


def assert_keras_round_trip(model, inputs, tmp_path, rtol=0, atol=0):
    """`.keras` save / load gives identical outputs."""
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(inputs)),
        keras.ops.convert_to_numpy(model(inputs)),
        rtol=rtol,
        atol=atol,
    )
    return restored
