"""One reconcile pass of an ElasticJob and the status it leads to (no kopf here; handlers.py calls it).

Every ``reconcile_interval_s`` (a kopf timer) the operator:

1. waits until the RayCluster is ready, then submits driver attempt 0 (a RayJob);
2. follows the current attempt: a finished one ends the job (``Succeeded``, and the RayCluster that
   holds the GPUs is deleted) or is retried as attempt N+1 while ``spec.driverRetries`` allows
   (``--resume`` continues from the checkpoint on the job's volume), else the job is ``Failed``;
3. while the driver runs, does one :class:`controller.loop.ReconcileLoop` pass with the job's policy,
   a :class:`KubeRayActuator` on ``NAME-ray`` and the trainer seen through ``status.trainer``.

Nothing is remembered between passes except what is in the resources (status.targetWorkers,
status.lastResize, status.driverAttempt, the RayCluster), so a restarted operator makes the same
decision and sends no patch for a resize that is already done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from controller.loop import ReconcileLoop, decision_action
from controller.policy import JobSnapshot, policy_for
from controller.k8s.contract import TrainerReport, epoch_s
from controller.k8s.spec import ElasticJob
from elastic.metrics import ControllerMetrics

__all__ = ["StatusTrainerControl", "job_snapshot", "cluster_ready", "driver_outcome", "policy_for", "OperatorMetrics",
           "PassResult", "run_pass"]


def cluster_ready(raycluster: Mapping[str, Any]) -> bool:
    """Whether KubeRay reports the RayCluster ready: ``status.state`` (what its RayJob controller waits
    for; deprecated) or the ``RayClusterProvisioned`` condition that replaces it."""
    status = raycluster.get("status") or {}
    provisioned = any(c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"
                      for c in status.get("conditions") or ())
    return provisioned or str(status.get("state") or "").lower() == "ready"


def driver_outcome(rayjob: Mapping[str, Any] | None) -> str | None:
    """``Succeeded`` / ``Failed`` of a driver RayJob from its status; None while it runs (or is gone).

    KubeRay sets ``jobDeploymentStatus`` Complete when the Ray job ended (``jobStatus`` says how) and
    Failed when the submission failed or a deadline passed.
    """
    status = (rayjob or {}).get("status") or {}
    deployment, ray_status = status.get("jobDeploymentStatus"), status.get("jobStatus")
    if deployment == "Failed" or ray_status in ("FAILED", "STOPPED"):
        return "Failed"
    if deployment == "Complete" or ray_status == "SUCCEEDED":
        return "Succeeded" if ray_status == "SUCCEEDED" else "Failed"
    return None


@dataclass
class StatusTrainerControl:
    """controller.loop.TrainerControl over the ElasticJob status: the loop's calls become status changes."""

    report: TrainerReport
    target_workers: int
    """``status.targetWorkers`` before this pass."""
    now_iso: str
    changes: dict[str, Any] = field(default_factory=dict)
    """Status fields to write after the pass (targetWorkers, lastResize) -- empty when nothing changed."""

    def set_target_workers(self, n: int, reason: str, at_progress: float | None = None,
                           at_time_s: float | None = None) -> None:
        if at_progress is not None or at_time_s is not None:
            # A schedule step announced ahead: the loop has already added its capacity (pods start
            # now); the target itself changes on the first pass after the trigger has fired.
            return
        if n == self.target_workers:
            return  # idempotent: a restarted operator repeating the same decision changes nothing
        self.changes["targetWorkers"] = n
        self.changes["lastResize"] = {"time": self.now_iso, "fromWorkers": self.report.workers,
                                      "toWorkers": n, "reason": reason}
        self.target_workers = n

    def released_workers(self) -> Sequence[str]:
        return self.report.released_pods

    def current_workers(self) -> int:
        return self.report.workers


def job_snapshot(job: ElasticJob, report: TrainerReport, capacity_workers: int, status: Mapping[str, Any],
                 now_s: float, created_s: float | None) -> JobSnapshot:
    """The policy's view of the job, from the resources only (so a restart sees the same)."""
    return JobSnapshot(
        now_s=now_s, current_workers=report.workers, min_workers=job.min_workers, max_workers=job.max_workers,
        capacity_workers=capacity_workers, progress=report.progress, total_progress=job.config.total_progress,
        grad_variance=report.grad_variance, grad_sqnorm=report.grad_sqnorm,
        accumulation_steps=job.config.accumulation_steps, step_time_s_by_workers=report.step_time_s,
        last_resize_s=epoch_s((status.get("lastResize") or {}).get("time")),
        elapsed_s=max(0.0, now_s - created_s) if created_s is not None else 0.0,
    )


class OperatorMetrics:
    """One elastic.metrics.ControllerMetrics per job, all served from one registry (``.registry``)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def for_job(self, key: str, job_name: str) -> Any:
        """The metrics of ElasticJob ``key`` (namespace/name), labelled ``job_name``."""
        with self._lock:
            if key not in self._jobs:
                self._jobs[key] = ControllerMetrics(job_name)
            return self._jobs[key]

    def forget(self, key: str) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def collect(self) -> list[Any]:
        families: dict[str, Any] = {}
        with self._lock:
            jobs = list(self._jobs.values())
        for metrics in jobs:
            for family in metrics.registry.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit))
                merged.samples.extend(family.samples)
        return list(families.values())


class _PassMetrics:
    """Forwards the loop's metrics and remembers whether this pass failed (for a warning event)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.failed = inner, False

    def record_decision(self, action: str, desired: int, capacity: int) -> None:
        self.inner.record_decision(action, desired, capacity)

    def record_actuation(self, seconds: float) -> None:
        self.inner.record_actuation(seconds)

    def record_reconcile_error(self) -> None:
        self.failed = True
        self.inner.record_reconcile_error()


@dataclass(frozen=True)
class PassResult:
    """What one scaling pass wants written and said."""

    status: dict[str, Any]
    """Status fields (only those that changed)."""
    resize_message: str | None = None
    """Text of a Resize event, when the target changed."""
    failure_message: str | None = None
    """Text of a ReconcileFailed warning, when observing or acting failed."""


def run_pass(job: ElasticJob, report: TrainerReport, status: Mapping[str, Any], actuator: Any, metrics: Any,
             created_s: float | None, now_iso: str, clock: Callable[[], float] = time.time) -> PassResult:
    """One observe -> decide -> act pass (controller.loop.ReconcileLoop) and the status it leads to."""
    trainer = StatusTrainerControl(report, status.get("targetWorkers", report.target_workers), now_iso)
    pass_metrics = _PassMetrics(metrics)
    seen: list[JobSnapshot] = []

    def observe() -> JobSnapshot:
        seen.append(job_snapshot(job, report, actuator.capacity_workers(), status, clock(), created_s))
        return seen[-1]

    decision = ReconcileLoop(policy_for(job.config.scaling), actuator, observe, trainer, pass_metrics).reconcile_once()
    update: dict[str, Any] = {"phase": "Running", "workers": report.workers, "progress": report.progress,
                              "gain": report.gain, **trainer.changes}
    if seen:
        update["capacityWorkers"] = seen[-1].capacity_workers
    resize = None
    if "targetWorkers" in trainer.changes:
        action, _ = decision_action(decision, seen[-1])
        resize = f"{action} {report.workers} -> {trainer.changes['targetWorkers']} workers: {decision.reason}"
    changed = {key: value for key, value in update.items() if status.get(key) != value}
    return PassResult(changed, resize, decision.reason if pass_metrics.failed else None)
