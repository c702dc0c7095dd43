"""An ElasticJob's ``spec`` validated into a frozen object, and the operator's own settings.

The job spec inside the resource is validated by ``elastic.config`` (the same models ``elastic run``
uses), after the operator fills in ``workers``, ``cluster``, ``metrics`` and the directories from the
resource, so ``spec.workers`` gets the same rules and messages as a YAML job's ``workers``. What only
the resource has (image, resources, the name KubeRay derives its objects' names from) is checked
here with the rules the CRD schema and the API server apply, so that an ElasticJob that slipped
past admission fails with one line instead of a refused child create.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from elastic.config import ConfigError, JobSpec, parse_job_spec

__all__ = ["SpecError", "ElasticJob", "OperatorConfig", "QUANTITY", "MAX_JOB_NAME", "WORKER_GROUP", "RAYJOB_INFIX",
           "RAYCLUSTER_SUFFIX", "MAX_RAYJOB_NAME", "MAX_RAYCLUSTER_NAME", "MAX_DRIVER_RETRIES",
           "DRIVER_METRICS_PORT", "STATE_MOUNT", "ENV_VARS", "job_config"]

WORKER_GROUP = "workers"
DEFAULT_RAY_VERSION = "2.60.0"
DRIVER_METRICS_PORT = 9464
STATE_MOUNT = "/var/lib/elastic"
"""Where the durable volume (checkpoints, run directory) is mounted in the head pod (the driver's)."""
GPU_RESOURCE = "nvidia.com/gpu"
RAYCLUSTER_SUFFIX = "-ray"
RAYJOB_INFIX = "-driver-"
"""Driver attempt N of job NAME is the RayJob ``NAME-driver-N``."""
MAX_DRIVER_RETRIES = 20
MAX_RAYCLUSTER_NAME = 53
"""KubeRay's limit on a RayCluster name (a DNS-1035 label; its Services add suffixes)."""
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6
"""KubeRay's limit on a RayJob name (``MaxRayJobNameLength``)."""
MAX_JOB_NAME = min(MAX_RAYCLUSTER_NAME - len(RAYCLUSTER_SUFFIX),
                   MAX_RAYJOB_NAME - len(f"{RAYJOB_INFIX}{MAX_DRIVER_RETRIES}"))
"""37: the longest ElasticJob name whose RayCluster and every driver RayJob KubeRay accepts."""
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes' resource.Quantity, as the KubeRay and core CRDs state it.
QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
            r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_QUANTITY = re.compile(QUANTITY)


class SpecError(ValueError):
    """An ElasticJob spec (or operator setting) is invalid; the one-line message names the field."""


def _quantities(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: must be an object of resource quantities (got {value!r})")
    for resource, amount in value.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, str)) or not _QUANTITY.match(str(amount)):
            raise SpecError(f"{where}.{resource}: must be a Kubernetes quantity such as 2, 500m or 4Gi (got {amount!r})")
    return dict(value)


