"""The ElasticJob operator: pure pieces, then kopf (KopfRunner) against the kmock API emulator over HTTP.

Verified here only against kmock (an in-memory emulator), never against a real API server or KubeRay:
nothing creates pods or garbage-collects owned objects, so the tests create the worker pods KubeRay
would create, and the operator deletes a job's children itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from controller import k8s_operator as op
from controller.policy import FixedPolicy, GoodputPolicy, SchedulePolicy
from elastic.config import parse_job_spec
from tests.k8s_util import KubeEmulator, kube, kubernetes  # noqa: F401  (kube is a fixture)

kopf_testing = pytest.importorskip("kopf.testing")
import kopf  # noqa: E402

SAMPLE = yaml.safe_load((Path(__file__).resolve().parents[1] / "k8s" / "sample-elasticjob.yaml").read_text())
NS = "ml"
EJ, RC, JOBS, CMS = ("elastic.dev/v1alpha1/elasticjobs", "ray.io/v1/rayclusters", "batch/v1/jobs", "v1/configmaps")


def sample_spec(**workers: int) -> op.ElasticJobSpec:
    spec = dict(SAMPLE["spec"], workers={**SAMPLE["spec"]["workers"], **workers})
    return op.ElasticJobSpec.from_spec(spec)


def report(**fields: Any) -> op.TrainerReport:
    return op.TrainerReport(**{"workers": 4, "target_workers": 4, **fields})


# ------------------------------------------------------------------ pure pieces


def test_config_from_env():
    config = op.OperatorConfig.from_env({"ELASTIC_OPERATOR_RECONCILE_INTERVAL_S": "2.5",
                                         "ELASTIC_OPERATOR_METRICS_PORT": "9465"})
    assert (config.reconcile_interval_s, config.metrics_port, config.driver_service_account) == (2.5, 9465, "elastic-driver")
    assert op.OperatorConfig.from_env({}).metrics_port is None
    with pytest.raises(op.SpecError, match="ELASTIC_OPERATOR_RECONCILE_INTERVAL_S: must be a number"):
        op.OperatorConfig.from_env({"ELASTIC_OPERATOR_RECONCILE_INTERVAL_S": "soon"})
    with pytest.raises(op.SpecError, match="reconcile_interval_s: must be a number > 0"):
        op.OperatorConfig(reconcile_interval_s=0)


def test_spec_defaults_initial_to_min_and_detects_gpus():
    spec = op.ElasticJobSpec.from_spec({"image": "i", "workers": {"min": 2, "max": 3},
                                        "workerResources": {"limits": {"nvidia.com/gpu": 1}}})
    assert (spec.initial_workers, spec.ray_version, spec.uses_gpu) == (2, op.DEFAULT_RAY_VERSION, True)
    assert not sample_spec().uses_gpu


def test_job_config_takes_workers_cluster_and_metrics_from_the_resource():
    config = op.job_config("digits", NS, sample_spec(min=2, max=8, initial=3))
    parsed = parse_job_spec(config)  # the driver's `elastic run` accepts it
    assert (parsed.workers.min, parsed.workers.max, parsed.workers.initial) == (2, 8, 3)
    assert (parsed.cluster.backend, parsed.cluster.namespace, parsed.cluster.raycluster, parsed.cluster.group) == (
        "kuberay", NS, "digits-ray", "workers")
    assert (parsed.metrics.addr, parsed.metrics.port, parsed.name) == ("0.0.0.0", op.DRIVER_METRICS_PORT, "digits")


def test_raycluster_is_sized_for_the_job():
    spec = sample_spec(min=1, max=4, initial=2)
    raycluster = op.build_raycluster("digits", NS, spec)
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("workers", 2, 1, 4)
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"] == SAMPLE["spec"]["workerResources"] and worker["image"] == SAMPLE["spec"]["image"]
    assert raycluster["spec"]["rayVersion"] == SAMPLE["spec"]["rayVersion"]
    assert raycluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_driver_runs_elastic_against_the_ray_client_port():
    job = op.build_driver_job("digits", NS, sample_spec(), "elastic-driver")
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == [
        "elastic", "run", "/etc/elastic/job.yaml", "--cluster-address", "ray://digits-ray-head-svc.ml.svc:10001"]
    assert pod["volumes"] == [{"name": "job-spec", "configMap": {"name": "digits-spec"}}]
    assert {"name": "ELASTIC_JOB_RESOURCE", "value": "ml/digits"} in pod["containers"][0]["env"]
    assert pod["serviceAccountName"] == "elastic-driver"


def test_trainer_report_round_trips_through_the_status():
    sent = report(progress=12.5, gain=1.8, grad_variance=0.4, grad_sqnorm=0.1, step_time_s={1: 0.2, 4: 0.25},
                  released_pods=("w3",), updated_at="2026-01-01T00:00:00+00:00")
    status = sent.to_status()
    assert status["stepTimeS"] == {"1": 0.2, "4": 0.25}  # JSON object keys are strings
    assert op.TrainerReport.from_status(status) == sent
    assert op.TrainerReport.from_status(None) is None
    assert op.TrainerReport.from_status({"workers": "four"}) is None
    assert op.TrainerReport.from_status({"workers": 2, "stepTimeS": {"x": 1}}) is None


def test_trainer_control_changes_status_only_for_a_new_target():
    control = op.StatusTrainerControl(report(), target_workers=4, now_iso="2026-01-01T00:00:00+00:00")
    control.set_target_workers(4, "same")
    assert control.changes == {}
    control.set_target_workers(2, "tau 150.0 >= 100: schedule step 1 wants 2 workers")
    assert control.changes == {"targetWorkers": 2, "lastResize": {
        "time": "2026-01-01T00:00:00+00:00", "fromWorkers": 4, "toWorkers": 2,
        "reason": "tau 150.0 >= 100: schedule step 1 wants 2 workers"}}
    assert control.released_workers() == () and control.current_workers() == 4


def test_snapshot_comes_from_resources_only():
    status = {"lastResize": {"time": "2026-01-01T00:00:10+00:00"}}
    created_s = op._epoch_s("2026-01-01T00:00:00Z")
    snapshot = op.job_snapshot(sample_spec(), report(progress=7.0, step_time_s={4: 0.3}), 4, status,
                               now_s=created_s + 60, created_s=created_s, total_progress=3000, accumulation_steps=2)
    assert (snapshot.current_workers, snapshot.capacity_workers, snapshot.min_workers, snapshot.max_workers) == (4, 4, 1, 4)
    assert (snapshot.last_resize_s, snapshot.elapsed_s, snapshot.accumulation_steps) == (created_s + 10, 60, 2)
    assert dict(snapshot.step_time_s_by_workers) == {4: 0.3} and snapshot.progress == 7.0


def test_policy_for_each_scaling_policy():
    def scaling(**section: Any) -> Any:
        return parse_job_spec({**op.job_config("j", NS, sample_spec()), "scaling": section}).scaling

    schedule = op.policy_for(scaling(policy="schedule", steps=[{"at_progress": 10, "workers": 2}]))
    assert isinstance(schedule, SchedulePolicy) and schedule.steps[0].workers == 2
    goodput = op.policy_for(scaling(policy="goodput", cooldown_s=5, min_efficiency=0.7))
    assert isinstance(goodput, GoodputPolicy) and (goodput.cooldown_s, goodput.min_efficiency) == (5, 0.7)
    assert isinstance(op.policy_for(scaling()), FixedPolicy)


def test_driver_phase():
    assert op.driver_phase(None) is None
    assert op.driver_phase({"status": {"active": 1}}) is None
    assert op.driver_phase({"status": {"succeeded": 1}}) == "Succeeded"
    assert op.driver_phase({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == "Failed"


def test_operator_metrics_serve_every_job_from_one_registry():
    from prometheus_client import generate_latest

    metrics = op.OperatorMetrics()
    metrics.for_job("ml/a", "a").record_decision("shrink", 2, 4)
    metrics.for_job("ml/b", "b").record_decision("noop", 1, 1)
    text = generate_latest(metrics.registry).decode()
    assert 'elastic_controller_desired_workers{job_name="a"} 2.0' in text
    assert 'elastic_controller_decisions_total{action="noop",job_name="b"} 1.0' in text
    metrics.forget("ml/a")
    assert 'job_name="a"' not in generate_latest(metrics.registry).decode()


# ------------------------------------------------------------------ kopf against kmock over HTTP


INTERVAL_S = 0.3


def elasticjob(name: str, workers: dict[str, int], scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    obj = yaml.safe_load(yaml.safe_dump(SAMPLE))
    # kmock assigns neither uid nor resourceVersion; kopf needs the latter, ownerReferences the former.
    obj["metadata"] = {"name": name, "namespace": NS, "uid": f"uid-{name}", "resourceVersion": "1"}
    obj["spec"]["workers"] = workers
    obj["spec"]["job"]["scaling"] = scaling or {"policy": "fixed"}
    return obj


def operator() -> Any:
    registry = kopf.OperatorRegistry()
    op.register(registry, op.OperatorConfig(reconcile_interval_s=INTERVAL_S, retry_delay_s=0.5, watch_timeout_s=1.0))
    return kopf_testing.KopfRunner(["run", "--all-namespaces", "--standalone"], registry=registry, timeout=30)


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


def add_worker_pods(kube: KubeEmulator, raycluster: str, count: int) -> list[str]:
    """What KubeRay would do: worker pods labelled with their cluster and group."""
    names = [f"{raycluster}-workers-{i}" for i in range(count)]
    for name in names:
        kube.handler.objects["v1/pods", NS, name] = {
            "apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running"},
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"ray.io/cluster": raycluster, "ray.io/group": "workers"}}}
    return names


def test_operator_lifecycle_against_kmock(kube):
    api = kube.api_client()
    objects = kubernetes.client.CustomObjectsApi(api)
    driver = op.ElasticJobStatusClient(NS, "digits", objects)
    pods = add_worker_pods(kube, "digits-ray", 4)
    rc_patches = lambda: kube.requests("PATCH", f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/")  # noqa: E731

    with operator() as runner:
        schedule = {"policy": "schedule", "steps": [{"at_progress": 100, "workers": 2}]}
        for obj in (elasticjob("digits", {"min": 1, "max": 4, "initial": 4}, schedule),
                    elasticjob("tiny", {"min": 1, "max": 1}),
                    elasticjob("bad", {"min": 3, "max": 2})):  # the CRD would refuse it; the operator too
            objects.create_namespaced_custom_object("elastic.dev", "v1alpha1", NS, "elasticjobs", obj)

        # -- create: RayCluster + driver Job + ConfigMap, owned by the ElasticJob
        wait_for("digits Pending", lambda: status_of(kube, "digits").get("phase") == "Pending")
        raycluster, job, configmap = (kube.object(RC, NS, "digits-ray"), kube.object(JOBS, NS, "digits-driver"),
                                      kube.object(CMS, NS, "digits-spec"))
        (group,) = raycluster["spec"]["workerGroupSpecs"]
        assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("workers", 4, 1, 4)
        assert group["template"]["spec"]["containers"][0]["resources"] == SAMPLE["spec"]["workerResources"]
        owner = {"apiVersion": "elastic.dev/v1alpha1", "kind": "ElasticJob", "name": "digits", "uid": "uid-digits",
                 "controller": True, "blockOwnerDeletion": True}
        for child in (raycluster, job, configmap):
            assert child["metadata"]["ownerReferences"] == [owner]
        assert parse_job_spec(yaml.safe_load(configmap["data"]["job.yaml"])).cluster.raycluster == "digits-ray"
        assert job["spec"]["template"]["spec"]["containers"][0]["command"][:3] == ["elastic", "run", "/etc/elastic/job.yaml"]
        assert status_of(kube, "digits")["targetWorkers"] == 4

        # -- an invalid spec: Failed with a one-line message, nothing created
        wait_for("bad Failed", lambda: status_of(kube, "bad").get("phase") == "Failed")
        assert status_of(kube, "bad")["message"].startswith("spec.workers.min: must be <= spec.workers.max")
        assert kube.object(RC, NS, "bad-ray") is None

        # -- a driver that finished: Succeeded, and the RayCluster (holding the GPUs) is freed
        wait_for("tiny-driver", lambda: kube.object(JOBS, NS, "tiny-driver"))
        kubernetes.client.BatchV1Api(api).patch_namespaced_job_status("tiny-driver", NS, {"status": {"succeeded": 1}})
        wait_for("tiny Succeeded", lambda: status_of(kube, "tiny").get("phase") == "Succeeded")
        assert kube.object(RC, NS, "tiny-ray") is None

        # -- the policy decides to shrink: the driver is told first, no capacity goes yet
        driver.publish(report(progress=150.0, gain=3.1))
        wait_for("targetWorkers 2", lambda: status_of(kube, "digits").get("targetWorkers") == 2)
        assert driver.target_workers() == 2
        wait_for("Resize event", lambda: [e for e in kube.objects("v1/events")
                                          if e.get("reason") == "Resize" and e["involvedObject"]["name"] == "digits"])
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
    creates_before, status_patches_before = len(kube.requests("POST", f"/apis/ray.io")), len(
        kube.requests("PATCH", f"/apis/elastic.dev/v1alpha1/namespaces/{NS}/elasticjobs/digits/status"))
    driver_reads = lambda: kube.requests("GET", f"/apis/batch/v1/namespaces/{NS}/jobs/digits-driver")  # noqa: E731
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
        assert [kube.object(r, NS, n) for r, n in ((RC, "digits-ray"), (JOBS, "digits-driver"), (CMS, "digits-spec"))] \
            == [None, None, None]
    assert runner.exception is None and runner.exit_code == 0
