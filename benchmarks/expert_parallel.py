"""Expert parallelism: one device against 8 (virtual) devices.

Usage (JAX only; 8 virtual CPU devices unless real ones are present):
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python benchmarks/expert_parallel.py
    KERAS_BACKEND=jax python benchmarks/expert_parallel.py --processes 2

For the MoE layer at B=32, T=197, d=384, h=1536, E=8 (token routing,
K=2, capacity factor 1.25, groups of 4 images = 788 tokens) it prints the
train step time (forward + backward) on 1 and on 8 devices, the collectives
of the compiled 8-device step with the bytes each all-to-all moves (from
the HLO), against the minimum K*N*d*bytes (every routed token once, no
capacity padding), and XLA's per-device memory estimate.

`--processes 2` starts 2 processes on 127.0.0.1 (JAX's distributed
runtime, gloo collectives), each with 4 virtual CPU devices, and runs the
same layer with its experts sharded over all 8 devices. Process 0 prints
the step time, every all-to-all of the compiled step with its bytes and
the share of them that leaves a process, against the minimum 2*K*S*d*4
bytes of one MoE layer's forward pass (S tokens in the global batch), and
the time and on-disk size of a sharded Orbax checkpoint (model and Adam
state) saved and restored by both processes.

Virtual CPU devices share the host's cores, so the 8-device time measures
overhead, not speed-up; timings on a shared machine are noisy.
"""

import argparse
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Imported by `_load_backend` once the mode (and so the device count) is
# known: XLA reads XLA_FLAGS when JAX is first imported.
jax = keras = vmoe_distribution = MoEFeedForward = None


def _load_backend(devices):
    global jax, keras, vmoe_distribution, MoEFeedForward
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault(
        "XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}"
    )
    import jax
    import keras

    from keras_vmoe import distribution as vmoe_distribution
    from keras_vmoe.layers import MoEFeedForward


B, T, D, H, E, K, CF = 32, 197, 384, 1536, 8, 2, 1.25
DEVICES = 8
GROUP = (B // DEVICES) * T
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}


