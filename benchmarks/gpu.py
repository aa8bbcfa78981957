"""The package on one GPU: MoE layer and model speed against dense,
mixed-precision training, and what dispatch runs on the device.

Usage:
    python benchmarks/gpu.py                      # JAX then torch
    python benchmarks/gpu.py --backend torch --sections layer checks
    python benchmarks/gpu.py --budget-s 300 --json results.json
    python benchmarks/gpu.py --smoke              # tiny grid, any CPU

The parent process starts one subprocess per backend (`KERAS_BACKEND` is
fixed per process), each writes its results as JSON; the parent merges
them into one file (`--json`, default `gpu_results.json`), prints a
plain-text table and exits with status 1 when a section failed, listing
the failures at the end ("n/a" and "skipped" lines are not failures).

Sections:
- `layer`: forward + backward (training mode, with the input gradient,
  as `benchmarks/moe_layer.py` measures it) of each MoE configuration
  against a dense FFN of the same active parameters, timed interleaved in
  the same run (`benchmarks/_timing.py`): token top-1 at capacity factor
  1.0 and 1.25, token top-2 at 1.0, dropless token top-1, dropless image
  top-1, Soft MoE and Expert Choice, T=197, h=4d, E=8, in float32 and
  under the "mixed_bfloat16" policy, B=256 before B=32 and d=384 before
  d=768. Top-k configurations run every dispatch mode of
  `keras_vmoe.layers.dispatch.DISPATCH_MODES`; a mode the layer refuses
  on this device (e.g. torch's grouped matmul in float32 on a GPU) is
  recorded as "n/a" with the message; "auto" records the path it ran
  (`layer.dispatch_path`). Peak memory of the step: XLA's memory analysis
  of the compiled step on JAX (temporaries and gradients, on any device),
  the CUDA allocator's peak above the resident tensors on torch with
  CUDA, none with torch on a CPU.
- `model`: training-step (forward, backward and AdamW update through
  `train_on_batch`) and inference (`predict_on_batch`) images/s of MoE
  models against their dense baselines, B=256, 224x224, mixed_bfloat16,
  random weights: ViT-S/16 vs ViT-S/16 E8 Last-2 top-2, ConvNeXt-T vs
  MoE-ConvNeXt-T E8 Last-2, DINOv2 ViT-S/14 vs ViMoE N8 L2 shared. Beside
  the speed ratio (MoE images/s / dense images/s) it prints the FLOP ratio
  (MoE active FLOPs / dense FLOPs, the presets' counts or
  `keras_vmoe.models.stats.model_stats`) and the speed ratio over the one
  the FLOPs allow (speed ratio x FLOP ratio; 1.0 means the MoE model
  runs as fast as its FLOPs say).
- `fit`: mixed precision end to end: the `vimoe_mnist` and
  `convnext_moe_mnist` recipes under "mixed_bfloat16" and
  "mixed_float16" (whose `compile` must wrap the optimizer in a
  `LossScaleOptimizer`) fit random images for a number of steps; then the
  loss, every weight and the outputs must be finite, every router must
  compute in float32 and every MoE layer in the low precision. Reports
  steps/s (after the first, compiling, step) and the loss Keras logs at
  the last step (the epoch's running mean). `fit` is `keras.Model.fit`
  on pre-scaled arrays: the KerasHub task's own `fit` (and keras-vmoe's
  shuffling one) would build a `tf.data` pipeline. On a CPU, JAX's
  missing float16 dot ("F16_F16_F32 ... dot_general") is recorded as
  "n/a"; on a GPU every error is a failure.
- `checks`: the path "auto" takes for each configuration, dtype and
  batch size on this device; on JAX, the ragged dots left in the
  compiled forward + backward of a grouped-dispatch layer;
  `grouped_matmul_is_fast` for the grid's first shape; on torch with
  CUDA, a training call + backward of the "auto", "grouped" and "slots"
  paths under `torch.cuda.set_sync_debug_mode("error")` (a host
  synchronisation there is a failure); and whether TensorFlow was
  imported.

Targets (bfloat16, B=256, on the GPU): layer forward + backward at most
1.10x dense at capacity factor 1.0, 1.20x at 1.25 and 1.25x dropless;
model training throughput at least 0.95 of the speed ratio the FLOPs
allow (speed ratio x FLOP ratio >= 0.95).

Every backend process has a time budget (`--budget-s`): `layer`, `model`
and `fit` get 40, 35 and 25 % of it, plus what the sections before them
left unused (`checks` is not budgeted). A line expected (from the
previous line's time) to end past its section's time is not started and
counts as "skipped (budget)"; the first line of a section always runs.
The grid is ordered by importance, so the lines skipped are the least
important.

It never imports TensorFlow (the GPU machines have none): the backend
processes refuse any `tensorflow` import, as if it were not installed,
and report whether it got imported anyway. `--smoke` runs a tiny grid,
tiny models and a few fit steps, the backends side by side, exercising
every section on a CPU in under a minute; its numbers are not GPU
figures.
"""

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

BACKENDS = ("jax", "torch")
SECTIONS = ("layer", "model", "fit", "checks")
# Each budgeted section's share of the budget.
SECTION_SHARES = {"layer": 0.4, "model": 0.35, "fit": 0.25}
DEFAULT_BUDGET_S = 150.0
SKIPPED = "skipped (budget)"
# The one error tolerated on a CPU: XLA:CPU has no float16 dot.
CPU_FLOAT16_ERROR = "F16_F16_F32"


