"""Several processes on 127.0.0.1: expert parallelism, crashes, resuming.

Each test starts worker processes (`worker.py`) with JAX's distributed
runtime and gloo CPU collectives; every wait is bounded. Run them in their
own stage:

    KERAS_BACKEND=jax python -m pytest -q tests/multiprocess

The training runs are module fixtures shared by the tests that read them.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="several processes train together on the JAX backend only",
)

WORKER = os.path.join(os.path.dirname(__file__), "worker.py")
HEARTBEAT = 10  # seconds: a dead process is noticed after this
BOUND = HEARTBEAT + 30  # the survivor must have exited within this


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(args, devices, log, extra_env=None):
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, WORKER, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def _cluster_args(port, count, index):
    return [
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(count),
        "--process-id",
        str(index),
        "--heartbeat-timeout",
        str(HEARTBEAT),
    ]


def _wait(process, timeout, log_path):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(
            f"a worker ran past {timeout} s:\n{_tail(log_path)}"
        )


def _tail(path, lines=40):
    with open(path, errors="replace") as file:
        return "".join(file.readlines()[-lines:])


def _run_cluster(tmp, name, *, count, devices, checkpoint, extra=(),
                 timeout=240, env=None):
    """Starts `count` processes, waits for all; returns their logs."""
    port = _free_port()
    out = os.path.join(tmp, name)
    processes, logs = [], []
    for index in range(count):
        log_path = os.path.join(tmp, f"{name}_{index}.log")
        args = ["train", "--checkpoint", checkpoint, "--out", out, *extra]
        if count > 1:
            args += _cluster_args(port, count, index)
        with open(log_path, "w") as log:
            processes.append(
                _start(args, devices, log, env if index == 0 else None)
            )
        logs.append(log_path)
    for process, log_path in zip(processes, logs):
        status = _wait(process, timeout, log_path)
        assert status == 0, _tail(log_path)
    return out, logs


def _weights(out):
    with np.load(os.path.join(out, "weights.npz")) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def _losses(out):
    with open(os.path.join(out, "losses.json")) as file:
        return json.load(file)


def _assert_weights_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("multiprocess"))


@pytest.fixture(scope="module")
def one_process(workdir):
    """The reference: 1 process x 8 devices, uninterrupted."""
    checkpoint = os.path.join(workdir, "ckpt_one")
    out, _ = _run_cluster(
        workdir, "one", count=1, devices=8, checkpoint=checkpoint
    )
    return out


def test_two_processes_train_like_one_process(workdir, one_process):
    dump = os.path.join(workdir, "hlo")
    out, _ = _run_cluster(
        workdir,
        "two",
        count=2,
        devices=4,
        checkpoint=os.path.join(workdir, "ckpt_two"),
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
            f"--xla_dump_to={dump} --xla_dump_hlo_as_text "
            "--xla_dump_hlo_module_re=.*train.*"
        },
    )
    expected, actual = _losses(one_process), _losses(out)
    np.testing.assert_allclose(
        actual["loss"], expected["loss"], rtol=1e-5, atol=1e-5
    )
    _assert_weights_close(_weights(out), _weights(one_process))
    # The compiled training step exchanges tokens between the processes:
    # all-to-alls over all 8 devices (4 in each process).
    optimized = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
    assert optimized, os.listdir(dump)[:10]
    text = "".join(open(path).read() for path in optimized)
    groups = re.findall(r"all-to-all\([^\n]*replica_groups=(\S+)", text)
    assert len(groups) >= 4, groups  # 2 layers: dispatch, combine, and back
    # A group of 8 participants holds devices of both processes (each has
    # 4); XLA writes it as a mesh axis of size 8, an iota list [1,8] or the
    # ids {0,...,7}.
    spanning = [
        g
        for g in groups
        if re.search(r"'=8\b|\[1,8\]|\{0,1,2,3,4,5,6,7\}", g)
    ]
    assert spanning, groups


@pytest.fixture(scope="module")
def killed_and_resumed(workdir):
    """2 processes; process 1 is SIGKILLed mid-epoch after the first
    checkpoint; then both restart and resume."""
    checkpoint = os.path.join(workdir, "ckpt_killed")
    port = _free_port()
    out = os.path.join(workdir, "killed")
    logs = [os.path.join(workdir, f"killed_{i}.log") for i in range(2)]
    processes = []
    for index in range(2):
        with open(logs[index], "w") as log:
            processes.append(
                _start(
                    [
                        "train",
                        "--checkpoint",
                        checkpoint,
                        "--out",
                        out,
                        "--step-seconds",
                        "0.5",
                        *_cluster_args(port, 2, index),
                    ],
                    4,
                    log,
                )
            )
    deadline = time.monotonic() + 240
    while not os.path.isdir(os.path.join(checkpoint, "2")):
        assert time.monotonic() < deadline, _tail(logs[0])
        assert processes[0].poll() is None, _tail(logs[0])
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    processes[1].wait()
    status = _wait(processes[0], BOUND + 30, logs[0])
    survivor_seconds = time.monotonic() - killed_at
    finished = [
        int(name)
        for name in os.listdir(checkpoint)
        if name.isdigit()
    ]
    resumed, _ = _run_cluster(
        workdir, "resumed", count=2, devices=4, checkpoint=checkpoint
    )
    return {
        "status": status,
        "seconds": survivor_seconds,
        "log": _tail(logs[0], 200),
        "finished_before_resume": finished,
        "out": resumed,
        "checkpoint": checkpoint,
    }


def test_a_killed_process_stops_the_other_loudly(killed_and_resumed):
    run = killed_and_resumed
    assert run["status"] != 0, run["log"]
    assert run["seconds"] < BOUND, (run["seconds"], run["log"])
    # Either the collective fails first (the library names the cause and
    # how to resume) or the runtime's heartbeat check ends the process.
    assert (
        "another process of the cluster stopped during training" in run["log"]
        or "stopped sending heartbeats" in run["log"]
    ), run["log"]
    assert "process 0: finished" not in run["log"]


def test_restart_resumes_and_matches_an_uninterrupted_run(
    killed_and_resumed, one_process
):
    run = killed_and_resumed
    losses = _losses(run["out"])
    # 4 steps per epoch, a checkpoint every 2: the kill follows the step-2
    # save (mid-epoch), so the restart resumes from step 2 (4 if the
    # next save finished first), never from scratch or the end.
    assert losses["restored"] in run["finished_before_resume"]
    assert losses["restored"] in (2, 4)
    _assert_weights_close(_weights(run["out"]), _weights(one_process))


def test_restore_on_one_process_with_4_devices_and_with_1(
    killed_and_resumed, workdir
):
    predictions = []
    for devices, shards in ((4, 4), (1, 0)):
        out = os.path.join(workdir, f"predict_{devices}")
        log_path = os.path.join(workdir, f"predict_{devices}.log")
        with open(log_path, "w") as log:
            process = _start(
                [
                    "predict",
                    "--checkpoint",
                    killed_and_resumed["checkpoint"],
                    "--out",
                    out,
                    "--expert-shards",
                    str(shards),
                ],
                devices,
                log,
            )
        assert _wait(process, 120, log_path) == 0, _tail(log_path)
        assert f"on {devices} devices" in _tail(log_path)
        predictions.append(np.load(os.path.join(out, "predictions.npy")))
    np.testing.assert_allclose(
        predictions[0], predictions[1], rtol=1e-5, atol=1e-5
    )
    assert np.abs(predictions[0]).max() > 0


def test_a_process_started_with_another_count_is_named(workdir):
    port = _free_port()
    logs, processes = [], []
    for index, count in ((0, 2), (1, 3)):
        log_path = os.path.join(workdir, f"count_{index}.log")
        args = [
            "train",
            "--checkpoint",
            os.path.join(workdir, "ckpt_count"),
            "--out",
            os.path.join(workdir, "count"),
            *_cluster_args(port, count, index),
        ]
        with open(log_path, "w") as log:
            processes.append(_start(args, 1, log))
        logs.append(log_path)
    try:
        status = _wait(processes[1], 120, logs[1])
        assert status != 0
        text = _tail(logs[1])
        assert "num_processes=3" in text, text
        assert "cluster of 2 processes" in text, text
    finally:
        # Process 0 would stop on its own after the heartbeat timeout (the
        # killed-process test checks that); no need to wait here.
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
