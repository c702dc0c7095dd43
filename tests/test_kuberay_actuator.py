"""KubeRayActuator: the JSON Patch it computes (pure) and what an API server receives (kmock over HTTP)."""

from __future__ import annotations

import copy

import pytest

from controller.actuators.base import ActuationError, Actuator
from controller.actuators.kuberay import KubeRayActuator, WorkerGroupState, find_worker_group, scale_patch
from tests.k8s_util import KubeEmulator, kubernetes

RC = "ray.io/v1/rayclusters"


def raycluster(replicas: int = 4, workers_to_delete: list[str] | None = None) -> dict:
    workers = {"groupName": "workers", "replicas": replicas, "minReplicas": 1, "maxReplicas": 6}
    if workers_to_delete is not None:
        workers["scaleStrategy"] = {"workersToDelete": workers_to_delete}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "rc", "namespace": "ml"},
        "spec": {"headGroupSpec": {"rayStartParams": {}},
                 "workerGroupSpecs": [{"groupName": "cpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2},
                                      workers]},
    }


def state(**overrides) -> WorkerGroupState:
    base = dict(index=1, group="workers", replicas=4, min_replicas=1, max_replicas=6,
                workers_to_delete=(), has_scale_strategy=False)
    return WorkerGroupState(**{**base, **overrides})


PODS = ["w0", "w1", "w2", "w3"]
GUARDS = [{"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "workers"},
          {"op": "test", "path": "/spec/workerGroupSpecs/1/replicas", "value": 4}]


# ------------------------------------------------------------------ pure: finding the group, the patch


def test_find_worker_group_by_name_not_by_position():
    found = find_worker_group(raycluster(workers_to_delete=["old"]), "workers")
    assert (found.index, found.replicas, found.min_replicas, found.max_replicas) == (1, 4, 1, 6)
    assert found.workers_to_delete == ("old",) and found.has_scale_strategy


def test_unknown_group_names_the_groups_there_are():
    with pytest.raises(ActuationError, match=r"no worker group named 'gpu' \(groups: cpu, workers\)"):
        find_worker_group(raycluster(), "gpu")


def test_grow_patches_replicas_only_guarded_by_tests():
    assert scale_patch(state(), 6, release=["w0"], live_pods=PODS) == [
        *GUARDS, {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 6}]


def test_shrink_lists_exactly_the_released_live_pods():
    ops = scale_patch(state(), 2, release=["w3", "w1", "gone"], live_pods=PODS)
    assert ops == [*GUARDS,
                   {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 2},
                   {"op": "add", "path": "/spec/workerGroupSpecs/1/scaleStrategy",
                    "value": {"workersToDelete": ["w3", "w1"]}}]


def test_shrink_replaces_a_stale_delete_list():
    ops = scale_patch(state(workers_to_delete=("old",), has_scale_strategy=True), 3, ["w2"], PODS)
    assert ops[-1] == {"op": "add", "path": "/spec/workerGroupSpecs/1/scaleStrategy/workersToDelete",
                       "value": ["w2"]}
    assert ops[-2]["value"] == 3


def test_shrink_never_lowers_replicas_below_the_pods_still_training():
    # 4 live pods, only one released: KubeRay would delete a busy pod if replicas went to 2.
    ops = scale_patch(state(), 2, release=["w3"], live_pods=PODS)
    assert {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3} in ops
    # Nothing released yet: nothing to do (the trainer releases first).
    assert scale_patch(state(), 2, release=[], live_pods=PODS) == []
    # Pods that never started (2 live of 4 replicas) may go without a release.
    assert scale_patch(state(), 2, release=[], live_pods=["w0", "w1"])[-1]["value"] == 2


def test_idempotent_when_done():
    done = state(replicas=2, workers_to_delete=("w2", "w3"), has_scale_strategy=True)
    assert scale_patch(done, 2, release=["w2", "w3"], live_pods=PODS) == []
    # The list is ours to empty: with its autoscaler off KubeRay never clears it. Pods gone, list emptied.
    cleared = state(replicas=2, workers_to_delete=(), has_scale_strategy=True)
    assert scale_patch(cleared, 2, release=["w2", "w3"], live_pods=["w0", "w1"]) == []
    assert scale_patch(state(), 4, live_pods=PODS) == []


def test_the_delete_list_is_pruned_once_kuberay_deleted_the_pods():
    # KubeRay deleted w2 and w3 but (autoscaler off) left them listed: prune to what is still live.
    stale = state(replicas=2, workers_to_delete=("w2", "w3"), has_scale_strategy=True)
    assert scale_patch(stale, 2, release=["w2", "w3"], live_pods=["w0", "w1"]) == [
        GUARDS[0], {**GUARDS[1], "value": 2},
        {"op": "add", "path": "/spec/workerGroupSpecs/1/scaleStrategy/workersToDelete", "value": []}]


def test_grow_empties_a_leftover_delete_list():
    leftover = state(workers_to_delete=("w3",), has_scale_strategy=True)
    assert scale_patch(leftover, 5, live_pods=PODS)[-2:] == [
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 5},
        {"op": "add", "path": "/spec/workerGroupSpecs/1/scaleStrategy/workersToDelete", "value": []}]