# === Budget =================================================================


class Budget:
    """Time of the budgeted sections: each gets its share of the budget
    from when it starts, plus what the sections before it left unused (a
    section that overran takes nothing from the next). Sections outside
    `shares` are not budgeted."""

    def __init__(self, seconds, shares=None, clock=time.monotonic):
        self.seconds = seconds
        self.shares = dict(SECTION_SHARES if shares is None else shares)
        self.clock = clock
        self.unused = 0.0

    def begin(self, section):
        """The deadline of `section`, starting now."""
        if section not in self.shares:
            return math.inf
        share = self.shares[section] * self.seconds + self.unused
        self.unused = 0.0
        return self.clock() + share

    def end(self, deadline):
        """Passes the time left before `deadline` on to the next section."""
        if deadline != math.inf:
            self.unused = max(0.0, deadline - self.clock())


def run_lines(cases, run_case, budget, section):
    """Runs `run_case(case)` for each case while it is expected to end
    before the section's deadline (expected to take as long as the
    previous case); the others become `skipped (budget)` lines.

    `run_case` returns a dict (one line) or a list of dicts (several
    lines), each merged into a copy of the case; an exception becomes an
    "error" line.
    """
    deadline = budget.begin(section)
    lines = []
    last = 0.0
    for case in cases:
        if budget.clock() + last >= deadline:
            lines.append(dict(case, status="skipped", note=SKIPPED))
            continue
        start = budget.clock()
        try:
            result = run_case(case)
        except Exception as error:  # noqa: BLE001 - recorded as a failure
            traceback.print_exc()
            result = {"status": "error", "note": _message(error)}
        last = budget.clock() - start
        for line in result if isinstance(result, list) else [result]:
            lines.append(dict(case, **line))
    budget.end(deadline)
    return lines


def _message(error, limit=160):
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# === No TensorFlow ==========================================================


TENSORFLOW_MODULES = ("tensorflow", "tensorflow_text", "tensorflow_datasets")


def refuse_tensorflow():
    """Makes `import tensorflow` fail as if it were not installed (a `None`
    entry in `sys.modules`, Python's own way): optional imports, such as
    KerasHub's, take their no-TensorFlow path, as on the GPU machines, and
    a required one fails loudly."""
    for name in TENSORFLOW_MODULES:
        sys.modules.setdefault(name, None)


def tensorflow_imported():
    """Whether a real TensorFlow module got imported."""
    return sys.modules.get("tensorflow") is not None


# === Table ==================================================================

LAYER_COLUMNS = (
    ("config", "config", "{}"),
    ("batch", "B", "{}"),
    ("width", "d", "{}"),
    ("dtype", "dtype", "{}"),
    ("dispatch", "dispatch", "{}"),
    ("dispatch_path", "path", "{}"),
    ("moe_ms", "MoE ms", "{:.2f}"),
    ("dense_ms", "dense ms", "{:.2f}"),
    ("ratio", "ratio", "{:.3f}"),
    ("peak_mib", "peak MiB", "{:.1f}"),
    ("dense_peak_mib", "dense MiB", "{:.1f}"),
)
MODEL_COLUMNS = (
    ("pair", "pair", "{}"),
    ("mode", "mode", "{}"),
    ("moe_images_s", "MoE im/s", "{:.1f}"),
    ("dense_images_s", "dense im/s", "{:.1f}"),
    ("speed_ratio", "speed", "{:.3f}"),
    ("flop_ratio", "FLOP ratio", "{:.3f}"),
    ("speed_x_flops", "speed x FLOPs", "{:.3f}"),
)
FIT_COLUMNS = (
    ("model", "model", "{}"),
    ("policy", "policy", "{}"),
    ("steps", "steps", "{}"),
    ("steps_s", "steps/s", "{:.2f}"),
    ("final_loss", "loss", "{:.4f}"),
    ("loss_scale", "loss scale", "{}"),
)
CHECK_COLUMNS = (
    ("check", "check", "{}"),
    ("subject", "subject", "{}"),
    ("result", "result", "{}"),
)
COLUMNS = {
    "layer": LAYER_COLUMNS,
    "model": MODEL_COLUMNS,
    "fit": FIT_COLUMNS,
    "checks": CHECK_COLUMNS,
}


