"""Every example script runs with --smoke; every notebook executes."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = sorted(
    name for name in os.listdir(EXAMPLES) if name.endswith(".py")
)
NOTEBOOKS = sorted(
    name for name in os.listdir(EXAMPLES) if name.endswith(".ipynb")
)


def _environment():
    return dict(
        os.environ,
        KERAS_VMOE_SMOKE="1",
        KERAS_VMOE_NOTEBOOK_EXAMPLES="64",
        MPLBACKEND="Agg",
        PYTHONPATH=ROOT,
    )


def test_examples_are_found():
    assert len(SCRIPTS) >= 4 and len(NOTEBOOKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_smoke(script, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), "--smoke"],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Every smoke run trains: a run on zero batches must not pass.
    assert re.search(r"^trained [1-9]\d* steps$", result.stdout, re.M), (
        result.stdout[-3000:]
    )


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_executes(notebook, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    for name, value in _environment().items():
        monkeypatch.setenv(name, value)
    with open(os.path.join(EXAMPLES, notebook)) as file:
        document = nbformat.read(file, as_version=4)
    client = NotebookClient(
        document,
        timeout=900,
        kernel_name="python3",
        # Run in a scratch folder: notebooks write figures to their cwd.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    # Notebooks are committed without outputs.
    with open(os.path.join(EXAMPLES, notebook)) as file:
        saved = nbformat.read(file, as_version=4)
    assert all(
        not cell.get("outputs") for cell in saved.cells if cell.cell_type == "code"
    ), f"{notebook} is committed with outputs"
