"""Backend adapter: whether the Keras backend sees a GPU, and which.

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


def gpu_compute_capability(backend=None):
    """The CUDA compute capability `(major, minor)` of the first GPU the
    backend sees, or None (no GPU, or a GPU that reports none: ROCm).

    Args:
        backend: as in `has_gpu`.
    """
    backend = keras.backend.backend() if backend is None else backend
    if not has_gpu(backend):
        return None
    if backend == "torch":
        import torch

        return tuple(torch.cuda.get_device_capability())
    if backend == "jax":
        import jax

        return _parse_capability(
            getattr(jax.devices()[0], "compute_capability", None)
        )
    import tensorflow as tf

    gpu = tf.config.list_physical_devices("GPU")[0]
    details = tf.config.experimental.get_device_details(gpu)
    return _parse_capability(details.get("compute_capability"))


def _parse_capability(value):
    """`(major, minor)` from "9.0" or (9, 0); None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(".")
    return tuple(int(part) for part in value)[:2]


def auto_precision(backend=None):
    """The policy `set_precision("auto")` sets.

    "mixed_bfloat16" on a CPU, a TPU and a GPU with bfloat16 tensor cores
    (compute capability 8.0 or newer: A100, L4, H100, ...; and ROCm GPUs),
    where the grouped-matmul kernels of `dispatch="grouped"` run;
    "mixed_float16" (with loss scaling) on older GPUs (T4, V100), which
    have no bfloat16 matmuls.
    """
    if not has_gpu(backend):
        return "mixed_bfloat16"
    capability = gpu_compute_capability(backend)
    if capability is not None and capability < (8, 0):
        return "mixed_float16"
    return "mixed_bfloat16"