def build(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((T, D))
    layer = MoEFeedForward(
        E, H, top_k=K, capacity_factor=CF, group_size=GROUP, name="moe"
    )
    return keras.Model(inputs, layer(inputs))


def train_step(model):
    def loss(trainable, non_trainable, x):
        y, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return keras.ops.mean(y * y)

    return jax.jit(jax.grad(loss))


def measure(model, x, distribution=None, repeats=5):
    step = train_step(model)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    if distribution is not None:
        layout = distribution.get_data_layout(x.shape).backend_layout
        x = jax.device_put(x, layout)
    compiled = step.lower(trainable, non_trainable, x).compile()
    jax.block_until_ready(compiled(trainable, non_trainable, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(trainable, non_trainable, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times), compiled


def shape_bytes(text):
    total = 0
    for dtype, dims in re.findall(r"(f32|bf16|f16|s32)\[([\d,]*)\]", text):
        sizes = [int(d) for d in dims.split(",") if d]
        total += BYTES[dtype] * int(np.prod(sizes))
    return total


def collectives(hlo):
    counts, all_to_all = {}, []
    for line in hlo.splitlines():
        match = re.search(r" (all-to-all|all-gather|all-reduce|reduce-scatter|"
                          r"collective-permute)\(", line)
        if not match:
            continue
        op = match.group(1)
        counts[op] = counts.get(op, 0) + 1
        if op == "all-to-all":
            result = line.split("=", 1)[1].split(op + "(")[0]
            all_to_all.append(shape_bytes(result))
    return counts, all_to_all


def memory(compiled):
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every platform reports it
        return "n/a"
    if stats is None:
        return "n/a"
    mib = 2**20
    return (
        f"args {stats.argument_size_in_bytes / mib:.1f} MiB, "
        f"outputs {stats.output_size_in_bytes / mib:.1f} MiB, "
        f"temp {stats.temp_size_in_bytes / mib:.1f} MiB"
    )


def single_process():
    if jax.device_count() < DEVICES:
        raise SystemExit(
            f"needs {DEVICES} devices; set XLA_FLAGS="
            "--xla_force_host_platform_device_count=8"
        )
    x = np.random.default_rng(0).standard_normal((B, T, D)).astype("float32")
    model = build()
    one_time, one = measure(model, x)
    dist = vmoe_distribution.expert_parallel(model, devices=DEVICES)
    sharded = vmoe_distribution.distribute_model(model, dist)
    with dist.scope():
        eight_time, eight = measure(sharded, x, dist)
    counts, a2a = collectives(eight.as_text())
    tokens = B * T
    minimum = K * tokens * D * 4  # every routed (token, choice) once, f32
    capacity = math.ceil(K * GROUP * CF / E)
    padded = E * capacity * (tokens // GROUP) * D * 4
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()}, "
          f"B={B} T={T} d={D} h={H} E={E} K={K} cf={CF} group={GROUP} tokens")
    print(f"train step 1 device : {1e3 * one_time:8.1f} ms | "
          f"memory {memory(one)}")
    print(f"train step {DEVICES} devices: {1e3 * eight_time:8.1f} ms | "
          f"per device {memory(eight)} | mesh {dist.device_mesh.shape}")
    print(f"collectives in the {DEVICES}-device step: {counts}")
    for i, size in enumerate(a2a):
        print(f"  all-to-all #{i}: {size / 2**20:.2f} MiB per device, "
              f"{DEVICES * size / 2**20:.2f} MiB over all devices")
    print(f"minimum per layer per direction (K*N*d*4): {minimum / 2**20:.2f} "
          f"MiB; with capacity padding (E*C*G*d*4, C={capacity}): "
          f"{padded / 2**20:.2f} MiB (x{padded / minimum:.3f})")



# --- Several processes ------------------------------------------------------

REPEATS = 3  # timed steps after one warm-up step
HEARTBEAT = 30  # seconds without a heartbeat before the runtime stops all


def replica_groups(line, count):
    """The device-id groups of a collective's HLO line.

    Handles the mesh form `mesh['axis_0'=1,'axis_1'=8] {'axis_1'}`, the
    iota form `[2,4]<=[8]` (optionally `T(perm)`) and explicit lists
    `{{0,1},{2,3}}`; no groups means one group of all `count` ids.
    """
    match = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if match:
        axes = re.findall(r"'([^']+)'=(\d+)", match.group(1))
        names = [name for name, _ in axes]
        dims = [int(size) for _, size in axes]
        inner = [names.index(n) for n in re.findall(r"'([^']+)'",
                                                    match.group(2))]
        outer = [i for i in range(len(dims)) if i not in inner]
        ids = np.arange(math.prod(dims)).reshape(dims)
        size = math.prod(dims[i] for i in inner)
        return ids.transpose(outer + inner).reshape(-1, size).tolist()
    match = re.search(
        r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
        line,
    )
    if match:
        dims = [int(d) for d in match.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if match.group(4):
            ids = ids.transpose([int(p) for p in match.group(4).split(",")])
        return ids.reshape(int(match.group(1)), int(match.group(2))).tolist()
    match = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)+)\}", line)
    if match:
        return [
            [int(i) for i in group.split(",") if i]
            for group in re.findall(r"\{([\d,]*)\}", match.group(1))
        ]
    return [list(range(count))]


def all_to_alls(hlo, devices):
    """`(bytes per device, bytes leaving a process, groups, forward)` of
    every all-to-all; `devices`: the executable's devices by id."""
    result = []
    for line in hlo.splitlines():
        if " all-to-all(" not in line:
            continue
        size = shape_bytes(line.split("=", 1)[1].split("all-to-all(")[0])
        groups = replica_groups(line, len(devices))
        leaving = 0.0
        for group in groups:
            owners = [devices[i].process_index for i in group]
            for owner in owners:
                # Uniform: each member sends size/n to every member.
                local = owners.count(owner)
                leaving += size * (len(group) - local) / len(group)
        forward = "transpose(jvp(" not in line
        result.append((size, leaving, groups, forward))
    return result


def process_rows(sharding, shape):
    """The slice of the global batch this process's devices hold."""
    ranges = sorted(
        {
            (index[0].start or 0, shape[0] if index[0].stop is None
             else index[0].stop)
            for index in sharding.addressable_devices_indices_map(
                shape).values()
        }
    )
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        if stop != start:
            raise ValueError(f"this process's rows are not contiguous: "
                             f"{ranges}")
    return slice(ranges[0][0], ranges[-1][1])


