"""`examples/analyze_routing.py --smoke` and the notebook's structure."""

import json
import os
import runpy
import sys

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def test_smoke_example_writes_report_and_surgery(
    tmp_path, monkeypatch, capsys
):
    script = os.path.join(EXAMPLES, "analyze_routing.py")
    monkeypatch.setattr(
        sys, "argv", [script, "--smoke", "--out", str(tmp_path)]
    )
    runpy.run_path(script, run_name="__main__")
    assert "trained 2 steps" in capsys.readouterr().out
    assert (tmp_path / "index.md").exists()
    surgery = json.loads((tmp_path / "surgery.json").read_text())
    assert set(surgery["variants"]) == {
        "original",
        "pruned 1 least specialised",
        "all experts merged",
    }


def test_notebook_installs_on_colab_first_and_has_no_outputs():
    with open(os.path.join(EXAMPLES, "analyze_routing.ipynb")) as handle:
        notebook = json.load(handle)
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert "keras-vmoe @ git+{REPO_URL}" in "".join(code_cells[0]["source"])
    assert all(
        not c["outputs"] and c["execution_count"] is None for c in code_cells
    )
