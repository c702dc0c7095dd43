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
from typing import Any, Callable, Mapping, Sequence

from controller.actuators.base import ActuationError, ActuatorConfigError

__all__ = ["RayAutoscalerActuator"]

logger = logging.getLogger(__name__)

RequestResources = Callable[..., Any]
ClusterResources = Callable[[], Mapping[str, float]]


def _default_request_resources(*, bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _default_cluster_resources() -> Mapping[str, float]:
    import ray

    return ray.cluster_resources()


class RayAutoscalerActuator:
    """Scale a Ray cluster through its autoscaler.

    Args:
        resources_per_worker: Ray resources one worker actor needs, e.g. ``{"GPU": 1, "CPU": 4}``.
        max_workers: the most workers the autoscaler can provision (its max nodes x workers per
            node).  When given, ``capacity_workers()`` reports at least this, because a request brings
            the nodes up; when None, capacity is what the current nodes hold.
        request_resources: replaces ``ray.autoscaler.sdk.request_resources`` (called with ``bundles=``).
        cluster_resources: replaces ``ray.cluster_resources`` (total resources of the live nodes).
    """

    name = "ray_autoscaler"

    def __init__(
        self,
        resources_per_worker: Mapping[str, float],
        *,
        max_workers: int | None = None,
        request_resources: RequestResources | None = None,
        cluster_resources: ClusterResources | None = None,
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
        self._cluster_resources = cluster_resources or _default_cluster_resources
        self._requested: int | None = None  # last request this process made; None before the first

    def capacity_workers(self) -> int:
        try:
            totals = self._cluster_resources()
        except Exception as exc:  # noqa: BLE001 - any Ray failure is an actuation failure here
            raise ActuationError(f"ray_autoscaler: cluster_resources failed: {exc}") from exc
        # Floor of the scarcest resource; the epsilon absorbs float sums such as 0.1 * 3.
        hostable = min(
            math.floor(float(totals.get(key, 0.0)) / amount + 1e-9) for key, amount in self._per_worker.items()
        )
        hostable = max(hostable, 0)
        if self._max_workers is not None:
            return max(hostable, self._max_workers)
        return hostable

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