def tree_bytes(path):
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )


def worker(args):
    _load_backend(DEVICES // args.processes)
    from jax.experimental import multihost_utils

    from keras_vmoe import cluster
    from keras_vmoe.training.checkpoint import TrainingCheckpoint
    from keras_vmoe.training.checkpoint import restore

    count, index = cluster.initialize_cluster(
        f"127.0.0.1:{args.port}",
        args.processes,
        args.process_id,
        initialization_timeout=120,
        heartbeat_timeout=HEARTBEAT,
    )
    if jax.device_count() != DEVICES:
        raise SystemExit(f"needs {DEVICES} devices over {count} processes; "
                         f"found {jax.device_count()}")
    primary = cluster.is_primary()
    x = np.random.default_rng(0).standard_normal((B, T, D)).astype("float32")
    model = build()
    dist = vmoe_distribution.expert_parallel(model, devices=DEVICES)
    keras.distribution.set_distribution(dist)
    model = vmoe_distribution.distribute_model(model, dist)
    sharding = dist.get_data_layout(x.shape).backend_layout
    local = x[process_rows(sharding, x.shape)]
    x = jax.make_array_from_process_local_data(sharding, local, x.shape)
    step_time, compiled = measure(model, x, repeats=REPEATS)
    counts, _ = collectives(compiled.as_text())
    devices = sharding._device_assignment
    a2a = all_to_alls(compiled.as_text(), devices)

    # A sharded checkpoint of the model and its Adam state, after one
    # update (a fresh Adam state is zeros, which compress to nothing).
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    grads = compiled(
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        x,
    )
    model.optimizer.apply(grads, model.trainable_variables)
    folder = os.path.join(args.checkpoint_dir, "checkpoint")
    checkpoint = TrainingCheckpoint(folder, 1, asynchronous=False,
                                    settings={"benchmark": "expert_parallel"})
    checkpoint.set_model(model)
    multihost_utils.sync_global_devices("save")
    start = time.perf_counter()
    checkpoint.save(1)
    checkpoint.close()
    save_time = time.perf_counter() - start
    multihost_utils.sync_global_devices("saved")
    steps = [name for name in os.listdir(folder) if name.isdigit()]
    if steps != ["1"]:
        raise RuntimeError(f"expected one step folder '1' in {folder}: "
                           f"{os.listdir(folder)}")
    disk = tree_bytes(os.path.join(folder, "1"))
    # A fresh model (other initial weights) on the same mesh.
    keras.distribution.set_distribution(None)
    fresh = build(seed=1)
    keras.distribution.set_distribution(dist)
    fresh = vmoe_distribution.distribute_model(fresh, dist)
    fresh.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    fresh.optimizer.build(fresh.trainable_variables)
    multihost_utils.sync_global_devices("restore")
    start = time.perf_counter()
    restore(fresh, folder)
    jax.block_until_ready([v.value for v in fresh.variables])
    restore_time = time.perf_counter() - start
    equal = jax.jit(
        lambda a, b: jax.numpy.all(jax.numpy.stack(
            [jax.numpy.array_equal(p, q) for p, q in zip(a, b)]))
    )(
        [v.value for v in model.variables + model.optimizer.variables],
        [v.value for v in fresh.variables + fresh.optimizer.variables],
    )
    equal = bool(np.asarray(equal))
    weights = sum(
        math.prod(v.shape) * np.dtype(v.dtype).itemsize
        for v in model.variables + model.optimizer.variables
    )
    multihost_utils.sync_global_devices("done")
    if not primary:
        return

    tokens = B * T
    minimum = 2 * K * tokens * D * 4  # dispatch + combine, f32
    per = DEVICES // count
    print(f"device: {jax.devices()[0].platform} x{jax.device_count()} over "
          f"{count} processes ({per} per process, gloo), B={B} T={T} d={D} "
          f"h={H} E={E} K={K} cf={CF} group={GROUP} tokens")
    print(f"train step {DEVICES} devices, {count} processes: "
          f"{1e3 * step_time:8.1f} ms (median of {REPEATS}) | per device "
          f"{memory(compiled)} | mesh {dist.device_mesh.shape}")
    print(f"collectives in the step: {counts}")
    total_forward = leaving_forward = 0
    for i, (size, leaving, groups, forward) in enumerate(a2a):
        total = size * sum(len(group) for group in groups)
        owners = {devices[j].process_index for j in groups[0]}
        if forward:
            total_forward += total
            leaving_forward += leaving
        print(f"  all-to-all #{i} ({'forward' if forward else 'backward'}): "
              f"{size / 2**20:.2f} MiB per device, {total / 2**20:.2f} MiB "
              f"in total, {leaving / 2**20:.2f} MiB "
              f"({leaving / total:.0%}) leave their process | "
              f"{len(groups)} group(s) of {len(groups[0])} devices over "
              f"{len(owners)} processes")
    print(f"minimum per MoE layer forward (2*K*S*d*4: dispatch + combine, "
          f"every routed token once, f32): {minimum / 2**20:.2f} MiB; "
          f"forward all-to-alls: {total_forward / 2**20:.2f} MiB "
          f"(x{total_forward / minimum:.3f}), "
          f"{leaving_forward / 2**20:.2f} MiB of it across processes")
    print(f"checkpoint (Orbax, sharded, synchronous, model + Adam state, "
          f"{weights / 2**20:.1f} MiB of arrays): save {save_time:.2f} s, "
          f"restore {restore_time:.2f} s, {disk / 2**20:.1f} MiB on disk; "
          f"restored state equal: {equal}")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path, lines=30):
    with open(path, errors="replace") as file:
        return "".join(file.readlines()[-lines:])


