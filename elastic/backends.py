"""Cluster backends for the trainer: where the Ray driver connects and which actuator it gets.

- ``local``: a multi-node Ray cluster started on this machine (controller.actuators.local).
- ``ray``: an existing Ray cluster at ``cluster.address``, scaled through the Ray autoscaler.
- ``kuberay``: the Ray cluster of a KubeRay RayCluster; capacity via JSON Patch of its worker group.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from elastic.config import JobSpec


class BackendError(RuntimeError):
    """The cluster could not be reached or started (one-line message)."""


#: Seconds to wait for a TCP connection to a Ray address before calling it unreachable.
CONNECT_TIMEOUT_S = 3.0


def host_port(address: str) -> tuple[str, int] | None:
    """``host:port``, ``ray://host:port`` or ``[v6]:port`` -> (host, port); None for ``auto`` and the like."""
    rest = address.strip()
    scheme, sep, after = rest.partition("://")
    if sep:
        if scheme != "ray":
            return None
        rest = after
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fails fast when a ``host:port`` Ray address does not accept TCP connections.

    Raises:
        BackendError: ``cluster.address: cannot reach HOST:PORT (reason)``.
    """
    target = host_port(address)
    if target is None:
        return
    host, port = target
    if not 0 < port < 65536:
        raise BackendError(f"cluster.address: port must be in 1..65535 (got {address!r})")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except socket.timeout:
        raise BackendError(f"cluster.address: cannot reach {host}:{port} (no answer within {timeout_s:g} s)") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise BackendError(f"cluster.address: cannot reach {host}:{port} ({reason})") from None


class LocalBackend:
    needs_main_thread = True

    def __init__(self, spec: JobSpec) -> None:
        from controller.actuators.local import LocalActuator, LocalRayCluster

        self.cluster = LocalRayCluster(spec.cluster.num_cpus_per_worker, max_workers=spec.workers.max,
                                       gpus_per_worker=1 if spec.cluster.use_gpu else 0)
        self.actuator = LocalActuator(self.cluster)

    def start(self, initial_workers: int) -> None:
        self.cluster.start(initial_workers)

    def serve(self, done: threading.Event) -> None:
        self.cluster.executor.serve(done)

    def worker_actor_options(self) -> dict[str, Any]:
        return self.cluster.worker_actor_options()

    @staticmethod
    def release_id(member: Any) -> str:
        return member.node_id

    def shutdown(self) -> None:
        self.cluster.shutdown()


class RayBackend:
    """An existing cluster (``cluster.backend: ray`` or ``kuberay``)."""

    needs_main_thread = False

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        c = spec.cluster
        resources = {"CPU": c.num_cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
        if c.backend == "kuberay":
            from controller.actuators.kuberay import KubeRayActuator

            self.actuator: Any = KubeRayActuator(c.namespace, c.raycluster, c.group)
        else:
            from controller.actuators.ray_autoscaler import RayAutoscalerActuator

            self.actuator = RayAutoscalerActuator(resources, max_workers=spec.workers.max)

    def start(self, initial_workers: int) -> None:
        import ray

        from controller.actuators.local import local_ray_environment

        local_ray_environment(loopback=False)
        address = self.spec.cluster.address or "auto"
        check_reachable(address)  # ray.init may retry an unreachable address for a long time
        try:
            ray.init(address=address, logging_level="WARNING")
        except Exception as exc:  # noqa: BLE001 - ray raises several types for an unreachable cluster
            raise BackendError(f"cluster.address: cannot connect to Ray at {address!r}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def serve(self, done: threading.Event) -> None:  # pragma: no cover - not used (no main-thread work)
        done.wait()

    def worker_actor_options(self) -> dict[str, Any]:
        c = self.spec.cluster
        options: dict[str, Any] = {"num_cpus": c.num_cpus_per_worker, "num_gpus": 1 if c.use_gpu else 0}
        if c.backend == "kuberay":
            from controller.actuators.base import WORKER_RESOURCE

            # Each worker pod offers one (rayStartParams.resources): one rank per pod.
            options["resources"] = {WORKER_RESOURCE: 1}
        return options

    def release_id(self, member: Any) -> str:
        # KubeRay deletes pods by name; a pod's hostname is its name.
        return member.hostname if self.spec.cluster.backend == "kuberay" else member.node_id

    def shutdown(self) -> None:
        import ray

        ray.shutdown()


def make_backend(spec: JobSpec) -> LocalBackend | RayBackend:
    return LocalBackend(spec) if spec.cluster.backend == "local" else RayBackend(spec)
