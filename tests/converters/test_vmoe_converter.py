"""vmoe checkpoints -> ViTMoEImageClassifier: parity and errors.

`tests/fixtures/vmoe` holds a checkpoint written by vmoe's own writer and
the logits of vmoe's own model on 8 images (its README): the converted
model must give `logits_float32_dispatch` to 1e-4 and `logits` (vmoe's
bfloat16 dispatcher) to 1e-2. What that fixture does not cover (pre_logits,
top-2, E^3 ensembles, arrays split over shards, bfloat16 arrays, the old
index version) is checked against `vmoe_reference`, a numpy forward pass
written from vmoe's definitions and itself checked against the fixture.
"""

import copy
import json
import os

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_vmoe.converters import build_vmoe_model
from keras_vmoe.converters import convert_vmoe_checkpoint
from keras_vmoe.models import set_eval_group_size
from keras_vmoe.converters import read_vmoe_checkpoint
from keras_vmoe.converters import vmoe_model_kwargs
from tests.converters.vmoe_reference import random_vmoe_params
from tests.converters.vmoe_reference import vmoe_forward
from tests.converters.vmoe_writer import flatten
from tests.converters.vmoe_writer import write_vmoe_checkpoint

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "vmoe")
PREFIX = os.path.join(FIXTURES, "tiny_every2_k1")
with open(os.path.join(FIXTURES, "fixtures.json")) as _file:
    FIXTURE = json.load(_file)["tiny_every2_k1"]
CONFIG = FIXTURE["config"]
IO = np.load(os.path.join(FIXTURES, "tiny_every2_k1_io.npz"))
IMAGES = IO["images"]


def _config(**changes):
    config = copy.deepcopy(CONFIG)
    moe = config["encoder"]["moe"]
    for key, value in changes.items():
        if key in ("ensemble_size", "group_size", "layers"):
            moe[key] = value
        elif key in ("num_selected_experts",):
            moe["router"][key] = value
        elif key == "capacity_factor":
            moe["router"]["dispatcher"][key] = value
        else:
            config[key] = value
    return config


def _as_vmoe_evaluates(model):
    """vmoe routes groups of several images at inference too (batch-level
    capacity); the Keras default routes every image alone."""
    return set_eval_group_size(model, model.backbone.group_size)


@pytest.fixture(scope="module")
def fixture_model():
    return _as_vmoe_evaluates(
        build_vmoe_model(PREFIX, CONFIG, FIXTURE["image_size"])
    )


def test_reproduces_vmoe_logits(fixture_model):
    logits = np.asarray(fixture_model.predict(IMAGES, batch_size=8, verbose=0))
    np.testing.assert_allclose(logits, IO["logits_float32_dispatch"], atol=1e-4)
    np.testing.assert_allclose(logits, IO["logits"], atol=1e-2)


@pytest.mark.slow
def test_capacity_drops_tokens_in_the_fixture(fixture_model):
    # The parity above is not trivial: at vmoe's capacity (12 slots of 34
    # tokens per expert) tokens are dropped; without drops the logits move.
    routing = {}

    def observe(layer, info):
        routing[layer.name] = keras.ops.convert_to_numpy(info["dropped"])

    layers = [
        b.mlp for b in fixture_model.backbone.transformer_layers if b.is_moe
    ]
    for layer in layers:
        layer.add_routing_observer(observe)
    try:
        fixture_model(IMAGES)
    finally:
        for layer in layers:
            layer.remove_routing_observer(observe)
    assert sum(d.sum() for d in routing.values()) > 0
    roomy = _as_vmoe_evaluates(
        build_vmoe_model(
            PREFIX, CONFIG, FIXTURE["image_size"], eval_capacity_factor=8.0
        )
    )
    moved = np.abs(
        roomy.predict(IMAGES, batch_size=8, verbose=0)
        - IO["logits_float32_dispatch"]
    )
    assert moved.max() > 1e-3


def test_reference_forward_reproduces_vmoe():
    logits = vmoe_forward(read_vmoe_checkpoint(PREFIX), CONFIG, IMAGES)
    np.testing.assert_allclose(logits, IO["logits_float32_dispatch"], atol=1e-4)


