"""An independent numpy forward pass of vmoe's models in eval mode.

Written from vmoe's definitions (`vmoe/nn/vit_moe.py`,
`vmoe/nn/vit_moe_ensemble.py`, `vmoe/nn/ensemble_routing.py`,
`vmoe/moe.py`), on the flax parameter tree ('/'-joined paths), loop by
loop: it shares no code with keras_vmoe. Checked against the logits of
vmoe's own model (`tests/fixtures/vmoe`), then used to check the converter
on configurations that fixture does not cover (pre_logits, E^3, top-2).
"""

import math

import numpy as np


def _layer_norm(x, params, key):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * params[f"{key}/scale"] + params[
        f"{key}/bias"
    ]


def _gelu_tanh(x):
    return (
        0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    )


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _attention(x, params, key, num_heads):
    def project(name):
        return (
            np.einsum("btd,dhk->bthk", x, params[f"{key}/{name}/kernel"])
            + params[f"{key}/{name}/bias"]
        )

    q, k, v = project("query"), project("key"), project("value")
    scores = np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
    attended = np.einsum("bhqt,bthk->bqhk", _softmax(scores), v)
    return (
        np.einsum("bqhk,hkd->bqd", attended, params[f"{key}/out/kernel"])
        + params[f"{key}/out/bias"]
    )


def _capacity(group_size, top_k, num_experts, capacity_factor, multiple_of=4):
    capacity = int(
        math.ceil(group_size * top_k * capacity_factor / num_experts)
    )
    capacity += (-capacity) % multiple_of
    return capacity


