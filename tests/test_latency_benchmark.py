"""`benchmarks/latency.py --smoke` runs and prints its table."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "latency.py")


def _run(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO, KERAS_BACKEND="tensorflow")
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_smoke_exits_zero_and_prints_the_table(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    path = tmp_path / "latency.json"
    process = _run("--smoke", "--runtimes", "keras", "litert", "--json", str(path))
    output = process.stdout[-4000:] + process.stderr[-4000:]
    assert process.returncode == 0, output
    assert "== keras-vmoe inference latency (smoke)" in process.stdout
    assert "image_sizes: {'vimoe': 28}" in process.stdout
    headers = [
        line.split() for line in process.stdout.splitlines() if line.startswith("pair ")
    ]
    assert headers == [
        ["pair", "runtime", "batch", "dense", "ms", "MoE", "ms", "MoE", "÷", "dense"]
    ]
    for runtime in ("keras", "litert"):
        for batch in (1, 8):
            rows = [
                line.split()
                for line in process.stdout.splitlines()
                if line.startswith("ViMoE-S vs dense twin")
                and line.split()[4:6] == [runtime, str(batch)]
            ]
            assert len(rows) == 1, (runtime, batch, process.stdout)
            dense_ms, moe_ms, ratio = map(float, rows[0][6:9])
            assert dense_ms > 0 and moe_ms > 0
            assert abs(ratio - moe_ms / dense_ms) < 0.01 * ratio + 0.002
    with open(path) as f:
        results = json.load(f)
    assert results["smoke"] is True
    assert [(r["runtime"], r["batch"]) for r in results["lines"]] == [
        ("keras", 1),
        ("keras", 8),
        ("litert", 1),
        ("litert", 8),
    ]


def _load_latency_module():
    spec = importlib.util.spec_from_file_location("latency_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runtimes", "tensorrt"], "invalid choice: 'tensorrt'"),
        (["--pairs", "resnet"], "invalid choice: 'resnet'"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--batches", "1", "0"], "--batches must be >= 1"),
    ],
)
def test_bad_flags_give_clear_errors(argv, message, capsys):
    latency = _load_latency_module()
    with pytest.raises(SystemExit) as error:
        latency.parse_args(argv)
    assert error.value.code == 2
    assert message in capsys.readouterr().err
