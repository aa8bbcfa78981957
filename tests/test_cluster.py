"""`keras_vmoe.cluster`: settings that are wrong fail before anything runs,
naming the setting. Several live processes: tests/multiprocess."""

import socket

import keras
import pytest

from keras_vmoe import cluster

ON_JAX = keras.backend.backend() == "jax"


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
    for name in (
        cluster.ENV_ADDRESS, cluster.ENV_NUM_PROCESSES, cluster.ENV_PROCESS_ID
    ):
        monkeypatch.delenv(name, raising=False)


def test_one_process_by_default():
    assert cluster.resolve_cluster() == (None, 1, 0)
    assert cluster.initialize_cluster() == (1, 0)
    assert cluster.process_count() == 1 and cluster.is_primary()


def test_settings_come_from_keras_environment_variables(monkeypatch):
    monkeypatch.setenv(cluster.ENV_ADDRESS, "10.0.0.1:1234,10.0.0.2:2345")
    monkeypatch.setenv(cluster.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(cluster.ENV_PROCESS_ID, "1")
    assert cluster.resolve_cluster() == ("10.0.0.1:1234", 2, 1)
    # Arguments win over the environment.
    assert cluster.resolve_cluster(process_id=0) == ("10.0.0.1:1234", 2, 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_processes=2, process_id=2, coordinator_address="h:1"),
         r"process_id` must be an integer in \[0, 1\].*Received: 2"),
        (dict(num_processes=2, process_id=-1, coordinator_address="h:1"),
         r"process_id.*Received: -1"),
        (dict(num_processes=2, coordinator_address="h:1"),
         "`process_id` is needed"),
        (dict(num_processes=2, process_id=0),
         "`coordinator_address`"),
        (dict(num_processes=0), "num_processes` must be an integer >= 1"),
        (dict(coordinator_address="h:1", process_id=1),
         "`num_processes` is needed"),
        (dict(num_processes=2, process_id=0, coordinator_address="host"),
         "must be 'host:port'.*'host'"),
        (dict(num_processes=2, process_id=0, coordinator_address="h:99999"),
         r"port in \[1, 65535\]"),
    ],
)
def test_wrong_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cluster.initialize_cluster(**kwargs)


def test_a_malformed_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv(cluster.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_NUM_PROCESSES"):
        cluster.resolve_cluster()
    monkeypatch.setenv(cluster.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(cluster.ENV_PROCESS_ID, "5")
    monkeypatch.setenv(cluster.ENV_ADDRESS, "h:1")
    with pytest.raises(ValueError, match=r"from \$KERAS_DISTRIBUTION_PROC"):
        cluster.resolve_cluster()


def test_timeouts_must_be_whole_seconds():
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        cluster.initialize_cluster(heartbeat_timeout=0)


@pytest.mark.skipif(ON_JAX, reason="checks the error on TF and torch")
def test_several_processes_need_jax():
    with pytest.raises(ValueError, match="KERAS_BACKEND=jax"):
        cluster.initialize_cluster("127.0.0.1:1", 2, 1)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not ON_JAX, reason="JAX's distributed runtime")
def test_an_unreachable_coordinator_is_named():
    # Checked before JAX's runtime starts (which would abort the process).
    port = _free_port()
    with pytest.raises(ValueError, match=rf"cannot reach the coordinator at "
                       rf"127.0.0.1:{port} within 2 s"):
        cluster.initialize_cluster(
            f"127.0.0.1:{port}", 2, 1, initialization_timeout=2
        )


@pytest.mark.skipif(not ON_JAX, reason="JAX's distributed runtime")
def test_a_coordinator_port_in_use_is_named():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=rf"port {port} is already in "
                           "use.*process_id=0"):
            cluster.initialize_cluster(f"127.0.0.1:{port}", 2, 0)
