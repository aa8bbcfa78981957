"""Auxiliary routing losses as pure functions.

All inputs are float32 router outputs over routing groups:
    probs   [S, E] or [G, S, E] softmax probabilities of the clean logits
    logits  [S, E] or [G, S, E] router logits
and `expert_index` [..., S, K] the chosen experts (before capacity drops).
With a group axis every loss is computed per group and averaged over the
groups, as vmoe does.
"""

from keras import ops


def _squared_coefficient_of_variation(values):
    """CV^2 over the last axis, averaged over any leading (group) axes."""
    mean = ops.mean(values, axis=-1)
    return ops.mean(ops.var(values, axis=-1) / (ops.square(mean) + 1e-10))


def load_balance_loss(probs, expert_index):
    """`N * sum_i f_i * P_i`: ViMoE Eq. 2, Switch Transformer and GShard.

    `f_i` is the fraction of items whose *first* choice is expert i (a hard,
    non-differentiable count; GShard's `c_e / S` and vmoe's
    `_gshard_auxiliary_loss`; with K = 1 it is also Switch's and ViMoE's)
    and `P_i` the mean router probability of expert i. The value is 1 when
    routing is uniform and N when every item goes to one expert. The weight
    (ViMoE's alpha = 0.01) is applied by the caller.
    """
    num_experts = ops.shape(probs)[-1]
    first_choice = ops.one_hot(expert_index[..., 0], num_experts, dtype=probs.dtype)
    fraction_routed = ops.mean(first_choice, axis=-2)  # [..., E]
    mean_probability = ops.mean(probs, axis=-2)  # [..., E]
    per_group = ops.sum(fraction_routed * mean_probability, axis=-1)
    return ops.cast(num_experts, probs.dtype) * ops.mean(per_group)


def importance_loss(probs):
    """Shazeer et al. (2017) importance loss: CV^2 of per-expert importance.

    Importance of expert i is the sum over items of its router probability
    (the full softmax of the *clean* logits, as vmoe computes it, also when
    noisy gating is on). CV^2 = variance / mean^2 with the population
    variance; 0 when all experts are equally important.
    """
    return _squared_coefficient_of_variation(ops.sum(probs, axis=-2))


def load_loss(logits, noisy_logits, noise_std, top_k):
    """Shazeer et al. (2017) load loss for noisy top-k gating.

    The smooth load of expert i is the probability, over fresh noise, that
    its noisy logit clears the k-th largest noisy logit of the item:
    `P_i = 1 - Phi((kth_noisy - logit_i) / noise_std)`. The loss is the
    CV^2 of `sum_items P_i` (vmoe's form of Shazeer's Eq. 10).

    Args:
        logits: [..., S, E] clean logits.
        noisy_logits: [..., S, E] logits plus the noise used for routing.
        noise_std: the noise standard deviation (> 0).
        top_k: K.
    """
    kth_value = ops.top_k(noisy_logits, top_k, sorted=True)[0][..., -1:]
    noise_to_win = (kth_value - logits) / noise_std
    win_probability = 0.5 * (1.0 - ops.erf(noise_to_win / 2.0**0.5))
    return _squared_coefficient_of_variation(
        ops.sum(win_probability, axis=-2)
    )


def router_z_loss(logits):
    """ST-MoE router z-loss (Zoph et al., 2022): mean of logsumexp(logits)^2.

    Keeps router logits small, which keeps the float32 softmax well
    conditioned.
    """
    return ops.mean(ops.square(ops.logsumexp(logits, axis=-1)))
