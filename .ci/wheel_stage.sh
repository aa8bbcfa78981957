#!/usr/bin/env bash
# CI stage: the package as a user meets it. Builds a wheel from a clean copy
# of the working tree, installs it (not editable) into a fresh venv, and from
# a folder outside the repository checks that the shipped presets load by
# name, then runs every example script with --smoke and every notebook.
#
# The venv sees the calling interpreter's site-packages (TensorFlow, JAX,
# KerasHub, Jupyter are too slow to install per run), whether that is the
# system Python or itself a virtualenv (`venv --system-site-packages` would
# inherit the base interpreter's packages instead, not the caller's): a
# .pth file in the venv adds the caller's site directories, .pth files
# included, after the venv's own. keras-vmoe itself comes from the wheel:
# pip installs it into the venv with --ignore-installed, the venv's
# site-packages precede the caller's on sys.path, and a development
# install's editable finder is appended after the path finders, so it never
# wins; the stage asserts keras_vmoe.__file__ is inside the venv, and each
# notebook asserts the same in its kernel.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/keras-vmoe-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
export PYTHONNOUSERSITE=1 MPLBACKEND=Agg
export KERAS_VMOE_SMOKE=1 KERAS_VMOE_NOTEBOOK_EXAMPLES=64
unset PYTHONPATH
start=$(date +%s)

echo "== wheel: build from a clean copy of the working tree"
# A copy, so no stale build/ folder of the checkout can leak into the wheel.
mkdir "$work/src"
tar -C "$repo" --exclude=./.git --exclude=./build --exclude=./dist \
  --exclude='*.egg-info' --exclude='__pycache__' --exclude=./runs \
  --exclude=./out -cf - . | tar -C "$work/src" -xf -
python -m pip wheel --quiet --no-deps --no-build-isolation \
  -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/keras_vmoe-*.whl)
python - "$wheel" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for preset in ("vimoe_mnist", "convnext_moe_mnist"):
    for file in ("config.json", "task.json", "task.weights.h5",
                 "model.weights.h5", "manifest.json"):
        path = f"keras_vmoe/presets_data/{preset}/{file}"
        assert path in names, f"{path} is missing from {sys.argv[1]}"
print(f"   {len(names)} files, presets included")
EOF

echo "== wheel: install into a fresh venv"
python -m venv "$work/venv"
venv_python="$work/venv/bin/python"
site_packages=$("$venv_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The calling interpreter's site directories (and user site, where it is
# enabled), appended after the venv's by `site.addsitedir`, which also runs
# their .pth files.
python - "$site_packages/_caller_site_packages.pth" <<'EOF'
import site, sys
dirs = list(site.getsitepackages())
if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
with open(sys.argv[1], "w") as pth:
    pth.write(f"import site; list(map(site.addsitedir, {dirs!r}))\n")
EOF
"$venv_python" -m pip install --quiet --no-deps --ignore-installed \
  --no-index "$wheel"
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv"

mkdir "$work/user"
cd "$work/user"  # outside the repository: nothing relative to it resolves
echo "== wheel: shipped presets by name, from $(pwd)"
python - "$site_packages" <<'EOF'
import os, sys
import keras_hub
import numpy as np
import keras_vmoe
from keras_vmoe import models

where = os.path.abspath(keras_vmoe.__file__)
assert where.startswith(os.path.abspath(sys.argv[1])), (
    f"keras_vmoe was imported from {where}, not from the venv's wheel")
print("   keras_vmoe from", where)
assert {"vimoe_mnist", "convnext_moe_mnist"} <= set(models.list_presets())
images = np.random.default_rng(0).uniform(0, 255, (2, 28, 28, 3))
for name, cls in (("vimoe_mnist", models.ViTMoEImageClassifier),
                  ("convnext_moe_mnist", models.ConvNeXtMoEImageClassifier)):
    expected = keras_hub.models.ImageClassifier.from_preset(name).predict(
        images, verbose=0)
    for model in (cls.from_preset(name), models.load_classifier(name)):
        np.testing.assert_array_equal(model.predict(images, verbose=0),
                                      expected)
    print(f"   {name}: keras_hub, {cls.__name__}, load_classifier agree")
EOF
echo "== wheel: console script"
keras-vmoe --help > /dev/null
echo "   $(command -v keras-vmoe)"

echo "== wheel: example scripts (--smoke) and notebooks, outside the repo"
python "$repo/.ci/run_installed_examples.py" "$repo/examples" "$site_packages"
echo "== wheel stage took $(( $(date +%s) - start )) s"
