"""Actuator for a Ray cluster with an autoscaler: ``ray.autoscaler.sdk.request_resources``.

``scale_to(n)`` asks the autoscaler to keep room for ``n`` worker bundles (the request is a total,
counting bundles already in use, and replaces the previous request).  The autoscaler removes only
idle nodes, so scale-down is graceful by construction: once the trainer has released a worker its
node becomes idle and is removed after the autoscaler's idle timeout; ``release`` needs no action.

Ray is imported only when a default function is first needed, so tests inject fakes instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from controller.actuators.base import ActuationError, ActuatorConfigError

__all__ = ["ClusterSnapshot", "NodeGroup", "RayAutoscalerActuator", "capacity_of"]

logger = logging.getLogger(__name__)

RequestResources = Callable[..., Any]
ClusterView = Callable[[], "ClusterSnapshot"]


@dataclass(frozen=True)
class NodeGroup:
    """One node type the autoscaler may start: resources of one node and its maximum count
    (-1 = unbounded)."""

    resources: Mapping[str, float]
    max_count: int


@dataclass(frozen=True)
class ClusterSnapshot:
    """What the cluster holds now and what its autoscaler may add (``node_groups`` is None when the
    cluster has no autoscaler, or one that does not publish its node types)."""

    nodes: tuple[Mapping[str, float], ...]
    node_groups: tuple[NodeGroup, ...] | None = None


def workers_per_node(node: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """Workers one node holds: the floor of its scarcest resource (a worker never spans nodes);
    the epsilon absorbs float sums such as 0.1 * 3."""
    return max(0, min(math.floor(float(node.get(key, 0.0)) / amount + 1e-9) for key, amount in per_worker.items()))


def capacity_of(snapshot: ClusterSnapshot, per_worker: Mapping[str, float], max_workers: int | None = None) -> int:
    """Workers the cluster can host: on its live nodes, or, with an autoscaler, on the most nodes of
    each type it may start (whichever is more), capped at ``max_workers``."""
    live = sum(workers_per_node(node, per_worker) for node in snapshot.nodes)
    scaled = 0
    for group in snapshot.node_groups or ():
        per_node = workers_per_node(group.resources, per_worker)
        if per_node and group.max_count < 0:
            scaled = max_workers if max_workers is not None else 1 << 30
            break
        scaled += per_node * max(group.max_count, 0)
    capacity = max(live, scaled)
    return min(capacity, max_workers) if max_workers is not None else capacity


def describe_shortfall(snapshot: ClusterSnapshot, per_worker: Mapping[str, float], wanted: int) -> str:
    """Why fewer than ``wanted`` workers fit, in one line."""
    totals: dict[str, float] = {}
    for node in snapshot.nodes:
        for key in per_worker:
            totals[key] = totals.get(key, 0.0) + float(node.get(key, 0.0))
    held = ", ".join(f"{totals[k]:g} {k}" for k in per_worker)
    scaler = ("no autoscaler (or none that publishes its node types)" if snapshot.node_groups is None else
              f"its autoscaler may start {', '.join(f'{g.max_count} x {dict(g.resources)}' for g in snapshot.node_groups) or 'nothing'}")
    return (f"{wanted} workers of {dict(per_worker)} do not fit: the cluster has {held} on "
            f"{len(snapshot.nodes)} live node(s) and {scaler}")


def _default_request_resources(*, bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _default_cluster_view() -> ClusterSnapshot:
    import ray

    nodes = tuple(dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive"))
    groups: tuple[NodeGroup, ...] | None = None
    try:
        from ray._private.state import state

        config = state.get_cluster_config()  # written by the v2 autoscaler (what Ray Train reads too)
    except Exception as exc:  # noqa: BLE001 - no autoscaler state is the same as no autoscaler here
        logger.debug("ray_autoscaler: no cluster config: %s", exc)
        config = None
    if config is not None and config.node_group_configs:
        groups = tuple(NodeGroup(dict(g.resources), int(g.max_count)) for g in config.node_group_configs)
    return ClusterSnapshot(nodes, groups)


class RayAutoscalerActuator:
    """Scale a Ray cluster through its autoscaler.

    Args:
        resources_per_worker: Ray resources one worker actor needs, e.g. ``{"GPU": 1, "CPU": 4}``.
        max_workers: the job's ``workers.max``: capacity is never reported above it.
        request_resources: replaces ``ray.autoscaler.sdk.request_resources`` (called with ``bundles=``).
        cluster_view: replaces the reader of the live nodes' resources and the autoscaler's node
            types (:class:`ClusterSnapshot`).

    Capacity is what the live nodes hold, or what the autoscaler's node types can hold at their
    maximum counts, whichever is more; never ``workers.max`` on faith. When that is short of
    ``workers.max``, the reason is logged once (per capacity value). :meth:`close` withdraws the
    resource request, which Ray otherwise keeps in force after the job.
    """

    name = "ray_autoscaler"

    def __init__(
        self,
        resources_per_worker: Mapping[str, float],
        *,
        max_workers: int | None = None,
        request_resources: RequestResources | None = None,
        cluster_view: ClusterView | None = None,
    ) -> None:
        if not isinstance(resources_per_worker, Mapping) or not resources_per_worker:
            raise ActuatorConfigError(
                "ray_autoscaler resources_per_worker must be a non-empty mapping, e.g. {'GPU': 1}"
            )
        for key, amount in resources_per_worker.items():
            if (
                not isinstance(key, str)
                or isinstance(amount, bool)
                or not isinstance(amount, (int, float))
                or not math.isfinite(amount)
                or amount <= 0
            ):
                raise ActuatorConfigError(
                    f"ray_autoscaler resources_per_worker[{key!r}] must be a positive number, got {amount!r}"
                )
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 0
        ):
            raise ActuatorConfigError(f"ray_autoscaler max_workers must be an integer >= 0, got {max_workers!r}")
        self._per_worker = {key: float(amount) for key, amount in resources_per_worker.items()}
        self._max_workers = max_workers
        self._request = request_resources or _default_request_resources
        self._cluster_view = cluster_view or _default_cluster_view
        self._requested: int | None = None  # last request this process made; None before the first
        self._reported_shortfall: int | None = None

    def capacity_workers(self) -> int:
        try:
            snapshot = self._cluster_view()
        except Exception as exc:  # noqa: BLE001 - any Ray failure is an actuation failure here
            raise ActuationError(f"ray_autoscaler: reading the cluster's resources failed: {exc}") from exc
        capacity = capacity_of(snapshot, self._per_worker, self._max_workers)
        if self._max_workers is not None and capacity < self._max_workers and capacity != self._reported_shortfall:
            self._reported_shortfall = capacity
            logger.warning("ray: room for %d worker(s), not workers.max=%d: %s", capacity, self._max_workers,
                           describe_shortfall(snapshot, self._per_worker, self._max_workers))
        return capacity

    def scale_to(self, target_workers: int, release: Sequence[str] = ()) -> None:
        if isinstance(target_workers, bool) or not isinstance(target_workers, int) or target_workers < 0:
            raise ActuationError(f"ray_autoscaler: target_workers must be an integer >= 0, got {target_workers!r}")
        if release:
            # Nothing to do for them: their nodes go idle and the autoscaler removes idle nodes.
            logger.debug("ray_autoscaler: %d released workers left to the idle timeout", len(release))
        if target_workers == self._requested:
            return
        bundles = [dict(self._per_worker) for _ in range(target_workers)]
        try:
            self._request(bundles=bundles)
        except Exception as exc:  # noqa: BLE001
            raise ActuationError(f"ray_autoscaler: request_resources({target_workers} bundles) failed: {exc}") from exc
        logger.info("ray_autoscaler: requested %d worker bundles of %s", target_workers, self._per_worker)
        self._requested = target_workers

    def close(self) -> None:
        """Withdraws this job's resource request (an empty request replaces it), if it made one."""
        if not self._requested:
            return
        try:
            self._request(bundles=[])
        except Exception as exc:  # noqa: BLE001
            raise ActuationError(f"ray_autoscaler: clearing the resource request failed: {exc}") from exc
        logger.info("ray_autoscaler: resource request cleared")
        self._requested = 0
