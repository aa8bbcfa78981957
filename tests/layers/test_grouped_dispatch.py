"""`dispatch="grouped"`: rows sorted by expert through a grouped matmul.

Same routing, drops and outputs (and gradients) as the slot path on the
backends that have a grouped matmul (JAX `ragged_dot`, torch `grouped_mm`,
both correct on a CPU if not fast); a clear error elsewhere.
"""

import keras
import numpy as np
import pytest

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.layers import backends
from keras_vmoe.layers import dispatch

BACKEND = keras.backend.backend()
GROUPED = BACKEND in ("jax", "torch")
RNG = np.random.default_rng(3)
TOKENS = RNG.standard_normal((4, 9, 16)).astype("float32")

CASES = {
    "token top-1 cf 1.25": dict(top_k=1, capacity_factor=1.25),
    "token top-2 cf 1.0": dict(top_k=2, capacity_factor=1.0),
    "token top-2 cf 0.5": dict(top_k=2, capacity_factor=0.5),
    "token top-2 dropless": dict(top_k=2, capacity_factor=None),
    "token top-1 groups": dict(top_k=1, capacity_factor=1.0, group_size=12),
    "image top-1 cf 1.0": dict(routing="image", capacity_factor=1.0),
    "image top-2 dropless": dict(routing="image", top_k=2, capacity_factor=None),
}


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _pair(**kwargs):
    grouped = MoEFeedForward(6, 32, dispatch="grouped", seed=0, **kwargs)
    slots = MoEFeedForward(6, 32, dispatch="slots", seed=0, **kwargs)
    grouped(TOKENS)
    slots(TOKENS)
    slots.set_weights(grouped.get_weights())
    return grouped, slots


@pytest.mark.skipif(not GROUPED, reason="no grouped matmul on this backend")
@pytest.mark.parametrize("case", sorted(CASES))
def test_grouped_equals_slots(case):
    grouped, slots = _pair(**CASES[case])
    for training in (True, False):
        np.testing.assert_allclose(
            _np(grouped(TOKENS, training=training)),
            _np(slots(TOKENS, training=training)),
            rtol=1e-5,
            atol=1e-5,
        )


def _gradients(layer, x):
    if BACKEND == "jax":
        import jax

        def loss(weights, x):
            outputs, _ = layer.stateless_call(
                weights, [v.value for v in layer.non_trainable_variables], x,
                training=True,
            )
            return (outputs * outputs).sum()

        weights = [v.value for v in layer.trainable_variables]
        return jax.grad(loss, argnums=(0, 1))(weights, x)
    import torch

    x = torch.tensor(x, requires_grad=True)
    outputs = layer(x, training=True)
    (outputs * outputs).sum().backward()
    return [v.value.grad for v in layer.trainable_variables], x.grad


@pytest.mark.skipif(not GROUPED, reason="no grouped matmul on this backend")
@pytest.mark.parametrize(
    "case", ["token top-2 cf 1.0", "token top-2 dropless", "image top-1 cf 1.0"]
)
def test_grouped_gradients_equal_slots(case):
    grouped, slots = _pair(**CASES[case])
    (grouped_weights, grouped_x) = _gradients(grouped, TOKENS)
    (slot_weights, slot_x) = _gradients(slots, TOKENS)
    np.testing.assert_allclose(_np(grouped_x), _np(slot_x), rtol=1e-5, atol=1e-5)
    for a, b in zip(grouped_weights, slot_weights):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="jit")
def test_grouped_runs_under_jit():
    import jax

    grouped, slots = _pair(top_k=2, capacity_factor=1.25)
    run = jax.jit(
        lambda weights, x: grouped.stateless_call(
            weights, [v.value for v in grouped.non_trainable_variables], x,
            training=True,
        )[0]
    )
    np.testing.assert_allclose(
        _np(run([v.value for v in grouped.trainable_variables], TOKENS)),
        _np(slots(TOKENS, training=True)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_grouped_matmul_by_hand():
    if not GROUPED:
        with pytest.raises(ValueError, match="jax.*torch|JAX.*torch"):
            backends.grouped_matmul(
                np.ones((3, 2), "float32"),
                np.ones((2, 2, 1), "float32"),
                np.array([1, 2], "int32"),
            )
        return
    rows = np.array([[1, 2, 0, 0], [3, 4, 0, 0], [5, 6, 0, 0]], "float32")
    # Expert 0 copies column 0 of its rows, expert 1 column 1.
    kernels = np.zeros((2, 4, 4), "float32")
    kernels[0, 0, 0] = kernels[1, 1, 0] = 1.0
    # Expert 0 takes row 0, expert 1 rows 1 and 2.
    outputs = backends.grouped_matmul(
        rows, kernels, keras.ops.convert_to_tensor([1, 2], "int32")
    )
    np.testing.assert_array_equal(_np(outputs)[:, 0], [1, 4, 6])
    np.testing.assert_array_equal(_np(outputs)[:, 1:], 0)


@pytest.mark.skipif(GROUPED, reason="the backend has a grouped matmul")
def test_grouped_names_the_backends_that_have_one():
    layer = MoEFeedForward(6, 32, dispatch="grouped")
    with pytest.raises(ValueError, match=f"backend='{BACKEND}'"):
        layer(TOKENS)


def test_grouped_is_refused_under_expert_parallelism():
    with pytest.raises(ValueError, match="dispatch='grouped'"):
        dispatch.choose_dispatcher(
            "grouped", (1, 36, 1, 16), 1, 8, 6, expert_parallel=True
        )
