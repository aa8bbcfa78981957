"""The published V-MoE / E^3 presets: the table, `from_preset` through a
download from a local server, a local copy, fine-tuning and the CLI.

A tiny preset entry pointing at the vmoe-written fixture stands in for the
real (100 MB - 1 GB) checkpoints; no network beyond 127.0.0.1.
"""

import copy
import json
import os

import keras
import numpy as np
import pytest

from keras_vmoe.models import set_eval_group_size
from keras_vmoe.models import ViTMoEBackbone
from keras_vmoe.models import ViTMoEImageClassifier
from keras_vmoe.models import list_presets
from keras_vmoe.models.vit_moe import vmoe_presets
from keras_vmoe.models.vit_moe.vmoe_presets import VMOE_PRESETS
from keras_vmoe.models.vit_moe.vmoe_presets import group_size_for
from tests.converters.test_vmoe_format import server  # noqa: F401

FIXTURES = os.path.join(
    os.path.dirname(__file__), "..", "..", "fixtures", "vmoe"
)
with open(os.path.join(FIXTURES, "fixtures.json")) as _file:
    FIXTURE = json.load(_file)["tiny_every2_k1"]
IO = np.load(os.path.join(FIXTURES, "tiny_every2_k1_io.npz"))
NAME = "tiny_every2_k1"

PUBLISHED = {
    # name: (image size, classes, reported top-1 or None, ensemble members)
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": (224, 1000, 73.1, None),
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": (
        384,
        1000,
        75.9,
        None,
    ),
    "vmoe_s32_last2_ilsvrc2012_randaug_medium": (224, 1000, None, None),
    "vmoe_b16_imagenet21k_randaug_strong": (224, 21843, None, None),
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": (
        384,
        1000,
        85.6,
        None,
    ),
    "vmoe_b16_imagenet21k_randaug_strong_ft_cifar10": (128, 10, 98.7, None),
    "eee_s32_last2_ilsvrc2012": (224, 1000, None, 2),
    "eee_s32_last2_ilsvrc2012_ft_cifar100": (128, 100, 81.3, 2),
}


def test_table_lists_every_published_checkpoint():
    assert set(VMOE_PRESETS) == set(PUBLISHED)
    assert set(PUBLISHED) <= set(list_presets())
    for name, (size, classes, top1, members) in PUBLISHED.items():
        preset = VMOE_PRESETS[name]
        model = preset["model"]
        assert vmoe_presets.checkpoint_url(name) == (
            f"https://storage.googleapis.com/vmoe_checkpoints/{name}"
        )
        assert preset["image_size"] == size, name
        assert model["num_classes"] == classes, name
        assert (preset["reported"] or {}).get("top1") == top1, name
        moe = model["encoder"]["moe"]
        assert moe.get("ensemble_size") == members, name
        assert moe["num_experts"] == 8
        top_k = moe["router"]["num_selected_experts"]
        assert top_k == (1 if members else 2), name
        if name.startswith(("vmoe_s32", "eee_s32")):
            # V-MoE "S": 8 blocks of width 512; Last-2 = blocks 5 and 7.
            assert (model["hidden_size"], model["encoder"]["num_layers"]) == (
                512,
                8,
            )
            assert moe["layers"] == [5, 7]
        else:
            assert (model["hidden_size"], model["encoder"]["num_layers"]) == (
                768,
                12,
            )
            assert moe["layers"] == [1, 3, 5, 7, 9, 11]


def test_group_sizes_follow_vmoe_configs():
    # 8 images per group (vmoe_paper/common.py), x members for E^3;
    # 128 images per device group in the E^3 CIFAR-100 fine-tuning.
    light1 = VMOE_PRESETS["vmoe_s32_last2_ilsvrc2012_randaug_light1"]
    assert group_size_for(light1, 224) == 8 * (7 * 7 + 1)
    b16 = VMOE_PRESETS["vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012"]
    assert group_size_for(b16, 384) == 8 * (24 * 24 + 1)
    eee = VMOE_PRESETS["eee_s32_last2_ilsvrc2012_ft_cifar100"]
    assert group_size_for(eee, 128) == 128 * (4 * 4 + 1) * 2


