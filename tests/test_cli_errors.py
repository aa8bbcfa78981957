"""`keras-vmoe` errors: non-zero exit, one line naming the flag or file and
the value, no traceback (unless --debug). No training here."""

import os
import subprocess
import sys

import pytest

from keras_vmoe import cli
from keras_vmoe.models.shipped import shipped_preset_dir

PRESET = shipped_preset_dir("vimoe_mnist")


def run_main(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--epochs", "-1"], ["--epochs", "'-1'"]),
        (["train", "--epochs", "two"], ["--epochs", "'two'"]),
        (["train", "--learning-rate", "nan"], ["--learning-rate", "'nan'"]),
        (["train", "--learning-rate", "-0.1"], ["--learning-rate", "'-0.1'"]),
        (["train", "--weight-decay", "inf"], ["--weight-decay", "'inf'"]),
        (["train", "--layer-decay", "0"], ["--layer-decay", "'0'"]),
        (["train", "--warmup-epochs", "-1"], ["--warmup-epochs", "'-1'"]),
        (["train", "--label-smoothing", "1"], ["--label-smoothing", "'1'"]),
        (["train", "--batch-size", "0"], ["--batch-size", "'0'"]),
        (["train", "--image-size", "-28"], ["--image-size", "'-28'"]),
        (["train", "--max-examples", "0"], ["--max-examples", "'0'"]),
        (["train", "--seed", "-3"], ["--seed", "'-3'"]),
        (["train", "--devices", "0"], ["--devices", "'0'"]),
        (["train", "--devices", "-2"], ["--devices", "'-2'"]),
        (["train", "--expert-parallel", "0"], ["--expert-parallel", "'0'"]),
        (["train", "--expert-parallel", "-4"], ["--expert-parallel", "'-4'"]),
        (["predict", "p", "x.png", "--top", "-1"], ["--top", "'-1'"]),
        (["analyze", "p", "--max-batches", "0"], ["--max-batches", "'0'"]),
    ],
)
def test_bad_numeric_flags_exit_2_with_one_line(argv, expected, capsys):
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for part in expected:
        assert part in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["evaluate", PRESET, "--split", "validaton"], ["--split", "'validaton'"]),
        (["analyze", PRESET, "--split", "valid"], ["--split", "'valid'"]),
        (["evaluate", "no/such/preset"], ["preset", "'no/such/preset'"]),
    ],
)
def test_bad_split_or_preset(argv, expected):
    message = run_main(argv)
    assert message.startswith("error: ") and "\n" not in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max-examples", "64"], ["--max-examples 64", "--batch-size 128"]),
        (
            ["--max-examples", "10", "--batch-size", "32"],
            ["--max-examples 10", "--batch-size 32"],
        ),
    ],
)
def test_max_examples_below_one_batch_names_both_flags(
    argv, expected, tmp_path
):
    output_dir = str(tmp_path / "run")
    message = run_main(["train", "--output-dir", output_dir, *argv])
    assert message.startswith("error: ") and "\n" not in message
    for part in expected:
        assert part in message
    assert not os.path.exists(output_dir)  # refused before any work


def test_output_dir_pointing_at_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    message = run_main(["train", "--output-dir", str(path)])
    assert "--output-dir" in message and repr(str(path)) in message


def test_predict_missing_and_non_image_files(tmp_path):
    missing = str(tmp_path / "missing.png")
    message = run_main(["predict", PRESET, missing])
    assert "image" in message and repr(missing) in message
    not_image = tmp_path / "text.png"
    not_image.write_text("not an image")
    message = run_main(["predict", PRESET, str(not_image)])
    assert "image" in message and repr(str(not_image)) in message
    message = run_main(["predict", PRESET, str(not_image), "--top", "11"])
    assert "--top" in message and "11" in message


def test_folder_without_config_is_not_a_preset(tmp_path):
    message = run_main(["evaluate", str(tmp_path)])
    assert "config.json" in message and repr(str(tmp_path)) in message


def test_debug_reraises_the_original_error(tmp_path):
    with pytest.raises(cli.CliError, match="preset="):
        cli.main(["evaluate", str(tmp_path / "none"), "--debug"])


def test_console_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-c", "from keras_vmoe.cli import entry; entry()",
            "predict", str(tmp_path / "none"), "missing.png",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "image='missing.png'" in result.stderr