def _cell(line, key, spec):
    value = line.get(key)
    if value is None:
        return "-"
    try:
        return spec.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_table(lines, columns):
    """Plain-text table, one row per line. A line whose status is not "ok"
    keeps its identifying cells (the plain "{}" columns it has, up to the
    first it lacks) and shows its note in place of the measurements."""
    header = [title for _, title, _ in columns]
    rows = []
    for line in lines:
        cells = [_cell(line, key, spec) for key, _, spec in columns]
        note = None
        if line.get("status", "ok") != "ok":
            keep = 0
            while (
                keep < len(columns)
                and columns[keep][2] == "{}"
                and columns[keep][0] in line
            ):
                keep += 1
            cells, note = cells[:keep], line.get("note") or line["status"]
        rows.append((cells, note))
    widths = [len(title) for title in header]
    for cells, _ in rows:
        for i, cell in enumerate(cells):
            widths[i] = max(widths[i], len(cell))
    out = ["  ".join(t.ljust(w) for t, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for cells, note in rows:
        padded = [c.ljust(w) for c, w in zip(cells, widths)]
        out.append("  ".join(padded + ([note] if note else [])).rstrip())
    return "\n".join(out)


def header_lines(results):
    """Date, device and versions, from the parent and each backend."""
    lines = [
        f"date: {results['date']}",
        f"python {results['python']}  "
        + "  ".join(f"{k} {v}" for k, v in results["versions"].items()),
    ]
    for backend, result in results["backends"].items():
        info = result.get("device") or {}
        runtime = info.get("runtime", {}).items()
        lines.append(
            f"{backend}: device {info.get('name', '?')} "
            f"({info.get('platform', '?')}), "
            + ", ".join(f"{k} {v}" for k, v in runtime)
            + f"; {result.get('elapsed_s', '?')} s in all"
        )
    return lines


def report(results):
    """The whole plain-text report of merged results."""
    out = ["== keras-vmoe GPU benchmark" + (" (smoke)" * results["smoke"])]
    out += header_lines(results)
    for backend, result in results["backends"].items():
        for section in SECTIONS:
            data = result.get("sections", {}).get(section)
            if data is None:
                continue
            out.append("")
            out.append(
                f"[{backend}] {section} ({data.get('seconds', 0):.1f} s)"
            )
            if data.get("error"):
                out.append(f"  section error: {data['error']}")
            shown = [
                line
                for line in data.get("lines", [])
                if line.get("status") != "skipped"
            ]
            if shown:
                out.append(format_table(shown, COLUMNS[section]))
            skipped = len(data.get("lines", [])) - len(shown)
            if skipped:
                out.append(f"{skipped} more lines {SKIPPED}")
        out.append(
            f"[{backend}] tensorflow imported: "
            f"{result.get('tensorflow_imported')}"
        )
    failures = collect_failures(results)
    out.append("")
    out.append(f"failures: {len(failures)}")
    out += [f"  {failure}" for failure in failures]
    return "\n".join(out)


def collect_failures(results):
    """Every failure of the merged results, one line each."""
    failures = []
    for backend in results["requested_backends"]:
        result = results["backends"].get(backend)
        if result is None:
            failures.append(f"{backend}: no result")
            continue
        failures += _backend_failures(backend, result, results["sections"])
    return failures


def _backend_failures(backend, result, sections=None):
    failures = []
    if result.get("returncode"):
        failures.append(
            f"{backend}: process failed (exit {result['returncode']})"
        )
    if result.get("tensorflow_imported"):
        failures.append(f"{backend}: tensorflow imported")
    for section in sections or result.get("sections", {}):
        data = result.get("sections", {}).get(section)
        if data is None:
            failures.append(f"{backend} {section}: no result")
            continue
        if data.get("error"):
            failures.append(f"{backend} {section}: {data['error']}")
        for line in data.get("lines", []):
            if line.get("status") in ("error", "fail"):
                ident = " ".join(
                    str(line[key])
                    for key, _, spec in COLUMNS[section]
                    if spec == "{}" and key in line
                )
                failures.append(
                    f"{backend} {section} {ident}: {line.get('note')}"
                )
    return failures


# === Parent =================================================================


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_parent(args):
    json_path = os.path.abspath(args.json or "gpu_results.json")
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("keras", "keras-hub", "jax", "jaxlib", "torch")
            if _version(name)
        },
        "smoke": args.smoke,
        "budget_s": args.budget_s,
        "requested_backends": list(args.backend),
        "sections": list(args.sections),
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        # One backend at a time, so neither slows the other's timings;
        # side by side under `--smoke`, whose numbers are no measurements.
        running = []
        for backend in args.backend:
            running.append(_start_backend(backend, args, folder))
            if not args.smoke:
                results["backends"][backend] = _finish_backend(*running.pop())
        for started in running:
            results["backends"][started[0]] = _finish_backend(*started)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    print(report(results))
    print(f"results: {json_path}")
    return 1 if collect_failures(results) else 0


def _start_backend(backend, args, folder):
    out = os.path.join(folder, f"{backend}.json")
    log = os.path.join(folder, f"{backend}.log")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        out,
        "--budget-s",
        str(args.budget_s),
        "--sections",
        *args.sections,
    ]
    if args.smoke:
        command.append("--smoke")
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.smoke:
        # Side by side on a CPU: one thread each, not two fighting for
        # every core.
        env.setdefault("OMP_NUM_THREADS", "1")
        # XLA:CPU compiles several times faster without LLVM's costly
        # optimisations; smoke numbers are no measurements anyway.
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
            " --xla_llvm_disable_expensive_passes=true"
        ).strip()
    # JAX allocates GPU memory on demand (no 75 % preallocation).
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env=env, stderr=stderr)
    return backend, process, out, log


def _finish_backend(backend, process, out, log):
    code = process.wait()
    result = {}
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    result["returncode"] = code
    if code or _backend_failures(backend, result):
        with open(log) as f:
            tail = f.read()[-4000:]
        print(f"--- {backend} stderr (tail) ---\n{tail}", file=sys.stderr)
    return result


# === Worker: shared ==========================================================


