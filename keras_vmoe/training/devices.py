"""Backend adapter: whether the Keras backend sees a GPU.

`keras.distribution.list_devices()` answers on JAX and TensorFlow only;
this module asks each framework itself.
"""

import keras

BACKENDS = ("jax", "tensorflow", "torch", "numpy")


def has_gpu(backend=None):
    """Whether a Keras backend can run on a GPU (CUDA or ROCm).

    Args:
        backend: one of "jax", "tensorflow", "torch", "numpy"; defaults to
            the current Keras backend.

    Returns:
        bool.
    """
    backend = keras.backend.backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(
            f"`backend` must be one of {BACKENDS}. Received: "
            f"backend={backend!r}"
        )
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    if backend == "jax":
        import jax

        # The default platform: "gpu" when a CUDA/ROCm jaxlib sees one.
        return jax.default_backend() == "gpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return False
