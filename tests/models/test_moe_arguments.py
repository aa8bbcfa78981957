"""One set of MoE arguments for both backbone families, and the deprecated
ConvNeXt spellings (`moe_placement`, `moe_kwargs`) and loader aliases."""

import contextlib
import inspect
import json
import os
import shutil
import warnings

import keras
import numpy as np
import pytest

from keras_vmoe.converters import convnext as convnext_converters
from keras_vmoe.converters import vit as vit_converters
from keras_vmoe.models import moe_arguments
from keras_vmoe.models.convnext_moe import presets as convnext_presets
from keras_vmoe.models.convnext_moe import preset_builder as convnext_builder
from keras_vmoe.models.convnext_moe.backbone import ConvNeXtMoEBackbone
from keras_vmoe.models.vit_moe import presets as vit_presets
from keras_vmoe.models.vit_moe import preset_builder as vit_builder
from keras_vmoe.models.vit_moe.backbone import ViTMoEBackbone

FAMILIES = {"vit": ViTMoEBackbone, "convnext": ConvNeXtMoEBackbone}
VIT = dict(
    image_shape=(16, 16, 3),
    patch_size=8,
    num_layers=2,
    num_heads=2,
    hidden_dim=8,
    mlp_dim=16,
    moe_layers="last-2",
)
CONVNEXT = dict(
    depths=[1, 2],
    hidden_dims=[8, 16],
    image_shape=(16, 16, 3),
    moe_layers="last-2",
)
SMALL = {"vit": VIT, "convnext": CONVNEXT}
DEPRECATED = r"is deprecated; use .* removed in keras-vmoe 0\.3"
PRESET_DIR = os.path.join(
    os.path.dirname(moe_arguments.__file__),
    os.pardir,
    "presets_data",
    "convnext_moe_mnist",
)
OLD_CONFIG = os.path.join(
    os.path.dirname(__file__), "data", "convnext_moe_mnist_old_config.json"
)


def _build(family, **kwargs):
    return FAMILIES[family](**dict(SMALL[family], **kwargs))


def _moe_layers(backbone):
    blocks = getattr(backbone, "blocks", None) or backbone.transformer_layers
    return [block.mlp for block in blocks if block.is_moe]