def _worker_imports():
    """Imports the benchmark helpers (after the TensorFlow refusal)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _timing

    return _timing


def device_info():
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        runtime = {"jax": jax.__version__}
        try:
            version = str(device.client.platform_version)
            runtime["platform_version"] = " ".join(version.split())
        except AttributeError:
            pass
        return {
            "name": getattr(device, "device_kind", str(device)),
            "platform": device.platform,
            "runtime": runtime,
        }
    import torch

    cuda = torch.cuda.is_available()
    return {
        "name": torch.cuda.get_device_name() if cuda else platform.processor()
        or "cpu",
        "platform": "cuda" if cuda else "cpu",
        "runtime": {"torch": torch.__version__, "cuda": torch.version.cuda},
    }


def on_gpu():
    from keras_vmoe.layers import backends

    return backends.accelerator() != "cpu"


def cast_inputs(x, dtype):
    import keras

    return keras.ops.cast(x, dtype)


def free_memory():
    import gc

    import keras

    gc.collect()
    keras.backend.clear_session()
    if keras.backend.backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# === Worker: layer section ==================================================

# name: (kind, MoE kwargs, dense FFNs with the same active parameters)
LAYER_CONFIGS = {
    "top-1 cf=1.0": ("top_k", dict(top_k=1, capacity_factor=1.0), 1),
    "top-1 cf=1.25": ("top_k", dict(top_k=1, capacity_factor=1.25), 1),
    "top-2 cf=1.0": ("top_k", dict(top_k=2, capacity_factor=1.0), 2),
    "top-1 dropless": ("top_k", dict(top_k=1, capacity_factor=None), 1),
    "image top-1 dropless": (
        "top_k",
        dict(top_k=1, capacity_factor=None, routing="image"),
        1,
    ),
    "soft": ("soft", {}, 1),
    "expert choice cf=1.0": ("expert_choice", dict(capacity_factor=1.0), 1),
}
# (dtype, B, T, d) by importance: the targets are bfloat16 at B=256.
FULL_LAYER_GROUPS = (
    ("bfloat16", 256, 197, 384),
    ("float32", 256, 197, 384),
    ("bfloat16", 32, 197, 384),
    ("float32", 32, 197, 384),
    ("bfloat16", 256, 197, 768),
    ("float32", 256, 197, 768),
)
# Smoke: (dtype, B, T, d) and the configurations run in it.
SMOKE_LAYER_GROUPS = (
    ("bfloat16", 2, 16, 32, ("top-1 cf=1.0", "soft", "expert choice cf=1.0")),
    ("float32", 2, 16, 32, ("top-1 cf=1.0",)),
)
# Smoke float32: the dispatch modes that differ most by dtype.
SMOKE_FLOAT32_MODES = ("auto", "grouped")
NUM_EXPERTS = 8
SMOKE_EXPERTS = 4


def dispatch_modes():
    from keras_vmoe.layers.dispatch import dispatch_modes

    return dispatch_modes()


def layer_cases(smoke):
    if smoke:
        groups = SMOKE_LAYER_GROUPS
    else:
        groups = [g + (tuple(LAYER_CONFIGS),) for g in FULL_LAYER_GROUPS]
    for dtype, batch, tokens, width, names in groups:
        for name in names:
            kind = LAYER_CONFIGS[name][0]
            modes = dispatch_modes() if kind == "top_k" else (None,)
            if smoke and dtype == "float32":
                modes = [m for m in modes if m in SMOKE_FLOAT32_MODES]
            for mode in modes:
                yield {
                    "config": name,
                    "batch": batch,
                    "tokens": tokens,
                    "width": width,
                    "dtype": dtype,
                    "dispatch": mode or "-",
                }


def layer_policy(dtype):
    import keras

    return keras.DTypePolicy("mixed_bfloat16" if dtype == "bfloat16" else dtype)


def build_moe_layer(case, experts):
    from keras_vmoe.layers import ExpertChoiceFeedForward
    from keras_vmoe.layers import MoEFeedForward
    from keras_vmoe.layers import SoftMoEFeedForward

    kind, kwargs, _ = LAYER_CONFIGS[case["config"]]
    hidden = 4 * case["width"]
    policy = layer_policy(case["dtype"])
    if kind == "soft":
        layer = SoftMoEFeedForward(
            experts,
            hidden,
            slots_per_expert=math.ceil(case["tokens"] / experts),
            dtype=policy,
        )
    elif kind == "expert_choice":
        layer = ExpertChoiceFeedForward(experts, hidden, dtype=policy, **kwargs)
    else:
        kwargs = dict(kwargs)
        kwargs.setdefault("routing", "token")
        layer = MoEFeedForward(
            experts,
            hidden,
            eval_capacity_factor=kwargs["capacity_factor"],
            dispatch=case["dispatch"],
            dtype=policy,
            **kwargs,
        )
    layer.build((case["batch"], case["tokens"], case["width"]))
    return layer


class LayerBench:
    """Runs layer cases; inputs and dense steps are cached per group."""

    def __init__(self, timing, smoke):
        self.timing = timing
        self.smoke = smoke
        self.rounds, self.warmup = (2, 1) if smoke else (10, 2)
        self.experts = SMOKE_EXPERTS if smoke else NUM_EXPERTS
        self._group = None
        self._cache = {}

    def _group_state(self, case):
        key = (case["dtype"], case["batch"], case["tokens"], case["width"])
        if key != self._group:
            self._cache = {}
            free_memory()
            self._group = key
            shape = key[1:]
            self._cache["inputs"] = cast_inputs(
                self.timing.random_inputs(shape), case["dtype"]
            )
        return self._cache

    def dense(self, case, copies):
        from keras_vmoe.layers import FeedForward

        cache = self._group_state(case)
        if copies not in cache:
            layer = FeedForward(
                4 * case["width"] * copies, dtype=layer_policy(case["dtype"])
            )
            layer.build((case["batch"], case["tokens"], case["width"]))
            step = self.timing.compiled_train_step(layer, input_gradient=True)
            inputs = cache["inputs"]
            self.timing.block(step(inputs))
            cache[copies] = (step, step_memory_mib(self.timing, step, inputs))
        return cache[copies]

    def __call__(self, case):
        cache = self._group_state(case)
        inputs = cache["inputs"]
        copies = LAYER_CONFIGS[case["config"]][2]
        dense_step, dense_mib = self.dense(case, copies)
        layer = build_moe_layer(case, self.experts)
        step = self.timing.compiled_train_step(layer, input_gradient=True)
        try:
            self.timing.block(step(inputs))
        except (ValueError, NotImplementedError) as error:
            return {"status": "n/a", "note": "n/a: " + _message(error)}
        times = self.timing.interleaved_median_times(
            {"moe": step, "dense": dense_step},
            inputs,
            rounds=self.rounds,
            warmup=self.warmup,
        )
        return {
            "status": "ok",
            "dispatch_path": layer.dispatch_path,
            "moe_ms": times["moe"] * 1e3,
            "dense_ms": times["dense"] * 1e3,
            "ratio": times["moe"] / times["dense"],
            "peak_mib": step_memory_mib(self.timing, step, inputs),
            "dense_peak_mib": dense_mib,
        }


def step_memory_mib(timing, step, inputs):
    """Peak memory of one step in MiB: XLA's analysis of the compiled step
    on JAX, the CUDA allocator's peak on torch, else None."""
    import keras

    if keras.backend.backend() == "jax":
        analysis = step.lower(inputs).compile().memory_analysis()
        if analysis is None:
            return None
        used = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
        return used / 2**20
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    timing.block(step(inputs))
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def section_layer(context):
    bench = LayerBench(context["timing"], context["smoke"])
    return run_lines(
        list(layer_cases(context["smoke"])), bench, context["budget"], "layer"
    )


