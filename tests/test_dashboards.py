"""The generated Grafana dashboard: up to date, parseable, complete, and templated by data source and job."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models import prometheus as prom_m

from dashboards import build, grafana
from elastic.metrics import CONTROLLER_METRIC_NAMES, TRAINER_METRIC_NAMES
from tests.prometheus_util import DASHBOARD_PATH, REPO, RULES_PATH, dashboard_expressions, rule_expressions


DASHBOARD = json.loads(DASHBOARD_PATH.read_text())
RULES = yaml.safe_load(RULES_PATH.read_text())
RECORDING = {name: expr for name, expr, is_alert in rule_expressions(RULES) if not is_alert}
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]

# A metric name as a selector: not part of a longer name and not inside a recording rule's name.
NAME = r"(?<![\w:]){}(?![\w:])"
SELECTOR = re.compile(r"(?<![\w:])((?:elastic_\w+)|(?:job_name:\w+:\w+))(\{[^}]*\})?")


def uses(expr: str, metric: str) -> bool:
    """True if ``expr`` reads ``metric`` (a histogram through its _bucket/_sum/_count series)."""
    for series in (metric, f"{metric}_bucket", f"{metric}_sum", f"{metric}_count"):
        if re.search(NAME.format(re.escape(series)), expr):
            return True
    return False


def expand_recorded(expr: str) -> str:
    """Appends the expression of every recording rule ``expr`` reads, so coverage sees through them."""
    extra = [RECORDING[name] for name in RECORDING if re.search(NAME.format(re.escape(name)), expr)]
    return " ".join([expr, *extra])


def test_generated_files_are_up_to_date():
    for path, text in build.outputs().items():
        assert path.read_text() == text, f"{path.name} is stale: run .venv/bin/python dashboards/build.py"


def test_the_script_runs_from_any_folder(tmp_path):
    # `python dashboards/build.py` puts dashboards/ (not the repository) on sys.path; build.py must
    # still find its sibling modules.
    done = subprocess.run([sys.executable, str(REPO / "dashboards" / "build.py"), "--check"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr


def test_check_mode_detects_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "elastic-job.json"
    stale.write_text("{}\n")
    monkeypatch.setattr(build, "outputs", lambda: {stale: "{\"fresh\": true}\n"})
    assert build.main(["--check"]) == 1
    assert "stale: elastic-job.json" in capsys.readouterr().err
    assert stale.read_text() == "{}\n"  # --check writes nothing
    assert build.main([]) == 0 and json.loads(stale.read_text()) == {"fresh": True}


def test_dashboard_parses_back_with_the_sdk():
    register_default_plugins()  # so targets and panel options parse into their typed models
    model = dash_m.Dashboard.from_json(DASHBOARD)
    assert model.uid == "elastic-job" and model.title == grafana.DASHBOARD_TITLE
    parsed_panels = [p for p in model.panels if isinstance(p, dash_m.Panel)]
    assert len(parsed_panels) == len(PANELS)
    for panel in parsed_panels:
        assert panel.targets, panel.title
        for target in panel.targets:
            assert isinstance(target, prom_m.Dataquery), (panel.title, type(target))
    # Serialising the parsed model gives the same dashboard back, except the annotation fields
    # that build.py adds beyond the SDK's AnnotationQuery model.
    again = json.loads(json.dumps(model, cls=JSONEncoder))
    assert dashboard_expressions(again) == dashboard_expressions(DASHBOARD)
    for key in ("titleFormat", "tagKeys", "step"):
        again["annotations"]["list"][0][key] = DASHBOARD["annotations"]["list"][0][key]
    assert again == DASHBOARD


def test_every_design_metric_is_in_some_panel():
    panel_exprs = [expand_recorded(expr) for where, expr in dashboard_expressions(DASHBOARD)
                   if where.startswith("panel")]
    missing = [m for m in TRAINER_METRIC_NAMES + CONTROLLER_METRIC_NAMES
               if not any(uses(expr, m) for expr in panel_exprs)]
    assert not missing, f"metrics in no panel: {missing}"
    assert len(TRAINER_METRIC_NAMES + CONTROLLER_METRIC_NAMES) == 27


def test_coverage_check_can_fail():
    assert uses('rate(elastic_step_seconds_bucket{job_name="x"}[1m])', "elastic_step_seconds")
    assert not uses("job_name:elastic_step_seconds:p50_rate1m", "elastic_step_seconds")
    assert not uses("elastic_workers_total", "elastic_workers")


def test_every_panel_has_title_description_and_the_datasource_variable():
    assert PANELS
    for panel in PANELS:
        assert panel.get("title"), panel
        assert panel.get("description"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), panel["title"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(set(ids)) == len(ids) and 0 not in ids


def test_every_selector_is_scoped_to_the_job_variable():
    for where, expr in dashboard_expressions(DASHBOARD):
        selectors = SELECTOR.findall(expr)
        assert selectors, (where, expr)
        for name, matchers in selectors:
            assert 'job_name="$job_name"' in matchers, f"{where}: {name} not filtered by job: {expr}"


def test_recording_rules_used_by_panels_exist():
    for where, expr in dashboard_expressions(DASHBOARD):
        for name, _ in SELECTOR.findall(expr):
            if name.startswith("job_name:"):
                assert name in RECORDING, f"{where} reads {name}, which rules.yaml does not record"


def test_templating_variables():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    job = variables["job_name"]
    assert job["type"] == "query" and job["datasource"]["uid"] == "${datasource}"
    assert "label_values(elastic_workers, job_name)" in json.dumps(job["query"])
    assert variables["total_progress"]["type"] == "textbox"


def test_resize_annotation_reads_resizes_counter():
    annotations = DASHBOARD["annotations"]["list"]
    resize = next(a for a in annotations if a["name"] == "Resizes")
    assert uses(resize["expr"], "elastic_resizes_total") and "changes(" in resize["expr"]
    assert resize["datasource"]["uid"] == "${datasource}" and resize["enable"] is True


def test_rows_cover_the_brief():
    rows = [p["title"] for p in DASHBOARD["panels"] if p["type"] == "row"]
    assert rows == ["Workers and batch", "AdaScale", "Throughput", "Resizes and failures", "Controller"]
    titles = " | ".join(p["title"] for p in PANELS).lower()
    for word in ("capacity", "scale", "gain", "efficiency", "tau", "eta", "learning rate", "sigma^2", "mu^2",
                 "loss", "goodput", "step time", "resize pause", "failures", "skipped", "checkpoint",
                 "decisions", "desired", "actuation", "reconcile"):
        assert word in titles, word


def test_configmap_carries_the_dashboard_for_the_sidecar():
    docs = list(yaml.safe_load_all(build.CONFIGMAP_PATH.read_text()))
    assert len(docs) == 1
    cm = docs[0]
    assert cm["kind"] == "ConfigMap" and cm["apiVersion"] == "v1"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["elastic-job.json"]) == DASHBOARD


def test_configmap_is_a_valid_kubernetes_object():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cm = yaml.safe_load(build.CONFIGMAP_PATH.read_text())
    kubernetes_validate.validate(cm, "1.30", strict=True)


def test_prometheus_rule_wraps_the_same_rules():
    doc = yaml.safe_load(build.PROMETHEUS_RULE_PATH.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"] == RULES