def job_config(name: str, namespace: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The job spec the driver runs: ``spec.job`` with workers, cluster, metrics and directories from the resource."""
    config = dict(spec.get("job") or {})
    config.setdefault("name", name)
    config["workers"] = spec.get("workers")
    user_cluster = config.get("cluster") if isinstance(config.get("cluster"), Mapping) else {}
    limits = (spec.get("workerResources") or {}).get("limits") or {}
    config["cluster"] = {
        **{k: v for k, v in user_cluster.items() if k in ("num_cpus_per_worker", "retain_heap")},
        "backend": "kuberay", "namespace": namespace, "raycluster": f"{name}{RAYCLUSTER_SUFFIX}",
        "group": WORKER_GROUP, "use_gpu": str(limits.get(GPU_RESOURCE, "0")) not in ("0", ""),
    }
    # Bind all interfaces so that the PodMonitor can scrape the driver (in the head pod).
    config["metrics"] = {**(config.get("metrics") or {}), "addr": "0.0.0.0", "port": DRIVER_METRICS_PORT}
    # On the durable volume: a retried driver resumes from here (`elastic run --resume`).
    config["run_dir"] = f"{STATE_MOUNT}/run"
    checkpoint = config.get("checkpoint") if isinstance(config.get("checkpoint"), Mapping) else {}
    config["checkpoint"] = {**checkpoint, "dir": f"{STATE_MOUNT}/checkpoints"}
    return config


@dataclass(frozen=True)
class ElasticJob:
    """One ElasticJob, validated: what the builders and the reconcile pass need."""

    name: str
    namespace: str
    image: str
    config: JobSpec
    """The driver's job spec (``job_config``), validated by elastic.config."""
    config_data: Mapping[str, Any]
    """The same as plain data (the ConfigMap's job.yaml)."""
    ray_version: str = DEFAULT_RAY_VERSION
    worker_resources: Mapping[str, Any] = field(default_factory=dict)
    storage_size: str = "1Gi"
    """Size of the durable volume (``spec.storage.size``)."""
    storage_class: str | None = None
    """StorageClass of that volume (``spec.storage.storageClassName``); None: the cluster's default."""
    driver_retries: int = 3
    """Times a failed driver is submitted again, resuming from its checkpoint (``spec.driverRetries``)."""

    @property
    def min_workers(self) -> int:
        return self.config.workers.min

    @property
    def max_workers(self) -> int:
        return self.config.workers.max

    @property
    def initial_workers(self) -> int:
        return self.config.workers.initial

    @property
    def uses_gpu(self) -> bool:
        return self.config.cluster.use_gpu

    @classmethod
    def from_resource(cls, name: str, namespace: str, spec: Mapping[str, Any]) -> ElasticJob:
        """Validate ``spec`` of ElasticJob ``namespace/name``; SpecError with the first problem."""
        if len(name) > MAX_JOB_NAME or not DNS_1035.match(name):
            raise SpecError(f"metadata.name: must be a DNS-1035 label of at most {MAX_JOB_NAME} characters, so that "
                            f"KubeRay accepts its RayCluster and driver RayJob names (got {name!r})")
        image = spec.get("image")
        if not isinstance(image, str) or not image:
            raise SpecError(f"spec.image: required, a non-empty string (got {image!r})")
        ray_version = spec.get("rayVersion", DEFAULT_RAY_VERSION)
        if not isinstance(ray_version, str) or not ray_version:
            raise SpecError(f"spec.rayVersion: must be a non-empty string (got {ray_version!r})")
        resources = spec.get("workerResources") or {}
        if not isinstance(resources, Mapping) or set(resources) - {"requests", "limits"}:
            raise SpecError(f"spec.workerResources: must be an object with requests and/or limits (got {resources!r})")
        resources = {key: _quantities(f"spec.workerResources.{key}", resources.get(key))
                     for key in ("requests", "limits") if key in resources}
        storage = spec.get("storage") or {}
        size = storage.get("size", "1Gi") if isinstance(storage, Mapping) else None
        if size is None or not _QUANTITY.match(str(size)):
            raise SpecError(f"spec.storage.size: must be a Kubernetes quantity such as 1Gi (got {size!r})")
        retries = spec.get("driverRetries", 3)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_DRIVER_RETRIES:
            raise SpecError(f"spec.driverRetries: must be an integer in 0..{MAX_DRIVER_RETRIES} (got {retries!r})")
        if not isinstance(spec.get("workers"), Mapping):
            raise SpecError(f"spec.workers: required, an object {{min, max, initial}} (got {spec.get('workers')!r})")
        job = spec.get("job") or {}
        if not isinstance(job, Mapping):
            raise SpecError(f"spec.job: must be an object (the job spec), got {type(job).__name__}")
        data = job_config(name, namespace, spec)
        try:
            config = parse_job_spec(data)
        except ConfigError as exc:
            where = "spec." if str(exc).startswith("workers") else "spec.job."
            raise SpecError(f"{where}{exc}") from None
        return cls(name, namespace, image, config, data, ray_version, resources, str(size),
                   storage.get("storageClassName"), retries)


ENV_VARS = ("ELASTIC_OPERATOR_RECONCILE_INTERVAL_S", "ELASTIC_OPERATOR_METRICS_ADDR", "ELASTIC_OPERATOR_METRICS_PORT",
            "ELASTIC_DRIVER_SERVICE_ACCOUNT", "ELASTIC_KUBERAY_NAMESPACE")
"""Every environment variable :meth:`OperatorConfig.from_env` reads (the Deployment sets no other)."""


@dataclass(frozen=True)
class OperatorConfig:
    """Operator-wide settings (read once from the environment by :meth:`from_env`)."""

    reconcile_interval_s: float = 10.0
    """Seconds between reconcile passes of one job (ELASTIC_OPERATOR_RECONCILE_INTERVAL_S)."""
    retry_delay_s: float = 15.0
    """Delay of kopf retries after a transient API error."""
    driver_service_account: str = "elastic-driver"
    """ServiceAccount of the head pods, where the driver runs; needs get/patch on elasticjobs/status
    (ELASTIC_DRIVER_SERVICE_ACCOUNT)."""
    kuberay_namespace: str = "ray-system"
    """Namespace of the KubeRay operator, the one peer outside a job allowed to its Ray dashboard
    (it submits and watches the RayJob there) (ELASTIC_KUBERAY_NAMESPACE)."""
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
            kuberay_namespace=environ.get("ELASTIC_KUBERAY_NAMESPACE") or cls.kuberay_namespace,
            metrics_addr=environ.get("ELASTIC_OPERATOR_METRICS_ADDR") or cls.metrics_addr,
            metrics_port=int(number("ELASTIC_OPERATOR_METRICS_PORT", 0)) if port else None,
        )