# === Worker: model section ==================================================


def _vit_preset(name):
    def build():
        from keras_vmoe.models.vit_moe import ViTMoEBackbone

        return ViTMoEBackbone.from_preset(name, load_weights=False)

    return build, ("vit", name)


def _convnext_preset(name):
    def build():
        from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone

        return ConvNeXtMoEBackbone.from_preset(name, load_weights=False)

    return build, ("convnext", name)


def _tiny_vit(**moe):
    def build():
        from keras_vmoe.models.vit_moe import ViTMoEBackbone

        return ViTMoEBackbone(
            image_shape=(32, 32, 3),
            patch_size=8,
            num_layers=1,
            num_heads=2,
            hidden_dim=64,
            mlp_dim=128,
            **moe,
        )

    return build, None


FULL_MODEL_PAIRS = (
    (
        "ViT-S/16 vs E8 Last-2 top-2",
        _vit_preset("vit_small_patch16"),
        _vit_preset("vit_moe_small_patch16_e8_last2_top2"),
    ),
    (
        "ConvNeXt-T vs E8 Last-2",
        _convnext_preset("convnext_tiny"),
        _convnext_preset("convnext_moe_tiny_e8_last2"),
    ),
    (
        "DINOv2 ViT-S/14 vs ViMoE N8 L2 shared",
        _vit_preset("vit_small_patch14_dinov2"),
        _vit_preset("vimoe_small_patch14_e8_last2_shared"),
    ),
)
SMOKE_MODEL_PAIRS = (
    (
        "tiny ViT vs E4 Last-1 top-2",
        _tiny_vit(),
        _tiny_vit(
            moe_layers="last-1", num_experts=4, top_k=2, routing="token"
        ),
    ),
)
NUM_CLASSES = 10


def preset_flops(source):
    """Active FLOPs per image from the preset table, if it has them."""
    if source is None:
        return None
    family, name = source
    if family == "vit":
        from keras_vmoe.models.vit_moe.presets import PRESETS
    else:
        from keras_vmoe.models.convnext_moe.presets import PRESETS
    return PRESETS.get(name, {}).get("flops")


