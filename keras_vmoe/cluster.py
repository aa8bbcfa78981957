"""Several processes, one training run: JAX's distributed runtime.

`initialize_cluster(coordinator_address, num_processes, process_id)` must
run in every process before anything touches a device. It starts JAX's
distributed runtime (`jax.distributed.initialize`, the engine under
`keras.distribution.initialize`) with bounded timeouts, after checks that
name the setting at fault:

- `num_processes` and `process_id` are integers, `0 <= process_id <
  num_processes`; `coordinator_address` is `host:port`;
- process 0 can bind the coordinator's port (another process 0 already
  running is named), every other process can reach it within
  `initialization_timeout` seconds;
- after the start, the cluster has `num_processes` processes (a process
  started with another count than the coordinator is named).

Afterwards `keras.distribution.list_devices()` lists every process's
devices, and `expert_parallel` / `DataParallel` meshes span them. On CPUs
the cross-process collectives run over gloo (TCP), which is how the tests
run several processes on 127.0.0.1.

Faults: every process sends heartbeats to the coordinator. When a process
dies (or stops responding) for `heartbeat_timeout` seconds, the runtime
terminates every other process with a non-zero status and the message
"Terminating process because the JAX distributed service detected fatal
errors ... The following tasks are unhealthy (stopped sending heartbeats):
<ids>". Nothing waits forever.

Each argument left None is read from Keras' environment variables
`KERAS_DISTRIBUTION_JOB_ADDRESSES` (the coordinator first, or only it),
`KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID`.
"""

import errno
import hashlib
import json
import os
import socket
import time

import keras

ENV_ADDRESS = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"


def _require_jax():
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            "Several processes train together only on the JAX backend "
            "(JAX's distributed runtime and XLA's collectives). Set "
            f"KERAS_BACKEND=jax. Received: backend={backend!r}"
        )


def _from_env(value, env, name, parse=str):
    if value is not None:
        return value, name
    text = os.environ.get(env)
    if text is None or text == "":
        return None, name
    if parse is int:
        try:
            return int(text), f"{name} (from ${env})"
        except ValueError:
            raise ValueError(
                f"${env} must be an integer. Received: {env}={text!r}"
            ) from None
    return text, f"{name} (from ${env})"


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def parse_address(address, name="coordinator_address"):
    """`(host, port)` from "host:port" ("[::1]:port" for IPv6)."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(
            f"`{name}` must be 'host:port' (the address of process 0 and a "
            f"free port). Received: {name}={address!r}"
        )
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not host or not 1 <= port <= 65535:
        raise ValueError(
            f"`{name}` must be 'host:port' with a port in [1, 65535]. "
            f"Received: {name}={address!r}"
        )
    return host, port


def resolve_cluster(coordinator_address=None, num_processes=None,
                    process_id=None):
    """The checked `(coordinator_address, num_processes, process_id)`.

    Arguments left None come from Keras' environment variables (see the
    module docstring). Returns `(None, 1, 0)` when nothing is set: one
    process. Raises `ValueError` naming the argument (and its environment
    variable) for a missing, malformed or out-of-range value.
    """
    address, address_name = _from_env(
        coordinator_address, ENV_ADDRESS, "coordinator_address"
    )
    count, count_name = _from_env(
        num_processes, ENV_NUM_PROCESSES, "num_processes", int
    )
    index, index_name = _from_env(
        process_id, ENV_PROCESS_ID, "process_id", int
    )
    if count is not None and (not _is_int(count) or count < 1):
        raise ValueError(
            f"`{count_name}` must be an integer >= 1. Received: {count!r}"
        )
    if address is None and count in (None, 1) and index in (None, 0):
        return None, 1, 0
    if count is None:
        raise ValueError(
            f"`num_processes` is needed with {address_name}={address!r} and "
            f"{index_name}={index!r} (or set ${ENV_NUM_PROCESSES})."
        )
    if address is None:
        if count == 1:
            return None, 1, 0
        raise ValueError(
            "`coordinator_address` ('host:port' of process 0) is needed for "
            f"{count} processes (or set ${ENV_ADDRESS}). Received: "
            "coordinator_address=None"
        )
    if "," in address:
        address = address.split(",")[0].strip()
    parse_address(address, address_name)
    if index is None:
        raise ValueError(
            f"`process_id` is needed for {count} processes (or set "
            f"${ENV_PROCESS_ID}). Received: process_id=None"
        )
    if not _is_int(index) or not 0 <= index < count:
        raise ValueError(
            f"`{index_name}` must be an integer in [0, {count - 1}] "
            f"(num_processes={count}). Received: {index!r}"
        )
    return address, count, index


def _check_port_free(host, port, address):
    """Process 0 binds the coordinator's port: fail now if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("::" if family == socket.AF_INET6 else "", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"process 0 cannot start the coordinator: port {port} "
                    "is already in use on this machine (another process "
                    "started with process_id=0, or another program). "
                    f"Received: coordinator_address={address!r}, "
                    "process_id=0"
                ) from None
            raise


