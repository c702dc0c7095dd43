"""The objects the operator builds for one ElasticJob (controller.k8s.builders), as unit tests.

Their schemas are checked in test_k8s_manifests.py (kubernetes-validate, KubeRay field names);
here: what they say. The `restricted` Pod Security checks are a transcription (no admission runs here).
"""

from __future__ import annotations

import json

from controller.actuators.base import WORKER_RESOURCE
from controller.k8s import builders
from controller.k8s.spec import DRIVER_METRICS_PORT, MAX_DRIVER_RETRIES, MAX_JOB_NAME, MAX_RAYCLUSTER_NAME, \
    MAX_RAYJOB_NAME, STATE_MOUNT, ElasticJob
from elastic.config import parse_job_spec
from tests.test_k8s_operator import NS, SAMPLE, sample_job


def pod_specs(job: ElasticJob) -> dict[str, dict]:
    raycluster = builders.build_raycluster(job, "elastic-driver")
    return {"head": raycluster["spec"]["headGroupSpec"]["template"]["spec"],
            "worker": raycluster["spec"]["workerGroupSpecs"][0]["template"]["spec"],
            "submitter": builders.build_rayjob(job, 0)["spec"]["submitterPodTemplate"]["spec"]}


def test_raycluster_is_sized_for_the_job():
    raycluster = builders.build_raycluster(sample_job(min=1, max=4, initial=2), "elastic-driver")
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("workers", 2, 1, 4)
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"] == SAMPLE["spec"]["workerResources"] and worker["image"] == SAMPLE["spec"]["image"]
    assert raycluster["spec"]["rayVersion"] == SAMPLE["spec"]["rayVersion"]
    assert raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert raycluster["spec"]["enableInTreeAutoscaling"] is False


def test_one_training_worker_per_worker_pod():
    """Each worker pod offers one elastic_worker; each rank asks for one, on KubeRay and locally."""
    from controller.actuators.local import LocalRayCluster
    from controller.backends import RayBackend

    (group,) = builders.build_raycluster(sample_job(), "elastic-driver")["spec"]["workerGroupSpecs"]
    offered = json.loads(group["rayStartParams"]["resources"].strip("'"))  # KubeRay's own quoting for `ray start`
    assert offered == {WORKER_RESOURCE: 1}
    # The sample's worker pod has a CPU limit of 2 (Ray num-cpus 2): CPUs alone would fit two ranks.
    assert SAMPLE["spec"]["workerResources"]["limits"]["cpu"] == "2"
    driver = RayBackend(parse_job_spec(sample_job().config_data)).worker_actor_options()
    assert driver["resources"] == {WORKER_RESOURCE: 1} and driver["num_cpus"] <= 2
    assert LocalRayCluster().worker_actor_options()["resources"] == {WORKER_RESOURCE: 1}


def test_driver_is_a_rayjob_on_the_sized_cluster_that_resumes():
    job = sample_job()
    rayjob = builders.build_rayjob(job, 2)
    spec = rayjob["spec"]
    assert rayjob["metadata"]["name"] == "digits-driver-2"
    assert spec["entrypoint"] == "elastic run /etc/elastic/job.yaml --resume"
    assert spec["clusterSelector"] == {"ray.io/cluster": "digits-ray"}
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is False
    assert "backoffLimit" not in spec  # KubeRay refuses backoffLimit > 0 with clusterSelector
    assert "rayClusterSpec" not in spec  # one of the two, never both
    head = pod_specs(job)["head"]
    (container,) = head["containers"]
    assert {"name": "ELASTIC_JOB_RESOURCE", "value": f"{NS}/digits"} in container["env"]
    assert head["serviceAccountName"] == "elastic-driver"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounts[STATE_MOUNT]]["persistentVolumeClaim"]["claimName"] == builders.pvc_name("digits")
    assert volumes[mounts["/etc/elastic"]]["configMap"]["name"] == builders.configmap_name("digits")
    assert builders.build_pvc(job)["spec"]["resources"]["requests"]["storage"] == "1Gi"


