"""KubeRay actuator: resize one worker group of a RayCluster with a JSON Patch.

The RayCluster CRD (ray.io/v1) keeps its worker groups in a list,
``spec.workerGroupSpecs[i].{groupName, replicas, minReplicas, maxReplicas, scaleStrategy.workersToDelete}``.
A merge patch would replace the whole list, so every change here is a JSON Patch
(``application/json-patch+json``) addressed to one element by index, guarded by ``test`` operations
on the element's ``groupName`` (the index still names our group) and its current ``replicas``
(nobody resized it since we read it). When either guard fails the API server rejects the whole
patch and nothing changes: a concurrent edit surfaces as an ``ActuationError`` and the caller retries
with fresh state on its next reconcile.

Scale-down is graceful (DESIGN.md, Controller): the trainer first releases workers at a step
boundary and reports the pods it vacated; ``scale_to(n, release=pods)`` then lowers ``replicas`` and
lists exactly those pods in ``scaleStrategy.workersToDelete`` so that KubeRay removes the idle pods,
not random busy ones. Released names are checked against the group's live pods (labels
``ray.io/cluster``, ``ray.io/group``), so a name whose pod is already gone is ignored. KubeRay clears
``workersToDelete`` only when its autoscaler is on, and ours is off, so every patch here owns the list:
it is set to exactly the live pods to delete, pruned of pods that are gone, and emptied on a grow;
repeating a call once KubeRay deleted the pods sends one pruning patch, then nothing.

Usage::

    actuator = KubeRayActuator("ml", "digits-ray", "workers")
    actuator.capacity_workers()                                   # -> 4 (replicas of the group)
    actuator.scale_to(2, release=["digits-ray-workers-x7k2p", "digits-ray-workers-q9d4m"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kubernetes

from controller.actuators.base import ActuationError

__all__ = ["KubeRayActuator", "WorkerGroupState", "scale_patch", "find_worker_group"]

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayclusters"
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class WorkerGroupState:
    """One worker group of a RayCluster as read from the API server."""

    index: int
    """Position in ``spec.workerGroupSpecs`` (JSON Patch paths address the list by index)."""
    group: str
    """``groupName`` of the group."""
    replicas: int
    """Desired worker pods (``replicas``; KubeRay's default ``minReplicas`` when unset)."""
    min_replicas: int
    """``minReplicas`` (0 when unset, KubeRay's default)."""
    max_replicas: int | None
    """``maxReplicas``; None when unset (KubeRay then treats it as unbounded)."""
    workers_to_delete: tuple[str, ...]
    """``scaleStrategy.workersToDelete`` as currently set."""
    has_scale_strategy: bool
    """Whether ``scaleStrategy`` exists (decides between ``add`` of the object or of the list)."""
    has_replicas: bool = True
    """Whether ``replicas`` is set (a missing member cannot be guarded with ``test``)."""


def find_worker_group(raycluster: Mapping[str, Any], group: str) -> WorkerGroupState:
    """Locate ``group`` by ``groupName`` in a RayCluster object; ActuationError if it is not there."""
    name = raycluster.get("metadata", {}).get("name", "?")
    groups = raycluster.get("spec", {}).get("workerGroupSpecs") or []
    for index, spec in enumerate(groups):
        if spec.get("groupName") != group:
            continue
        strategy = spec.get("scaleStrategy")
        replicas = spec.get("replicas")
        has_replicas = isinstance(replicas, int)
        if not has_replicas:
            replicas = spec.get("minReplicas", 0)  # KubeRay's default
        max_replicas = spec.get("maxReplicas")
        return WorkerGroupState(
            index=index,
            group=group,
            replicas=int(replicas),
            min_replicas=int(spec.get("minReplicas", 0) or 0),
            max_replicas=int(max_replicas) if max_replicas is not None else None,
            workers_to_delete=tuple((strategy or {}).get("workersToDelete") or ()),
            has_scale_strategy=isinstance(strategy, Mapping),
            has_replicas=has_replicas,
        )
    known = ", ".join(str(g.get("groupName")) for g in groups) or "none"
    raise ActuationError(f"raycluster {name}: no worker group named {group!r} (groups: {known})")


def scale_patch(state: WorkerGroupState, target_workers: int, release: Sequence[str] = (),
                live_pods: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The JSON Patch that moves ``state`` towards ``target_workers``; ``[]`` when nothing is to change.

    ``live_pods`` are the group's pods that exist and are not terminating; released names that are
    not among them are ignored (KubeRay already removed them, or they never were ours).

    - grow: ``replicas = target`` and ``workersToDelete`` emptied (nothing leaves when growing);
    - shrink: ``workersToDelete`` = exactly the live released pods (a stale list from an earlier
      resize is replaced, never appended to) and ``replicas`` lowered only as far as those pods allow:
      KubeRay deletes the listed pods first and then *any* pods while more remain than ``replicas``,
      so ``replicas >= live pods - released pods`` keeps every pod that may still train;
    - no patch when the group already has that many replicas and the list is exactly the live released pods.
    Raises ActuationError when the target is outside ``[minReplicas, maxReplicas]``.
    """
    if isinstance(target_workers, bool) or not isinstance(target_workers, int) or target_workers < 0:
        raise ActuationError(f"target_workers: must be an integer >= 0, got {target_workers!r}")
    if target_workers < state.min_replicas:
        raise ActuationError(f"target_workers: {target_workers} is below minReplicas={state.min_replicas} "
                             f"of worker group {state.group!r}")
    if state.max_replicas is not None and target_workers > state.max_replicas:
        raise ActuationError(f"target_workers: {target_workers} is above maxReplicas={state.max_replicas} "
                             f"of worker group {state.group!r}")
    if target_workers > state.replicas:
        replicas, delete = target_workers, []
    else:
        live = set(live_pods)
        delete = [pod for pod in dict.fromkeys(release) if pod in live]
        replicas = min(state.replicas, max(target_workers, len(live) - len(delete)))
        if replicas == state.replicas and set(delete) == set(state.workers_to_delete):
            return []

    base = f"/spec/workerGroupSpecs/{state.index}"
    ops: list[dict[str, Any]] = [{"op": "test", "path": f"{base}/groupName", "value": state.group}]
    if state.has_replicas:
        ops.append({"op": "test", "path": f"{base}/replicas", "value": state.replicas})
    if replicas != state.replicas or not state.has_replicas:
        ops.append({"op": "replace" if state.has_replicas else "add", "path": f"{base}/replicas", "value": replicas})
    if set(delete) != set(state.workers_to_delete):
        if not state.has_scale_strategy:
            ops.append({"op": "add", "path": f"{base}/scaleStrategy", "value": {"workersToDelete": delete}})
        else:
            # "add" on an existing member replaces it (RFC 6902, 4.1): one op covers both cases.
            ops.append({"op": "add", "path": f"{base}/scaleStrategy/workersToDelete", "value": delete})
    return ops


class KubeRayActuator:
    """Resizes worker group ``group`` of RayCluster ``namespace/raycluster`` (see module docstring).

    ``api`` defaults to a CustomObjectsApi on the default client configuration; the group's pods
    are listed with a CoreV1Api on the same ApiClient (label ``ray.io/cluster``, ``ray.io/group``).
    """

    name = "kuberay"

    def __init__(self, namespace: str, raycluster: str, group: str,
                 api: kubernetes.client.CustomObjectsApi | None = None) -> None:
        for field, value in (("namespace", namespace), ("raycluster", raycluster), ("group", group)):
            if not isinstance(value, str) or not value:
                raise ActuationError(f"kuberay {field}: must be a non-empty string, got {value!r}")
        self.namespace = namespace
        self.raycluster = raycluster
        self.group = group
        self._api = api if api is not None else kubernetes.client.CustomObjectsApi()
        self._core = kubernetes.client.CoreV1Api(self._api.api_client)

    def __repr__(self) -> str:
        return f"KubeRayActuator({self.namespace}/{self.raycluster}, group={self.group!r})"

    def group_state(self) -> WorkerGroupState:
        """Read the RayCluster and return the state of our worker group."""
        try:
            obj = self._api.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, self.raycluster)
        except kubernetes.client.ApiException as exc:
            raise self._api_error("read", exc) from exc
        return find_worker_group(obj, self.group)

    def capacity_workers(self) -> int:
        """Workers the group can be given on request: ``maxReplicas`` (``replicas`` when unbounded).

        The operator, not Ray's autoscaler, moves ``replicas`` within ``[minReplicas, maxReplicas]``,
        so the maximum is what the cluster can provision (the Actuator protocol's meaning).
        """
        state = self.group_state()
        return state.max_replicas if state.max_replicas is not None else state.replicas

    def live_pods(self) -> list[str]:
        """Names of the group's pods that exist, are not terminating and have not exited."""
        labels = {"ray.io/cluster": self.raycluster, "ray.io/group": self.group}
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        try:
            pods = self._core.list_namespaced_pod(self.namespace, label_selector=selector)
        except kubernetes.client.ApiException as exc:
            raise self._api_error("list pods", exc, resource="pods") from exc
        return sorted(
            pod.metadata.name for pod in pods.items
            # Re-checked here: a selector is a request, and not every server (nor emulator) honours it.
            if labels.items() <= (pod.metadata.labels or {}).items()
            and pod.metadata.deletion_timestamp is None
            and (pod.status is None or pod.status.phase not in ("Succeeded", "Failed"))
        )

    def scale_to(self, target_workers: int, release: Sequence[str] = ()) -> None:
        """Move the group to ``target_workers`` replicas; on scale-down remove exactly ``release``.

        Graceful: never lowers ``replicas`` so far that KubeRay would delete a pod not named in
        ``release``; the rest of a shrink happens on a later call, once the trainer released more.
        Idempotent: no request is sent when there is nothing to change. See :func:`scale_patch`.
        """
        state = self.group_state()
        live = self.live_pods() if target_workers <= state.replicas else []  # a grow empties the list
        ops = scale_patch(state, target_workers, release, live)
        if not ops:
            return
        try:
            self._api.patch_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, self.raycluster, ops,
                _content_type=JSON_PATCH)
        except kubernetes.client.ApiException as exc:
            raise self._api_error(f"resize {state.replicas} -> {target_workers}", exc) from exc

    def _api_error(self, what: str, exc: kubernetes.client.ApiException,
                   resource: str = "rayclusters.ray.io") -> ActuationError:
        where = f"kuberay {self.namespace}/{self.raycluster}"
        if exc.status == 404 and resource == "pods":
            return ActuationError(f"{where}: {what} failed: pods not found (HTTP 404)")
        if exc.status == 404:
            return ActuationError(f"{where}: raycluster not found (is KubeRay installed and the cluster created?)")
        if exc.status in (409, 422):
            # A failed JSON Patch "test" (someone changed the group since we read it) is a 422.
            return ActuationError(f"{where}: {what} rejected, the worker group changed concurrently "
                                  f"(HTTP {exc.status}); retry with fresh state")
        if exc.status == 403:
            return ActuationError(f"{where}: {what} forbidden; the service account needs access to {resource}")
        return ActuationError(f"{where}: {what} failed with HTTP {exc.status} {exc.reason}")
