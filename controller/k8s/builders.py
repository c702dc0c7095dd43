"""The objects the operator creates for one ElasticJob ``NAME``, as plain dicts (pure; no API calls).

* ``ConfigMap NAME-spec``: ``job.yaml``, the driver's job spec (:func:`controller.k8s.spec.job_config`);
* ``PersistentVolumeClaim NAME-state``: durable checkpoints and run directory, mounted in the head pod;
* ``RayCluster NAME-ray``: a head (no training; the driver runs here) and worker group ``workers``
  with ``replicas=initial, minReplicas=min, maxReplicas=max``; each worker pod offers one
  ``elastic_worker`` Ray resource and each rank asks for one, so rank <-> pod is one-to-one;
* ``RayJob NAME-driver-N`` (attempt N): the driver, ``elastic run /etc/elastic/job.yaml --resume``,
  submitted by KubeRay through the Ray Jobs API to the RayCluster above (``clusterSelector``) once
  that cluster is ready. A retried driver resumes from the newest checkpoint on the volume;
* ``NetworkPolicy NAME-ray``: the job's pods accept traffic from each other; from elsewhere only the
  driver's metrics port and, from the KubeRay operator's namespace, the Ray dashboard (Jobs API).

Every pod template meets the ``restricted`` Pod Security level (non-root, RuntimeDefault seccomp,
no privilege escalation, all capabilities dropped) and Ray pods get a memory-backed ``/dev/shm``
(a container's default is 64 MiB, too small for Ray's object store).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from controller.actuators.base import WORKER_RESOURCE
from controller.k8s.spec import DRIVER_METRICS_PORT, RAYCLUSTER_SUFFIX, RAYJOB_INFIX, STATE_MOUNT, WORKER_GROUP, \
    ElasticJob

__all__ = ["raycluster_name", "rayjob_name", "configmap_name", "pvc_name", "networkpolicy_name", "labels",
           "build_configmap", "build_pvc", "build_raycluster", "build_rayjob", "build_network_policy",
           "build_children", "entrypoint", "DASHBOARD_PORT", "GCS_PORT", "RAY_CLIENT_PORT", "JOB_SPEC_DIR"]

PART_OF = "elastic-adascale"
JOB_SPEC_DIR = "/etc/elastic"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
RAY_CLIENT_PORT = 10001
RUN_AS = 10001
"""uid/gid of the image's user (Dockerfile ``USER 10001:10001``)."""
HEAD_MEMORY = "2Gi"


def raycluster_name(job_name: str) -> str:
    return f"{job_name}{RAYCLUSTER_SUFFIX}"


def rayjob_name(job_name: str, attempt: int) -> str:
    return f"{job_name}{RAYJOB_INFIX}{attempt}"


def configmap_name(job_name: str) -> str:
    return f"{job_name}-spec"


def pvc_name(job_name: str) -> str:
    return f"{job_name}-state"


def networkpolicy_name(job_name: str) -> str:
    return f"{job_name}-ray"