def test_partial_batch_routes_as_the_start_of_a_group(fixture_model):
    # Top-1 without batch priority: images 0-2 alone (padded to a group of
    # 2 images) give what they give in the full batch.
    logits = np.asarray(fixture_model.predict(IMAGES[:3], verbose=0))
    np.testing.assert_allclose(
        logits, IO["logits_float32_dispatch"][:3], atol=1e-4
    )


CASES = {
    # name: (config changes, writer options)
    "pre_logits_top2_old_index": (
        dict(representation_size=24, num_selected_experts=2),
        dict(num_shards=3, chunks_per_array=2, version=None),
    ),
    "ensemble_bfloat16": (
        dict(
            name="VisionTransformerMoeEnsemble",
            representation_size=24,
            ensemble_size=2,
            group_size=68,
        ),
        dict(num_shards=2, chunks_per_array=3, bfloat16=True),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, tmp_path):
    changes, options = CASES[case]
    config = _config(**changes)
    tree = random_vmoe_params(config, 32, seed=3)
    if options.pop("bfloat16", False):
        tree = _cast_tree(tree, ml_dtypes.bfloat16)
    prefix = str(tmp_path / "checkpoint")
    write_vmoe_checkpoint(prefix, tree, **options)
    params = read_vmoe_checkpoint(prefix)
    expected = vmoe_forward(params, config, IMAGES)
    model = _as_vmoe_evaluates(build_vmoe_model(prefix, config, 32))
    logits = np.asarray(model.predict(IMAGES, batch_size=8, verbose=0))
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def _cast_tree(tree, dtype):
    return {
        key: (
            _cast_tree(value, dtype)
            if isinstance(value, dict)
            else value.astype(dtype)
        )
        for key, value in tree.items()
    }


def test_kwargs_hold_vmoe_routing_semantics():
    backbone, head = vmoe_model_kwargs(CONFIG, 32, eval_capacity_factor=2.0)
    assert backbone["activation"] == "gelu_tanh"
    assert backbone["layer_scale_init_value"] is None
    assert backbone["moe_layers"] == [1, 3]
    assert backbone["group_size"] == 34
    assert backbone["capacity_multiple_of"] == 4
    assert backbone["batch_prioritized_routing"] is False
    assert backbone["normalize_gates"] is False
    assert (backbone["capacity_factor"], backbone["eval_capacity_factor"]) == (
        1.25,
        2.0,
    )
    # vmoe: noise_std * 1 / (experts an item chooses from).
    assert backbone["noise_std"] == pytest.approx(0.25 / 4)
    assert head == {"num_classes": 5, "representation_size": None}


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(classifier="gap"), "classifier='token'"),
        (dict(patch_size=[8, 4]), "square patches"),
        (dict(name="VisionTransformer"), "Unsupported vmoe model"),
    ],
)
def test_unsupported_configs_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        vmoe_model_kwargs(_config(**changes), 32)


def _fixture_params():
    return dict(read_vmoe_checkpoint(PREFIX))


def test_missing_unused_and_misshaped_tensors_are_named(fixture_model):
    params = _fixture_params()
    del params["Encoder/encoderblock_3/Moe/Router/dense/kernel"]
    with pytest.raises(
        ValueError, match="encoderblock_3/Moe/Router/dense/kernel"
    ):
        convert_vmoe_checkpoint(params, fixture_model)
    params = _fixture_params()
    params["Encoder/extra/kernel"] = np.zeros(3, "float32")
    with pytest.raises(ValueError, match="Encoder/extra/kernel"):
        convert_vmoe_checkpoint(params, fixture_model)
    params = _fixture_params()
    params["head/kernel"] = np.zeros((32, 7), "float32")
    with pytest.raises(ValueError, match=r"head/kernel.*\(32, 7\).*\(32, 5\)"):
        convert_vmoe_checkpoint(params, fixture_model)