def _moe(y, params, key, moe_config, capacity_factor, ensemble_size):
    """vmoe's MlpMoeBlock on [N, T, d] (N = B * M for an ensemble)."""
    n, t, d = y.shape
    members = ensemble_size or 1
    if members > 1:
        # (B*M, T, d) -> (B, M, T, d) -> (B, T, M, d): member-minor order.
        y = y.reshape(n // members, members, t, d).transpose(0, 2, 1, 3)
    group_size = moe_config["group_size"]
    groups = y.reshape(-1, group_size, d)
    num_experts = moe_config["num_experts"]
    top_k = moe_config["router"]["num_selected_experts"]
    kernel = params[f"{key}/Router/dense/kernel"]
    out = np.zeros_like(groups)
    capacity = _capacity(group_size, top_k, num_experts, capacity_factor)
    per_member = num_experts // members
    for g, items in enumerate(groups):
        gates = np.zeros((group_size, num_experts))
        for s in range(group_size):
            if members > 1:
                m = s % members
                logits = items[s] @ kernel[:, m, :]
                gates[s, m * per_member : (m + 1) * per_member] = _softmax(
                    logits
                )
            else:
                gates[s] = _softmax(items[s] @ kernel)
        # Top-k per item (ties: the lower expert index first).
        choices = np.argsort(-gates, axis=1, kind="stable")[:, :top_k]
        filled = np.zeros(num_experts, dtype=int)
        for k in range(top_k):  # all first choices before second choices
            for s in range(group_size):
                e = choices[s, k]
                if filled[e] < capacity:
                    filled[e] += 1
                    hidden = _gelu_tanh(
                        items[s] @ params[f"{key}/Mlp/Dense_0/kernel"][e]
                        + params[f"{key}/Mlp/Dense_0/bias"][e]
                    )
                    expert = (
                        hidden @ params[f"{key}/Mlp/Dense_1/kernel"][e]
                        + params[f"{key}/Mlp/Dense_1/bias"][e]
                    )
                    out[g, s] += gates[s, e] * expert
    if members > 1:
        out = out.reshape(n // members, t, members, d).transpose(0, 2, 1, 3)
    return out.reshape(n, t, d)


def vmoe_forward(params, config, images, capacity_factor=None):
    """Logits of vmoe's `VisionTransformerMoe(Ensemble)` in eval mode.

    Args:
        params: `{path: array}` (float64 is used throughout).
        config: vmoe's `config.model` dict (with `encoder.moe.group_size`).
        images: [B, H, W, 3] in [-1, 1].
        capacity_factor: the dispatcher's (default the config's).

    Returns:
        [B, num_classes] logits (for an ensemble, log of the members' mean
        probability, as vmoe's `ensemble_softmax_xent_eval`).
    """
    params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    images = np.asarray(images, dtype=np.float64)
    encoder = config["encoder"]
    moe = encoder["moe"]
    members = moe.get("ensemble_size") or None
    capacity_factor = (
        capacity_factor or moe["router"]["dispatcher"]["capacity_factor"]
    )
    p = config["patch_size"][0]
    b, h, w, c = images.shape
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(
        0, 1, 3, 2, 4, 5
    )
    patches = patches.reshape(b, (h // p) * (w // p), p * p * c)
    kernel = params["embedding/kernel"].reshape(p * p * c, -1)
    x = patches @ kernel + params["embedding/bias"]
    cls = np.broadcast_to(params["cls"], (b, 1, x.shape[-1]))
    x = (
        np.concatenate([cls, x], axis=1)
        + params["Encoder/posembed_input/pos_embedding"]
    )
    repeated = False
    for i in range(encoder["num_layers"]):
        key = f"Encoder/encoderblock_{i}"
        is_moe = i in moe["layers"]
        if is_moe and members and not repeated:
            x = np.repeat(x, members, axis=0)
            repeated = True
        y = _layer_norm(x, params, f"{key}/LayerNorm_0")
        x = x + _attention(
            y, params, f"{key}/SelfAttention", encoder["num_heads"]
        )
        y = _layer_norm(x, params, f"{key}/LayerNorm_1")
        if is_moe:
            y = _moe(y, params, f"{key}/Moe", moe, capacity_factor, members)
        else:
            hidden = _gelu_tanh(
                y @ params[f"{key}/Mlp/Dense_0/kernel"]
                + params[f"{key}/Mlp/Dense_0/bias"]
            )
            y = (
                hidden @ params[f"{key}/Mlp/Dense_1/kernel"]
                + params[f"{key}/Mlp/Dense_1/bias"]
            )
        x = x + y
    x = _layer_norm(x, params, "Encoder/encoder_norm")[:, 0]
    if config.get("representation_size"):
        x = np.tanh(x @ params["pre_logits/kernel"] + params["pre_logits/bias"])
    logits = x @ params["head/kernel"] + params["head/bias"]
    if members:
        logits = logits.reshape(b, members, -1)
        log_p = logits - logits.max(-1, keepdims=True)
        log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
        top = log_p.max(1, keepdims=True)
        logits = (top + np.log(np.exp(log_p - top).sum(1, keepdims=True)))[:, 0]
        logits = logits - math.log(members)
    return logits


def random_vmoe_params(config, image_size, seed=0, scale=0.3):
    """A random, well-spread flax parameter tree for `config` (nested dicts
    in flax's key order)."""
    rng = np.random.default_rng(seed)
    d = config["hidden_size"]
    encoder = config["encoder"]
    moe = encoder["moe"]
    h, heads = encoder["mlp_dim"], encoder["num_heads"]
    p = config["patch_size"][0]
    tokens = (image_size // p) ** 2 + 1
    experts = moe["num_experts"]
    members = moe.get("ensemble_size") or None

    def normal(*shape, std=scale):
        return (std * rng.normal(size=shape)).astype(np.float32)

    def norm():
        return {"bias": normal(d, std=0.1), "scale": 1 + normal(d, std=0.1)}

    blocks = {}
    for i in range(encoder["num_layers"]):
        attention = {
            name: {
                "bias": normal(heads, d // heads),
                "kernel": normal(d, heads, d // heads),
            }
            for name in ("key", "query", "value")
        }
        attention["out"] = {
            "bias": normal(d),
            "kernel": normal(heads, d // heads, d),
        }
        block = {"LayerNorm_0": norm(), "LayerNorm_1": norm()}
        if i in moe["layers"]:
            router = (
                normal(d, members, experts // members, std=1.0)
                if members
                else normal(d, experts, std=1.0)
            )
            block["Moe"] = {
                "Mlp": {
                    "Dense_0": {
                        "bias": normal(experts, h),
                        "kernel": normal(experts, d, h),
                    },
                    "Dense_1": {
                        "bias": normal(experts, d),
                        "kernel": normal(experts, h, d),
                    },
                },
                "Router": {"dense": {"kernel": router}},
            }
        else:
            block["Mlp"] = {
                "Dense_0": {"bias": normal(h), "kernel": normal(d, h)},
                "Dense_1": {"bias": normal(d), "kernel": normal(h, d)},
            }
        block["SelfAttention"] = attention
        blocks[f"encoderblock_{i}"] = block
    tree = {
        "Encoder": dict(
            blocks,
            encoder_norm=norm(),
            posembed_input={"pos_embedding": normal(1, tokens, d)},
        ),
        "cls": normal(1, 1, d),
        "embedding": {"bias": normal(d), "kernel": normal(p, p, 3, d)},
        "head": {
            "bias": normal(config["num_classes"]),
            "kernel": normal(
                (
                    d
                    if not config.get("representation_size")
                    else config["representation_size"]
                ),
                config["num_classes"],
            ),
        },
    }
    if config.get("representation_size"):
        r = config["representation_size"]
        tree["pre_logits"] = {"bias": normal(r), "kernel": normal(d, r)}
    return tree
