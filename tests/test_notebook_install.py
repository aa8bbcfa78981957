"""Every notebook opens with the same install cell, from the repository URL
recorded in pyproject.toml, and loads the shipped presets by name."""

import ast
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
NOTEBOOKS = sorted(n for n in os.listdir(EXAMPLES) if n.endswith(".ipynb"))


def _repository_url():
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as file:
        text = file.read()
    urls = text.split("[project.urls]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^Repository = "([^"]+)"', urls, re.M).group(1)


def _code_cells(name):
    with open(os.path.join(EXAMPLES, name), encoding="utf-8") as file:
        notebook = json.load(file)
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def test_repository_url_is_a_github_https_url():
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", _repository_url())


def test_every_notebook_installs_from_the_repository_in_its_first_cell():
    assert len(NOTEBOOKS) >= 3
    for name in NOTEBOOKS:
        first = _code_cells(name)[0]
        tree = ast.parse(first)
        assignments = {
            node.targets[0].id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        }
        # One variable holds the URL, and it is the project's.
        assert assignments.get("REPO_URL") == _repository_url(), name
        assert first.count("github.com") == 1, name
        assert 'f"keras-vmoe @ git+{REPO_URL}"' in first, name
        assert '"keras-vmoe"]' not in first, name  # not the package index


def test_notebooks_load_shipped_presets_by_name_not_from_the_checkout():
    for name in NOTEBOOKS:
        source = "\n".join(_code_cells(name))
        assert "../weights" not in source and "KERAS_VMOE_WEIGHTS" not in source
        assert '"..", "weights"' not in source
    assert 'ImageClassifier.from_preset("vimoe_mnist")' in "\n".join(
        _code_cells("quickstart.ipynb")
    )
