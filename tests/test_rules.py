"""dashboards/rules.yaml: promtool accepts it, and each alert fires exactly when it should (promtool test rules)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.prometheus_util import RULES_PATH, find_binary, rule_expressions, signal_expr

RULES = yaml.safe_load(RULES_PATH.read_text())
ALERTS = {r["alert"]: r for g in RULES["groups"] for r in g["rules"] if "alert" in r}
EXPECTED_ALERTS = {"ElasticJobStalled", "ElasticEfficiencyCollapsed", "ElasticWorkerFailuresRepeated",
                   "ElasticResizePauseHigh", "ElasticControllerReconcileErrors", "ElasticCheckpointOverdue"}


def promtool() -> str:
    binary = find_binary("promtool")
    if binary is None:
        pytest.skip("promtool not on PATH; install it with: bash scripts/install_prometheus.sh")
    return binary


def test_alert_names_and_labels():
    assert set(ALERTS) == EXPECTED_ALERTS
    for name, rule in ALERTS.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "{{ $labels.job_name }}" in rule["annotations"]["summary"], name


def test_promtool_check_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES_PATH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions(RULES))} rules found" in result.stdout


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check above can fail: a syntax error in an expression is reported."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Broken", "expr": "increase(elastic_steps_total[5m] == 0"}]}]}))
    result = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0


def annotations(alert: str, job: str) -> dict[str, str]:
    rendered = {k: v.replace("{{ $labels.job_name }}", job) for k, v in ALERTS[alert]["annotations"].items()}
    assert not any("{{" in v for v in rendered.values()), "a template the test cannot render"
    return rendered


def firing(alert: str, job: str, instance: str = "trainer:9464") -> dict:
    return {"exp_labels": {"severity": ALERTS[alert]["labels"]["severity"], "job_name": job, "instance": instance},
            "exp_annotations": annotations(alert, job)}


def series(metric: str, job: str, values: str, instance: str = "trainer:9464", **labels: str) -> dict:
    label_text = ", ".join(f'{k}="{v}"' for k, v in {"job_name": job, "instance": instance, **labels}.items())
    return {"series": f"{metric}{{{label_text}}}", "values": values}


def rule_tests() -> list[dict]:
    return [
        {   # ElasticJobStalled: steps for 10 minutes, then none.
            "interval": "1m",
            "input_series": [series("elastic_steps_total", "stall", "0+10x10 100x20")],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "ElasticJobStalled", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "ElasticJobStalled",
                 "exp_alerts": [firing("ElasticJobStalled", "stall")]},
            ],
        },
        {   # ElasticEfficiencyCollapsed: only the job that stays low for 15 minutes, after `for`.
            "interval": "1m",
            "input_series": [
                series("elastic_statistical_efficiency", "low", "0.2x40"),
                series("elastic_statistical_efficiency", "ok", "0.9x40"),
                series("elastic_statistical_efficiency", "dip", "0.9x10 0.1x3 0.9x20"),
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "ElasticEfficiencyCollapsed", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "ElasticEfficiencyCollapsed",
                 "exp_alerts": [firing("ElasticEfficiencyCollapsed", "low")]},
            ],
        },
        {   # ElasticWorkerFailuresRepeated: two failures fire, one does not.
            "interval": "1m",
            "input_series": [
                series("elastic_worker_failures_total", "flaky", "0 0 1 1 2 2"),
                series("elastic_worker_failures_total", "once", "0 0 1 1 1 1"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "ElasticWorkerFailuresRepeated",
                 "exp_alerts": [firing("ElasticWorkerFailuresRepeated", "flaky")]},
            ],
        },
        {   # ElasticResizePauseHigh: mean pause 15 s fires, 0.9 s does not.
            "interval": "1m",
            "input_series": [
                series("elastic_resize_seconds_sum", "slow", "0 0 15 30 30 30"),
                series("elastic_resize_seconds_count", "slow", "0 0 1 2 2 2"),
                series("elastic_resize_seconds_sum", "fast", "0 0 0.9 1.8 1.8 1.8"),
                series("elastic_resize_seconds_count", "fast", "0 0 1 2 2 2"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "ElasticResizePauseHigh",
                 "exp_alerts": [firing("ElasticResizePauseHigh", "slow")]},
            ],
        },
        {   # ElasticControllerReconcileErrors: three errors in 15 minutes fire, one does not.
            "interval": "1m",
            "input_series": [
                series("elastic_controller_reconcile_errors_total", "broken", "0 1 2 3 3 3"),
                series("elastic_controller_reconcile_errors_total", "blip", "0 1 1 1 1 1"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "ElasticControllerReconcileErrors",
                 "exp_alerts": [firing("ElasticControllerReconcileErrors", "broken")]},
            ],
        },
        {   # ElasticCheckpointOverdue: training without checkpoints for an hour fires; checkpointing does not.
            "interval": "1m",
            "input_series": [
                series("elastic_steps_total", "nockpt", "0+10x120"),
                series("elastic_checkpoints_total", "nockpt", "0x120"),
                series("elastic_steps_total", "ckpt", "0+10x120"),
                series("elastic_checkpoints_total", "ckpt", "0+1x120"),
                series("elastic_steps_total", "idle", "0x120"),
                series("elastic_checkpoints_total", "idle", "0x120"),
            ],
            "alert_rule_test": [
                {"eval_time": "90m", "alertname": "ElasticCheckpointOverdue",
                 "exp_alerts": [firing("ElasticCheckpointOverdue", "nockpt")]},
            ],
        },
        {   # Recording rules the panels read.
            "interval": "15s",
            "input_series": [
                series("elastic_samples_total", "rec", "0+32x40"),
                series("elastic_steps_total", "rec", "0+1x40"),
                series("elastic_progress", "rec", "0+3x40"),
                series("elastic_step_seconds_bucket", "rec", "0x40", le="0.025"),
                series("elastic_step_seconds_bucket", "rec", "0+4x40", le="0.05"),
                series("elastic_step_seconds_bucket", "rec", "0+4x40", le="+Inf"),
            ],
            "promql_expr_test": [
                {"expr": "job_name:elastic_samples:rate1m", "eval_time": "5m",
                 "exp_samples": [{"labels": 'job_name:elastic_samples:rate1m{job_name="rec"}',
                                  "value": 32 / 15}]},
                {"expr": "job_name:elastic_steps:rate1m", "eval_time": "5m",
                 "exp_samples": [{"labels": 'job_name:elastic_steps:rate1m{job_name="rec"}', "value": 1 / 15}]},
                {"expr": "job_name:elastic_progress:deriv5m", "eval_time": "6m",
                 "exp_samples": [{"labels": 'job_name:elastic_progress:deriv5m{job_name="rec"}', "value": 0.2}]},
                {"expr": "job_name:elastic_step_seconds:p50_rate1m", "eval_time": "5m",
                 "exp_samples": [{"labels": 'job_name:elastic_step_seconds:p50_rate1m{job_name="rec"}',
                                  "value": 0.025 + (0.05 - 0.025) * 0.5}]},  # interpolated in the bucket
            ],
        },
    ]


def write_rule_test(tmp_path, tests: list[dict]):
    path = tmp_path / "rules_test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [str(RULES_PATH)], "evaluation_interval": "1m",
                                    "tests": tests}, sort_keys=False))
    return path


def test_promtool_rule_unit_tests(tmp_path):
    tests = rule_tests()
    assert {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])} == EXPECTED_ALERTS
    path = write_rule_test(tmp_path, tests)
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_can_fail(tmp_path):
    """Expecting the stalled alert while steps still advance must fail, so the tests above mean something."""
    case = rule_tests()[0]
    case["alert_rule_test"] = [{"eval_time": "8m", "alertname": "ElasticJobStalled",
                                "exp_alerts": [firing("ElasticJobStalled", "stall")]}]
    path = write_rule_test(tmp_path, [case])
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode != 0


@pytest.mark.parametrize("expr, expected", [
    ("increase(x[5m]) == 0", "increase(x[5m]) == bool 0"),
    ("a / b > 10", "a / b > bool 10"),
    ('(x{a!="b"} > 0) and on (j) (y{c=~"d>e"} == 0)', '(x{a!="b"} > bool 0) and on (j) (y{c=~"d>e"} == bool 0)'),
    ("x >= bool 2", "x >= bool 2"),
    ('label_replace(x, "a", "<", "b", ".*") <= 1', 'label_replace(x, "a", "<", "b", ".*") <= bool 1'),
    ("sum(rate(x[1m]))", "sum(rate(x[1m]))"),
])
def test_signal_expr(expr, expected):
    assert signal_expr(expr) == expected
