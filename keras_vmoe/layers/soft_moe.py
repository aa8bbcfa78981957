"""`SoftMoEFeedForward`: Soft Mixture-of-Experts (Puigcerver et al., 2024).

"From Sparse to Soft Mixtures of Experts" (ICLR 2024). Every image is its
own routing group; each expert has C slots per image (`slots_per_expert`).
Every slot's input is a convex combination of all tokens of its image, and
every token's output a convex combination of all slot outputs:

    logits  = x phi                  [B, T, E*C]   (float32)
    D       = softmax(logits, T)     dispatch weights, each slot sums to 1
    M       = softmax(logits, E*C)   combine weights, each token sums to 1
    slots   = D^T x                  [B, E*C, d]
    y       = M expert(slots)        [B, T, d]   slot n runs expert n // C

With `normalize=True` (the paper's Sec. 2.3, and vmoe's `SoftRouter`) the
tokens are L2-normalised over d, the columns of `phi` over d, and the
logits multiplied by a learned scalar `scale` (initialised to 1):
`logits = scale * (x / |x|) (phi / |phi|)`; the norms use
`rsqrt(sum(v^2) + 1e-6)` as vmoe does. Nothing is dropped, there is no
load-balancing loss, and each image is routed independently of the
others in the batch. Axis letters: see `docs/glossary.md`.
"""

import math

import keras
from keras import ops

from keras_vmoe import validation
from keras_vmoe.layers.base import MoELayer
from keras_vmoe.layers.dispatch import DISPATCHERS

NORM_EPSILON = 1e-6


def l2_normalize(x, axis):
    """`x / sqrt(sum(x^2) + 1e-6)` along `axis` (vmoe's `normalize`)."""
    return x * ops.rsqrt(
        ops.sum(ops.square(x), axis=axis, keepdims=True) + NORM_EPSILON
    )


def soft_routing_weights(tokens, phi, scale=None):
    """Dispatch and combine weights of Soft MoE.

    Args:
        tokens: [B, T, d] float32 (already normalised if wanted).
        phi: [d, E*C] float32 slot parameters (already normalised if
            wanted).
        scale: optional scalar multiplying the logits.

    Returns:
        `(dispatch, combine)`, both [B, T, E*C] float32: `dispatch` sums to
        1 over T (each slot mixes the tokens of its image), `combine` sums
        to 1 over E*C (each token mixes the slots).
    """
    logits = ops.einsum("btd,dn->btn", tokens, phi)
    if scale is not None:
        logits = logits * scale
    return ops.softmax(logits, axis=1), ops.softmax(logits, axis=-1)


def slot_entropy(dispatch, num_experts):
    """Mean entropy (nats) of each expert's slot distributions over tokens.

    Args:
        dispatch: [B, T, E*C] dispatch weights (sum to 1 over T).
        num_experts: E.

    Returns:
        [E] float32: entropy of every slot's dispatch distribution,
        averaged over the images and the expert's C slots. log(T) means a
        slot averages all tokens, 0 that it picks a single token.
    """
    plogp = dispatch * ops.log(ops.maximum(dispatch, 1e-30))
    entropy = -ops.sum(plogp, axis=1)  # [B, E*C]
    slots_per_expert = ops.shape(entropy)[1] // num_experts
    entropy = ops.reshape(entropy, (-1, num_experts, slots_per_expert))
    return ops.mean(entropy, axis=(0, 2))


