"""Joining a Ray cluster, or starting an embedded one, for the length of a fleet run."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.capacity import NodeCapacity


class ClusterUnreachable(RuntimeError):
    """--address or RAY_ADDRESS names no running Ray cluster."""


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: --address, else RAY_ADDRESS (set by `ray job submit`), else None (embedded)."""
    return address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[list[NodeCapacity]]:
    """Connect to `address` (or RAY_ADDRESS), or start a local cluster with the dashboard off; yields its nodes.

    A Ray session that is already up in this process (a test, a notebook) is used as it is and left running.
    Worker output stays in Ray's log files (`/tmp/ray/session_latest/logs`) so it does not tear the live view;
    a worker's error reaches fleet.json and the summary.
    """
    import ray

    started = False
    if not ray.is_initialized():
        address = cluster_address(address)
        if address:
            try:
                _check_reachable(address)
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as err:
                raise ClusterUnreachable(
                    f"could not join the Ray cluster at {address!r}: {err} "
                    f"(fix: start it with `ray start --head`, correct --address/RAY_ADDRESS, or unset both to run locally)"
                ) from None
        else:
            with _loopback_only():
                ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        yield ray_nodes()
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _loopback_only() -> Iterator[None]:
    """An embedded cluster is for this machine only: every Ray server (GCS, raylet, workers, runtime-env
    agent) binds to 127.0.0.1. Ray does this when its node address is the loopback one, which it picks
    when clusters are switched off (its setting for single-machine use); the variable also reaches the
    processes Ray starts. A cluster on several nodes is `--address`: see docs/fleet.md for what it exposes."""
    import ray._private.ray_constants as ray_constants

    previous_env = os.environ.get(_SINGLE_MACHINE_ENV)
    previous_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = previous_env


_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on; ray.init would retry it for many minutes.
    `auto` and `ray://` addresses are left to Ray, which reports them promptly."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"nothing answers at {host}:{port} ({err.strerror or err})") from None


def ray_nodes() -> list[NodeCapacity]:
    """Every live node's total CPUs and GPUs."""
    import ray

    return [
        NodeCapacity(node_id=node["NodeID"], cpus=node["Resources"].get("CPU", 0.0), gpus=node["Resources"].get("GPU", 0.0))
        for node in ray.nodes()
        if node.get("Alive")
    ]
