"""`benchmarks/gpu.py --smoke` runs every section on both backends here."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu.py")


def _load_gpu_module():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu = _load_gpu_module()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    # Both backends run in their own processes; CI runs this file in its
    # torch suite, once torch is installed.
    for backend in gpu.BACKENDS:
        if importlib.util.find_spec(backend) is None:
            pytest.skip(f"{backend} is not installed")
    path = tmp_path_factory.mktemp("gpu") / "results.json"
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("KERAS_BACKEND", None)
    process = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--backend", "jax", "torch",
         "--json", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    with open(path) as f:
        return process, json.load(f)


def test_smoke_exits_zero_and_prints_the_table(smoke):
    process, _ = smoke
    output = process.stdout[-4000:] + process.stderr[-4000:]
    assert process.returncode == 0, output
    assert "== keras-vmoe GPU benchmark (smoke)" in process.stdout
    assert "date: " in process.stdout
    assert "[jax] layer" in process.stdout
    assert "failures: 0" in process.stdout


def test_smoke_has_every_section_for_both_backends(smoke):
    _, results = smoke
    for backend in ("jax", "torch"):
        result = results["backends"][backend]
        assert result["returncode"] == 0
        seconds = sum(data["seconds"] for data in result["sections"].values())
        assert result["elapsed_s"] >= seconds
        for section in gpu.SECTIONS:
            data = result["sections"][section]
            assert "error" not in data, (backend, section, data["error"])
            assert data["lines"], (backend, section)


def test_smoke_layer_runs_every_dispatch_mode(smoke):
    _, results = smoke
    for backend in ("jax", "torch"):
        lines = results["backends"][backend]["sections"]["layer"]["lines"]
        top_1 = [
            line
            for line in lines
            if line["config"] == "top-1 cf=1.0" and line["dtype"] == "bfloat16"
        ]
        assert {line["dispatch"] for line in top_1} == set(
            ("auto", "slots", "sorted", "grouped")
        )
        for line in top_1:
            assert line["status"] == "ok", line
            assert line["dispatch_path"], line
            assert line["ratio"] > 0


def test_smoke_fit_is_finite_under_mixed_precision(smoke):
    _, results = smoke
    policies = {"torch": gpu.FIT_POLICIES, "jax": ("mixed_bfloat16",)}
    for backend, expected in policies.items():
        lines = results["backends"][backend]["sections"]["fit"]["lines"]
        for policy in expected:
            ran = [line for line in lines if line["policy"] == policy]
            assert len(ran) == len(gpu.FIT_MODELS)
            for line in ran:
                assert line["status"] == "ok", line
                assert math.isfinite(line["final_loss"])
        scaled = [
            line["loss_scale"]
            for line in lines
            if line["policy"] == "mixed_float16" and line["status"] == "ok"
        ]
        assert set(scaled) <= {"yes"}


def test_smoke_never_imports_tensorflow(smoke):
    _, results = smoke
    for backend in ("jax", "torch"):
        result = results["backends"][backend]
        assert result["tensorflow_imported"] is False
        checks = result["sections"]["checks"]["lines"]
        assert {"check": "tensorflow imported", "subject": "-",
                "result": "False", "status": "ok"} in checks


def test_table_shows_notes_in_place_of_measurements():
    lines = [
        {"config": "top-1", "batch": 2, "status": "ok", "moe_ms": 1.5,
         "ratio": 1.25},
        {"config": "top-2", "batch": 2, "status": "n/a", "note": "n/a: no"},
    ]
    columns = (
        ("config", "config", "{}"),
        ("batch", "B", "{}"),
        ("moe_ms", "MoE ms", "{:.2f}"),
        ("ratio", "ratio", "{:.3f}"),
    )
    table = gpu.format_table(lines, columns).splitlines()
    assert table[0].split() == ["config", "B", "MoE", "ms", "ratio"]
    assert table[2].split() == ["top-1", "2", "1.50", "1.250"]
    assert table[3].split() == ["top-2", "2", "n/a:", "no"]


def test_budget_skips_the_lines_expected_to_end_past_the_deadline():
    now = [0.0]
    budget = gpu.Budget(10, {"layer": 0.5, "model": 0.3}, clock=lambda: now[0])
    step = [2.0]

    def run_case(case):
        now[0] += step[0]
        return {"status": "ok"}

    cases = [{"config": str(i)} for i in range(4)]
    lines = gpu.run_lines(cases, run_case, budget, "layer")
    # Deadline 5: the third case would end at 6.
    assert [line["status"] for line in lines] == [
        "ok", "ok", "skipped", "skipped"
    ]
    assert lines[-1]["note"] == gpu.SKIPPED
    # The model section gets its 3 s and the 1 s the layer section left.
    step[0] = 1.0
    lines = gpu.run_lines(cases, run_case, budget, "model")
    assert [line["status"] for line in lines] == ["ok", "ok", "ok", "skipped"]
    assert budget.begin("checks") == float("inf")


def test_report_counts_skipped_lines_and_failures():
    lines = [
        {"check": "auto dispatch", "subject": "a", "result": "slots",
         "status": "ok"},
        {"check": "no host sync", "subject": "b", "result": "fail",
         "status": "fail", "note": "RuntimeError: synced"},
        {"check": "x", "subject": "c", "status": "skipped",
         "note": gpu.SKIPPED},
    ]
    results = {
        "date": "today", "python": "3", "versions": {"keras": "3"},
        "smoke": False, "requested_backends": ["torch"],
        "sections": ["checks"],
        "backends": {"torch": {
            "returncode": 0, "tensorflow_imported": False,
            "device": {"name": "GPU", "platform": "cuda", "runtime": {}},
            "sections": {"checks": {"seconds": 1.0, "lines": lines}},
        }},
    }
    text = gpu.report(results)
    assert "torch: device GPU (cuda)" in text
    assert f"1 more lines {gpu.SKIPPED}" in text
    assert "failures: 1" in text
    assert "torch checks no host sync b fail: RuntimeError: synced" in text
