"""k8s/: kustomize builds, built-in kinds pass the real Kubernetes schemas, the CRD schema accepts the
sample and rejects bad ElasticJobs, and the pieces refer to each other consistently.

All offline: kubectl only renders (no API server can run here), kubernetes-validate carries the
upstream OpenAPI schemas, custom resources are checked with jsonschema against the CRD's
openAPIV3Schema. jsonschema cannot run the CRD's CEL rules (x-kubernetes-validations); the test
evaluates the two rules with a Python transcription and checks that the CRD holds exactly those rules.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from controller.actuators.base import WORKER_RESOURCE  # noqa: E402
from controller.k8s import builders  # noqa: E402
from controller.k8s.client import KINDS  # noqa: E402
from controller.k8s.contract import ELASTICJOB, TrainerReport  # noqa: E402
from controller.k8s.spec import WORKER_GROUP, ElasticJob, SpecError  # noqa: E402

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
        ("elastic.dev", "elasticjobs"): {"list", "watch", "patch"},
        ("elastic.dev", "elasticjobs/status"): {"patch"},
        # kopf.adopt sets blockOwnerDeletion: OwnerReferencesPermissionEnforcement wants this.
        ("elastic.dev", "elasticjobs/finalizers"): {"update"},
        ("ray.io", "rayclusters"): {"get", "create", "patch", "delete"},
        ("ray.io", "rayjobs"): {"get", "create", "delete"},
        ("", "pods"): {"list"},
        ("", "configmaps"): {"create", "delete"},
        ("", "persistentvolumeclaims"): {"create", "delete"},
        ("networking.k8s.io", "networkpolicies"): {"create", "delete"},
        ("", "events"): {"create"},
    }
    assert rules_of(built, "elastic-driver") == {("elastic.dev", "elasticjobs/status"): {"get", "patch"}}
    # Everything the operator creates is covered by a create verb, and nothing else is.
    created = {(obj["apiVersion"].rpartition("/")[0], KINDS[obj["kind"]].plural)
               for obj in builders.build_children(sample_job(), "elastic-driver", "ray-system")
               + [builders.build_rayjob(sample_job(), 0)]}
    creatable = {key for key, verbs in rules_of(built, "elastic-operator").items() if "create" in verbs}
    assert creatable - {("", "events")} == created
    for binding in by_kind(built, "RoleBinding"):
        assert binding["roleRef"]["name"] == binding["subjects"][0]["name"]


def sample_job() -> ElasticJob:
    return ElasticJob.from_resource("digits", "elastic", load("sample-elasticjob.yaml")["spec"])


def test_monitors_select_what_the_pods_expose(built):
    # The driver runs in the Ray head pod (the Ray Jobs API runs entrypoints there).
    driver = builders.build_raycluster(sample_job(), "elastic-driver")["spec"]["headGroupSpec"]["template"]
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

# The CRD's CEL rules, transcribed (jsonschema cannot evaluate CEL): where they sit, and what they say.
CEL_RULES = {
    ("workers", "self.min <= self.max"): lambda w, old: w["min"] <= w["max"],
    ("workers", "!has(self.initial) || (self.initial >= self.min && self.initial <= self.max)"):
        lambda w, old: "initial" not in w or w["min"] <= w["initial"] <= w["max"],
    ("<root>", "size(self.metadata.name) <= 37 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"):
        lambda obj, old: len(obj["metadata"]["name"]) <= 37 and re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
                                                                        obj["metadata"]["name"]),
    ("spec", "self == oldSelf"): lambda spec, old: old is None or spec == old,  # a transition rule: updates only
}


def schema_errors(obj: dict, old: dict | None = None) -> list[str]:
    errors = [e.message for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(obj)]
    if errors:
        return errors
    spec = obj.get("spec", {})
    where = {"<root>": (obj, old), "spec": (spec, (old or {}).get("spec")), "workers": (spec.get("workers"), None)}
    return [f"CEL: {rule}" for (at, rule), holds in CEL_RULES.items()
            if isinstance(where[at][0], dict) and not holds(*where[at])]


def test_crd_holds_exactly_the_transcribed_cel_rules():
    spec = SCHEMA["properties"]["spec"]
    found = {("<root>", r["rule"]) for r in SCHEMA["x-kubernetes-validations"]}
    found |= {("spec", r["rule"]) for r in spec["x-kubernetes-validations"]}
    found |= {("workers", r["rule"]) for r in spec["properties"]["workers"]["x-kubernetes-validations"]}
    assert found == set(CEL_RULES)


def test_spec_is_immutable_after_creation():
    sample = load("sample-elasticjob.yaml")
    raised = copy.deepcopy(sample)
    raised["spec"]["workers"]["max"] = 8
    assert schema_errors(raised, old=sample) == ["CEL: self == oldSelf"]
    assert schema_errors(sample, old=sample) == [] and schema_errors(raised) == []  # a create is not an update


def test_crd_basics():
    assert CRD["metadata"]["name"] == "elasticjobs.elastic.dev"
    assert (CRD["spec"]["group"], VERSION["name"], CRD["spec"]["names"]["kind"]) == (
        "elastic.dev", "v1alpha1", "ElasticJob")
    assert (CRD["spec"]["group"], VERSION["name"], CRD["spec"]["names"]["plural"]) == ELASTICJOB
    assert VERSION["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert columns.items() >= {"Phase": ".status.phase", "Workers": ".status.workers",
                               "Target": ".status.targetWorkers", "Progress": ".status.progress",
                               "Gain": ".status.gain"}.items()


def test_sample_elasticjob_is_valid_for_schema_and_operator():
    sample = load("sample-elasticjob.yaml")
    assert schema_errors(sample) == []
    ElasticJob.from_resource(sample["metadata"]["name"], "elastic", sample["spec"])


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
    # KubeRay's RayCluster CRD would refuse "lots" (its quantity pattern): the ElasticJob CRD does first.
    "cpu limit not a quantity": (_bad("spec.workerResources.limits.cpu", "lots"), "does not match",
                                 "spec.workerResources.limits.cpu"),
    "memory request not a quantity": (_bad("spec.workerResources.requests.memory", "2 GB"), "does not match",
                                      "spec.workerResources.requests.memory"),
    "name too long for KubeRay": (_bad("metadata.name", "a" * 38), "CEL: size(self.metadata.name) <= 37",
                                  "metadata.name"),
    "storage size not a quantity": (_bad("spec.storage.size", "big"), "does not match", "spec.storage.size"),
    "negative driverRetries": (_bad("spec.driverRetries", -1), "less than the minimum of 0", "spec.driverRetries"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_elasticjobs_are_rejected_by_schema_and_operator(name):
    obj, schema_message, field = BAD[name]
    errors = schema_errors(obj)
    assert any(schema_message in e for e in errors), errors
    with pytest.raises(SpecError, match=re.escape(field)):
        ElasticJob.from_resource(obj["metadata"]["name"], "elastic", obj["spec"])


def test_trainer_report_fits_the_status_schema():
    status = {"phase": "Running", "workers": 2, "targetWorkers": 2,
              "lastResize": {"time": "2026-01-01T00:00:00+00:00", "fromWorkers": 4, "toWorkers": 2, "reason": "x"},
              "conditions": [{"type": "Failed", "status": "True", "reason": "ChildRejected", "message": "m",
                              "lastTransitionTime": "2026-01-01T00:00:00+00:00"}],
              "observedGeneration": 2, "driverAttempt": 1,
              "trainer": TrainerReport(workers=2, target_workers=2, progress=10.5, gain=1.7, grad_variance=0.3,
                                          grad_sqnorm=0.1, step_time_s={1: 0.2, 2: 0.21},
                                          released_pods=("w3",)).to_status()}
    obj = {**load("sample-elasticjob.yaml"), "status": status}
    assert schema_errors(obj) == []
    obj["status"]["trainer"]["workers"] = "two"
    assert schema_errors(obj)


# ------------------------------------------------------------------ what the operator creates


def pod_templates(obj: dict) -> list[dict]:
    """The core PodTemplateSpecs inside a RayCluster or RayJob (no KubeRay schema ships with any package)."""
    if obj["kind"] == "RayJob":
        return [obj["spec"]["submitterPodTemplate"]]
    return [group["template"] for group in (obj["spec"]["headGroupSpec"], *obj["spec"]["workerGroupSpecs"])]


def test_objects_the_operator_creates_pass_the_kubernetes_schema():
    job = sample_job()
    children = builders.build_children(job, "elastic-driver", "ray-system")
    builtin = [c for c in children if not c["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert sorted(c["kind"] for c in builtin) == ["ConfigMap", "NetworkPolicy", "PersistentVolumeClaim"]
    for obj in builtin:
        validate_builtin(obj)
    for obj in (builders.build_raycluster(job, "elastic-driver"), builders.build_rayjob(job, 0),
                load("sample-raycluster.yaml")):
        for template in pod_templates(obj):
            validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})
        if obj["kind"] == "RayCluster":
            for group in (obj["spec"]["headGroupSpec"], *obj["spec"]["workerGroupSpecs"]):
                assert all(isinstance(v, str) for v in group["rayStartParams"].values())


# The KubeRay field names the operator relies on (ENVIRONMENT.md; ray-operator/apis/ray/v1 *_types.go).
RAYJOB_SPEC_FIELDS = {"entrypoint", "clusterSelector", "submissionMode", "shutdownAfterJobFinishes", "submitterConfig",
                      "submitterPodTemplate", "backoffLimit", "rayClusterSpec", "runtimeEnvYAML", "activeDeadlineSeconds",
                      "ttlSecondsAfterFinished", "jobId", "metadata", "suspend", "entrypointNumCpus",
                      "entrypointNumGpus", "entrypointResources", "managedBy", "deletionStrategy"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                       "scaleStrategy", "numOfHosts", "suspend", "idleTimeoutSeconds"}


def test_built_ray_objects_use_only_kuberay_field_names():
    job = sample_job()
    rayjob = builders.build_rayjob(job, 0)
    assert set(rayjob["spec"]) <= RAYJOB_SPEC_FIELDS
    assert rayjob["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode")
    raycluster = builders.build_raycluster(job, "elastic-driver")
    assert set(raycluster["spec"]) <= {"rayVersion", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs"}
    for group in raycluster["spec"]["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS


def test_sample_raycluster_matches_the_worker_group_contract():
    raycluster = load("sample-raycluster.yaml")
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    assert group["groupName"] == WORKER_GROUP
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert raycluster["spec"]["enableInTreeAutoscaling"] is False  # only one controller resizes the group
    # Ranks ask for one elastic_worker each (controller.backends): without it nothing would schedule.
    assert json.loads(group["rayStartParams"]["resources"].strip("'")) == {WORKER_RESOURCE: 1}
    for template in pod_templates(raycluster):
        assert template["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_every_object_has_the_same_part_of_label(built):
    prometheus_rule = yaml.safe_load((ROOT / "dashboards" / "prometheusrule.yaml").read_text())
    job = sample_job()
    made = builders.build_children(job, "elastic-driver", "ray-system") + [builders.build_rayjob(job, 0)]
    labels = {d["metadata"]["labels"]["app.kubernetes.io/part-of"] for d in [*built, *made, prometheus_rule]
              if d["kind"] != "CustomResourceDefinition"}
    assert labels == {builders.PART_OF}


def test_dockerfile_runs_as_non_root_with_elastic_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    for path in re.findall(r"(?:see |COPY )([\w./-]+\.md)", text):  # every file it names exists
        assert (ROOT / path).exists(), path
    assert re.findall(r"see ([\w./-]+\.md)", text) == ["docs/kubernetes.md"]
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    deployment = next(yaml.safe_load_all((K8S / "operator-deployment.yaml").read_text()))
    assert user[-1] == "{runAsUser}:{runAsGroup}".format(**deployment["spec"]["template"]["spec"]["securityContext"])
    assert re.search(r'^ENTRYPOINT \["elastic"\]$', text, re.M)
