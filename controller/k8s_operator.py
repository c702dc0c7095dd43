"""Kubernetes operator for ElasticJob (``elastic.dev/v1alpha1``), written with kopf.

Run it with ``kopf run --standalone --namespace=NS -m controller.k8s_operator`` (k8s/ deploys it so).

What it does with one ElasticJob ``NAME``:

* **create**: validates the spec (one-line ``kopf.PermanentError`` otherwise), then creates, all owned
  by the ElasticJob (``kopf.adopt``): the ConfigMap ``NAME-spec`` holding the job spec
  (``/etc/elastic/job.yaml``), the KubeRay RayCluster ``NAME-ray`` (head + worker group ``workers``
  with ``replicas=initial, minReplicas=min, maxReplicas=max``) and the driver ``batch/v1`` Job
  ``NAME-driver`` running ``elastic run /etc/elastic/job.yaml --cluster-address ray://...``.
* **every reconcile_interval_s** (a kopf timer): one pass of :class:`controller.loop.ReconcileLoop`
  with the job's policy, a :class:`KubeRayActuator` on ``NAME-ray`` and the trainer seen through the
  ElasticJob status (contract below). It writes ``status.{phase, workers, targetWorkers,
  capacityWorkers, progress, gain, lastResize}`` and a kopf event with the reason of every resize.
* **delete**: deletes the three children explicitly (a real API server would also garbage-collect
  them through their ownerReferences; the kmock emulator the tests run against does not).

Driver <-> operator contract (both sides go through the ElasticJob's status subresource):

* the driver (``ELASTIC_JOB_RESOURCE=namespace/name`` in its environment tells it which job it is)
  merge-patches ``status.trainer`` = :class:`TrainerReport` (``{workers, targetWorkers, progress,
  gain, gradVariance, gradSqnorm, stepTimeS: {"1": 0.21, ...}, releasedPods: [...], updatedAt}``)
  every few steps, with :class:`ElasticJobStatusClient`; ``releasedPods`` names the Ray worker pods
  (hostnames) the trainer has stopped using after a shrink;
* the operator writes ``status.targetWorkers``; the driver grows or shrinks in place to it at the
  next step boundary. Grow: the operator raises the RayCluster's replicas first, then the target.
  Shrink: it lowers the target first and removes capacity only for the pods listed in
  ``releasedPods`` (graceful scale-down); the driver does not run a controller loop of its own.

Nothing is remembered between passes except what is in the resources (status.targetWorkers,
status.lastResize, the RayCluster), so a restarted operator makes the same decision and sends no
patch for a resize that is already done.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from controller.actuators.kuberay import KubeRayActuator
from controller.loop import ReconcileLoop, decision_action
from controller.policy import JobSnapshot, Policy, PolicyError, make_policy
from elastic.config import ConfigError, parse_job_spec
from elastic.metrics import ControllerMetrics, start_exporter

__all__ = [
    "ELASTICJOB", "WORKER_GROUP", "SpecError", "OperatorConfig", "ElasticJobSpec", "TrainerReport",
    "ElasticJobStatusClient", "StatusTrainerControl", "policy_for", "job_config", "build_configmap",
    "build_raycluster", "build_driver_job", "job_snapshot", "driver_phase", "register",
]

ELASTICJOB = ("elastic.dev", "v1alpha1", "elasticjobs")
WORKER_GROUP = "workers"
DEFAULT_RAY_VERSION = "2.60.0"
JOB_SPEC_DIR = "/etc/elastic"
DRIVER_METRICS_PORT = 9464
RAY_CLIENT_PORT = 10001
GPU_RESOURCE = "nvidia.com/gpu"
TERMINAL_PHASES = ("Succeeded", "Failed")


class SpecError(ValueError):
    """An ElasticJob spec is invalid; the message names the field."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings (read once from the environment by :meth:`from_env`)."""

    reconcile_interval_s: float = 10.0
    """Seconds between reconcile passes of one job (ELASTIC_OPERATOR_RECONCILE_INTERVAL_S)."""
    retry_delay_s: float = 15.0
    """Delay of kopf retries after a transient API error."""
    driver_service_account: str = "elastic-driver"
    """ServiceAccount of driver pods; needs get/patch on elasticjobs/status (ELASTIC_DRIVER_SERVICE_ACCOUNT)."""
    metrics_addr: str = "0.0.0.0"
    """Address of the operator's /metrics endpoint (ELASTIC_OPERATOR_METRICS_ADDR)."""
    metrics_port: int | None = None
    """Port of /metrics; None serves no metrics (ELASTIC_OPERATOR_METRICS_PORT)."""
    watch_timeout_s: float | None = None
    """Client-side timeout of kopf's watch requests; None keeps kopf's default."""

    def __post_init__(self) -> None:
        for name in ("reconcile_interval_s", "retry_delay_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise SpecError(f"operator {name}: must be a number > 0, got {value!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SpecError(f"operator metrics_port: must be in 0..65535, got {self.metrics_port!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> OperatorConfig:
        def number(key: str, default: float) -> float:
            raw = environ.get(key)
            try:
                return float(raw) if raw else default
            except ValueError:
                raise SpecError(f"{key}: must be a number, got {raw!r}") from None

        port = environ.get("ELASTIC_OPERATOR_METRICS_PORT")
        return cls(
            reconcile_interval_s=number("ELASTIC_OPERATOR_RECONCILE_INTERVAL_S", cls.reconcile_interval_s),
            driver_service_account=environ.get("ELASTIC_DRIVER_SERVICE_ACCOUNT") or cls.driver_service_account,
            metrics_addr=environ.get("ELASTIC_OPERATOR_METRICS_ADDR") or cls.metrics_addr,
            metrics_port=int(number("ELASTIC_OPERATOR_METRICS_PORT", 0)) if port else None,
        )


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ElasticJobSpec:
    """``spec`` of an ElasticJob, validated (the CRD schema enforces the same rules at admission)."""

    image: str
    min_workers: int
    max_workers: int
    initial_workers: int
    ray_version: str = DEFAULT_RAY_VERSION
    worker_resources: Mapping[str, Any] = field(default_factory=dict)
    job: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> ElasticJobSpec:
        image = spec.get("image")
        if not isinstance(image, str) or not image:
            raise SpecError(f"spec.image: required, a non-empty string (got {image!r})")
        workers = spec.get("workers") or {}
        if not isinstance(workers, Mapping):
            raise SpecError(f"spec.workers: must be an object {{min, max, initial}} (got {workers!r})")
        for key in ("min", "max", "initial"):
            value = workers.get(key, workers.get("min") if key == "initial" else None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"spec.workers.{key}: must be an integer >= 1 (got {value!r})")
        low, high = workers["min"], workers["max"]
        initial = workers.get("initial", low)
        if low > high:
            raise SpecError(f"spec.workers.min: must be <= spec.workers.max (got min={low}, max={high})")
        if not low <= initial <= high:
            raise SpecError(f"spec.workers.initial: must be within min..max = {low}..{high} (got {initial})")
        ray_version = spec.get("rayVersion", DEFAULT_RAY_VERSION)
        if not isinstance(ray_version, str) or not ray_version:
            raise SpecError(f"spec.rayVersion: must be a non-empty string (got {ray_version!r})")
        resources = spec.get("workerResources") or {}
        if not isinstance(resources, Mapping) or set(resources) - {"requests", "limits"}:
            raise SpecError(f"spec.workerResources: must be an object with requests and/or limits (got {resources!r})")
        job = spec.get("job") or {}
        if not isinstance(job, Mapping):
            raise SpecError(f"spec.job: must be an object (the job spec), got {type(job).__name__}")
        return cls(image, low, high, initial, ray_version, dict(resources), dict(job))

    @property
    def uses_gpu(self) -> bool:
        limits = self.worker_resources.get("limits") or {}
        return str(limits.get(GPU_RESOURCE, "0")) not in ("0", "")


def policy_for(scaling: Any) -> Policy:
    """The controller.policy Policy for a validated ``elastic.config.ScalingConfig``."""
    if scaling.policy == "schedule":
        steps = [{"at_progress": s.at_progress, "at_time_s": s.at_time_s, "workers": s.workers}
                 for s in scaling.steps]
        return make_policy("schedule", steps=steps)
    if scaling.policy == "goodput":
        return make_policy("goodput", min_efficiency=scaling.min_efficiency,
                           hysteresis=scaling.hysteresis, cooldown_s=scaling.cooldown_s)
    return make_policy(scaling.policy)


# --------------------------------------------------------------------------- children


def raycluster_name(job_name: str) -> str:
    return f"{job_name}-ray"


def driver_name(job_name: str) -> str:
    return f"{job_name}-driver"


def configmap_name(job_name: str) -> str:
    return f"{job_name}-spec"


def _labels(job_name: str, role: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": "elastic-adascale", "elastic.dev/job": job_name, "elastic.dev/role": role}


def job_config(name: str, namespace: str, spec: ElasticJobSpec) -> dict[str, Any]:
    """The job spec the driver runs: ``spec.job`` with workers, cluster and metrics from the resource."""
    config = dict(spec.job)
    config.setdefault("name", name)
    config["workers"] = {"min": spec.min_workers, "max": spec.max_workers, "initial": spec.initial_workers}
    user_cluster = config.get("cluster") if isinstance(config.get("cluster"), Mapping) else {}
    config["cluster"] = {
        **{k: v for k, v in user_cluster.items() if k == "num_cpus_per_worker"},
        "backend": "kuberay", "namespace": namespace, "raycluster": raycluster_name(name),
        "group": WORKER_GROUP, "use_gpu": spec.uses_gpu,
    }
    # Bind all interfaces so that the PodMonitor can scrape the driver pod.
    config["metrics"] = {**(config.get("metrics") or {}), "addr": "0.0.0.0", "port": DRIVER_METRICS_PORT}
    return config


def build_configmap(name: str, namespace: str, spec: ElasticJobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": configmap_name(name), "namespace": namespace, "labels": _labels(name, "spec")},
        "data": {"job.yaml": yaml.safe_dump(job_config(name, namespace, spec), sort_keys=False)},
    }


# Ray 2.60 turns token authentication on by default; the head, the workers and the driver of one
# job must agree, and the cluster network is the boundary here, so it is off for all three.
def _ray_env() -> list[dict[str, str]]:
    return [{"name": "RAY_AUTH_MODE", "value": "disabled"}]


def _container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def build_raycluster(name: str, namespace: str, spec: ElasticJobSpec) -> dict[str, Any]:
    """A KubeRay RayCluster (ray.io/v1) sized for the job; the operator, not Ray, scales it."""
    head = {
        "name": "ray-head", "image": spec.image, "env": _ray_env(),
        "ports": [{"name": "gcs", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": RAY_CLIENT_PORT}],
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": _container_security(),
    }
    worker = {"name": "ray-worker", "image": spec.image, "env": _ray_env(),
              "resources": dict(spec.worker_resources), "securityContext": _container_security()}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": {"name": raycluster_name(name), "namespace": namespace, "labels": _labels(name, "raycluster")},
        "spec": {
            "rayVersion": spec.ray_version,
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                # num-cpus 0: no training actor is ever scheduled on the head.
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": {"metadata": {"labels": _labels(name, "head")}, "spec": {"containers": [head]}},
            },
            "workerGroupSpecs": [{
                "groupName": WORKER_GROUP,
                "replicas": spec.initial_workers,
                "minReplicas": spec.min_workers,
                "maxReplicas": spec.max_workers,
                "rayStartParams": {},
                "template": {"metadata": {"labels": _labels(name, "worker")}, "spec": {"containers": [worker]}},
            }],
        },
    }


def build_driver_job(name: str, namespace: str, spec: ElasticJobSpec, service_account: str) -> dict[str, Any]:
    """The driver: one pod running ``elastic run`` against the RayCluster's Ray client port."""
    address = f"ray://{raycluster_name(name)}-head-svc.{namespace}.svc:{RAY_CLIENT_PORT}"
    container = {
        "name": "driver", "image": spec.image,
        "command": ["elastic", "run", f"{JOB_SPEC_DIR}/job.yaml", "--cluster-address", address],
        "env": [*_ray_env(), {"name": "ELASTIC_JOB_RESOURCE", "value": f"{namespace}/{name}"}],
        "ports": [{"name": "metrics", "containerPort": DRIVER_METRICS_PORT}],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [{"name": "job-spec", "mountPath": JOB_SPEC_DIR, "readOnly": True}],
        "securityContext": _container_security(),
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": driver_name(name), "namespace": namespace, "labels": _labels(name, "driver")},
        "spec": {
            # A replaced driver pod resumes from the last checkpoint (checkpoint.dir on a persistent volume).
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": _labels(name, "driver")},
                "spec": {
                    "serviceAccountName": service_account,
                    "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True},
                    "containers": [container],
                    "volumes": [{"name": "job-spec", "configMap": {"name": configmap_name(name)}}],
                },
            },
        },
    }


# --------------------------------------------------------------------------- driver <-> operator


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _epoch_s(iso: str | None) -> float | None:
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None
    except (AttributeError, ValueError):
        return None


@dataclass(frozen=True)
class TrainerReport:
    """What the driver publishes in ``status.trainer`` (the operator's observation of the trainer)."""

    workers: int
    """Workers training now (released ones excluded)."""
    target_workers: int
    """The size the trainer is moving to."""
    progress: float = 0.0
    """tau, scale-invariant iterations so far."""
    gain: float = 1.0
    """AdaScale gain ratio r_t of the last step."""
    grad_variance: float | None = None
    """sigma^2 estimate (None before the first estimate)."""
    grad_sqnorm: float | None = None
    """mu^2 estimate."""
    step_time_s: Mapping[int, float] = field(default_factory=dict)
    """Median step seconds by world size."""
    released_pods: tuple[str, ...] = ()
    """Ray worker pods (hostnames) the trainer released and whose capacity may go."""
    updated_at: str = ""
    """ISO-8601 time of the report."""

    def to_status(self) -> dict[str, Any]:
        return {
            "workers": self.workers, "targetWorkers": self.target_workers, "progress": self.progress,
            "gain": self.gain, "gradVariance": self.grad_variance, "gradSqnorm": self.grad_sqnorm,
            "stepTimeS": {str(k): v for k, v in self.step_time_s.items()},
            "releasedPods": list(self.released_pods), "updatedAt": self.updated_at or _now_iso(),
        }

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> TrainerReport | None:
        """Parse ``status.trainer``; None when absent or unusable (the driver has not reported yet)."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("workers"), int):
            return None
        try:
            return cls(
                workers=int(raw["workers"]), target_workers=int(raw.get("targetWorkers", raw["workers"])),
                progress=float(raw.get("progress") or 0.0), gain=float(raw.get("gain") or 1.0),
                grad_variance=None if raw.get("gradVariance") is None else float(raw["gradVariance"]),
                grad_sqnorm=None if raw.get("gradSqnorm") is None else float(raw["gradSqnorm"]),
                step_time_s={int(k): float(v) for k, v in (raw.get("stepTimeS") or {}).items()},
                released_pods=tuple(str(p) for p in raw.get("releasedPods") or ()),
                updated_at=str(raw.get("updatedAt") or ""),
            )
        except (TypeError, ValueError):
            return None


class ElasticJobStatusClient:
    """The driver's side of the contract: publish reports, read the operator's target.

    ``ElasticJobStatusClient.from_env()`` inside a driver pod (``ELASTIC_JOB_RESOURCE=ns/name``).
    """

    def __init__(self, namespace: str, name: str, api: kubernetes.client.CustomObjectsApi | None = None) -> None:
        self.namespace, self.name = namespace, name
        self._api = api if api is not None else kubernetes.client.CustomObjectsApi()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ElasticJobStatusClient:
        resource = environ.get("ELASTIC_JOB_RESOURCE", "")
        namespace, _, name = resource.partition("/")
        if not namespace or not name:
            raise SpecError(f"ELASTIC_JOB_RESOURCE: must be 'namespace/name', got {resource!r}")
        kubernetes.config.load_incluster_config()
        return cls(namespace, name)

    def publish(self, report: TrainerReport) -> None:
        self._api.patch_namespaced_custom_object_status(
            *ELASTICJOB[:2], self.namespace, ELASTICJOB[2], self.name, {"status": {"trainer": report.to_status()}},
            _content_type="application/merge-patch+json")

    def target_workers(self) -> int | None:
        obj = self._api.get_namespaced_custom_object_status(*ELASTICJOB[:2], self.namespace, ELASTICJOB[2], self.name)
        target = (obj.get("status") or {}).get("targetWorkers")
        return target if isinstance(target, int) else None


@dataclass
class StatusTrainerControl:
    """controller.loop.TrainerControl over the ElasticJob status: the loop's calls become status changes."""

    report: TrainerReport
    target_workers: int
    """``status.targetWorkers`` before this pass."""
    now_iso: str
    changes: dict[str, Any] = field(default_factory=dict)
    """Status fields to write after the pass (targetWorkers, lastResize) -- empty when nothing changed."""

    def set_target_workers(self, n: int, reason: str) -> None:
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


def job_snapshot(spec: ElasticJobSpec, report: TrainerReport, capacity_workers: int, status: Mapping[str, Any],
                 now_s: float, created_s: float | None, total_progress: float | None,
                 accumulation_steps: int) -> JobSnapshot:
    """The policy's view of the job, from the resources only (so a restart sees the same)."""
    return JobSnapshot(
        now_s=now_s, current_workers=report.workers, min_workers=spec.min_workers, max_workers=spec.max_workers,
        capacity_workers=capacity_workers, progress=report.progress, total_progress=total_progress,
        grad_variance=report.grad_variance, grad_sqnorm=report.grad_sqnorm, accumulation_steps=accumulation_steps,
        step_time_s_by_workers=report.step_time_s,
        last_resize_s=_epoch_s((status.get("lastResize") or {}).get("time")),
        elapsed_s=max(0.0, now_s - created_s) if created_s is not None else 0.0,
    )


def driver_phase(job: Mapping[str, Any] | None) -> str | None:
    """Succeeded / Failed from a batch/v1 Job's status; None while it runs (or is gone)."""
    status = (job or {}).get("status") or {}
    if (status.get("succeeded") or 0) >= 1:
        return "Succeeded"
    if any(c.get("type") == "Failed" and c.get("status") == "True" for c in status.get("conditions") or ()):
        return "Failed"
    return None


# --------------------------------------------------------------------------- API plumbing


def load_kube_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account, else ``$KUBECONFIG`` (read now, not at import time) or ~/.kube/config."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                           client_configuration=config)
    return config


def _api_failure(what: str, exc: kubernetes.client.ApiException, delay_s: float) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"{what}: HTTP {exc.status} {exc.reason}", delay=delay_s)


def _create(api: kubernetes.client.ApiClient, obj: dict[str, Any], delay_s: float) -> None:
    """Create a child; one that exists already (an earlier attempt of this handler) is kept."""
    kind, meta = obj["kind"], obj["metadata"]
    try:
        if kind == "ConfigMap":
            kubernetes.client.CoreV1Api(api).create_namespaced_config_map(meta["namespace"], obj)
        elif kind == "Job":
            kubernetes.client.BatchV1Api(api).create_namespaced_job(meta["namespace"], obj)
        else:
            kubernetes.client.CustomObjectsApi(api).create_namespaced_custom_object(
                "ray.io", "v1", meta["namespace"], "rayclusters", obj)
    except kubernetes.client.ApiException as exc:
        if exc.status == 409:
            return
        if exc.status == 422:
            raise kopf.PermanentError(f"create {kind} {meta['name']}: rejected as invalid: {exc.reason}") from exc
        raise _api_failure(f"create {kind} {meta['name']}", exc, delay_s) from exc


def _delete(api: kubernetes.client.ApiClient, kind: str, namespace: str, name: str, delay_s: float) -> None:
    """Delete a child; one that is gone already is fine."""
    try:
        if kind == "ConfigMap":
            kubernetes.client.CoreV1Api(api).delete_namespaced_config_map(name, namespace)
        elif kind == "Job":
            kubernetes.client.BatchV1Api(api).delete_namespaced_job(name, namespace, propagation_policy="Background")
        else:
            kubernetes.client.CustomObjectsApi(api).delete_namespaced_custom_object(
                "ray.io", "v1", namespace, "rayclusters", name)
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise _api_failure(f"delete {kind} {name}", exc, delay_s) from exc


def _read_driver(api: kubernetes.client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        job = kubernetes.client.BatchV1Api(api).read_namespaced_job(driver_name(name), namespace)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return api.sanitize_for_serialization(job)


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


# --------------------------------------------------------------------------- handlers


@dataclass(frozen=True)
class _Job:
    spec: ElasticJobSpec
    name: str
    """job_name of the metrics (spec.job.name, default the ElasticJob's name)."""
    policy: Policy
    total_progress: float
    accumulation_steps: int


def _validated(spec: Mapping[str, Any], name: str, namespace: str) -> _Job:
    """The spec, its job config and its policy, or kopf.PermanentError with the first problem."""
    try:
        job = ElasticJobSpec.from_spec(spec)
        try:
            config = parse_job_spec(job_config(name, namespace, job))
        except ConfigError as exc:
            raise SpecError(f"spec.job.{exc}") from None
        policy = policy_for(config.scaling)
    except (SpecError, PolicyError) as exc:
        raise kopf.PermanentError(str(exc)) from None
    return _Job(job, config.name, policy, config.total_progress, config.accumulation_steps)


def _changed(status: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in update.items() if status.get(key) != value}


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
    if param.watch_timeout_s is not None:
        settings.watching.client_timeout = param.watch_timeout_s
        settings.watching.server_timeout = param.watch_timeout_s
    memo.api_client = kubernetes.client.ApiClient(load_kube_configuration())
    memo.metrics = OperatorMetrics()
    memo.exporter = None
    if param.metrics_port is not None:
        memo.exporter = start_exporter(memo.metrics.registry, param.metrics_addr, param.metrics_port)


def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "exporter", None) is not None:
        memo.exporter.close()
    if getattr(memo, "api_client", None) is not None:
        memo.api_client.close()


def create_job(body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, patch: kopf.Patch,
               memo: kopf.Memo, param: OperatorConfig, logger: Any, **_: Any) -> None:
    try:
        job = _validated(spec, name, namespace)
    except kopf.PermanentError as exc:
        patch.status.update(phase="Failed", message=str(exc))
        raise
    children = [build_configmap(name, namespace, job.spec), build_raycluster(name, namespace, job.spec),
                build_driver_job(name, namespace, job.spec, param.driver_service_account)]
    kopf.adopt(children, owner=body)
    for child in children:
        _create(memo.api_client, child, param.retry_delay_s)
    patch.status.update(phase="Pending", message=f"RayCluster {raycluster_name(name)} and driver created",
                        workers=0, targetWorkers=job.spec.initial_workers,
                        capacityWorkers=job.spec.max_workers, progress=0.0, gain=1.0)
    logger.info("Created RayCluster %s (%d..%d workers, %d at start) and driver %s", raycluster_name(name),
                job.spec.min_workers, job.spec.max_workers, job.spec.initial_workers, driver_name(name))


def reconcile_job(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, name: str,
                  namespace: str, patch: kopf.Patch, memo: kopf.Memo, param: OperatorConfig,
                  logger: Any, **_: Any) -> None:
    """One observe -> decide -> act pass (controller.loop.ReconcileLoop) and the status it leads to."""
    if not status.get("phase") or status.get("phase") in TERMINAL_PHASES:
        return  # not created yet, or finished
    try:
        job = _validated(spec, name, namespace)
    except kopf.PermanentError as exc:
        patch.status.update(phase="Failed", message=str(exc))
        return
    api = memo.api_client
    try:
        finished = driver_phase(_read_driver(api, namespace, name))
    except kubernetes.client.ApiException as exc:
        raise _api_failure(f"read driver {driver_name(name)}", exc, param.retry_delay_s) from exc
    if finished is not None:
        _finish(body, name, namespace, finished, patch, api, param)
        return
    report = TrainerReport.from_status(status.get("trainer"))
    if report is None:
        return  # the driver has not reported yet: still Pending
    actuator = KubeRayActuator(namespace, raycluster_name(name), WORKER_GROUP, kubernetes.client.CustomObjectsApi(api))
    trainer = StatusTrainerControl(report, status.get("targetWorkers", report.target_workers), _now_iso())
    metrics = _PassMetrics(memo.metrics.for_job(f"{namespace}/{name}", job.name))
    seen: list[JobSnapshot] = []

    def observe() -> JobSnapshot:
        seen.append(job_snapshot(job.spec, report, actuator.capacity_workers(), status, time.time(),
                                 _epoch_s(meta.get("creationTimestamp")), job.total_progress,
                                 job.accumulation_steps))
        return seen[-1]

    decision = ReconcileLoop(job.policy, actuator, observe, trainer, metrics).reconcile_once()
    update: dict[str, Any] = {"phase": "Running", "workers": report.workers, "progress": report.progress,
                              "gain": report.gain, **trainer.changes}
    if seen:
        update["capacityWorkers"] = seen[-1].capacity_workers
    patch.status.update(_changed(status, update))
    if "targetWorkers" in trainer.changes:
        action, _ = decision_action(decision, seen[-1])
        kopf.info(body, reason="Resize", message=f"{action} {report.workers} -> "
                  f"{trainer.changes['targetWorkers']} workers: {decision.reason}")
    if metrics.failed:
        kopf.warn(body, reason="ReconcileFailed", message=decision.reason)


def _finish(body: kopf.Body, name: str, namespace: str, phase: str, patch: kopf.Patch,
            api: kubernetes.client.ApiClient, param: OperatorConfig) -> None:
    """The driver ended: record it; on success free the RayCluster (its pods hold the GPUs)."""
    if phase == "Succeeded":
        _delete(api, "RayCluster", namespace, raycluster_name(name), param.retry_delay_s)
        message = f"driver {driver_name(name)} succeeded; RayCluster {raycluster_name(name)} deleted"
        kopf.info(body, reason="Succeeded", message=message)
    else:
        message = f"driver {driver_name(name)} failed; RayCluster {raycluster_name(name)} kept for inspection"
        kopf.warn(body, reason="Failed", message=message)
    patch.status.update(phase=phase, message=message)


def delete_job(name: str, namespace: str, memo: kopf.Memo, param: OperatorConfig, logger: Any, **_: Any) -> None:
    """Delete the children explicitly (ownerReferences would too, on a real API server)."""
    for kind, child in (("Job", driver_name(name)), ("RayCluster", raycluster_name(name)),
                        ("ConfigMap", configmap_name(name))):
        _delete(memo.api_client, kind, namespace, child, param.retry_delay_s)
    memo.metrics.forget(f"{namespace}/{name}")
    logger.info("Deleted the driver, the RayCluster and the job spec of %s", name)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    """Attach the operator's handlers to ``registry`` (tests build their own with a short interval)."""
    kopf.on.login(registry=registry)(login)
    kopf.on.startup(registry=registry, param=config)(startup)
    kopf.on.cleanup(registry=registry)(cleanup)
    kopf.on.create(*ELASTICJOB, registry=registry, param=config)(create_job)
    kopf.timer(*ELASTICJOB, interval=config.reconcile_interval_s, initial_delay=config.reconcile_interval_s,
               registry=registry, param=config)(reconcile_job)
    kopf.on.delete(*ELASTICJOB, registry=registry, param=config)(delete_job)


# `kopf run -m controller.k8s_operator` imports this module: the handlers go to kopf's default registry.
register(kopf.get_default_registry(), OperatorConfig.from_env())