def image_model(backbone):
    """Backbone + mean pooling + linear head, compiled for training."""
    import keras

    class PooledHead(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(
                NUM_CLASSES, dtype=self.dtype_policy
            )

        def call(self, x):
            axes = tuple(range(1, len(x.shape) - 1))
            return self.dense(keras.ops.mean(x, axis=axes))

    inputs = keras.Input(backbone.image_shape)
    model = keras.Model(inputs, PooledHead()(backbone(inputs)))
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def model_flops(backbone, source):
    flops = preset_flops(source)
    if flops is not None:
        return flops
    import keras

    from keras_vmoe.models.stats import model_stats

    size = backbone.image_shape[0]
    if keras.backend.backend() != "jax":
        return model_stats(backbone, size)["flops"]
    import jax

    # Traced, not run: `model_stats` only reads shapes, and an eager JAX
    # call runs op by op.
    stats = {}

    def trace():
        with keras.StatelessScope():
            stats.update(model_stats(backbone, size))
        return jax.numpy.zeros(())

    jax.eval_shape(trace)
    return stats["flops"]


def section_model(context):
    import keras

    timing, smoke = context["timing"], context["smoke"]
    pairs = SMOKE_MODEL_PAIRS if smoke else FULL_MODEL_PAIRS
    batch, rounds, warmup = (4, 2, 1) if smoke else (256, 5, 2)
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_bfloat16")

    def run_case(case):
        _, dense, moe = next(p for p in pairs if p[0] == case["pair"])
        return measure_pair(timing, dense, moe, batch, rounds, warmup)

    try:
        cases = [{"pair": name} for name, _, _ in pairs]
        return run_lines(cases, run_case, context["budget"], "model")
    finally:
        keras.config.set_dtype_policy(previous)
        free_memory()


def _train_step(model, labels):
    """One compiled forward, backward and optimizer update."""
    return lambda images: model.train_on_batch(images, labels)


def measure_pair(timing, dense, moe, batch, rounds, warmup):
    """Train and inference lines of one (dense, MoE) pair."""
    import keras
    import numpy as np

    free_memory()
    models, flops = {}, {}
    for label, (build, source) in (("dense", dense), ("moe", moe)):
        backbone = build()
        flops[label] = model_flops(backbone, source)
        models[label] = image_model(backbone)
    size = models["dense"].input_shape[1:]
    rng = np.random.default_rng(0)
    # On the device once: no host-to-device copy inside the timed steps.
    x = keras.ops.convert_to_tensor(
        rng.standard_normal((batch, *size)).astype("float32")
    )
    y = keras.ops.convert_to_tensor(rng.integers(0, NUM_CLASSES, batch))
    flop_ratio = flops["moe"] / flops["dense"]
    lines = []
    for mode in ("train", "inference"):
        functions = {
            label: _train_step(model, y)
            if mode == "train"
            else model.predict_on_batch
            for label, model in models.items()
        }
        times = timing.interleaved_median_times(
            functions, x, rounds=rounds, warmup=warmup
        )
        speed = times["dense"] / times["moe"]
        lines.append({
            "mode": mode,
            "status": "ok",
            "moe_images_s": batch / times["moe"],
            "dense_images_s": batch / times["dense"],
            "speed_ratio": speed,
            "flop_ratio": flop_ratio,
            "speed_x_flops": speed * flop_ratio,
        })
    return lines


# === Worker: fit section ====================================================

FIT_MODELS = ("vimoe_mnist", "convnext_moe_mnist")
FIT_POLICIES = ("mixed_bfloat16", "mixed_float16")


def section_fit(context):
    # Both policies and both models within the first two cases, should
    # the budget stop the section early.
    cases = [
        {"model": model, "policy": policy}
        for offset in range(len(FIT_MODELS))
        for policy, model in zip(
            FIT_POLICIES, FIT_MODELS[offset:] + FIT_MODELS[:offset]
        )
    ]
    steps = 3 if context["smoke"] else 300
    batch = 4 if context["smoke"] else 64

    def run_case(case):
        return fit_case(
            case["model"], case["policy"], steps, batch, context["smoke"]
        )

    return run_lines(cases, run_case, context["budget"], "fit")


SMOKE_FIT_IMAGE = 16


def tiny_classifier(name):
    """A classifier of the recipe's family, small enough to compile in
    seconds on a CPU (`--smoke`), without a preprocessor."""
    if name == "vimoe_mnist":
        from keras_vmoe.models.vit_moe import ViTMoEBackbone
        from keras_vmoe.models.vit_moe import ViTMoEImageClassifier

        backbone = ViTMoEBackbone(
            image_shape=(SMOKE_FIT_IMAGE, SMOKE_FIT_IMAGE, 3),
            patch_size=8,
            num_layers=1,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            moe_layers="last-1",
            num_experts=2,
            top_k=1,
            routing="image",
            shared_expert=True,
            capacity_factor=None,
            eval_capacity_factor=None,
        )
        return ViTMoEImageClassifier(backbone, num_classes=NUM_CLASSES)
    from keras_vmoe.models.convnext_moe import ConvNeXtMoEBackbone
    from keras_vmoe.models.convnext_moe import ConvNeXtMoEImageClassifier

    backbone = ConvNeXtMoEBackbone(
        depths=[2],
        hidden_dims=[16],
        patch_size=4,
        moe_layers=[(0, 1)],
        num_experts=2,
        top_k=1,
        expert_mlp_ratio=2,
        image_shape=(SMOKE_FIT_IMAGE, SMOKE_FIT_IMAGE, 3),
    )
    return ConvNeXtMoEImageClassifier(backbone, num_classes=NUM_CLASSES)


def step_recorder():
    """A Keras callback recording the time and the loss logged at the end
    of every training batch (`times`, `losses`)."""
    import keras

    class StepRecorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.losses = [], []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())
            self.losses.append(float((logs or {}).get("loss", math.nan)))

    return StepRecorder()


def fit_case(name, policy, steps, batch, smoke=False):
    import keras

    try:
        return _fit_and_check(name, policy, steps, batch, smoke)
    except Exception as error:
        if not on_gpu() and CPU_FLOAT16_ERROR in str(error):
            return {
                "status": "n/a",
                "note": "n/a on cpu: " + _message(error, 100),
            }
        raise
    finally:
        keras.config.set_dtype_policy("float32")
        free_memory()


