"""At inference an image's output never depends on the rest of the batch.

Every router type, token and image routing, both families, with the MoE
defaults (`eval_group_size="image"`) and a small eval capacity that makes
batch-level routing drop: an image alone, last in a batch of copies of
itself (every copy wants the same experts, and ties go to the earlier
position), and in shuffled batches of other images. The control
(`set_eval_group_size(model, None)`: the whole batch as one routing group)
changes the outputs of the same batches, so these tests can fail.
"""

import numpy as np
import pytest

from keras_vmoe.layers import find_moe_layers
from keras_vmoe.models import ConvNeXtMoEBackbone
from keras_vmoe.models import ConvNeXtMoEImageClassifier
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.models import set_eval_group_size
from tests.helpers import TINY_VIT

VIT = dict(TINY_VIT, patch_size=4, moe_layers="last-2")
CONVNEXT = dict(
    image_shape=(16, 16, 3),
    depths=[1, 2],
    hidden_dims=[8, 16],
    moe_layers="every-2",
    num_experts=4,
    layer_scale_init_value=1.0,  # 1e-6 would hide the MoE blocks' outputs
)
DROPPING = dict(capacity_factor=0.5, eval_capacity_factor=0.5)
CASES = {
    "vit-image-linear-top1": ("vit", dict(DROPPING)),
    "vit-token-linear-top2": (
        "vit",
        dict(DROPPING, routing="token", top_k=2),
    ),
    "vit-token-cosine-top1": (
        "vit",
        dict(DROPPING, routing="token", router="cosine", router_dim=8),
    ),
    "vit-image-l2-top2": (
        "vit",
        dict(DROPPING, top_k=2, router="l2", router_dim=8),
    ),
    "vit-token-shared-batch-priority-off": (
        "vit",
        dict(
            DROPPING,
            routing="token",
            shared_expert=True,
            batch_prioritized_routing=False,
        ),
    ),
    "vit-ensemble": (
        "vit",
        dict(DROPPING, routing="token", ensemble_size=2),
    ),
    "vit-soft": ("vit", dict(router_type="soft", slots_per_expert=2)),
    "vit-expert-choice": (
        "vit",
        dict(router_type="expert_choice", capacity_factor=0.5),
    ),
    "convnext-token-linear-top1": ("convnext", dict(DROPPING)),
    "convnext-image-cosine-top2": (
        "convnext",
        dict(DROPPING, routing="image", top_k=2, router="cosine"),
    ),
    "convnext-soft": ("convnext", dict(router_type="soft")),
    "convnext-expert-choice": (
        "convnext",
        dict(router_type="expert_choice", capacity_factor=0.5),
    ),
}
RNG = np.random.default_rng(0)
IMAGES = RNG.normal(size=(8, 16, 16, 3)).astype("float32")


def _classifier(name):
    family, moe = CASES[name]
    if family == "vit":
        backbone = ViTMoEBackbone(**VIT, **moe, seed=1)
        model = ViTMoEImageClassifier(backbone, num_classes=5)
    else:
        backbone = ConvNeXtMoEBackbone(**CONVNEXT, **moe, seed=1)
        model = ConvNeXtMoEImageClassifier(backbone, num_classes=5)
    # Weights of order 1 (the initialisers' are small): a dropped token
    # then moves the logits far more than float rounding does.
    rng = np.random.default_rng(1)
    for variable in model.trainable_variables:
        variable.assign(0.3 * rng.standard_normal(variable.shape))
    return model


def _predict(model, images):
    return np.asarray(model.predict(images, batch_size=len(images), verbose=0))


def _compare(model):
    """max |difference| to the image alone: (last of 8 copies, shuffled)."""
    alone = np.concatenate([_predict(model, IMAGES[i : i + 1]) for i in (0, 3)])
    copies = np.repeat(IMAGES[:1], 8, axis=0)
    in_copies = _predict(model, copies)[-1]
    order = RNG.permutation(8)
    shuffled = _predict(model, IMAGES[order])
    in_shuffled = shuffled[np.argsort(order)][[0, 3]]
    return (
        float(np.abs(in_copies - alone[0]).max()),
        float(np.abs(in_shuffled - alone).max()),
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_image_gets_the_same_output_alone_and_in_any_batch(name):
    model = _classifier(name)
    copies, shuffled = _compare(model)
    assert copies < 1e-4 and shuffled < 1e-4, (copies, shuffled)
    if "soft" in name:
        return  # Soft MoE mixes tokens of one image only: no control.
    set_eval_group_size(model, None)
    assert max(_compare(model)) > 1e-3, "control: batch-level routing differs"


def test_default_is_per_image_and_recorded_in_the_config():
    model = _classifier("vit-token-linear-top2")
    assert model.backbone.get_config()["eval_group_size"] == "image"
    set_eval_group_size(model, None)
    assert model.backbone.get_config()["eval_group_size"] is None
    assert all(
        layer.eval_group_size is None for layer in find_moe_layers(model)
    )


@pytest.mark.parametrize(
    "value, message",
    [("batch", "eval_group_size='batch'"), (0, "eval_group_size=0")],
)
def test_bad_eval_group_size_is_named(value, message):
    with pytest.raises(ValueError, match=message):
        ViTMoEBackbone(**VIT, eval_group_size=value)
    with pytest.raises(ValueError, match=message):
        set_eval_group_size(_classifier("vit-image-linear-top1"), value)


def test_ensemble_eval_groups_hold_whole_members():
    with pytest.raises(ValueError, match="multiple of `ensemble_size`"):
        ViTMoEBackbone(
            **VIT, routing="token", ensemble_size=2, eval_group_size=5
        )
    with pytest.raises(ValueError, match="multiple of `ensemble_size`"):
        set_eval_group_size(_classifier("vit-ensemble"), 5)


def test_soft_moe_alone_has_no_eval_groups_to_set():
    model = _classifier("vit-soft")
    with pytest.raises(ValueError, match="Soft MoE"):
        set_eval_group_size(model, None)
