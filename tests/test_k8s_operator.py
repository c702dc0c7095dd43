"""The ElasticJob operator: spec, settings and passes (pure), then kopf (KopfRunner) against the kmock API emulator.

Verified here only against kmock (an in-memory emulator), never against a real API server or KubeRay:
nothing creates pods, sets a RayCluster ready, runs a RayJob or garbage-collects owned objects, so
the tests do what KubeRay would (worker pods, ``status.state: ready``, a RayJob's end), and the
operator deletes a job's children itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from controller.k8s.contract import ElasticJobStatusClient, TrainerReport, epoch_s
from controller.k8s.handlers import register
from controller.k8s.reconcile import OperatorMetrics, StatusTrainerControl, cluster_ready, driver_outcome, job_snapshot, \
    policy_for
from controller.k8s.spec import DRIVER_METRICS_PORT, ENV_VARS, MAX_JOB_NAME, STATE_MOUNT, ElasticJob, OperatorConfig, \
    SpecError
from controller.policy import FixedPolicy, GoodputPolicy, SchedulePolicy
from elastic.config import parse_job_spec
from tests.k8s_util import KubeEmulator, kube, kubernetes  # noqa: F401  (kube is a fixture)

kopf_testing = pytest.importorskip("kopf.testing")
import kopf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = yaml.safe_load((ROOT / "k8s" / "sample-elasticjob.yaml").read_text())
NS = "ml"
EJ, RC, RJ, CMS, PVC, NP = ("elastic.dev/v1alpha1/elasticjobs", "ray.io/v1/rayclusters", "ray.io/v1/rayjobs",
                            "v1/configmaps", "v1/persistentvolumeclaims", "networking.k8s.io/v1/networkpolicies")


def sample_job(name: str = "digits", **workers: int) -> ElasticJob:
    spec = dict(SAMPLE["spec"], workers={**SAMPLE["spec"]["workers"], **workers})
    return ElasticJob.from_resource(name, NS, spec)


def report(**fields: Any) -> TrainerReport:
    return TrainerReport(**{"workers": 4, "target_workers": 4, **fields})


# ------------------------------------------------------------------ settings and the spec


def test_config_from_env():
    config = OperatorConfig.from_env({"ELASTIC_OPERATOR_RECONCILE_INTERVAL_S": "2.5",
                                      "ELASTIC_OPERATOR_METRICS_PORT": "9465", "ELASTIC_KUBERAY_NAMESPACE": "kr"})
    assert (config.reconcile_interval_s, config.metrics_port, config.driver_service_account,
            config.kuberay_namespace) == (2.5, 9465, "elastic-driver", "kr")
    assert OperatorConfig.from_env({}).metrics_port is None
    with pytest.raises(SpecError, match="ELASTIC_OPERATOR_RECONCILE_INTERVAL_S: must be a number"):
        OperatorConfig.from_env({"ELASTIC_OPERATOR_RECONCILE_INTERVAL_S": "soon"})
    with pytest.raises(SpecError, match="reconcile_interval_s: must be a number > 0"):
        OperatorConfig(reconcile_interval_s=0)


def test_every_env_var_the_deployment_sets_is_read():
    deployment = next(yaml.safe_load_all((ROOT / "k8s" / "operator-deployment.yaml").read_text()))
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {name for name in env if name.startswith("ELASTIC_")} <= set(ENV_VARS)  # e.g. no ..._COOLDOWN_S


def test_spec_defaults_initial_to_min_and_detects_gpus():
    job = ElasticJob.from_resource("j", NS, {**SAMPLE["spec"], "workers": {"min": 2, "max": 4},
                                             "workerResources": {"limits": {"nvidia.com/gpu": 1}}})
    assert (job.initial_workers, job.uses_gpu, job.driver_retries) == (2, True, 3)
    assert not sample_job().uses_gpu


@pytest.mark.parametrize("name, spec, message", [
    ("x" * (MAX_JOB_NAME + 1), {}, "metadata.name: must be a DNS-1035 label of at most 37 characters"),
    ("1digits", {}, "metadata.name: must be a DNS-1035 label"),
    ("digits", {"workerResources": {"limits": {"cpu": "lots"}}},
     "spec.workerResources.limits.cpu: must be a Kubernetes quantity"),
    ("digits", {"workers": {"min": 3, "max": 2}}, "spec.workers.min: must be <= workers.max"),  # elastic.config's rule
    ("digits", {"workers": {"min": 0, "max": 2}}, "spec.workers.min: must be >= 1"),
    ("digits", {"image": ""}, "spec.image: required"),
    ("digits", {"driverRetries": -1}, "spec.driverRetries: must be an integer in 0..20"),
    ("digits", {"job": {**SAMPLE["spec"]["job"], "optimizer": {"name": "nope"}}}, "spec.job.optimizer.name"),
])
def test_bad_specs_get_one_line_naming_the_field(name, spec, message):
    with pytest.raises(SpecError, match=message) as caught:
        ElasticJob.from_resource(name, NS, {**SAMPLE["spec"], **spec})
    assert "\n" not in str(caught.value)


def test_job_config_takes_workers_cluster_metrics_and_storage_from_the_resource():
    job = sample_job(min=2, max=8, initial=3)
    parsed = parse_job_spec(job.config_data)  # the driver's `elastic run` accepts it
    assert (parsed.workers.min, parsed.workers.max, parsed.workers.initial) == (2, 8, 3)
    assert (parsed.cluster.backend, parsed.cluster.namespace, parsed.cluster.raycluster, parsed.cluster.group) == (
        "kuberay", NS, "digits-ray", "workers")
    assert (parsed.metrics.addr, parsed.metrics.port, parsed.name) == ("0.0.0.0", DRIVER_METRICS_PORT, "digits")
    # Durable: a retried driver resumes from the volume, not from a pod-local /tmp.
    assert parsed.checkpoint.dir.startswith(STATE_MOUNT + "/") and parsed.run_dir.startswith(STATE_MOUNT + "/")
    assert parsed.checkpoint.every_steps == SAMPLE["spec"]["job"]["checkpoint"]["every_steps"]


# ------------------------------------------------------------------ the reconcile pass, pure


def test_trainer_report_round_trips_through_the_status():
    sent = report(progress=12.5, gain=1.8, grad_variance=0.4, grad_sqnorm=0.1, step_time_s={1: 0.2, 4: 0.25},
                  released_pods=("w3",), updated_at="2026-01-01T00:00:00+00:00")
    status = sent.to_status()
    assert status["stepTimeS"] == {"1": 0.2, "4": 0.25}  # JSON object keys are strings
    assert TrainerReport.from_status(status) == sent
    assert TrainerReport.from_status(None) is None
    assert TrainerReport.from_status({"workers": "four"}) is None
    assert TrainerReport.from_status({"workers": 2, "stepTimeS": {"x": 1}}) is None


def test_trainer_control_changes_status_only_for_a_new_target():
    control = StatusTrainerControl(report(), target_workers=4, now_iso="2026-01-01T00:00:00+00:00")
    control.set_target_workers(4, "same")
    assert control.changes == {}
    control.set_target_workers(2, "tau 150.0 >= 100: schedule step 1 wants 2 workers")
    assert control.changes == {"targetWorkers": 2, "lastResize": {
        "time": "2026-01-01T00:00:00+00:00", "fromWorkers": 4, "toWorkers": 2,
        "reason": "tau 150.0 >= 100: schedule step 1 wants 2 workers"}}
    assert control.released_workers() == () and control.current_workers() == 4
    # A schedule step announced ahead (its pods are being added): the target waits for the trigger.
    ahead = StatusTrainerControl(report(), target_workers=1, now_iso="2026-01-01T00:00:00+00:00")
    ahead.set_target_workers(4, "schedule step 1 wants 4 workers at tau 250: preparing now", at_progress=250.0)
    assert ahead.changes == {} and ahead.target_workers == 1


def test_snapshot_comes_from_resources_only():
    status = {"lastResize": {"time": "2026-01-01T00:00:10+00:00"}}
    created_s = epoch_s("2026-01-01T00:00:00Z")
    snapshot = job_snapshot(sample_job(), report(progress=7.0, step_time_s={4: 0.3}), 4, status,
                            now_s=created_s + 60, created_s=created_s)
    assert (snapshot.current_workers, snapshot.capacity_workers, snapshot.min_workers, snapshot.max_workers) == (4, 4, 1, 4)
    assert (snapshot.last_resize_s, snapshot.elapsed_s, snapshot.total_progress) == (created_s + 10, 60, 3000)
    assert dict(snapshot.step_time_s_by_workers) == {4: 0.3} and snapshot.progress == 7.0


def test_policy_for_each_scaling_policy():
    def scaling(**section: Any) -> Any:
        return parse_job_spec({**sample_job().config_data, "scaling": section}).scaling

    schedule = policy_for(scaling(policy="schedule", steps=[{"at_progress": 10, "workers": 2}]))
    assert isinstance(schedule, SchedulePolicy) and schedule.steps[0].workers == 2
    goodput = policy_for(scaling(policy="goodput", cooldown_s=5, min_efficiency=0.7))
    assert isinstance(goodput, GoodputPolicy) and (goodput.cooldown_s, goodput.min_efficiency) == (5, 0.7)
    assert isinstance(policy_for(scaling()), FixedPolicy)


def test_cluster_ready_from_state_or_condition():
    assert not cluster_ready({}) and not cluster_ready({"status": {"state": "unhealthy"}})
    assert cluster_ready({"status": {"state": "ready"}})
    assert cluster_ready({"status": {"conditions": [{"type": "RayClusterProvisioned", "status": "True"}]}})
    assert not cluster_ready({"status": {"conditions": [{"type": "RayClusterProvisioned", "status": "False"}]}})


def test_driver_outcome_from_the_rayjob_status():
    assert driver_outcome(None) is None
    assert driver_outcome({"status": {"jobDeploymentStatus": "Initializing"}}) is None
    assert driver_outcome({"status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}) is None
    assert driver_outcome({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}) == "Succeeded"
    assert driver_outcome({"status": {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}}) == "Failed"
    assert driver_outcome({"status": {"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed"}}) == "Failed"


def test_operator_metrics_serve_every_job_from_one_registry():
    from prometheus_client import generate_latest

    metrics = OperatorMetrics()
    metrics.for_job("ml/a", "a").record_decision("shrink", 2, 4)
    metrics.for_job("ml/b", "b").record_decision("noop", 1, 1)
    text = generate_latest(metrics.registry).decode()
    assert 'elastic_controller_desired_workers{job_name="a"} 2.0' in text
    assert 'elastic_controller_decisions_total{action="noop",job_name="b"} 1.0' in text
    metrics.forget("ml/a")
    assert 'job_name="a"' not in generate_latest(metrics.registry).decode()


# ------------------------------------------------------------------ kopf against kmock over HTTP


INTERVAL_S = 0.3


def elasticjob(name: str, workers: dict[str, int], scaling: dict[str, Any] | None = None,
               **spec: Any) -> dict[str, Any]:
    obj = yaml.safe_load(yaml.safe_dump(SAMPLE))
    # kmock assigns neither uid, resourceVersion nor generation; kopf needs the second, ownerReferences the first.
    obj["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "1", "generation": 1}
    obj["spec"]["workers"] = workers
    obj["spec"]["job"]["scaling"] = scaling or {"policy": "fixed"}
    obj["spec"].update(spec)
    return obj


def operator(*namespace_args: str) -> Any:
    registry = kopf.OperatorRegistry()
    register(registry, OperatorConfig(reconcile_interval_s=INTERVAL_S, retry_delay_s=0.5, watch_timeout_s=1.0))
    return kopf_testing.KopfRunner(["run", *(namespace_args or ("--all-namespaces",)), "--standalone"],
                                   registry=registry, timeout=30)


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def status_of(kube: KubeEmulator, name: str) -> dict[str, Any]:
    return (kube.object(EJ, NS, name) or {}).get("status") or {}


def set_status(api: Any, plural: str, name: str, status: dict[str, Any]) -> None:
    """What KubeRay would write: a RayCluster's state, a RayJob's outcome."""
    kubernetes.client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        "ray.io", "v1", NS, plural, name, {"status": status})


def add_worker_pods(kube: KubeEmulator, raycluster: str, count: int) -> list[str]:
    """What KubeRay would do: worker pods labelled with their cluster and group."""
    names = [f"{raycluster}-workers-{i}" for i in range(count)]
    for name in names:
        kube.handler.objects["v1/pods", NS, name] = {
            "apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running"},
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"ray.io/cluster": raycluster, "ray.io/group": "workers"}}}
    return names


def events(kube: KubeEmulator, name: str, reason: str) -> list[dict]:
    return [e for e in kube.objects("v1/events") if e.get("reason") == reason and e["involvedObject"]["name"] == name]


def test_operator_lifecycle_against_kmock(kube):
    api = kube.api_client()
    objects = kubernetes.client.CustomObjectsApi(api)
    driver = ElasticJobStatusClient(NS, "digits", objects)
    pods = add_worker_pods(kube, "digits-ray", 4)
    rc_path = f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/digits-ray"  # the spec; not the status KubeRay writes
    rc_patches = lambda: [r for r in kube.requests("PATCH", rc_path) if r.url.path == rc_path]  # noqa: E731

    with operator() as runner:
        schedule = {"policy": "schedule", "steps": [{"at_progress": 100, "workers": 2}]}
        for obj in (elasticjob("digits", {"min": 1, "max": 4, "initial": 4}, schedule),
                    elasticjob("tiny", {"min": 1, "max": 1}, driverRetries=1),
                    elasticjob("bad", {"min": 3, "max": 2})):  # the CRD would refuse it; the operator too
            objects.create_namespaced_custom_object("elastic.dev", "v1alpha1", NS, "elasticjobs", obj)

        # -- create: volume, NetworkPolicy, ConfigMap and RayCluster, owned by the ElasticJob; no driver yet
        wait_for("digits Pending", lambda: status_of(kube, "digits").get("phase") == "Pending")
        children = [kube.object(RC, NS, "digits-ray"), kube.object(CMS, NS, "digits-spec"),
                    kube.object(PVC, NS, "digits-state"), kube.object(NP, NS, "digits-ray")]
        (group,) = children[0]["spec"]["workerGroupSpecs"]
        assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("workers", 4, 1, 4)
        owner = {"apiVersion": "elastic.dev/v1alpha1", "kind": "ElasticJob", "name": "digits", "uid": "uid-digits",
                 "controller": True, "blockOwnerDeletion": True}
        for child in children:
            assert child["metadata"]["ownerReferences"] == [owner]
        assert parse_job_spec(yaml.safe_load(children[1]["data"]["job.yaml"])).cluster.raycluster == "digits-ray"
        assert status_of(kube, "digits")["targetWorkers"] == 4 and status_of(kube, "digits")["observedGeneration"] == 1

        # -- the driver is submitted only once the RayCluster is ready
        time.sleep(3 * INTERVAL_S)
        assert kube.objects(RJ) == []
        set_status(api, "rayclusters", "digits-ray", {"state": "ready"})
        rayjob = wait_for("driver attempt 0", lambda: kube.object(RJ, NS, "digits-driver-0"))
        assert rayjob["spec"]["entrypoint"].endswith("--resume") and rayjob["metadata"]["ownerReferences"] == [owner]
        wait_for("driverAttempt 0", lambda: status_of(kube, "digits").get("driverAttempt") == 0)

        # -- an invalid spec: Failed with a one-line message, a condition, nothing created
        wait_for("bad Failed", lambda: status_of(kube, "bad").get("phase") == "Failed")
        bad = status_of(kube, "bad")
        assert bad["message"].startswith("spec.workers.min: must be <= workers.max") and "\n" not in bad["message"]
        (cond,) = bad["conditions"]
        assert (cond["type"], cond["status"], cond["reason"], cond["message"]) == ("Failed", "True", "InvalidSpec",
                                                                                   bad["message"])
        assert epoch_s(cond["lastTransitionTime"]) is not None and bad["observedGeneration"] == 1
        assert kube.object(RC, NS, "bad-ray") is None

        # -- a driver that fails is submitted again (resuming) while driverRetries allows, then ends the job
        set_status(api, "rayclusters", "tiny-ray", {"state": "ready"})
        wait_for("tiny-driver-0", lambda: kube.object(RJ, NS, "tiny-driver-0"))
        ElasticJobStatusClient(NS, "tiny", objects).publish(report(workers=1, target_workers=1, progress=50.0))
        wait_for("tiny Running", lambda: status_of(kube, "tiny").get("phase") == "Running")
        set_status(api, "rayjobs", "tiny-driver-0", {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED",
                                                     "message": "exit code 1"})
        wait_for("tiny-driver-1", lambda: kube.object(RJ, NS, "tiny-driver-1"))
        wait_for("DriverRetry event", lambda: events(kube, "tiny", "DriverRetry"))
        # The dead driver's report is dropped: the new one starts over with `initial` workers.
        wait_for("attempt 1", lambda: status_of(kube, "tiny").get("driverAttempt") == 1)
        assert "trainer" not in status_of(kube, "tiny") and status_of(kube, "tiny")["targetWorkers"] == 1
        set_status(api, "rayjobs", "tiny-driver-1", {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
        wait_for("tiny Succeeded", lambda: status_of(kube, "tiny").get("phase") == "Succeeded")
        assert kube.object(RC, NS, "tiny-ray") is None  # the RayCluster (holding the GPUs) is freed
        assert status_of(kube, "tiny")["conditions"][0]["type"] == "Succeeded"

        # -- the policy decides to shrink: the driver is told first, no capacity goes yet
        driver.publish(report(progress=150.0, gain=3.1))
        wait_for("targetWorkers 2", lambda: status_of(kube, "digits").get("targetWorkers") == 2)
        assert driver.target_workers() == 2
        wait_for("Resize event", lambda: events(kube, "digits", "Resize"))
        assert rc_patches() == []

        # -- the driver released two pods: exactly those go, by a JSON Patch on the worker group
        driver.publish(report(workers=2, target_workers=2, progress=160.0, released_pods=(pods[3], pods[1])))
        wait_for("RayCluster patch", rc_patches)
        (patch,) = rc_patches()
        assert patch.headers["Content-Type"] == "application/json-patch+json"
        assert patch.data == [
            {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "workers"},
            {"op": "test", "path": "/spec/workerGroupSpecs/0/replicas", "value": 4},
            {"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 2},
            {"op": "add", "path": "/spec/workerGroupSpecs/0/scaleStrategy",
             "value": {"workersToDelete": [pods[3], pods[1]]}}]
        wait_for("status Running with 2 workers",
                 lambda: status_of(kube, "digits").get("workers") == 2 and status_of(kube, "digits")["phase"] == "Running")
        time.sleep(4 * INTERVAL_S)
        assert len(rc_patches()) == 1  # later passes of the same operator send nothing
        assert status_of(kube, "digits")["lastResize"]["toWorkers"] == 2
    assert runner.exception is None and runner.exit_code == 0

    # -- a restarted operator derives everything from the resources: no patch, no re-create
    creates_before, status_patches_before = len(kube.requests("POST", "/apis/ray.io")), len(
        kube.requests("PATCH", f"/apis/elastic.dev/v1alpha1/namespaces/{NS}/elasticjobs/digits/status"))
    driver_reads = lambda: kube.requests("GET", f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/digits-driver-0")  # noqa: E731
    reads_before = len(driver_reads())
    with operator() as runner:
        wait_for("three reconcile passes", lambda: len(driver_reads()) >= reads_before + 3)
        assert len(rc_patches()) == 1
        assert len(kube.requests("POST", "/apis/ray.io")) == creates_before
        new_status_patches = kube.requests(
            "PATCH", f"/apis/elastic.dev/v1alpha1/namespaces/{NS}/elasticjobs/digits/status")[status_patches_before:]
        assert not [p for p in new_status_patches if "targetWorkers" in (p.data.get("status") or {})]

        # -- delete: the children go (explicitly; kmock has no garbage collector), then the job
        objects.delete_namespaced_custom_object("elastic.dev", "v1alpha1", NS, "elasticjobs", "digits")
        wait_for("digits gone", lambda: kube.object(EJ, NS, "digits") is None)
        assert [kube.object(r, NS, n) for r, n in ((RC, "digits-ray"), (RJ, "digits-driver-0"), (CMS, "digits-spec"),
                                                   (PVC, "digits-state"), (NP, "digits-ray"))] == [None] * 5
    assert runner.exception is None and runner.exit_code == 0


def test_a_child_the_api_server_refuses_fails_the_job_with_a_reason(kube):
    """E.g. KubeRay's CRD refusing a quantity, or its webhook a name: Failed, never 'no phase forever'."""
    kube.refuse_creates("ray.io/v1/rayclusters", 422,
                        'RayCluster.ray.io "digits-ray" is invalid: spec.workerGroupSpecs[0]...limits.cpu: Invalid value')
    objects = kubernetes.client.CustomObjectsApi(kube.api_client())
    with operator() as runner:
        objects.create_namespaced_custom_object("elastic.dev", "v1alpha1", NS, "elasticjobs",
                                                elasticjob("digits", {"min": 1, "max": 2}))
        wait_for("digits Failed", lambda: status_of(kube, "digits").get("phase") == "Failed")
        wait_for("ChildRejected event", lambda: events(kube, "digits", "ChildRejected"))
    assert runner.exception is None
    status = status_of(kube, "digits")
    assert status["message"].startswith("create RayCluster digits-ray: HTTP 422: RayCluster.ray.io")
    (cond,) = status["conditions"]
    assert set(cond) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert (cond["type"], cond["status"], cond["reason"]) == ("Failed", "True", "ChildRejected")
    assert status["observedGeneration"] == 1


def test_namespaced_operator_lists_nothing_cluster_wide(kube):
    """`kopf run --namespace=ml` with scanning disabled: no namespace or CRD listing (the Role grants none)."""
    objects = kubernetes.client.CustomObjectsApi(kube.api_client())
    with operator(f"--namespace={NS}") as runner:
        objects.create_namespaced_custom_object("elastic.dev", "v1alpha1", NS, "elasticjobs",
                                                elasticjob("digits", {"min": 1, "max": 2}))
        wait_for("digits Pending", lambda: status_of(kube, "digits").get("phase") == "Pending")
    assert runner.exception is None
    cluster_wide = [r.url.path for r in kube.requests() if r.url.path.rstrip("/") in ("/api/v1/namespaces",)
                    or "customresourcedefinitions" in r.url.path
                    or (r.url.path.startswith("/apis/elastic.dev/v1alpha1/elasticjobs"))]
    assert cluster_wide == []
