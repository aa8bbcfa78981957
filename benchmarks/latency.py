"""Inference latency at batch 1 and 8: MoE ÷ dense, in Keras and in the
exported runtimes.

Usage:
    python benchmarks/latency.py                          # TensorFlow, every runtime
    python benchmarks/latency.py --image-size 112 --runtimes keras onnx
    KERAS_BACKEND=jax python benchmarks/latency.py --runtimes keras
    KERAS_BACKEND=torch python benchmarks/latency.py
    python benchmarks/latency.py --smoke                  # tiny check, < 1 minute (TF)

Three pairs of classifiers with random weights and 1000 classes (no
downloads), each MoE model against a dense model of the same architecture:

- "vit": ViT-S/16 (`vit_small_patch16`) vs ViT-S/16 E8 Last-2 top-2,
  token routing (`vit_moe_small_patch16_e8_last2_top2`);
- "vimoe": ViMoE-S (`vimoe_small_patch14_e8_last2_shared`: image
  routing, shared expert) vs its dense twin
  (`keras_vmoe.converters.vit.dense_twin`: the same backbone config
  without MoE blocks, i.e. DINOv2 ViT-S/14);
- "convnext": ConvNeXt-T (`convnext_tiny`) vs MoE-ConvNeXt-T E8 Last-2
  (`convnext_moe_tiny_e8_last2`).

The MoE models run with their inference defaults: every MoE layer routes
each image on its own (`eval_group_size="image"`).

Runtimes:

- "keras": `model.predict_on_batch(x)` with NumPy inputs, i.e. the
  function `predict` runs for one batch: on TensorFlow the
  `tf.function` of `predict_step`, with XLA where `model.jit_compile`
  resolves to True (printed); on JAX the jitted `predict_step`; on torch
  eager under `torch.no_grad()`.
- "tf_saved_model", "onnx", "litert": the artifact of
  `keras_vmoe.export.export_classifier(model, path, format,
  include_preprocessing=False)` (the network only), run with
  `tf.saved_model.load(path).serve(x)`, `onnxruntime.InferenceSession`
  and the `ai_edge_litert` interpreter (resized to the batch). Only the
  formats the current backend exports are available (see
  `keras_vmoe/export.py`); ONNX Runtime and LiteRT use `--threads`
  threads.

Timing: per pair, runtime and batch size, 2 warmup calls of each model,
then the median of `--rounds` calls, dense and MoE alternating
(`benchmarks/_timing.py`). Image sizes are rounded down to a multiple of
each model's patch size (ConvNeXt: 32) and printed.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import interleaved_median_times  # noqa: E402

from keras_vmoe.converters.vit import dense_twin  # noqa: E402
from keras_vmoe.export import check_export_format  # noqa: E402
from keras_vmoe.export import export_classifier  # noqa: E402
from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier  # noqa: E402
from keras_vmoe.models.vit_moe import ViTMoEImageClassifier  # noqa: E402

RUNTIMES = ("keras", "tf_saved_model", "onnx", "litert")
# The Python package each runtime needs besides Keras.
RUNTIME_PACKAGES = {
    "keras": None,
    "tf_saved_model": "tensorflow",
    "onnx": "onnxruntime",
    "litert": "ai_edge_litert",
}
EXTENSIONS = {"tf_saved_model": "", "onnx": ".onnx", "litert": ".tflite"}
NUM_CLASSES = 1000
SMOKE_IMAGE_SIZE = 32
# --smoke keeps the architectures but with fewer blocks (the MoE blocks
# stay the last 2).
SMOKE_VIT_LAYERS = 3
SMOKE_CONVNEXT_DEPTHS = (1, 1, 2, 1)
# and by default one pair and the runtimes that export fast (tf2onnx takes
# about 20 s per MoE model even then), to finish within a minute.
SMOKE_PAIRS = ("vimoe",)
SMOKE_RUNTIMES = ("keras", "litert")


def _vit(preset, size, smoke):
    overrides = dict(image_shape=(size, size, 3))
    if smoke:
        overrides["num_layers"] = SMOKE_VIT_LAYERS
    return ViTMoEImageClassifier.from_preset(
        preset, num_classes=NUM_CLASSES, load_weights=False, **overrides
    )


def _convnext(preset, size, smoke):
    overrides = dict(image_shape=(size, size, 3))
    if smoke:
        overrides["depths"] = SMOKE_CONVNEXT_DEPTHS
    return ConvNeXtMoEImageClassifier.from_preset(
        preset, num_classes=NUM_CLASSES, load_weights=False, **overrides
    )


def _vimoe_pair(size, smoke):
    moe = _vit("vimoe_small_patch14_e8_last2_shared", size, smoke)
    dense = ViTMoEImageClassifier(dense_twin(moe.backbone), num_classes=NUM_CLASSES)
    return dense, moe


# key -> (table name, size multiple, builder of (dense, MoE) at a size)
PAIRS = {
    "vit": (
        "ViT-S/16 vs E8 Last-2 top-2",
        16,
        lambda size, smoke: (
            _vit("vit_small_patch16", size, smoke),
            _vit("vit_moe_small_patch16_e8_last2_top2", size, smoke),
        ),
    ),
    "vimoe": ("ViMoE-S vs dense twin", 14, _vimoe_pair),
    "convnext": (
        "ConvNeXt-T vs MoE-ConvNeXt-T",
        32,
        lambda size, smoke: (
            _convnext("convnext_tiny", size, smoke),
            _convnext("convnext_moe_tiny_e8_last2", size, smoke),
        ),
    ),
}


def available_runtimes(backend=None):
    """The runtimes of `RUNTIMES` that run here: "keras", and each format
    the backend exports whose runtime package is installed."""
    import importlib.util

    available = ["keras"]
    for runtime in RUNTIMES[1:]:
        try:
            check_export_format(runtime, backend)
        except ValueError:
            continue
        if importlib.util.find_spec(RUNTIME_PACKAGES[runtime]) is None:
            continue
        if runtime == "onnx" and importlib.util.find_spec("tf2onnx") is None:
            continue
        available.append(runtime)
    return available


def _unavailable_reason(runtime):
    try:
        check_export_format(runtime)
    except ValueError as error:
        return str(error)
    packages = [RUNTIME_PACKAGES[runtime]] + (["tf2onnx"] if runtime == "onnx" else [])
    return f"It needs the Python package(s) {packages}."


def _keras_runner(model):
    def prepare(batch):
        return lambda x: model.predict_on_batch(x)

    return prepare


def _saved_model_runner(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)  # kept alive by the closures

    def prepare(batch):
        def run(x):
            return loaded.serve(tf.constant(x)).numpy()

        run.loaded = loaded
        return run

    return prepare


def _onnx_runner(path, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        path, options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name

    def prepare(batch):
        return lambda x: session.run(None, {name: x})[0]

    return prepare


def _litert_runner(path, threads):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    input_index = interpreter.get_input_details()[0]["index"]

    def prepare(batch):
        shape = list(interpreter.get_input_details()[0]["shape"])
        interpreter.resize_tensor_input(input_index, [batch] + shape[1:])
        interpreter.allocate_tensors()
        output_index = interpreter.get_output_details()[0]["index"]

        def run(x):
            interpreter.set_tensor(input_index, x)
            interpreter.invoke()
            return interpreter.get_tensor(output_index)

        return run

    return prepare


def make_runner(runtime, model, export_dir, label, threads):
    """(prepare, export seconds): `prepare(batch)` gives a function from a
    float32 NumPy batch to the outputs, with any waiting done."""
    if runtime == "keras":
        return _keras_runner(model), 0.0
    path = os.path.join(export_dir, f"{label}_{runtime}{EXTENSIONS[runtime]}")
    start = time.perf_counter()
    export_classifier(model, path, runtime, include_preprocessing=False)
    seconds = time.perf_counter() - start
    if runtime == "tf_saved_model":
        return _saved_model_runner(path), seconds
    if runtime == "onnx":
        return _onnx_runner(path, threads), seconds
    return _litert_runner(path, threads), seconds


def _versions(runtimes):
    versions = {"keras": keras.__version__}
    backend = keras.backend.backend()
    packages = {backend} | {RUNTIME_PACKAGES[r] for r in runtimes if r != "keras"}
    if "onnx" in runtimes:
        packages.add("tf2onnx")
    for package in sorted(packages):
        try:
            module = __import__(package)
            versions[package] = getattr(module, "__version__", "?")
        except ImportError:
            versions[package] = "not installed"
    return versions


def format_table(lines):
    header = ("pair", "runtime", "batch", "dense ms", "MoE ms", "MoE ÷ dense")
    rows = [
        (
            line["pair"],
            line["runtime"],
            str(line["batch"]),
            f"{line['dense_ms']:.2f}",
            f"{line['moe_ms']:.2f}",
            f"{line['ratio']:.3f}",
        )
        for line in lines
    ]
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(6)]

    def fmt(row):
        left = [row[i].ljust(widths[i]) for i in range(2)]
        right = [row[i].rjust(widths[i]) for i in range(2, 6)]
        return "  ".join(left + right)

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([fmt(header), rule] + [fmt(row) for row in rows])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        choices=tuple(PAIRS),
        help="model pairs to time (default: all; with --smoke: "
        f"{' '.join(SMOKE_PAIRS)})",
    )
    parser.add_argument(
        "--runtimes",
        "--formats",
        nargs="+",
        choices=RUNTIMES,
        help="runtimes to time (default: every one available on this "
        f"backend; with --smoke: those of {' '.join(SMOKE_RUNTIMES)} available)",
    )
    parser.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=[1, 8],
        help="batch sizes (default: 1 8)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="input height and width (default 224), rounded down per model",
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="timed calls per model (median)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="ONNX Runtime and LiteRT threads (default: the CPUs this "
        "process may use)",
    )
    parser.add_argument(
        "--export-dir", help="keep the exported artifacts here (default: a temp dir)"
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_IMAGE_SIZE}x{SMOKE_IMAGE_SIZE} images, 1 round, 1 warmup, "
        f"models cut to {SMOKE_VIT_LAYERS} ViT blocks / ConvNeXt depths "
        f"{SMOKE_CONVNEXT_DEPTHS}; a check that the script runs, not a "
        "measurement",
    )
    args = parser.parse_args(argv)
    for name in ("image_size", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if any(batch < 1 for batch in args.batches):
        parser.error(f"--batches must be >= 1, got {args.batches}")
    available = available_runtimes()
    if args.pairs is None:
        args.pairs = list(SMOKE_PAIRS if args.smoke else PAIRS)
    args.pairs = list(dict.fromkeys(args.pairs))
    if args.runtimes is None:
        args.runtimes = [r for r in available if not args.smoke or r in SMOKE_RUNTIMES]
    else:
        for runtime in args.runtimes:
            if runtime not in available:
                parser.error(
                    f"runtime {runtime!r} is not available here; available on "
                    f"the {keras.backend.backend()} backend: {available}. "
                    + _unavailable_reason(runtime)
                )
        args.runtimes = list(dict.fromkeys(args.runtimes))
    if args.smoke:
        args.image_size = SMOKE_IMAGE_SIZE
        args.rounds = 1
        args.warmup = 1
    return args


def main(argv=None):
    args = parse_args(argv)
    backend = keras.backend.backend()
    sizes = {
        key: args.image_size // PAIRS[key][1] * PAIRS[key][1] for key in args.pairs
    }
    for key, size in sizes.items():
        if size < 1:
            raise SystemExit(
                f"--image-size {args.image_size} is smaller than the "
                f"{PAIRS[key][0]} models' multiple {PAIRS[key][1]}"
            )
    meta = {
        "date": datetime.date.today().isoformat(),
        "backend": backend,
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPU(s) "
        f"usable of {os.cpu_count()}",
        "versions": _versions(args.runtimes),
        "runtimes": args.runtimes,
        "batches": args.batches,
        "image_sizes": sizes,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "smoke": args.smoke,
    }
    print(f"== keras-vmoe inference latency{' (smoke)' if args.smoke else ''}")
    for key, value in meta.items():
        print(f"{key}: {value}")
    sys.stdout.flush()

    export_dir = args.export_dir or tempfile.mkdtemp(prefix="vmoe_latency_")
    os.makedirs(export_dir, exist_ok=True)
    lines = []
    try:
        for key in args.pairs:
            name, _, build = PAIRS[key]
            dense, moe = build(sizes[key], args.smoke)
            models = {"dense": dense, "moe": moe}
            for runtime in args.runtimes:
                runners, export_s = {}, 0.0
                for label, model in models.items():
                    runners[label], seconds = make_runner(
                        runtime, model, export_dir, f"{key}_{label}", args.threads
                    )
                    export_s += seconds
                notes = {}
                if runtime == "keras":
                    notes["jit_compile"] = {
                        label: bool(model.jit_compile)
                        for label, model in models.items()
                    }
                for batch in args.batches:
                    x = (
                        np.random.default_rng(0)
                        .standard_normal((batch, sizes[key], sizes[key], 3))
                        .astype("float32")
                    )
                    functions = {label: runners[label](batch) for label in models}
                    times = interleaved_median_times(
                        functions, x, rounds=args.rounds, warmup=args.warmup
                    )
                    line = dict(
                        pair=name,
                        key=key,
                        runtime=runtime,
                        batch=batch,
                        image_size=sizes[key],
                        dense_ms=1000 * times["dense"],
                        moe_ms=1000 * times["moe"],
                        ratio=times["moe"] / times["dense"],
                        export_s=export_s,
                        **notes,
                    )
                    lines.append(line)
                    print(
                        f"{name} | {runtime} | batch {batch}: dense "
                        f"{line['dense_ms']:.2f} ms, MoE {line['moe_ms']:.2f} ms, "
                        f"MoE ÷ dense {line['ratio']:.3f}"
                        + (f" (export {export_s:.0f} s)" if export_s else "")
                        + (f" jit_compile={notes['jit_compile']}" if notes else ""),
                        flush=True,
                    )
                del runners
    finally:
        if not args.export_dir:
            shutil.rmtree(export_dir, ignore_errors=True)
    print()
    print(format_table(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta, lines=lines), f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
