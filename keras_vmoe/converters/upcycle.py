"""Sparse upcycling: initialise MoE experts from a trained dense FFN.

Komatsuzaki et al. (2023), "Sparse Upcycling": every expert (and the shared
expert) starts as a copy of the dense FFN. With renormalised gates
(`normalize_gates=True`) and no dropped tokens, the upcycled layer computes
exactly the dense FFN, for any router.

The same copy initialises `SoftMoEFeedForward` and
`ExpertChoiceFeedForward` (same stacked expert weights; their routers, `phi`
and `scale` or the router layer, keep their initialisation, as in vmoe's
sparse upcycling), but neither then starts at the dense FFN:
- Expert Choice: `y_t = (sum of the gates of the experts that chose t)
  FFN(x_t)`, the dense output scaled by a token's total gate (0 for a
  token no expert chose; at most 1, the router probabilities sum to 1).
- Soft MoE: `y_t = sum_n C[t, n] FFN(slot_n)` with slots mixing the
  image's tokens. A fresh router has logits of at most `scale` = 1 in
  absolute value, so dispatch and combine weights are nearly uniform and
  every token starts at about FFN(mean token of its image); the residual
  branch keeps the tokens apart while the router learns.

With a shared expert the output is `E_s(x) + sum_i g_i E_i(x)`; copying the
FFN into both would double it, so the output projection (fc2 kernel and
bias) of every copy is halved: `0.5 FFN(x) + 0.5 FFN(x) = FFN(x)`.
"""

import numpy as np


def upcycle_feed_forward(dense, moe, noise_std=0.0, seed=None):
    """Copies a dense `FeedForward` into every expert of a MoE layer.

    Args:
        dense: a built `keras_vmoe.layers.FeedForward` (the source).
        moe: a built `MoEFeedForward`, `SoftMoEFeedForward` or
            `ExpertChoiceFeedForward` with the same input width and
            `hidden_dim` (the target). Its router is left as is.
        noise_std: optional Gaussian noise, relative to each kernel's
            standard deviation, added to each routed expert's copy so
            experts can diverge (the shared expert gets no noise).
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
    # fc2 is linear in its kernel and bias: halving both halves the output.
    output_scale = 0.5 if moe.shared_ffn is not None else 1.0
    kernel_2 = np.asarray(dense.fc2.kernel) * output_scale
    bias_2 = np.asarray(dense.fc2.bias) * output_scale
    sources = (
        (moe.expert_kernel_1, kernel_1),
        (moe.expert_bias_1, np.asarray(dense.fc1.bias)),
        (moe.expert_kernel_2, kernel_2),
        (moe.expert_bias_2, bias_2),
    )
    for variable, value in sources:
        stacked = np.repeat(value[None], moe.num_experts, axis=0)
        if noise_std and value.ndim == 2:
            stacked = stacked + rng.normal(
                0.0, noise_std * value.std(), stacked.shape
            )
        variable.assign(stacked.astype(variable.dtype))
    if moe.shared_ffn is not None:
        shared = moe.shared_ffn
        shared.fc1.kernel.assign(dense.fc1.kernel)
        shared.fc1.bias.assign(dense.fc1.bias)
        shared.fc2.kernel.assign(kernel_2.astype(shared.fc2.kernel.dtype))
        shared.fc2.bias.assign(bias_2.astype(shared.fc2.bias.dtype))