@contextlib.contextmanager
def _no_deprecation_warning():
    """A context in which a DeprecationWarning raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_signature_lists_the_shared_names_with_the_family_defaults(family):
    parameters = inspect.signature(FAMILIES[family].__init__).parameters
    defaults = moe_arguments.defaults(family)
    assert tuple(defaults) == moe_arguments.MOE_ARGUMENTS
    for name, default in defaults.items():
        assert parameters[name].default == default, name
    assert parameters["moe_layers"].default is None
    # Every MoE argument name is a constructor argument of its layer.
    from keras_vmoe.layers.moe_types import MOE_LAYERS

    for router_type, names in moe_arguments.ROUTER_TYPE_ARGUMENTS.items():
        layer = inspect.signature(MOE_LAYERS[router_type].__init__)
        assert set(names) <= set(layer.parameters), router_type


def test_only_num_experts_and_routing_defaults_differ():
    vit, convnext = (moe_arguments.defaults(f) for f in ("vit", "convnext"))
    differ = {name for name in vit if vit[name] != convnext[name]}
    assert differ == {"num_experts", "routing"}
    assert (vit["num_experts"], vit["routing"]) == (8, "image")
    assert (convnext["num_experts"], convnext["routing"]) == (4, "token")


FLAT = dict(
    num_experts=3,
    top_k=2,
    routing="token",
    router="cosine",
    router_dim=4,
    shared_expert=True,
    capacity_factor=None,
    eval_capacity_factor=1.5,
    group_size=2,
    batch_prioritized_routing=False,
    normalize_gates=True,
    noisy_gating=True,
    noise_std=0.5,
    load_balance_loss_weight=0.02,
    importance_loss_weight=0.1,
    load_loss_weight=0.03,
    z_loss_weight=0.001,
    dispatch="sorted",
    seed=7,
)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_same_flat_arguments_reach_every_moe_layer(family):
    backbone = _build(family, **FLAT)
    layers = _moe_layers(backbone)
    assert len(layers) == 2
    for layer in layers:
        config = layer.get_config()
        for name, value in FLAT.items():
            if name != "seed":
                assert config[name] == value, name
    # Gating noise seed: `seed + i`, i the block index over all blocks
    # (ConvNeXt "last-2" of depths [1, 2]: global blocks 0 and 2).
    expected = {"vit": [7, 8], "convnext": [7, 9]}[family]
    assert [layer.seed for layer in layers] == expected
    config = backbone.get_config()
    assert {name: config[name] for name in FLAT} == FLAT
    assert config["moe_layers"] == "last-2"
    assert "moe_placement" not in config and "moe_kwargs" not in config


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    "router_type, overrides, name",
    [
        ("soft", dict(group_size=4), "group_size"),
        ("soft", dict(dispatch="sorted"), "dispatch"),
        ("expert_choice", dict(noisy_gating=True), "noisy_gating"),
        ("top_k", dict(normalize=False), "normalize"),
        ("top_k", dict(slots_per_expert=2), "slots_per_expert"),
    ],
)
def test_unused_arguments_raise_the_same_in_both_families(
    family, router_type, overrides, name
):
    value = next(iter(overrides.values()))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        _build(family, router_type=router_type, **overrides)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_soft_and_expert_choice_get_their_arguments(family):
    soft = _build(family, router_type="soft", normalize=False, seed=1)
    assert [layer.normalize for layer in _moe_layers(soft)] == [False] * 2
    choice = _build(family, router_type="expert_choice", router_dim=4)
    assert [layer.router_dim for layer in _moe_layers(choice)] == [4] * 2


def test_moe_placement_is_a_deprecated_alias_of_moe_layers():
    with pytest.warns(DeprecationWarning, match="`moe_placement` is dep"):
        old = ConvNeXtMoEBackbone(
            **dict(CONVNEXT, moe_layers=None), moe_placement=[2]
        )
    assert old.moe_positions == [(1, 1)]
    assert old.get_config()["moe_layers"] == [2]
    assert "moe_placement" not in old.get_config()
    with pytest.raises(ValueError, match="moe_placement=\\[2\\]"):
        ConvNeXtMoEBackbone(**CONVNEXT, moe_placement=[2])


def test_moe_kwargs_is_deprecated_and_merged_into_the_flat_arguments():
    with pytest.warns(DeprecationWarning, match="`moe_kwargs` is dep"):
        old = ConvNeXtMoEBackbone(
            **CONVNEXT,
            top_k=2,
            moe_kwargs={"group_size": 4, "top_k": 2, "seed": 3},
        )
    config = old.get_config()
    assert (config["group_size"], config["top_k"], config["seed"]) == (
        4,
        2,
        3,
    )
    assert "moe_kwargs" not in config
    assert [layer.group_size for layer in _moe_layers(old)] == [4, 4]
    with _no_deprecation_warning():
        again = ConvNeXtMoEBackbone.from_config(config)
    assert again.get_config() == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(moe_kwargs={"activation": "relu"}), "'activation'"),
        (dict(moe_kwargs=[("top_k", 2)]), r"moe_kwargs=\[\('top_k', 2\)\]"),
        (dict(top_k=2, moe_kwargs={"top_k": 1}), "top_k=2"),
        (dict(moe_kwargs={"num_experts": 0}), "num_experts=0"),
    ],
)
def test_bad_moe_kwargs_raise_naming_the_key(kwargs, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=message):
            ConvNeXtMoEBackbone(**CONVNEXT, **kwargs)


def _preset_backbone(config_path, weights_path):
    with open(config_path) as file:
        config = json.load(file)
    backbone = keras.saving.deserialize_keras_object(config)
    backbone.load_weights(weights_path)
    return backbone


@pytest.mark.slow
def test_old_and_new_convnext_mnist_configs_give_the_same_outputs():
    weights = os.path.join(PRESET_DIR, "model.weights.h5")
    with pytest.warns(DeprecationWarning, match="`moe_placement` is dep"):
        old = _preset_backbone(OLD_CONFIG, weights)
    with _no_deprecation_warning():
        new = _preset_backbone(os.path.join(PRESET_DIR, "config.json"), weights)
    assert new.get_config() == old.get_config()
    images = np.random.default_rng(0).uniform(0, 1, (3, 28, 28, 3))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(new(images)),
        keras.ops.convert_to_numpy(old(images)),
    )
    assert float(np.abs(keras.ops.convert_to_numpy(new(images))).max()) > 0


def test_shipped_preset_files_use_the_new_names_only(tmp_path):
    for name in ("config.json", "task.json"):
        with open(os.path.join(PRESET_DIR, name)) as file:
            text = file.read()
        assert "moe_placement" not in text and "moe_kwargs" not in text
        assert '"moe_layers": "last-2"' in text
    # A copy of the preset folder with the old config still loads.
    folder = tmp_path / "old"
    shutil.copytree(PRESET_DIR, folder)
    shutil.copy(OLD_CONFIG, folder / "config.json")
    with pytest.warns(DeprecationWarning, match="`moe_placement` is dep"):
        backbone = keras.saving.deserialize_keras_object(
            json.loads((folder / "config.json").read_text())
        )
    assert backbone.moe_layers == "last-2"


def _constructor_names(cls):
    return set(inspect.signature(cls.__init__).parameters)


@pytest.mark.parametrize(
    "presets, cls",
    [
        (convnext_presets.PRESETS, ConvNeXtMoEBackbone),
        (vit_presets.PRESETS, ViTMoEBackbone),
    ],
)
def test_every_preset_config_uses_current_names(presets, cls):
    allowed = _constructor_names(cls) - {"moe_placement", "moe_kwargs"}
    for name, preset in presets.items():
        assert set(preset["config"]) <= allowed, name


def _representatives(presets):
    """One preset per distinct set of config keys (which arguments, not
    their values, decide whether a deprecated path is taken)."""
    seen = {}
    for name, preset in sorted(presets.items()):
        seen.setdefault(tuple(sorted(preset["config"])), name)
    return sorted(seen.values())


def _shrunk(family, config):
    """Overrides that make a preset architecture tiny (same arguments)."""
    if family == "convnext":
        return {"hidden_dims": [8] * len(config["hidden_dims"])}
    patch = config["patch_size"]
    return {
        "hidden_dim": 2 * config["num_heads"],
        "mlp_dim": 4,
        "image_shape": (2 * patch, 2 * patch, 3),
        "position_embedding_shape": None,
    }


@pytest.mark.parametrize(
    "family, name",
    [("convnext", n) for n in _representatives(convnext_presets.PRESETS)]
    + [("vit", n) for n in _representatives(vit_presets.PRESETS)],
)
@pytest.mark.slow
def test_building_presets_triggers_no_deprecation_warning(family, name):
    presets = {"convnext": convnext_presets, "vit": vit_presets}[family]
    overrides = _shrunk(family, presets.PRESETS[name]["config"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        backbone = FAMILIES[family].from_preset(
            name, load_weights=False, **overrides
        )
        FAMILIES[family].from_config(backbone.get_config())


def test_load_vit_checkpoint_noise_std_and_seed_are_deprecated_aliases(
    monkeypatch,
):
    moe = ViTMoEBackbone(**VIT, num_experts=2)
    calls = []
    monkeypatch.setattr(
        vit_converters,
        "upcycle_vit",
        lambda dense, moe, noise, seed: calls.append((noise, seed)),
    )
    monkeypatch.setattr(
        vit_converters, "convert_vit_checkpoint", lambda source, model: None
    )
    with pytest.warns(DeprecationWarning, match="`noise_std` is dep"):
        vit_converters.load_vit_checkpoint({}, moe, noise_std=0.1)
    with pytest.warns(DeprecationWarning, match="`seed` is dep"):
        vit_converters.load_vit_checkpoint({}, moe, seed=4)
    with _no_deprecation_warning():
        vit_converters.load_vit_checkpoint(
            {}, moe, upcycle_noise_std=0.2, upcycle_seed=5
        )
    with pytest.raises(ValueError, match="noise_std=0.1"):
        vit_converters.load_vit_checkpoint(
            {}, moe, upcycle_noise_std=0.2, noise_std=0.1
        )
    assert calls == [(0.1, None), (0.0, 4), (0.2, 5)]


@pytest.mark.parametrize(
    "function",
    [
        convnext_converters.convert_timm_weights,
        convnext_converters.convert_keras_applications_weights,
        vit_converters.load_vit_checkpoint,
        convnext_builder.build_model,
        vit_builder.build_backbone,
    ],
)
def test_loaders_take_the_same_upcycling_argument_names(function):
    parameters = inspect.signature(function).parameters
    assert parameters["upcycle_noise_std"].default == 0.0
    assert parameters["upcycle_seed"].default is None


def test_convert_timm_weights_seed_is_a_deprecated_alias(monkeypatch):
    calls = []
    monkeypatch.setattr(
        convnext_converters,
        "_load",
        lambda model, state, key, head, noise, seed: calls.append(seed),
    )
    monkeypatch.setattr(convnext_converters, "load_state_dict", dict)
    with pytest.warns(DeprecationWarning, match="`seed` is dep"):
        convnext_converters.convert_timm_weights({}, None, seed=3)
    with pytest.raises(ValueError, match="upcycle_seed=1, seed=3"):
        convnext_converters.convert_timm_weights(
            {}, None, upcycle_seed=1, seed=3
        )
    assert calls == [3]