def launch(processes, timeout):
    """Starts `processes` copies of this script in worker mode, waits for
    all (at most `timeout` s); kills every one on a failure."""
    if processes < 2 or DEVICES % processes:
        raise SystemExit(f"--processes must be >= 2 and divide {DEVICES}")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=(f"{flags} --xla_force_host_platform_device_count="
                   f"{DEVICES // processes}").strip(),
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    work = tempfile.mkdtemp(prefix="expert_parallel_")
    port = free_port()
    children, logs = [], []
    out_path = os.path.join(work, "process_0.out")

    def stop(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        for index in range(processes):
            log_path = os.path.join(work, f"process_{index}.log")
            logs.append(log_path)
            # Process 0's results go to `out_path`, everything else to logs.
            with open(log_path, "w") as log, open(
                out_path if index == 0 else os.devnull, "w"
            ) as out:
                children.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--worker",
                     "--processes", str(processes), "--process-id",
                     str(index), "--port", str(port), "--checkpoint-dir",
                     work],
                    stdout=out if index == 0 else log,
                    stderr=log,
                    env=env,
                ))
        deadline = time.monotonic() + timeout
        pending = list(range(processes))
        while pending:
            for index in list(pending):
                status = children[index].poll()
                if status is None:
                    continue
                pending.remove(index)
                if status != 0:
                    raise RuntimeError(
                        f"process {index} exited with status {status}:\n"
                        f"{tail(logs[index])}"
                    )
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"process(es) {pending} ran past {timeout} s:\n"
                    + "".join(tail(logs[i]) for i in pending)
                )
            time.sleep(0.5)
        with open(out_path) as out:
            # Without the connection messages gloo prints.
            sys.stdout.write("".join(
                line for line in out if not line.startswith("[Gloo]")
            ))
    except (RuntimeError, SystemExit, KeyboardInterrupt) as error:
        for child in children:
            if child.poll() is None:
                child.kill()
        for child in children:
            child.wait(timeout=30)
        print(f"expert_parallel --processes {processes} failed: {error}",
              file=sys.stderr)
        raise SystemExit(1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=1,
                        help="processes on this host (default 1: one "
                             "process, 1 vs 8 devices)")
    parser.add_argument("--timeout", type=int, default=540,
                        help="seconds the processes may run (several "
                             "processes only)")
    parser.add_argument("--worker", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.processes > 1:
        launch(args.processes, args.timeout)
    else:
        _load_backend(DEVICES)
        single_process()


if __name__ == "__main__":
    main()