def _fit_and_check(name, policy, steps, batch, smoke):
    import keras
    import numpy as np

    from keras_vmoe.layers.moe_types import find_moe_layers
    from keras_vmoe.training import create_optimizer
    from keras_vmoe.training import set_precision
    from keras_vmoe.training.recipes import build_classifier

    set_precision(policy)
    keras.utils.set_random_seed(0)
    if smoke:
        model, size = tiny_classifier(name), SMOKE_FIT_IMAGE
    else:
        model, size = build_classifier(name, num_classes=NUM_CLASSES), 28
    model.compile(
        optimizer=create_optimizer(
            model, total_steps=steps, learning_rate=1e-3
        ),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[],
    )
    scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    if scaled != (policy == "mixed_float16"):
        return _fail(f"LossScaleOptimizer wrapping is {scaled} under {policy}")
    rng = np.random.default_rng(0)
    # Images already scaled as the preprocessor would: `keras.Model.fit`
    # (not the KerasHub task's, which builds a data pipeline) feeds arrays
    # to the model as they are.
    x = rng.random((steps * batch, size, size, 3)).astype("float32")
    y = keras.utils.to_categorical(
        rng.integers(0, NUM_CLASSES, len(x)), NUM_CLASSES
    )
    recorder = step_recorder()
    keras.Model.fit(
        model,
        x,
        y,
        batch_size=batch,
        epochs=1,
        verbose=0,
        callbacks=[recorder],
    )
    losses = recorder.losses
    problems = fit_problems(model, x[:batch], policy, losses, find_moe_layers)
    # From the end of the first step (which compiles) to the last.
    times = recorder.times
    seconds = times[-1] - times[0] if len(times) > 1 else 0
    line = {
        "steps": len(times),
        "steps_s": (len(times) - 1) / seconds if seconds else None,
        "final_loss": losses[-1],
        "loss_scale": "yes" if scaled else "no",
    }
    if problems:
        return dict(line, **_fail("; ".join(problems)))
    return dict(line, status="ok")


def _fail(note):
    return {"status": "fail", "note": note}


def fit_problems(model, images, policy, losses, find_moe_layers):
    """What is wrong after a mixed-precision fit (empty when nothing)."""
    import keras
    import numpy as np

    problems = []
    low = policy.split("_")[1]
    if not np.isfinite(losses).all():
        problems.append(f"loss not finite: {losses}")
    for weight in model.weights:
        if not np.isfinite(keras.ops.convert_to_numpy(weight)).all():
            problems.append(f"weight not finite: {weight.path}")
    layers = find_moe_layers(model)
    if not layers:
        problems.append("no MoE layer found")
    for layer in layers:
        router = getattr(layer, "router", None)
        if router is not None and router.compute_dtype != "float32":
            problems.append(f"{layer.path} router in {router.compute_dtype}")
        if layer.compute_dtype != low:
            problems.append(f"{layer.path} computes in {layer.compute_dtype}")
    outputs = record_outputs(model, images, layers)
    for path, value in outputs.items():
        if not np.isfinite(value).all():
            problems.append(f"outputs of {path} not finite")
    return problems


def record_outputs(model, images, layers):
    """The model's outputs and every MoE layer's, from one inference call
    (compiled on JAX, where an eager call runs op by op)."""
    import keras
    import numpy as np

    recorded = {}

    def wrap(layer, call):
        def recording_call(*args, **kwargs):
            result = call(*args, **kwargs)
            recorded[layer.path] = keras.tree.flatten(result)[0]
            return result

        return recording_call

    def forward(x):
        recorded.clear()
        with keras.StatelessScope():
            logits = model(x, training=False)
        return dict(recorded, model=logits)

    if keras.backend.backend() == "jax":
        import jax

        forward = jax.jit(forward)
    for layer in layers:
        layer.call = wrap(layer, layer.call)
    try:
        outputs = forward(images)
    finally:
        for layer in layers:
            del layer.call
    return {
        path: np.asarray(
            keras.ops.convert_to_numpy(keras.ops.cast(value, "float32"))
        )
        for path, value in outputs.items()
    }


# === Worker: checks section =================================================


def section_checks(context):
    smoke = context["smoke"]
    lines = []
    checks = (dispatch_table, ragged_dot_check, grouped_fast_check, sync_check)
    for check in checks:
        try:
            lines += check(context["timing"], smoke)
        except Exception as error:  # noqa: BLE001 - recorded as a failure
            traceback.print_exc()
            lines.append(
                {
                    "check": check.__name__,
                    "status": "error",
                    "note": _message(error),
                }
            )
    return lines


def _check_case(smoke, config, dtype, dispatch="auto", batch=None):
    group = SMOKE_LAYER_GROUPS[0] if smoke else FULL_LAYER_GROUPS[0]
    tokens, width = group[2:4]
    batch = batch or group[1]
    return {
        "config": config,
        "batch": batch,
        "tokens": tokens,
        "width": width,
        "dtype": dtype,
        "dispatch": dispatch,
    }


def _case_shape(case):
    return case["batch"], case["tokens"], case["width"]


def traced_dispatch_path(layer, case):
    """The path the layer runs for a training call of this shape: traced
    only (no compile) on JAX, one call on torch."""
    import keras

    shape = _case_shape(case)
    if keras.backend.backend() == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        spec = jax.ShapeDtypeStruct(shape, case["dtype"])
        jax.eval_shape(
            lambda x: layer.stateless_call(
                trainable, non_trainable, x, training=True
            )[0],
            spec,
        )
    else:
        import torch

        with torch.no_grad():
            layer(keras.ops.zeros(shape, case["dtype"]), training=True)
    return layer.dispatch_path


def dispatch_table(timing, smoke):
    """What "auto" runs for each configuration, dtype and batch size (at
    the layer grid's first width) on this device."""
    experts = SMOKE_EXPERTS if smoke else NUM_EXPERTS
    groups = SMOKE_LAYER_GROUPS if smoke else FULL_LAYER_GROUPS
    batches = sorted({group[1] for group in groups}, reverse=True)
    lines = []
    for batch in batches:
        for dtype in ("bfloat16", "float32"):
            for config in LAYER_CONFIGS:
                case = _check_case(smoke, config, dtype, batch=batch)
                layer = build_moe_layer(case, experts)
                lines.append(
                    _check_line(
                        "auto dispatch",
                        f"{config} {dtype} B={batch}",
                        traced_dispatch_path(layer, case),
                    )
                )
    return lines


