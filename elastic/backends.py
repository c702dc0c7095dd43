"""Cluster backends for the trainer: where the Ray driver connects and which actuator it gets.

- ``local``: a multi-node Ray cluster started on this machine (controller.actuators.local).
- ``ray``: an existing Ray cluster at ``cluster.address``, scaled through the Ray autoscaler.
- ``kuberay``: the Ray cluster of a KubeRay RayCluster; capacity via JSON Patch of its worker group.
"""

from __future__ import annotations

import threading
from typing import Any

from elastic.config import JobSpec


class BackendError(RuntimeError):
    """The cluster could not be reached or started (one-line message)."""


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
        try:
            ray.init(address=address, logging_level="WARNING")
        except Exception as exc:  # noqa: BLE001 - ray raises several types for an unreachable cluster
            raise BackendError(f"cluster.address: cannot connect to Ray at {address!r}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    def serve(self, done: threading.Event) -> None:  # pragma: no cover - not used (no main-thread work)
        done.wait()

    def worker_actor_options(self) -> dict[str, Any]:
        c = self.spec.cluster
        return {"num_cpus": c.num_cpus_per_worker, "num_gpus": 1 if c.use_gpu else 0}

    def release_id(self, member: Any) -> str:
        # KubeRay deletes pods by name; a pod's hostname is its name.
        return member.hostname if self.spec.cluster.backend == "kuberay" else member.node_id

    def shutdown(self) -> None:
        import ray

        ray.shutdown()


def make_backend(spec: JobSpec) -> LocalBackend | RayBackend:
    return LocalBackend(spec) if spec.cluster.backend == "local" else RayBackend(spec)
