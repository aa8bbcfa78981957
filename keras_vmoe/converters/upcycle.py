"""Sparse upcycling: initialise MoE experts from a trained dense FFN.

Komatsuzaki et al. (2023), "Sparse Upcycling": every expert (and the shared
expert) starts as a copy of the dense FFN. With renormalised gates
(`normalize_gates=True`) and no dropped tokens, the upcycled layer computes
exactly the dense FFN, for any router.
"""

import numpy as np


def upcycle_feed_forward(dense, moe, noise_std=0.0, seed=None):
    """Copies a dense `FeedForward` into every expert of a `MoEFeedForward`.

    Args:
        dense: a built `keras_vmoe.layers.FeedForward` (the source).
        moe: a built `keras_vmoe.layers.MoEFeedForward` with the same input
            width and `hidden_dim` (the target). Its router is left as is.
        noise_std: optional Gaussian noise, relative to each kernel's
            standard deviation, added to each routed expert's copy so
            experts can diverge (the shared expert gets an exact copy).
        seed: seed of that noise.

    Raises:
        ValueError: if the layers are not built or their shapes differ.
    """
    if not dense.built or not moe.built:
        raise ValueError(
            "Both layers must be built before upcycling. Received: "
            f"dense.built={dense.built}, moe.built={moe.built}"
        )
    kernel_1 = np.asarray(dense.fc1.kernel)
    if kernel_1.shape != tuple(moe.expert_kernel_1.shape[1:]):
        raise ValueError(
            "The dense FFN and the experts must have the same [d, h] shape. "
            f"Received: dense fc1 kernel {kernel_1.shape}, expert kernel "
            f"{tuple(moe.expert_kernel_1.shape[1:])}"
        )
    rng = np.random.default_rng(seed)
    sources = (
        (moe.expert_kernel_1, kernel_1),
        (moe.expert_bias_1, np.asarray(dense.fc1.bias)),
        (moe.expert_kernel_2, np.asarray(dense.fc2.kernel)),
        (moe.expert_bias_2, np.asarray(dense.fc2.bias)),
    )
    for variable, value in sources:
        stacked = np.repeat(value[None], moe.num_experts, axis=0)
        if noise_std and value.ndim == 2:
            stacked = stacked + rng.normal(
                0.0, noise_std * value.std(), stacked.shape
            )
        variable.assign(stacked.astype(variable.dtype))
    if moe.shared_ffn is not None:
        for target, source in (
            (moe.shared_ffn.fc1, dense.fc1),
            (moe.shared_ffn.fc2, dense.fc2),
        ):
            target.kernel.assign(source.kernel)
            target.bias.assign(source.bias)
