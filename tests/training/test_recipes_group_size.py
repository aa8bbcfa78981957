"""`build_classifier(..., group_size=)`: what `keras-vmoe train --group-size`
sets on every MoE layer (expert parallelism needs routing groups)."""

import pytest

from keras_vmoe.layers import MoEFeedForward
from keras_vmoe.training.recipes import build_classifier


def _group_sizes(model):
    return {
        layer.group_size
        for layer in model._flatten_layers()
        if isinstance(layer, MoEFeedForward)
    }


@pytest.mark.parametrize("recipe", ["vimoe_mnist", "convnext_moe_mnist"])
def test_recipes_route_in_groups_of_the_given_size(recipe):
    assert _group_sizes(build_classifier(recipe, 10)) == {None}
    model = build_classifier(recipe, 10, group_size=16)
    assert _group_sizes(model) == {16}
    # The config carries it, so a re-created (sharded) copy keeps it.
    clone = model.__class__.from_config(model.get_config())
    assert _group_sizes(clone) == {16}


def test_vit_preset_names_take_group_size():
    model = build_classifier("vit_moe_small_patch16_e8_last2_top2", 10, image_size=32, group_size=64)
    assert _group_sizes(model) == {64}


@pytest.mark.slow
def test_convnext_preset_names_take_group_size():
    # The same flat `group_size` argument as the ViT presets.
    model = build_classifier("convnext_moe_tiny_e4_last2", 10, group_size=64)
    assert _group_sizes(model) == {64}


@pytest.mark.parametrize(
    "name, group_size, message",
    [
        ("vimoe_mnist", 0, "group_size=0"),
        ("no/such/preset", 64, "group_size=64, model='no/such/preset'"),
    ],
)
def test_group_size_errors_name_the_value(name, group_size, message):
    with pytest.raises(ValueError, match=message):
        build_classifier(name, 10, group_size=group_size)
