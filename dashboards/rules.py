"""The Prometheus rules of an elastic job: recording rules (the panels that aggregate read them) and alerts.

The panels that aggregate (rates, quantiles, tau/s for the ETA) read the recording rules, so a
dashboard over a long range stays cheap. The alerts read raw series, so they work even while the
recording rules have not produced anything yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JOB = 'job_name="$job_name"'


def sel(metric: str, extra: str = "") -> str:
    """``metric{job_name="$job_name", extra}``: every panel query looks at one job."""
    return f"{metric}{{{JOB}{', ' + extra if extra else ''}}}"


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str


def _step_quantile(q: float) -> RecordingRule:
    return RecordingRule(
        f"job_name:elastic_step_seconds:p{int(q * 100)}_rate1m",
        f"histogram_quantile({q}, sum by (job_name, le) (rate(elastic_step_seconds_bucket[1m])))")


RECORDING_RULES: tuple[RecordingRule, ...] = (
    RecordingRule("job_name:elastic_samples:rate1m",
                  "sum by (job_name) (rate(elastic_samples_total[1m]))"),
    RecordingRule("job_name:elastic_steps:rate1m",
                  "sum by (job_name) (rate(elastic_steps_total[1m]))"),
    # tau is a gauge that only grows (except after a restart from an older checkpoint), so its
    # slope comes from deriv(), not rate(); 5m smooths the ETA over resizes.
    RecordingRule("job_name:elastic_progress:deriv5m",
                  "max by (job_name) (deriv(elastic_progress[5m]))"),
    _step_quantile(0.5),
    _step_quantile(0.9),
    _step_quantile(0.99),
)
RECORDED = {rule.record: rule for rule in RECORDING_RULES}


def rec(name: str) -> str:
    if name not in RECORDED:
        raise KeyError(f"no recording rule named {name}")
    return sel(name)


@dataclass(frozen=True)
class AlertRule:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


ALERT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        "ElasticJobStalled",
        "increase(elastic_steps_total[5m]) == 0",
        "0m", "critical",
        "Elastic job {{ $labels.job_name }} has completed no step for 5 minutes",
        "The trainer's exporter is up but elastic_steps_total has not moved in 5m: the worker group is "
        "hung (a collective waiting on a lost rank), waiting for minimum capacity, or stuck in a resize."),
    AlertRule(
        "ElasticEfficiencyCollapsed",
        "max_over_time(elastic_statistical_efficiency[15m]) < 0.25",
        "5m", "warning",
        "Elastic job {{ $labels.job_name }}: statistical efficiency below 0.25 for 15 minutes",
        "The AdaScale gain r_t is under a quarter of the scale S: most of the extra workers' samples add "
        "no progress (gradient noise is small next to the signal). Lower workers.max or use the goodput policy."),
    AlertRule(
        "ElasticWorkerFailuresRepeated",
        "increase(elastic_worker_failures_total[30m]) >= 2",
        "0m", "warning",
        "Elastic job {{ $labels.job_name }} lost 2 or more workers in 30 minutes",
        "Workers keep dying (preemption, OOM, node loss). Training goes on, but each failure loses a step "
        "and a resize pause; check the node events and the worker logs."),
    AlertRule(
        "ElasticResizePauseHigh",
        "increase(elastic_resize_seconds_sum[30m]) / increase(elastic_resize_seconds_count[30m]) > 10",
        "0m", "warning",
        "Elastic job {{ $labels.job_name }}: resizes paused training for more than 10 s on average over 30 minutes",
        "An in-place resize should pause training for about a second. Long pauses mean slow group "
        "re-formation or state transfer (large model, slow network) or new workers not warmed in advance."),
    AlertRule(
        "ElasticControllerReconcileErrors",
        "increase(elastic_controller_reconcile_errors_total[15m]) >= 3",
        "0m", "warning",
        "Elastic controller for {{ $labels.job_name }} failed to reconcile 3 or more times in 15 minutes",
        "The reconcile loop cannot observe or act (Ray or Kubernetes API errors, RBAC, a bad RayCluster "
        "name); the job keeps its current size. See the controller logs."),
    AlertRule(
        "ElasticCheckpointOverdue",
        "(increase(elastic_steps_total[1h]) > 0) and on (job_name) (increase(elastic_checkpoints_total[1h]) == 0)",
        "0m", "warning",
        "Elastic job {{ $labels.job_name }} trains but wrote no checkpoint in the last hour",
        "A full restart would lose more than an hour of training. Check the checkpoint directory "
        "(space, permissions) and checkpoint.every_steps."),
)


def _alert_document(a: AlertRule) -> dict[str, Any]:
    doc: dict[str, Any] = {"alert": a.alert, "expr": a.expr}
    if a.for_ != "0m":
        doc["for"] = a.for_
    doc["labels"] = {"severity": a.severity}
    doc["annotations"] = {"summary": a.summary, "description": a.description}
    return doc


def rules_document() -> dict[str, Any]:
    return {"groups": [
        {"name": "elastic-job.recording",
         "rules": [{"record": r.record, "expr": r.expr} for r in RECORDING_RULES]},
        {"name": "elastic-job.alerts",
         "rules": [_alert_document(a) for a in ALERT_RULES]},
    ]}