def labels(job_name: str, role: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": PART_OF, "elastic.dev/job": job_name, "elastic.dev/role": role}


def _meta(job: ElasticJob, name: str, role: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": labels(job.name, role)}


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _shm(memory: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A memory-backed /dev/shm (volume, mount), bounded by the container's memory limit when it has one."""
    empty_dir: dict[str, Any] = {"medium": "Memory"}
    if memory is not None:
        empty_dir["sizeLimit"] = str(memory)
    return {"name": "dshm", "emptyDir": empty_dir}, {"name": "dshm", "mountPath": "/dev/shm"}


# Ray 2.60 turns token authentication on by default; the head, the workers and the driver of one
# job must agree, and the NetworkPolicy is the boundary here, so it is off for all of them.
def _ray_env() -> list[dict[str, str]]:
    return [{"name": "RAY_AUTH_MODE", "value": "disabled"}, {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]


def entrypoint() -> str:
    """The driver's command. ``--resume`` always: a first attempt finds no checkpoint and starts at 0."""
    return f"elastic run {JOB_SPEC_DIR}/job.yaml --resume"


def build_configmap(job: ElasticJob) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(job, configmap_name(job.name), "spec"),
            "data": {"job.yaml": yaml.safe_dump(dict(job.config_data), sort_keys=False)}}


def build_pvc(job: ElasticJob) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": job.storage_size}}}
    if job.storage_class:
        spec["storageClassName"] = job.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(job, pvc_name(job.name), "state"),
            "spec": spec}


def build_raycluster(job: ElasticJob, service_account: str) -> dict[str, Any]:
    """A KubeRay RayCluster (ray.io/v1) sized for the job; the operator, not Ray, scales it."""
    head_shm, head_shm_mount = _shm(HEAD_MEMORY)
    head = {
        "name": "ray-head", "image": job.image,
        "env": [*_ray_env(), {"name": "ELASTIC_JOB_RESOURCE", "value": f"{job.namespace}/{job.name}"}],
        "ports": [{"name": "gcs", "containerPort": GCS_PORT}, {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                  {"name": "client", "containerPort": RAY_CLIENT_PORT},
                  {"name": "metrics", "containerPort": DRIVER_METRICS_PORT}],
        "resources": {"requests": {"cpu": "1", "memory": HEAD_MEMORY}, "limits": {"memory": HEAD_MEMORY}},
        "securityContext": container_security(),
        "volumeMounts": [{"name": "job-spec", "mountPath": JOB_SPEC_DIR, "readOnly": True},
                         {"name": "state", "mountPath": STATE_MOUNT}, head_shm_mount],
    }
    worker_shm, worker_shm_mount = _shm((job.worker_resources.get("limits") or {}).get("memory"))
    worker = {"name": "ray-worker", "image": job.image, "env": _ray_env(), "resources": dict(job.worker_resources),
              "securityContext": container_security(), "volumeMounts": [worker_shm_mount]}
    head_pod = {
        # The driver runs in the head pod (the Ray Jobs API runs entrypoints there): it publishes
        # status.trainer with this account and keeps its checkpoints on the volume.
        "serviceAccountName": service_account, "securityContext": pod_security(), "containers": [head],
        "volumes": [{"name": "job-spec", "configMap": {"name": configmap_name(job.name)}},
                    {"name": "state", "persistentVolumeClaim": {"claimName": pvc_name(job.name)}}, head_shm],
    }
    worker_pod = {"automountServiceAccountToken": False, "securityContext": pod_security(), "containers": [worker],
                  "volumes": [worker_shm]}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster",
        "metadata": _meta(job, raycluster_name(job.name), "raycluster"),
        "spec": {
            "rayVersion": job.ray_version,
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                # num-cpus 0: no training actor is ever scheduled on the head.
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": {"metadata": {"labels": labels(job.name, "head")}, "spec": head_pod},
            },
            "workerGroupSpecs": [{
                "groupName": WORKER_GROUP,
                "replicas": job.initial_workers,
                "minReplicas": job.min_workers,
                "maxReplicas": job.max_workers,
                # One unit per pod; the worker actor asks for one (controller.backends): one rank per pod,
                # whatever Ray's num-cpus (KubeRay sets it from the CPU limit). Quoted for `ray start`.
                "rayStartParams": {"resources": f"'{json.dumps({WORKER_RESOURCE: 1})}'"},
                "template": {"metadata": {"labels": labels(job.name, "worker")}, "spec": worker_pod},
            }],
        },
    }


def build_rayjob(job: ElasticJob, attempt: int) -> dict[str, Any]:
    """Driver attempt ``attempt`` (0, 1, ...): a RayJob on the job's RayCluster via the Ray Jobs API.

    KubeRay forbids ``backoffLimit`` with ``clusterSelector`` (a retry there means a new cluster), so
    the operator retries by submitting attempt N+1, which resumes from the volume; the cluster we
    size stays. KubeRay submits only once the RayCluster is ready; the operator waits for that too.
    """
    submitter = {"name": "submitter", "image": job.image, "env": _ray_env(),
                 "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
                 "securityContext": container_security()}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {**_meta(job, rayjob_name(job.name, attempt), "driver"),
                     "annotations": {"elastic.dev/attempt": str(attempt)}},
        "spec": {
            "entrypoint": entrypoint(),
            "clusterSelector": {"ray.io/cluster": raycluster_name(job.name)},
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": False,  # the cluster is the operator's (clusterSelector mode)
            "submitterConfig": {"backoffLimit": 2},  # `ray job submit` itself may be retried
            "submitterPodTemplate": {
                "metadata": {"labels": labels(job.name, "submitter")},
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                         "securityContext": pod_security(), "containers": [submitter]},
            },
        },
    }


def build_network_policy(job: ElasticJob, kuberay_namespace: str) -> dict[str, Any]:
    """The job's pods talk to each other freely; from outside only metrics and, for KubeRay, the dashboard."""
    own = {"podSelector": {"matchLabels": {"elastic.dev/job": job.name}}}
    kuberay = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": kuberay_namespace}}}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(job, networkpolicy_name(job.name), "network"),
        "spec": {
            "podSelector": {"matchLabels": {"elastic.dev/job": job.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own]},  # GCS, raylets, object manager, Ray client, dashboard: the job only
                {"from": [kuberay], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
                {"ports": [{"protocol": "TCP", "port": DRIVER_METRICS_PORT}]},  # Prometheus scrapes the driver
            ],
        },
    }


def build_children(job: ElasticJob, service_account: str, kuberay_namespace: str) -> list[dict[str, Any]]:
    """What the create handler makes (the RayJob comes later, once the RayCluster is ready)."""
    return [build_configmap(job), build_pvc(job), build_network_policy(job, kuberay_namespace),
            build_raycluster(job, service_account)]
