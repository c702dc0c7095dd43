"""k8s/: kustomize builds, built-in kinds pass the real Kubernetes schemas, the CRD schema accepts the
sample and rejects bad ElasticJobs, and the pieces refer to each other consistently.

All offline: kubectl only renders (no API server can run here), kubernetes-validate carries the
upstream OpenAPI schemas, custom resources are checked with jsonschema against the CRD's
openAPIV3Schema. jsonschema cannot run the CRD's CEL rules (x-kubernetes-validations); the test
evaluates the two rules with a Python transcription and checks that the CRD holds exactly those rules.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from controller import k8s_operator as op  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.37.0"  # the schemas bundled with kubernetes-validate==1.37.0
CUSTOM_GROUPS = ("monitoring.coreos.com/", "elastic.dev/", "ray.io/")


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def validate_builtin(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture(scope="module")
def built() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`)")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# ------------------------------------------------------------------ kustomize + built-in schemas


def test_kustomize_builds_everything_into_one_namespace(built):
    kinds = sorted(d["kind"] for d in built)
    assert kinds == sorted(["Namespace", "CustomResourceDefinition", "ServiceAccount", "ServiceAccount", "Role",
                            "Role", "RoleBinding", "RoleBinding", "Deployment", "Service", "PodMonitor",
                            "ServiceMonitor"])
    namespaced = [d for d in built if d["kind"] not in ("Namespace", "CustomResourceDefinition")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"elastic"}


def test_every_builtin_kind_passes_the_kubernetes_schema(built):
    builtin = [d for d in built if not d["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert len(builtin) == 10
    for doc in builtin:
        validate_builtin(doc)


def test_the_validator_does_reject_a_broken_deployment(built):
    deployment = copy.deepcopy(by_kind(built, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of "resources"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(deployment)


def test_operator_deployment_is_locked_down(built):
    pod = by_kind(built, "Deployment")[0]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"requests", "limits"} <= set(container["resources"])
    assert pod["serviceAccountName"] == "elastic-operator"
    # The liveness probe hits the endpoint kopf serves with --liveness.
    liveness = next(a for a in container["command"] if a.startswith("--liveness="))
    port_name = container["livenessProbe"]["httpGet"]["port"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == port_name)
    assert liveness == f"--liveness=http://0.0.0.0:{port}{container['livenessProbe']['httpGet']['path']}"
    assert container["command"][:2] == ["kopf", "run"] and "controller.k8s_operator" in container["command"]
    assert "--standalone" in container["command"]  # no peering objects, hence none in the Role
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ELASTIC_DRIVER_SERVICE_ACCOUNT"] in {d["metadata"]["name"] for d in by_kind(built, "ServiceAccount")}


def rules_of(built: list[dict], role: str) -> dict[tuple[str, str], set[str]]:
    (doc,) = [d for d in by_kind(built, "Role") if d["metadata"]["name"] == role]
    return {(group, resource): set(rule["verbs"])
            for rule in doc["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}


def test_roles_grant_only_what_the_code_uses(built):
    assert rules_of(built, "elastic-operator") == {
        ("elastic.dev", "elasticjobs"): {"get", "list", "watch", "patch"},
        ("elastic.dev", "elasticjobs/status"): {"get", "patch"},
        ("ray.io", "rayclusters"): {"get", "create", "patch", "delete"},
        ("", "pods"): {"list"},
        ("batch", "jobs"): {"get", "create", "delete"},
        ("", "configmaps"): {"get", "create", "delete"},
        ("", "events"): {"create"},
    }
    assert rules_of(built, "elastic-driver") == {
        ("elastic.dev", "elasticjobs"): {"get"},
        ("elastic.dev", "elasticjobs/status"): {"get", "patch"},
    }
    for binding in by_kind(built, "RoleBinding"):
        assert binding["roleRef"]["name"] == binding["subjects"][0]["name"]


def test_monitors_select_what_the_pods_expose(built):
    spec = op.ElasticJobSpec.from_spec(load("sample-elasticjob.yaml")["spec"])
    driver = op.build_driver_job("digits", "elastic", spec, "elastic-driver")["spec"]["template"]
    pod_monitor = by_kind(built, "PodMonitor")[0]["spec"]
    assert pod_monitor["selector"]["matchLabels"].items() <= driver["metadata"]["labels"].items()
    ports = {p["name"] for p in driver["spec"]["containers"][0]["ports"]}
    assert pod_monitor["podMetricsEndpoints"][0]["port"] in ports
    relabel = pod_monitor["podMetricsEndpoints"][0]["relabelings"][0]
    assert relabel["targetLabel"] == "job_name"
    assert relabel["sourceLabels"] == ["__meta_kubernetes_pod_label_elastic_dev_job"]
    assert "elastic.dev/job" in driver["metadata"]["labels"]

    service = by_kind(built, "Service")[0]
    service_monitor = by_kind(built, "ServiceMonitor")[0]["spec"]
    assert service_monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    operator_pod = by_kind(built, "Deployment")[0]["spec"]["template"]
    assert service["spec"]["selector"].items() <= operator_pod["metadata"]["labels"].items()


# ------------------------------------------------------------------ the CRD's schema


CRD = load("crd-elasticjob.yaml")
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]

# The CRD's CEL rules on spec.workers, transcribed (jsonschema cannot evaluate CEL).
CEL_RULES = {
    "self.min <= self.max": lambda w: w["min"] <= w["max"],
    "!has(self.initial) || (self.initial >= self.min && self.initial <= self.max)":
        lambda w: "initial" not in w or w["min"] <= w["initial"] <= w["max"],
}


def schema_errors(obj: dict) -> list[str]:
    errors = [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(obj)]
    workers = obj.get("spec", {}).get("workers")
    if not errors and isinstance(workers, dict):
        errors += [f"CEL: {rule}" for rule, holds in CEL_RULES.items() if not holds(workers)]
    return errors


def test_crd_holds_exactly_the_transcribed_cel_rules():
    rules = SCHEMA["properties"]["spec"]["properties"]["workers"]["x-kubernetes-validations"]
    assert {r["rule"] for r in rules} == set(CEL_RULES)


def test_crd_basics():
    assert CRD["metadata"]["name"] == "elasticjobs.elastic.dev"
    assert (CRD["spec"]["group"], VERSION["name"], CRD["spec"]["names"]["kind"]) == (
        "elastic.dev", "v1alpha1", "ElasticJob")
    assert (CRD["spec"]["group"], VERSION["name"], CRD["spec"]["names"]["plural"]) == op.ELASTICJOB
    assert VERSION["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert columns.items() >= {"Phase": ".status.phase", "Workers": ".status.workers",
                               "Target": ".status.targetWorkers", "Progress": ".status.progress",
                               "Gain": ".status.gain"}.items()


def test_sample_elasticjob_is_valid_for_schema_and_operator():
    sample = load("sample-elasticjob.yaml")
    assert schema_errors(sample) == []
    op.ElasticJobSpec.from_spec(sample["spec"])


def _bad(path: str, value: object) -> dict:
    obj = load("sample-elasticjob.yaml")
    *parents, leaf = path.split(".")
    node = obj
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return obj


BAD = {
    "missing image": (_bad("spec.image", KeyError), "'image' is a required property", "spec.image"),
    "empty image": (_bad("spec.image", ""), "should be non-empty", "spec.image"),
    "min 0": (_bad("spec.workers.min", 0), "less than the minimum of 1", "spec.workers.min"),
    "max not an integer": (_bad("spec.workers.max", "four"), "is not of type 'integer'", "spec.workers.max"),
    "initial 0": (_bad("spec.workers.initial", 0), "less than the minimum of 1", "spec.workers.initial"),
    "min above max": (_bad("spec.workers.min", 5), "CEL: self.min <= self.max", "spec.workers.min"),
    "initial above max": (_bad("spec.workers.initial", 9), "CEL: !has(self.initial)", "spec.workers.initial"),
    "job not an object": (_bad("spec.job", [1]), "is not of type 'object'", "spec.job"),
    "missing workers": (_bad("spec.workers", KeyError), "'workers' is a required property", "spec.workers"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_elasticjobs_are_rejected_by_schema_and_operator(name):
    obj, schema_message, field = BAD[name]
    errors = schema_errors(obj)
    assert any(schema_message in e for e in errors), errors
    with pytest.raises(op.SpecError, match=re.escape(field)):
        op.ElasticJobSpec.from_spec(obj["spec"])


def test_trainer_report_fits_the_status_schema():
    status = {"phase": "Running", "workers": 2, "targetWorkers": 2,
              "lastResize": {"time": "2026-01-01T00:00:00+00:00", "fromWorkers": 4, "toWorkers": 2, "reason": "x"},
              "trainer": op.TrainerReport(workers=2, target_workers=2, progress=10.5, gain=1.7, grad_variance=0.3,
                                          grad_sqnorm=0.1, step_time_s={1: 0.2, 2: 0.21},
                                          released_pods=("w3",)).to_status()}
    obj = {**load("sample-elasticjob.yaml"), "status": status}
    assert schema_errors(obj) == []
    obj["status"]["trainer"]["workers"] = "two"
    assert schema_errors(obj)


# ------------------------------------------------------------------ what the operator creates


def test_objects_the_operator_creates_pass_the_kubernetes_schema():
    spec = op.ElasticJobSpec.from_spec(load("sample-elasticjob.yaml")["spec"])
    validate_builtin(op.build_configmap("digits", "elastic", spec))
    validate_builtin(op.build_driver_job("digits", "elastic", spec, "elastic-driver"))
    rayclusters = [op.build_raycluster("digits", "elastic", spec), load("sample-raycluster.yaml")]
    for raycluster in rayclusters:
        # No RayCluster schema ships with any package; its pod templates are core PodTemplateSpecs.
        groups = [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
        for group in groups:
            validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                              "template": group["template"]})
            assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_sample_raycluster_matches_the_worker_group_contract():
    raycluster = load("sample-raycluster.yaml")
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    assert group["groupName"] == op.WORKER_GROUP
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert raycluster["spec"]["enableInTreeAutoscaling"] is False  # only one controller resizes the group


def test_dockerfile_runs_as_non_root_with_elastic_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    deployment = next(yaml.safe_load_all((K8S / "operator-deployment.yaml").read_text()))
    assert user[-1] == "{runAsUser}:{runAsGroup}".format(**deployment["spec"]["template"]["spec"]["securityContext"])
    assert re.search(r'^ENTRYPOINT \["elastic"\]$', text, re.M)