def ragged_dot_check(timing, smoke):
    """JAX: the ragged dots left in the compiled forward + backward of a
    grouped-dispatch layer (none where XLA rewrote them densely)."""
    import keras

    if keras.backend.backend() != "jax":
        return [_check_line("ragged dots", "-", "n/a (jax only)")]
    from keras_vmoe.layers.backends.jax import count_ragged_dots

    lines = []
    experts = SMOKE_EXPERTS if smoke else NUM_EXPERTS
    for dtype in ("bfloat16", "float32"):
        case = _check_case(smoke, "top-1 cf=1.0", dtype, "grouped")
        layer = build_moe_layer(case, experts)
        step = timing.compiled_train_step(layer, input_gradient=True)
        inputs = cast_inputs(timing.random_inputs(_case_shape(case)), dtype)
        text = step.lower(inputs).compile().as_text()
        lines.append(
            _check_line(
                "ragged dots",
                f"grouped fwd+bwd {dtype} B={case['batch']}",
                count_ragged_dots(text),
            )
        )
    return lines


def grouped_fast_check(timing, smoke):
    """`grouped_matmul_is_fast` for the rows of a top-1 layer of the grid's
    first shape (what "auto" asks before taking the grouped path)."""
    from keras_vmoe.layers import backends
    from keras_vmoe.layers.dispatch import StaticLayout

    lines = []
    experts = SMOKE_EXPERTS if smoke else NUM_EXPERTS
    for dtype in ("bfloat16", "float32"):
        case = _check_case(smoke, "top-1 cf=1.0", dtype)
        shape = (1, case["batch"] * case["tokens"], 1, case["width"])
        capacity = math.ceil(shape[1] / experts)
        layout = StaticLayout.of(shape, 1, capacity, experts, 1)
        rows = layout.num_rows * layout.per_item
        fast = backends.grouped_matmul_is_fast(
            dtype, rows, case["width"], 4 * case["width"], experts
        )
        lines.append(
            _check_line(
                "grouped_matmul_is_fast",
                f"{dtype} rows={rows} d={case['width']}",
                fast,
            )
        )
    return lines


def _check_line(check, subject, result, status="ok", **extra):
    return dict(
        check=check, subject=subject, result=str(result), status=status,
        **extra,
    )


def sync_check(timing, smoke):
    """torch on CUDA: a training call + backward without host syncs."""
    import keras

    if keras.backend.backend() != "torch":
        return []
    import torch

    if not torch.cuda.is_available():
        return [_check_line("no host sync", "-", "n/a (cpu)")]
    lines = []
    experts = SMOKE_EXPERTS if smoke else NUM_EXPERTS
    for dispatch in ("auto", "grouped", "slots"):
        case = _check_case(smoke, "top-1 cf=1.0", "bfloat16", dispatch)
        layer = build_moe_layer(case, experts)
        step = timing.compiled_train_step(layer, input_gradient=True)
        inputs = cast_inputs(
            timing.random_inputs(_case_shape(case)), "bfloat16"
        )
        timing.block(step(inputs))  # first call outside: lazy setup
        subject = f"{dispatch} bfloat16 B={case['batch']}"
        try:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
            line = _check_line(
                "no host sync", subject, f"pass ({layer.dispatch_path})"
            )
        except RuntimeError as error:
            line = _check_line(
                "no host sync", subject, "fail", "fail", note=_message(error)
            )
        lines.append(line)
    return lines


# === Worker =================================================================

SECTION_FUNCTIONS = {
    "layer": section_layer,
    "model": section_model,
    "fit": section_fit,
    "checks": section_checks,
}


def run_section(section, context):
    """`{"lines": [...], "seconds": ...}`, or an "error" for a section
    that raised."""
    start = time.monotonic()
    data = {}
    try:
        data["lines"] = SECTION_FUNCTIONS[section](context)
    except Exception as error:  # noqa: BLE001 - recorded as a failure
        traceback.print_exc()
        data["error"] = _message(error)
    data["seconds"] = round(time.monotonic() - start, 2)
    return data


def run_worker(args):
    began = time.monotonic()
    refuse_tensorflow()
    timing = _worker_imports()
    import keras

    keras.config.disable_interactive_logging()
    backend = keras.backend.backend()
    result = {"backend": backend, "device": device_info(), "sections": {}}
    context = {
        "timing": timing,
        "smoke": args.smoke,
        "budget": Budget(args.budget_s),
    }
    for section in args.sections:
        data = run_section(section, context)
        result["sections"][section] = data
        print(f"[{backend}] {section}: {data['seconds']:.1f} s", flush=True)
    imported = tensorflow_imported()
    result["tensorflow_imported"] = imported
    if "checks" in args.sections:
        result["sections"]["checks"].setdefault("lines", []).append(
            _check_line(
                "tensorflow imported",
                "-",
                imported,
                "fail" if imported else "ok",
            )
        )
    print(f"[{backend}] tensorflow imported: {imported}", flush=True)
    result["elapsed_s"] = round(time.monotonic() - began, 1)
    with open(args.worker, "w") as f:
        json.dump(result, f, indent=1, default=str)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS)
    )
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS)
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds per backend for the layer, model and fit sections",
    )
    parser.add_argument("--json", help="default: gpu_results.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