def _wait_for_coordinator(host, port, address, process_id, timeout):
    """Every other process: the coordinator must accept connections."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return
        except OSError as error:
            last_error = error
            time.sleep(0.5)
    reason = getattr(last_error, "strerror", None) or str(last_error)
    raise ValueError(
        f"process {process_id} cannot reach the coordinator at {address} "
        f"within {timeout} s ({reason}): start process 0 with the same "
        "coordinator_address, and check the host, the port and the "
        f"firewall. Received: coordinator_address={address!r}"
    )


def is_initialized():
    """Whether this process runs in a cluster of several processes."""
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.process_count() > 1


def process_index():
    """This process's index (0 when there is one process)."""
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.process_index()


def process_count():
    """The number of processes (1 outside a cluster)."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def is_primary():
    """Whether this process logs and writes reports (process 0)."""
    return process_index() == 0


def initialize_cluster(
    coordinator_address=None,
    num_processes=None,
    process_id=None,
    *,
    initialization_timeout=300,
    heartbeat_timeout=100,
):
    """Starts this process's part of a cluster of `num_processes`.

    Call it first, in every process, with the same `coordinator_address`
    and `num_processes` and a distinct `process_id`; process 0 runs the
    coordinator. With one process (nothing set) it does nothing.

    Args:
        coordinator_address: "host:port" of process 0 (a port free there).
        num_processes: number of processes in the cluster.
        process_id: this process's index in `[0, num_processes)`.
        initialization_timeout: seconds to wait for every process to join.
        heartbeat_timeout: seconds without a heartbeat after which a
            process counts as dead and every other process is stopped.

    Returns:
        `(num_processes, process_id)`.

    Raises:
        ValueError: a setting is missing, malformed or inconsistent (named),
            the coordinator's port is taken or unreachable, or the backend
            is not JAX.
    """
    address, count, index = resolve_cluster(
        coordinator_address, num_processes, process_id
    )
    for name, value in (
        ("initialization_timeout", initialization_timeout),
        ("heartbeat_timeout", heartbeat_timeout),
    ):
        if not _is_int(value) or value < 1:
            raise ValueError(
                f"`{name}` must be a whole number of seconds >= 1. "
                f"Received: {name}={value!r}"
            )
    if count == 1:
        return 1, 0
    _require_jax()
    import jax

    if jax.distributed.is_initialized():
        if jax.process_count() == count and jax.process_index() == index:
            return count, index
        raise ValueError(
            "JAX's distributed runtime is already running with "
            f"num_processes={jax.process_count()}, process_id="
            f"{jax.process_index()}. Received: num_processes={count}, "
            f"process_id={index}"
        )
    host, port = parse_address(address)
    if index == 0:
        _check_port_free(host, port, address)
    else:
        _wait_for_coordinator(
            host, port, address, index, initialization_timeout
        )
    # Cross-process collectives between CPU devices (the CPU client reads
    # this when it is created; GPU and TPU devices use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=count,
        process_id=index,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )
    if jax.process_count() != count:
        raise ValueError(
            f"the coordinator at {address} runs a cluster of "
            f"{jax.process_count()} processes, but this process was "
            f"started with num_processes={count}: start every process "
            f"with the same count. Received: num_processes={count}, "
            f"process_id={index}"
        )
    return count, index


def check_same_settings(settings, what="settings"):
    """Raises unless every process passes equal `settings` (a JSON-able
    dict; the keys that differ from process 0's are named).

    One small collective: call it in every process at the same point.
    """
    if not is_initialized():
        return
    import numpy as np
    from jax.experimental import multihost_utils

    text = json.dumps(settings, sort_keys=True, default=str).encode()
    codes = np.frombuffer(hashlib.sha256(text).digest(), dtype=np.uint8)
    mine = codes.astype(np.int32)
    theirs = multihost_utils.broadcast_one_to_all(mine)
    agree = multihost_utils.process_allgather(
        np.asarray(np.array_equal(np.asarray(theirs), mine), np.int32)
    )
    if bool(np.all(np.asarray(agree))):
        return
    if np.array_equal(np.asarray(theirs), mine):
        # This process agrees; another one does not and raises there.
        raise ValueError(
            f"the {what} of process(es) "
            f"{[i for i, a in enumerate(np.asarray(agree).ravel()) if not a]} "
            "differ from process 0's: start every process with the same "
            "settings (only the process id differs)."
        )
    raise ValueError(
        f"the {what} of process {process_index()} differ from process "
        "0's: start every process with the same settings (only the process "
        f"id differs). This process's {what}: {settings}"
    )


def gather_weights(model):
    """Every weight of `model` as a whole NumPy array, on every process.

    Sharded arrays that span several processes are gathered (one
    collective per array: call it in every process); others are copied.
    Every process then holds the whole model in host memory.
    """
    import numpy as np

    arrays = []
    for variable in model.weights:
        value = variable.value
        if not getattr(value, "is_fully_addressable", True):
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        arrays.append(np.asarray(value))
    return arrays


__all__ = [
    "gather_weights",
    "ENV_ADDRESS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "check_same_settings",
    "initialize_cluster",
    "is_initialized",
    "is_primary",
    "parse_address",
    "process_count",
    "process_index",
    "resolve_cluster",
]