@keras.saving.register_keras_serializable(package="keras_vmoe")
class SoftMoEFeedForward(MoELayer):
    """Soft Mixture-of-Experts feed-forward layer.

    `y = E_s(x) + M(x) expert(D(x)^T x)`: see the module docstring for the
    dispatch (`D`, softmax over the tokens of each image) and combine (`M`,
    softmax over all E*C slots) weights. Fully differentiable; every expert
    processes exactly C slots per image, so the cost is that of a dense FFN
    run on E*C tokens per image, whatever T is. `E_s` is the optional
    always-on shared expert.

    The router (`phi` [d, E*C] and `scale`) computes in float32 under any
    dtype policy; the slot mixing and the experts run in the compute dtype.
    Inputs are [B, T, d] tokens or [B, H, W, d] feature maps (the H*W
    positions of an image are its tokens). The experts are the stacked
    weights of every MoE layer (`keras_vmoe.layers.experts`), so upcycling
    and the parameter counts apply unchanged.

    Args:
        num_experts: E, number of experts (>= 1).
        hidden_dim: h, hidden width of every expert (and the shared expert).
        slots_per_expert: C, slots per expert and image (>= 1); the
            paper's ViTs use 1 with E = 128 (Sec. 3).
        shared_expert: add an always-on dense expert.
        normalize: L2-normalise tokens and `phi` over d and learn a scalar
            scale of the logits (the paper's normalisation; needed at large
            d, Sec. 2.3). With False, `logits = x phi`.
        activation: "gelu" (exact) or "gelu_tanh".
        dropout: dropout after the expert activation and output.
        return_routing: also return a dict: `dispatch_weights` and
            `combine_weights` ([B, T, E, C], or [B, H, W, E, C]; float32),
            `slot_entropy` ([E], see `slot_entropy`), `dispatch_weights_max`
            ([E], largest dispatch weight of a slot, averaged over images
            and slots) and `expert_load` ([E], the share of the combine
            weights each expert receives, averaged over tokens; sums to 1).
        kernel_initializer: initializer of the expert kernels (default
            truncated normal, stddev 0.02, as ViT).
        phi_initializer: initializer of `phi` (default LeCun normal, as
            vmoe's `SoftRouter`).
        seed: seed of `phi`'s default initializer and of the dropout.

    Example:
    >>> moe = SoftMoEFeedForward(num_experts=4, hidden_dim=64)
    >>> moe(np.ones((2, 5, 16))).shape
    (2, 5, 16)
    """

    router_type = "soft"
    routing_statistic_names = ("max_load",)

    def __init__(
        self,
        num_experts,
        hidden_dim,
        slots_per_expert=1,
        shared_expert=False,
        normalize=True,
        activation="gelu",
        dropout=0.0,
        return_routing=False,
        kernel_initializer=None,
        phi_initializer=None,
        seed=None,
        **kwargs,
    ):
        validation.check_int("slots_per_expert", slots_per_expert)
        validation.check_bool("normalize", normalize)
        super().__init__(
            num_experts,
            hidden_dim,
            shared_expert=shared_expert,
            activation=activation,
            dropout=dropout,
            return_routing=return_routing,
            kernel_initializer=kernel_initializer,
            seed=seed,
            **kwargs,
        )
        self.slots_per_expert = slots_per_expert
        self.normalize = normalize
        self.phi_initializer = keras.initializers.get(
            phi_initializer or keras.initializers.LecunNormal(seed=seed)
        )
        self._last_combine = None

    @property
    def num_slots(self):
        """E * C, the total number of slots per image."""
        return self.num_experts * self.slots_per_expert

    # === Build ===
    def _build_routing_weights(self):
        # The router weights are float32 and read as float32 (no autocast)
        # under mixed precision.
        self.phi = self.add_weight(
            name="phi",
            shape=(self.input_dim, self.num_slots),
            initializer=self.phi_initializer,
            dtype="float32",
            autocast=False,
        )
        self.scale = (
            self.add_weight(
                name="scale",
                shape=(),
                initializer="ones",
                dtype="float32",
                autocast=False,
            )
            if self.normalize
            else None
        )

    @property
    def router_variables(self):
        """`phi` and `scale` (Soft MoE routes with weights of its own)."""
        return [v for v in (self.phi, self.scale) if v is not None]

    # === Forward ===
    def routing_weights(self, tokens):
        """Float32 `(dispatch, combine)` [B, T, E*C] for tokens [B, T, d]."""
        tokens = ops.cast(tokens, "float32")
        phi = ops.cast(self.phi, "float32")
        scale = None
        if self.normalize:
            tokens = l2_normalize(tokens, axis=-1)
            phi = l2_normalize(phi, axis=0)
            scale = ops.cast(self.scale, "float32")
        return soft_routing_weights(tokens, phi, scale)

    def _forward(self, inputs, training):
        shape = ops.shape(inputs)
        tokens = ops.reshape(inputs, (shape[0], -1, shape[-1]))  # [B, T, d]
        dispatch, combine = self.routing_weights(tokens)
        plan = {"dispatch": dispatch, "combine": combine}
        outputs = self._dispatch(DISPATCHERS["soft"], tokens, plan, training)
        self._last_combine = ops.stop_gradient(combine)
        return ops.reshape(outputs, shape), plan

    # === Routing information ===
    def expert_rows(self, input_shape):
        """E*C slots per image."""
        return input_shape[0] * self.num_slots

    def routing_macs(self, input_shape):
        """Logits, slot inputs and combination: 3 * T * d * E*C per image."""
        tokens = math.prod(input_shape[1:-1])
        return input_shape[0] * 3 * tokens * input_shape[-1] * self.num_slots

    def _combine_load(self, combine):
        """[E] share of the combine weights of all tokens per expert."""
        e, c = self.num_experts, self.slots_per_expert
        return ops.mean(
            ops.sum(ops.reshape(combine, (-1, e, c)), axis=-1), axis=0
        )

    def routing_statistics(self):
        """`{"max_load": E * max_i m_i}`, where m_i is expert i's share of
        all combine weights of the last batch (1.0: every expert gets the
        same mass)."""
        load = self._combine_load(self._last_combine)
        return {"max_load": self.num_experts * ops.max(load)}

    def _routing_info(self, state, input_shape):
        dispatch, combine = state["dispatch"], state["combine"]
        e, c = self.num_experts, self.slots_per_expert
        per_expert = ops.reshape(ops.max(dispatch, axis=1), (-1, e, c))
        leading = tuple(input_shape[:-1])
        return {
            "dispatch_weights": ops.reshape(dispatch, leading + (e, c)),
            "combine_weights": ops.reshape(combine, leading + (e, c)),
            "slot_entropy": slot_entropy(dispatch, e),
            "dispatch_weights_max": ops.mean(per_expert, axis=(0, 2)),
            "expert_load": self._combine_load(combine),
        }

    def _routing_specs(self, input_shape):
        e, c = self.num_experts, self.slots_per_expert
        leading = tuple(input_shape[:-1])
        shapes = {
            "dispatch_weights": leading + (e, c),
            "combine_weights": leading + (e, c),
            "slot_entropy": (e,),
            "dispatch_weights_max": (e,),
            "expert_load": (e,),
        }
        return {name: (shape, "float32") for name, shape in shapes.items()}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "slots_per_expert": self.slots_per_expert,
                "normalize": self.normalize,
                "phi_initializer": keras.initializers.serialize(
                    self.phi_initializer
                ),
            }
        )
        return config
