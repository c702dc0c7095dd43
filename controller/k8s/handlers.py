"""The kopf handlers of the ElasticJob operator: each returns the status it wants written.

``@_writes_status`` is the one place that writes ``status``: it adds ``observedGeneration`` and,
when a handler raises :class:`JobFailed`, writes ``phase: Failed`` with a reason, a message and a
``conditions`` entry before giving up (``kopf.PermanentError``), so no failure leaves a job without
a phase. ``spec`` is immutable after creation (a CEL transition rule in the CRD), so there is no
update handler.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import kopf
import kubernetes

from controller.actuators.base import ActuationError
from controller.actuators.kuberay import KubeRayActuator
from controller.k8s import builders
from controller.k8s.client import ApiFailure, ChildClient, load_kube_configuration
from controller.k8s.contract import ELASTICJOB, TrainerReport, epoch_s, now_iso
from controller.k8s.reconcile import OperatorMetrics, cluster_ready, driver_outcome, run_pass
from controller.k8s.spec import WORKER_GROUP, ElasticJob, OperatorConfig, SpecError
from elastic.metrics import start_exporter

__all__ = ["JobFailed", "condition", "register"]

TERMINAL_PHASES = ("Succeeded", "Failed")


class JobFailed(Exception):
    """The job cannot go on; ``reason`` is a CamelCase word for the condition and the event."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def condition(kind: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now_iso()}


def _ended(phase: str, reason: str, message: str) -> dict[str, Any]:
    return {"phase": phase, "message": message, "conditions": [condition(phase, reason, message)]}


def _writes_status(handler: Callable[..., dict[str, Any]]) -> Callable[..., None]:
    @functools.wraps(handler)
    def wrapper(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **kwargs: Any) -> None:
        generation = meta.get("generation")
        try:
            update = handler(body=body, meta=meta, status=status, **kwargs)
        except JobFailed as exc:
            patch.status.update({**_ended("Failed", exc.reason, str(exc)), "observedGeneration": generation})
            kopf.warn(body, reason=exc.reason, message=str(exc))
            raise kopf.PermanentError(str(exc)) from None
        if update:
            patch.status.update(update)
        if update and status.get("observedGeneration") != generation:
            patch.status["observedGeneration"] = generation
    return wrapper


def _validated(name: str, namespace: str, spec: Any) -> ElasticJob:
    try:
        return ElasticJob.from_resource(name, namespace, spec)
    except SpecError as exc:
        raise JobFailed("InvalidSpec", str(exc)) from None


def _apply(action: Callable[[], Any], delay_s: float) -> Any:
    """Run one API action: a refused object fails the job, anything else is retried by kopf."""
    try:
        return action()
    except ApiFailure as exc:
        if exc.permanent:
            raise JobFailed("ChildRejected", str(exc)) from None
        raise kopf.TemporaryError(str(exc), delay=delay_s) from None


# --------------------------------------------------------------------------- lifecycle


