"""Runs the examples the way a user meets them, against an installed package.

Called by `.ci/wheel_stage.sh` with the venv's python, from a scratch folder
outside the repository, with keras-vmoe installed from a built wheel:

    python run_installed_examples.py EXAMPLES_DIR SITE_PACKAGES

Every `examples/*.py` runs with `--smoke` and every `examples/*.ipynb`
executes (copied into a scratch folder first, with only tests/fixtures
beside them, so nothing else relative to the repository can be found). Each notebook gets one cell prepended that fails
unless `keras_vmoe` is imported from SITE_PACKAGES, so the kernel provably
runs the installed wheel and not the source tree. Prints one line per item
with its time; exits 1 if any failed.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHECK_CELL = """import keras_vmoe, os
assert os.path.abspath(keras_vmoe.__file__).startswith({prefix!r}), (
    "the notebook must run the installed wheel, not "
    + keras_vmoe.__file__
)"""


def run_script(path, scratch):
    result = subprocess.run(
        [sys.executable, path, "--smoke"],
        cwd=scratch,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def run_notebook(path, scratch, site_packages):
    import nbformat
    from nbclient import NotebookClient

    with open(path, encoding="utf-8") as file:
        document = nbformat.read(file, as_version=4)
    check = CHECK_CELL.format(prefix=os.path.abspath(site_packages))
    document.cells.insert(0, nbformat.v4.new_code_cell(check))
    client = NotebookClient(
        document,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": scratch}},
    )
    try:
        client.execute()
    except Exception as error:  # any cell error fails this notebook
        return False, str(error)[-3000:]
    return True, ""


def main(examples, site_packages):
    names = sorted(os.listdir(examples))
    scripts = [n for n in names if n.endswith(".py")]
    notebooks = [n for n in names if n.endswith(".ipynb")]
    if not scripts or not notebooks:
        print(f"no examples found in {examples!r}", file=sys.stderr)
        return 1
    failures = []
    root = tempfile.mkdtemp(prefix="keras-vmoe-examples-")
    copied = os.path.join(root, "examples")
    shutil.copytree(examples, copied)
    # upcycle_and_train.py --smoke reads the tiny dense checkpoints of
    # ../tests/fixtures (a user's copy of the repository has them); only
    # that folder of the repository travels with the examples.
    fixtures = os.path.join(os.path.dirname(examples), "tests", "fixtures")
    shutil.copytree(fixtures, os.path.join(root, "tests", "fixtures"))
    for name in scripts + notebooks:
        scratch = tempfile.mkdtemp(dir=root)
        start = time.time()
        path = os.path.join(copied, name)
        if name.endswith(".py"):
            ok, log = run_script(path, scratch)
        else:
            ok, log = run_notebook(path, scratch, site_packages)
        status = "ok" if ok else "FAILED"
        print(f"  {status:6} {time.time() - start:6.1f} s  {name}", flush=True)
        if not ok:
            failures.append(name)
            print(log, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"failed": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} EXAMPLES_DIR SITE_PACKAGES")
    sys.exit(main(sys.argv[1], sys.argv[2]))
