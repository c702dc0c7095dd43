"""The Actuator protocol: how the reconcile loop changes the number of workers a cluster hosts.

An actuator does the I/O (Ray autoscaler calls, Kubernetes patches, starting local nodes); the
policies and the loop never do.  This module imports nothing heavy so that the loop can use it.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

__all__ = ["Actuator", "ActuationError", "ActuatorConfigError", "WORKER_RESOURCE"]

WORKER_RESOURCE = "elastic_worker"
"""Custom Ray resource of which every worker node (a local Ray node, a KubeRay worker pod) offers
exactly one and every worker actor asks for one: rank <-> node is one-to-one, so releasing a node
(a pod, by its hostname) never takes a live rank with it. CPUs alone cannot promise that: KubeRay
sets a pod's Ray ``num-cpus`` from its CPU limit, so a 2-CPU pod would take two 1-CPU ranks."""


class ActuationError(RuntimeError):
    """An actuator could not read capacity or carry out a resize (one-line message naming the backend)."""


class ActuatorConfigError(ValueError):
    """An actuator was constructed with an invalid parameter."""


@runtime_checkable
class Actuator(Protocol):
    """Changes how many workers the cluster hosts.

    Contract (the reconcile loop relies on it):

    * ``capacity_workers()`` -- how many workers the cluster can host now, counting the ones already
      running.  For an autoscaled backend this is what it can provision on request (e.g. the
      autoscaler's or worker group's maximum), since policies never target more than capacity.
    * ``scale_to(target_workers, release=())`` -- make the cluster host ``target_workers`` workers.
      Idempotent: asking for the size already requested does nothing, and repeating a call (e.g.
      after a controller restart) is harmless.  ``release`` names the workers (pods, nodes, actor ids)
      that the trainer has already released; on scale-down those are removed first.  Graceful
      scale-down: an actuator never removes a worker that is not named in ``release`` and may still
      be training -- when ``release`` names fewer than the difference, it removes only those (or only
      idle ones) and reaches the target on a later call.  Names that no longer exist are ignored.
    * ``name`` -- short backend name for logs and metrics ("local", "ray_autoscaler", "kuberay").

    Errors are raised as :class:`ActuationError`; the loop counts and logs them and retries on its
    next reconcile.
    """

    name: str

    def capacity_workers(self) -> int: ...

    def scale_to(self, target_workers: int, release: Sequence[str] = ()) -> None: ...