@pytest.mark.slow
def test_published_architecture_builds_without_weights():
    model = ViTMoEImageClassifier.from_preset(
        "eee_s32_last2_ilsvrc2012_ft_cifar100",
        load_weights=False,
        image_size=64,
    )
    backbone = model.backbone
    assert (backbone.num_layers, backbone.hidden_dim, backbone.mlp_dim) == (
        8,
        512,
        2048,
    )
    assert backbone.moe_layer_indices == [5, 7] or list(
        backbone.moe_layer_indices
    ) == [5, 7]
    assert backbone.ensemble_size == 2 and model.representation_size == 512
    assert backbone.get_layer("embedding").position_embedding_grid == (4, 4)
    images = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3))
    probs = np.exp(model.predict(images.astype("float32"), verbose=0))
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)


@pytest.fixture
def tiny_preset(monkeypatch, server):  # noqa: F811
    """A preset entry for the fixture, served by the local server."""
    entry = {
        "description": "test",
        "model": copy.deepcopy(FIXTURE["config"]),
        "image_size": 32,
        "eval_capacity_factor": 1.25,
        "eval_capacity_note": "test",
        "images_per_group": 2,
        "preprocessing": "resize(32)|value_range(-1,1)",
        "dataset": "test",
        "reported": None,
    }
    entry["model"]["encoder"]["moe"].pop("group_size")
    monkeypatch.setitem(VMOE_PRESETS, NAME, entry)
    monkeypatch.setattr(vmoe_presets, "VMOE_BUCKET_URL", server.url)
    for filename in os.listdir(FIXTURES):
        if filename.startswith(NAME + ".") and not filename.endswith(".npz"):
            with open(os.path.join(FIXTURES, filename), "rb") as file:
                server.files[f"/{filename}"] = file.read()
    return server


def _logits(model, images):
    # vmoe's logits route groups of images (batch-level capacity); the
    # preset's default routes every image alone.
    set_eval_group_size(model, model.backbone.group_size)
    return keras.ops.convert_to_numpy(model(images))


@pytest.mark.slow
def test_from_preset_downloads_caches_and_reproduces_vmoe(
    tiny_preset, tmp_path
):
    model = ViTMoEImageClassifier.from_preset(
        NAME, cache_dir=str(tmp_path), progress=False
    )
    assert [path for path, _ in tiny_preset.requests] == [
        f"/{NAME}.index",
        f"/{NAME}.data-00000-of-00002",
        f"/{NAME}.data-00001-of-00002",
    ]
    np.testing.assert_allclose(
        _logits(model, IO["images"]), IO["logits_float32_dispatch"], atol=1e-4
    )
    # The preprocessor takes [0, 255] pixels to vmoe's [-1, 1].
    pixels = (IO["images"] + 1) * 127.5
    converted = keras.ops.convert_to_numpy(
        model.preprocessor.image_converter(pixels)
    )
    np.testing.assert_allclose(converted, IO["images"], atol=1e-5)
    # Second time: from the cache, no request.
    backbone = ViTMoEBackbone.from_preset(
        NAME, cache_dir=str(tmp_path), progress=False
    )
    assert len(tiny_preset.requests) == 3
    assert isinstance(backbone, ViTMoEBackbone) and backbone.ensemble_size == 1


def test_from_preset_offline_says_what_to_download(tiny_preset, tmp_path):
    tiny_preset.files.clear()  # the server answers 404
    with pytest.raises(ValueError, match=r"tiny_every2_k1\.index.*checkpoint="):
        ViTMoEImageClassifier.from_preset(
            NAME, cache_dir=str(tmp_path), progress=False
        )


def test_from_preset_reads_a_local_copy(tiny_preset):
    model = ViTMoEImageClassifier.from_preset(NAME, checkpoint=FIXTURES)
    assert tiny_preset.requests == []
    np.testing.assert_allclose(
        _logits(model, IO["images"]), IO["logits_float32_dispatch"], atol=1e-4
    )
    with pytest.raises(ValueError, match="No vmoe checkpoint index"):
        ViTMoEImageClassifier.from_preset(
            NAME, checkpoint=FIXTURES + "/missing"
        )


def test_from_preset_with_num_classes_starts_fine_tuning(tiny_preset):
    model = ViTMoEImageClassifier.from_preset(
        NAME, checkpoint=FIXTURES, num_classes=3
    )
    assert model.num_classes == 3 and model.pre_logits is None
    layer = model.backbone.transformer_layers[1].mlp
    # vmoe's fine-tuning configurations: capacity factor 1.5.
    assert (layer.capacity_factor, layer.eval_capacity_factor) == (1.5, 1.5)
    assert layer.group_size == 2 * 17 and layer.capacity_multiple_of == 4