def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf and our own client use the same credentials (see load_kube_configuration)."""
    config = load_kube_configuration()
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
        scheme=scheme or None, token=token or None, username=config.username or None,
        password=config.password or None, certificate_path=config.cert_file, private_key_path=config.key_file)


def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, param: OperatorConfig, **_: Any) -> None:
    settings.persistence.finalizer = "elastic.dev/cleanup"
    settings.posting.level = logging.INFO
    # Namespaced: no cluster-wide listing of namespaces or CRDs (the Role grants none; kopf would warn).
    settings.scanning.disabled = True
    if param.watch_timeout_s is not None:
        settings.watching.client_timeout = param.watch_timeout_s
        settings.watching.server_timeout = param.watch_timeout_s
    memo.api_client = kubernetes.client.ApiClient(load_kube_configuration())
    memo.children = ChildClient(memo.api_client)
    memo.metrics = OperatorMetrics()
    memo.exporter = None
    if param.metrics_port is not None:
        memo.exporter = start_exporter(memo.metrics.registry, param.metrics_addr, param.metrics_port)


def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "exporter", None) is not None:
        memo.exporter.close()
    if getattr(memo, "api_client", None) is not None:
        memo.api_client.close()


# --------------------------------------------------------------------------- the job


@_writes_status
def create_job(body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, memo: kopf.Memo,
               param: OperatorConfig, logger: Any, **_: Any) -> dict[str, Any]:
    """The volume, the NetworkPolicy, the job spec and the RayCluster; the driver follows once it is ready."""
    job = _validated(name, namespace, spec)
    children = builders.build_children(job, param.driver_service_account, param.kuberay_namespace)
    kopf.adopt(children, owner=body)
    for child in children:
        _apply(lambda child=child: memo.children.create(child), param.retry_delay_s)
    logger.info("Created RayCluster %s (%d..%d workers, %d at start)", builders.raycluster_name(name),
                job.min_workers, job.max_workers, job.initial_workers)
    return {"phase": "Pending", "message": f"waiting for RayCluster {builders.raycluster_name(name)} to be ready",
            "workers": 0, "targetWorkers": job.initial_workers, "capacityWorkers": job.max_workers,
            "progress": 0.0, "gain": 1.0}


def _submit(job: ElasticJob, body: kopf.Body, attempt: int, memo: kopf.Memo, param: OperatorConfig) -> dict[str, Any]:
    rayjob = builders.build_rayjob(job, attempt)
    kopf.adopt(rayjob, owner=body)
    _apply(lambda: memo.children.create(rayjob), param.retry_delay_s)
    return {"driverAttempt": attempt, "message": f"driver {rayjob['metadata']['name']} submitted"}


def _restart_capacity(job: ElasticJob, memo: kopf.Memo, param: OperatorConfig) -> dict[str, Any]:
    """Before a retried driver starts: room for the ``initial`` workers it starts with, and no stale report.

    The dead driver's ``status.trainer`` would drive scaling passes until the new one reports, and a
    group shrunk below ``initial`` would leave the new driver waiting for workers that never come.
    """
    actuator = KubeRayActuator(job.namespace, builders.raycluster_name(job.name), WORKER_GROUP,
                               kubernetes.client.CustomObjectsApi(memo.api_client))
    try:
        if actuator.group_state().replicas < job.initial_workers:
            actuator.scale_to(job.initial_workers)
    except ActuationError as exc:
        raise kopf.TemporaryError(str(exc), delay=param.retry_delay_s) from None
    return {"trainer": None, "workers": 0, "targetWorkers": job.initial_workers}


def _start_driver(job: ElasticJob, body: kopf.Body, memo: kopf.Memo, param: OperatorConfig) -> dict[str, Any]:
    """Attempt 0, once the RayCluster is ready (a cold image pull can take minutes; nothing waits on it)."""
    name = builders.raycluster_name(job.name)
    raycluster = _apply(lambda: memo.children.read("RayCluster", job.namespace, name), param.retry_delay_s)
    if raycluster is None:
        raise JobFailed("RayClusterMissing", f"RayCluster {name} does not exist")
    if not cluster_ready(raycluster):
        return {}
    return _submit(job, body, 0, memo, param)


def _follow_driver(job: ElasticJob, body: kopf.Body, attempt: int, memo: kopf.Memo,
                   param: OperatorConfig) -> dict[str, Any] | None:
    """The status a finished (or vanished) driver attempt leads to; None while it runs."""
    driver, cluster = builders.rayjob_name(job.name, attempt), builders.raycluster_name(job.name)
    rayjob = _apply(lambda: memo.children.read("RayJob", job.namespace, driver), param.retry_delay_s)
    if rayjob is None:
        return _submit(job, body, attempt, memo, param)  # deleted behind our back: submit it again
    outcome = driver_outcome(rayjob)
    if outcome == "Succeeded":
        _apply(lambda: memo.children.delete("RayCluster", job.namespace, cluster), param.retry_delay_s)
        message = f"driver {driver} succeeded; RayCluster {cluster} deleted"
        kopf.info(body, reason="Succeeded", message=message)
        return _ended("Succeeded", "DriverSucceeded", message)
    if outcome != "Failed":
        return None
    why = (rayjob.get("status") or {}).get("message") or (rayjob.get("status") or {}).get("reason") or "no reason"
    if attempt >= job.driver_retries:
        raise JobFailed("DriverFailed", f"driver {driver} failed ({why}) after {attempt + 1} attempt(s); "
                        f"RayCluster {cluster} kept for inspection")
    kopf.warn(body, reason="DriverRetry", message=f"driver attempt {attempt} failed ({why}); "
              f"submitting attempt {attempt + 1}, which resumes from the last checkpoint")
    return {**_restart_capacity(job, memo, param), **_submit(job, body, attempt + 1, memo, param)}


def _scale(job: ElasticJob, body: kopf.Body, status: kopf.Status, meta: kopf.Meta, memo: kopf.Memo) -> dict[str, Any]:
    """One scaling pass while the driver runs and reports."""
    report = TrainerReport.from_status(status.get("trainer"))
    if report is None:
        return {}  # the driver has not reported yet
    actuator = KubeRayActuator(job.namespace, builders.raycluster_name(job.name), WORKER_GROUP,
                               kubernetes.client.CustomObjectsApi(memo.api_client))
    metrics = memo.metrics.for_job(f"{job.namespace}/{job.name}", job.config.name)
    result = run_pass(job, report, status, actuator, metrics, epoch_s(meta.get("creationTimestamp")), now_iso())
    if result.resize_message:
        kopf.info(body, reason="Resize", message=result.resize_message)
    if result.failure_message:
        kopf.warn(body, reason="ReconcileFailed", message=result.failure_message)
    return result.status


@_writes_status
def reconcile_job(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, name: str,
                  namespace: str, memo: kopf.Memo, param: OperatorConfig, **_: Any) -> dict[str, Any]:
    """Start the driver when the cluster is ready, follow it, and scale the job while it runs."""
    if not status.get("phase") or status.get("phase") in TERMINAL_PHASES:
        return {}  # not created yet, or finished
    job = _validated(name, namespace, spec)
    attempt = status.get("driverAttempt")
    if attempt is None:
        return _start_driver(job, body, memo, param)
    ended_or_retried = _follow_driver(job, body, attempt, memo, param)
    return ended_or_retried if ended_or_retried is not None else _scale(job, body, status, meta, memo)


def delete_job(name: str, namespace: str, status: kopf.Status, memo: kopf.Memo, param: OperatorConfig,
               logger: Any, **_: Any) -> None:
    """Delete the children explicitly (ownerReferences would too, on a real API server)."""
    attempts = range((status.get("driverAttempt") or 0) + 1)
    doomed = [("RayJob", builders.rayjob_name(name, n)) for n in attempts] + [
        ("RayCluster", builders.raycluster_name(name)), ("NetworkPolicy", builders.networkpolicy_name(name)),
        ("ConfigMap", builders.configmap_name(name)), ("PersistentVolumeClaim", builders.pvc_name(name))]
    for kind, child in doomed:
        try:
            memo.children.delete(kind, namespace, child)
        except ApiFailure as exc:
            raise kopf.TemporaryError(str(exc), delay=param.retry_delay_s) from None
    memo.metrics.forget(f"{namespace}/{name}")
    logger.info("Deleted the driver, the RayCluster, the volume and the job spec of %s", name)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Attach the operator's handlers to ``registry`` (tests build their own with a short interval)."""
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry, param=config)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.create(*ELASTICJOB, registry=registry, param=config)(create_job)
    kopf.timer(*ELASTICJOB, interval=config.reconcile_interval_s, initial_delay=config.reconcile_interval_s,
               registry=registry, param=config)(reconcile_job)
    kopf.on.delete(*ELASTICJOB, registry=registry, param=config)(delete_job)
