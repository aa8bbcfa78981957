"""Expert parallelism: one device against 8 (virtual) devices.

Usage (JAX only; 8 virtual CPU devices unless real ones are present):
    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python benchmarks/expert_parallel.py

For the MoE layer at B=32, T=197, d=384, h=1536, E=8 (token routing,
K=2, capacity factor 1.25, groups of 4 images = 788 tokens) it prints the
train step time (forward + backward) on 1 and on 8 devices, the collectives
of the compiled 8-device step with the bytes each all-to-all moves (from
the HLO), against the minimum K*N*d*bytes (every routed token once, no
capacity padding), and XLA's per-device memory estimate.

Virtual CPU devices share the host's cores, so the 8-device time measures
overhead, not speed-up; timings on a shared machine are noisy.
"""

import math
import os
import re
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8"
)

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_vmoe import distribution as vmoe_distribution  # noqa: E402
from keras_vmoe.layers import MoEFeedForward  # noqa: E402

B, T, D, H, E, K, CF = 32, 197, 384, 1536, 8, 2, 1.25
DEVICES = 8
GROUP = (B // DEVICES) * T
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4}


def build():
    keras.utils.set_random_seed(0)
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


def main():
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


if __name__ == "__main__":
    main()