@pytest.mark.parametrize("target, match", [(7, "above maxReplicas=6"), (0, "below minReplicas=1"),
                                           (-1, "integer >= 0"), (True, "integer >= 0")])
def test_targets_outside_the_group_bounds_are_refused(target, match):
    with pytest.raises(ActuationError, match=match):
        scale_patch(state(), target, live_pods=PODS)


def test_group_without_replicas_is_added_not_tested():
    ops = scale_patch(state(has_replicas=False, replicas=1), 3, live_pods=[])
    assert ops == [GUARDS[0], {"op": "add", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3}]


# ------------------------------------------------------------------ over HTTP against kmock


@pytest.fixture()
def cluster():
    with KubeEmulator() as kube:
        kube.handler.objects[RC, "ml", "rc"] = raycluster()
        for i, name in enumerate(PODS + ["other"]):
            group = "workers" if name != "other" else "cpu"
            kube.handler.objects["v1/pods", "ml", name] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "ml",
                             "labels": {"ray.io/cluster": "rc", "ray.io/group": group}},
                "status": {"phase": "Running"}}
        api = kubernetes.client.CustomObjectsApi(kube.api_client())
        yield kube, KubeRayActuator("ml", "rc", "workers", api)


def test_is_an_actuator_reporting_max_replicas_as_capacity(cluster):
    _, actuator = cluster
    assert isinstance(actuator, Actuator) and actuator.name == "kuberay"
    assert actuator.capacity_workers() == 6
    assert actuator.live_pods() == PODS  # the other group's pod is not ours


def test_scale_down_sends_one_json_patch_on_the_right_group(cluster):
    kube, actuator = cluster
    actuator.scale_to(2, release=["w2", "w3"])
    patches = kube.requests("PATCH", "/apis/ray.io/v1/namespaces/ml/rayclusters/rc")
    assert len(patches) == 1
    assert patches[0].headers["Content-Type"] == "application/json-patch+json"
    assert patches[0].data[-1] == {"op": "add", "path": "/spec/workerGroupSpecs/1/scaleStrategy",
                                   "value": {"workersToDelete": ["w2", "w3"]}}
    groups = kube.object(RC, "ml", "rc")["spec"]["workerGroupSpecs"]
    assert groups[0] == raycluster()["spec"]["workerGroupSpecs"][0]  # the other group is untouched
    assert groups[1]["replicas"] == 2 and groups[1]["scaleStrategy"] == {"workersToDelete": ["w2", "w3"]}

    actuator.scale_to(2, release=["w2", "w3"])  # repeated (e.g. by a restarted controller)
    assert len(kube.requests("PATCH")) == 1

    # KubeRay deletes the two pods; it leaves workersToDelete as it is (its autoscaler is off).
    for pod in ("w2", "w3"):
        del kube.handler.objects["v1/pods", "ml", pod]
    actuator.scale_to(2, release=["w2", "w3"])
    assert kube.object(RC, "ml", "rc")["spec"]["workerGroupSpecs"][1]["scaleStrategy"] == {"workersToDelete": []}
    actuator.scale_to(2, release=["w2", "w3"])
    assert len(kube.requests("PATCH")) == 2


def test_scale_up_then_no_op(cluster):
    kube, actuator = cluster
    actuator.scale_to(5)
    actuator.scale_to(5)
    assert len(kube.requests("PATCH")) == 1
    assert kube.object(RC, "ml", "rc")["spec"]["workerGroupSpecs"][1]["replicas"] == 5


def test_concurrent_edit_fails_cleanly_and_changes_nothing(cluster):
    kube, actuator = cluster
    stale = actuator.group_state()
    before = copy.deepcopy(kube.object(RC, "ml", "rc"))
    # Someone else resizes the group between our read and our patch.
    kubernetes.client.CustomObjectsApi(kube.api_client()).patch_namespaced_custom_object(
        "ray.io", "v1", "ml", "rayclusters", "rc",
        [{"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 3}],
        _content_type="application/json-patch+json")
    actuator.group_state = lambda: stale  # type: ignore[method-assign]
    with pytest.raises(ActuationError, match="changed concurrently"):
        actuator.scale_to(2, release=["w2", "w3"])
    after = kube.object(RC, "ml", "rc")
    assert after["spec"]["workerGroupSpecs"][1]["replicas"] == 3
    assert "scaleStrategy" not in after["spec"]["workerGroupSpecs"][1]
    assert before["spec"]["workerGroupSpecs"][0] == after["spec"]["workerGroupSpecs"][0]


def test_missing_raycluster_and_group_are_clear_errors(cluster):
    kube, actuator = cluster
    api = kubernetes.client.CustomObjectsApi(kube.api_client())
    with pytest.raises(ActuationError, match="kuberay ml/nope: raycluster not found"):
        KubeRayActuator("ml", "nope", "workers", api).capacity_workers()
    with pytest.raises(ActuationError, match="no worker group named 'gpu'"):
        KubeRayActuator("ml", "rc", "gpu", api).scale_to(1)
    with pytest.raises(ActuationError, match="kuberay group: must be a non-empty string"):
        KubeRayActuator("ml", "rc", "", api)