def test_training_checkpoint_reads_the_params_subtree(tmp_path):
    # A train state: params/..., plus optimizer state the converter skips.
    tree = {"opt_state": {"momentum": np.zeros(3, "float32")}, "params": {}}
    for key, value in _fixture_params().items():
        node = tree["params"]
        *parents, leaf = key.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    prefix = str(tmp_path / "state")
    write_vmoe_checkpoint(prefix, tree)
    model = _as_vmoe_evaluates(build_vmoe_model(prefix, CONFIG, 32))
    np.testing.assert_allclose(
        np.asarray(model.predict(IMAGES, batch_size=8, verbose=0)),
        IO["logits_float32_dispatch"],
        atol=1e-4,
    )


def test_fine_tuning_replaces_the_head_only():
    config = _config(representation_size=24)
    tree = random_vmoe_params(config, 32, seed=5)
    params = {"/".join(k): v for k, v in flatten(tree)}
    model = build_vmoe_model(params, config, 32, num_classes=3)
    assert model.num_classes == 3 and model.pre_logits is None
    embedding = model.backbone.get_layer("embedding")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(embedding.patch_projection.kernel),
        params["embedding/kernel"],
    )


def test_other_image_size_resamples_the_position_grid():
    model = build_vmoe_model(PREFIX, CONFIG, 48)  # stored grid 4x4 -> 6x6
    embedding = model.backbone.get_layer("embedding")
    assert embedding.position_embedding_grid == (4, 4)
    # The routing groups keep 2 images: 2 x (36 + 1) tokens.
    layer = model.backbone.transformer_layers[1].mlp
    assert layer.group_size == 34  # from the config: the caller sizes groups
    images = np.random.default_rng(0).uniform(-1, 1, (2, 48, 48, 3))
    assert np.isfinite(model.predict(images.astype("float32"), verbose=0)).all()
    with pytest.raises(ValueError, match="group_size"):
        # 2 * 37 tokens do not fill groups of 34 in training.
        model(images.astype("float32"), training=True)


@pytest.mark.slow
def test_routing_analysis_reads_converted_models(fixture_model, tmp_path):
    from keras_vmoe.analysis import collect_routing

    labels = np.arange(8) % 5
    result = collect_routing(fixture_model, (IMAGES, labels), batch_size=8)
    assert [r.expert_index.shape for r in result.layers] == [(8, 17, 1)] * 2
    assert result.layers[0].class_expert_counts.shape == (5, 4)
    # E^3: each member's choice is one more choice of the image's token.
    config = _config(
        name="VisionTransformerMoeEnsemble", ensemble_size=2, group_size=68
    )
    params = {
        "/".join(k): v for k, v in flatten(random_vmoe_params(config, 32))
    }
    ensemble = build_vmoe_model(params, config, 32)
    record = collect_routing(ensemble, (IMAGES, labels), batch_size=8).layers[0]
    assert record.expert_index.shape == (8, 17, 2) and record.top_k == 2
    assert (record.expert_index[..., 0] < 2).all()
    assert (record.expert_index[..., 1] >= 2).all()
    np.testing.assert_allclose(record.router_probs.sum(-1), 1, rtol=1e-5)
    assert record.class_expert_counts.shape == (5, 4)


@pytest.mark.slow
def test_ensemble_classifier_round_trips_through_a_preset_folder(tmp_path):
    from keras_vmoe.models import load_classifier

    config = _config(
        name="VisionTransformerMoeEnsemble",
        ensemble_size=2,
        group_size=68,
        representation_size=24,
    )
    params = {
        "/".join(k): v for k, v in flatten(random_vmoe_params(config, 32))
    }
    model = build_vmoe_model(params, config, 32)
    model.save_to_preset(str(tmp_path / "preset"))
    loaded = load_classifier(str(tmp_path / "preset"))
    assert loaded.backbone.ensemble_size == 2
    assert loaded.representation_size == 24
    np.testing.assert_allclose(
        loaded.predict(IMAGES, batch_size=8, verbose=0),
        model.predict(IMAGES, batch_size=8, verbose=0),
        atol=1e-6,
    )