def restricted_violations(pod: dict) -> list[str]:
    """The `restricted` Pod Security Standard's checks (transcribed; no admission runs here)."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        found.append("host namespaces")
    if any("hostPath" in v for v in pod.get("volumes") or ()):
        found.append("hostPath volume")
    for c in pod["containers"]:
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            found.append(f"{c['name']}: privileged")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"] or set((sc.get("capabilities") or {}).get("add") or ()) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']}: capabilities")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")) or 0 in (sc.get("runAsUser"), pod_sc.get("runAsUser")):
            found.append(f"{c['name']}: runAsNonRoot")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{c['name']}: seccompProfile")
    return found


def test_every_pod_meets_the_restricted_pod_security_level():
    for role, pod in pod_specs(sample_job()).items():
        assert restricted_violations(pod) == [], role
    assert restricted_violations({"containers": [{"name": "c"}]})  # the check does find violations


def test_ray_pods_get_a_memory_backed_dev_shm():
    for role in ("head", "worker"):
        pod = pod_specs(sample_job())[role]
        (container,) = pod["containers"]
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory", role
    worker = pod_specs(sample_job())["worker"]
    assert worker["volumes"][0]["emptyDir"]["sizeLimit"] == SAMPLE["spec"]["workerResources"]["limits"]["memory"]


def test_network_policy_opens_ray_ports_only_to_the_job():
    policy = builders.build_network_policy(sample_job(), "kuberay-system")["spec"]
    job_pods = {"matchLabels": {"elastic.dev/job": "digits"}}
    assert policy["podSelector"] == job_pods and policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule.get("ports") or ()}
        sources = rule.get("from")
        if not sources:  # from anywhere: only the driver's metrics
            assert ports == {DRIVER_METRICS_PORT}
        elif sources == [{"podSelector": job_pods}]:
            assert not ports  # the job's own pods: everything Ray needs
        else:  # KubeRay submits and follows the RayJob through the dashboard
            assert sources == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}]
            assert ports == {builders.DASHBOARD_PORT}
    every_port = {p["port"] for rule in policy["ingress"] if rule.get("from") != [{"podSelector": job_pods}]
                  for p in rule.get("ports") or ()}
    assert builders.RAY_CLIENT_PORT not in every_port and builders.GCS_PORT not in every_port
    # Every pod of the job carries the label the policy selects.
    for role, pod_template in (("head", builders.build_raycluster(sample_job(), "sa")["spec"]["headGroupSpec"]),
                               ("submitter", builders.build_rayjob(sample_job(), 0)["spec"]["submitterPodTemplate"])):
        labels = (pod_template.get("template") or pod_template)["metadata"]["labels"]
        assert labels["elastic.dev/job"] == "digits", role




def test_the_longest_allowed_name_fits_kuberays_limits():
    """KubeRay: RayCluster names <= 53 characters, RayJob names <= 47 (MaxRayJobNameLength)."""
    job = sample_job("j" * MAX_JOB_NAME)
    assert len(builders.build_raycluster(job, "sa")["metadata"]["name"]) <= MAX_RAYCLUSTER_NAME == 53
    assert len(builders.build_rayjob(job, MAX_DRIVER_RETRIES)["metadata"]["name"]) <= MAX_RAYJOB_NAME == 47


def test_the_driver_job_keeps_the_users_worker_process_settings():
    from controller.k8s.spec import job_config

    spec = dict(SAMPLE["spec"])
    spec["job"] = {**spec["job"], "cluster": {"num_cpus_per_worker": 2, "retain_heap": False, "backend": "local"}}
    cluster = parse_job_spec(job_config("digits", NS, spec)).cluster
    assert cluster.num_cpus_per_worker == 2 and cluster.retain_heap is False
    assert cluster.backend == "kuberay"  # where the workers run is the operator's to say
