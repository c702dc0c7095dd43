"""What the dashboard shows: its rows and their panels as plain specs (queries, kind, unit, layout).

Every query selects one job with ``job_name="$job_name"`` (see :func:`dashboards.rules.sel`);
``dashboards.grafana`` turns these specs into the Grafana model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashboards.rules import rec, sel


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    format: str = "time_series"  # or "heatmap" for histogram buckets
    instant: bool = False


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # timeseries | bars | stat | heatmap | buckets
    unit: str = "short"
    span: int = 12
    height: int = 8
    min: float | None = None
    max: float | None = None
    log_scale: bool = False
    right_axis: tuple[str, ...] = field(default_factory=tuple)  # legends drawn on a right axis
    right_unit: str = ""


@dataclass(frozen=True)
class RowSpec:
    title: str
    panels: tuple[PanelSpec, ...]


def q(expr: str, legend: str = "", **kw: Any) -> Query:
    return Query(expr, legend, **kw)


def bucket_rate(metric: str, window: str = "$__rate_interval") -> str:
    return f"sum by (le) (rate({sel(metric + '_bucket')}[{window}]))"


ROWS: tuple[RowSpec, ...] = (
    RowSpec("Workers and batch", (
        PanelSpec(
            "Workers: current, target, capacity",
            "Workers in the group (elastic_workers), where the trainer is heading (elastic_target_workers) "
            "and how many the cluster could host at the controller's last look (capacity).",
            (q(sel("elastic_workers"), "workers"),
             q(sel("elastic_target_workers"), "target"),
             q(sel("elastic_controller_capacity_workers"), "capacity")),
            min=0),
        PanelSpec(
            "Scale S and global batch size",
            "AdaScale's scale S (global batch / one worker's batch) and the samples per step over all workers.",
            (q(sel("elastic_scale"), "scale S"),
             q(sel("elastic_global_batch_size"), "global batch")),
            min=0, right_axis=("global batch",), right_unit="short"),
    )),
    RowSpec("AdaScale", (
        PanelSpec(
            "Gain ratio r_t and statistical efficiency r_t / S",
            "r_t in [1, S] is how many scale-1 iterations one step is worth; efficiency = r_t / S is the "
            "fraction of the extra samples that turns into progress (1 at S = 1).",
            (q(sel("elastic_gain_ratio"), "gain r_t"),
             q(sel("elastic_statistical_efficiency"), "efficiency")),
            min=0, right_axis=("efficiency",), right_unit="percentunit"),
        PanelSpec(
            "Progress tau (scale-invariant iterations)",
            "tau grows by r_t per step; the job stops at total_progress. The ETA divides the remaining "
            "tau by its rate over 5 minutes.",
            (q(sel("elastic_progress"), "tau"),),
            span=8, min=0),
        PanelSpec(
            "ETA to total progress",
            "(total_progress - tau) / d tau/dt over 5m. Set total_progress (the job spec's total_progress) "
            "in the variable at the top.",
            (q(f"clamp_min(($total_progress - max by (job_name) ({sel('elastic_progress')})) "
               f"/ {rec('job_name:elastic_progress:deriv5m')}, 0)", "ETA", instant=True),),
            kind="stat", unit="dtdurations", span=4),
        PanelSpec(
            "Effective learning rate",
            "The learning rate AdaScale applied: r_t * base_lr * schedule(tau). It rises with the gain "
            "after a grow and falls after a shrink.",
            (q(sel("elastic_learning_rate"), "lr"),),
            span=12),
        PanelSpec(
            "Gradient variance sigma^2 and squared norm mu^2",
            "AdaScale's smoothed estimates. The gain at scale S is (sigma^2 + mu^2) / (sigma^2 / S + mu^2): "
            "large sigma^2 / mu^2 means more workers still pay off.",
            (q(sel("elastic_gradient_variance"), "sigma^2"),
             q(sel("elastic_gradient_sqnorm"), "mu^2")),
            log_scale=True),
        PanelSpec(
            "Training loss",
            "Loss of the last step (mean over the global batch).",
            (q(sel("elastic_loss"), "loss"),),
            span=12, log_scale=True),
        PanelSpec(
            "Evaluation metrics",
            "The task's evaluate(model) during training (evaluation.every_progress), one series per "
            "metric name (elastic_eval_metric{name}); empty until the first evaluation.",
            (q(sel("elastic_eval_metric"), "{{name}}"),),
            span=12),
    )),
    RowSpec("Throughput", (
        PanelSpec(
            "Samples/s and goodput",
            "Samples consumed per second (rate of elastic_samples_total), and goodput = samples/s * "
            "efficiency, the scale-1 progress the job buys per second.",
            (q(rec("job_name:elastic_samples:rate1m"), "samples/s"),
             q(sel("elastic_goodput"), "goodput")),
            min=0),
        PanelSpec(
            "Step time quantiles",
            "p50 / p90 / p99 of the wall time of one step (elastic_step_seconds) over 1 minute, and steps/s.",
            (q(rec("job_name:elastic_step_seconds:p50_rate1m"), "p50"),
             q(rec("job_name:elastic_step_seconds:p90_rate1m"), "p90"),
             q(rec("job_name:elastic_step_seconds:p99_rate1m"), "p99"),
             q(rec("job_name:elastic_steps:rate1m"), "steps/s")),
            unit="s", min=0, right_axis=("steps/s",), right_unit="short"),
    )),
    RowSpec("Resizes and failures", (
        PanelSpec(
            "Resizes by direction and cause",
            "Completed resizes per interval (elastic_resizes_total); they also show as annotations.",
            (q(f"sum by (direction, cause) (increase({sel('elastic_resizes_total')}[$__interval]))",
               "{{direction}} ({{cause}})"),),
            kind="bars", span=8, min=0),
        PanelSpec(
            "Resize pause distribution",
            "How long training was paused by the resizes in the dashboard's time range, by bucket "
            "(elastic_resize_seconds). An in-place resize should take about a second.",
            (q(f"sum by (le) (increase({sel('elastic_resize_seconds_bucket')}[$__range]))", "{{le}}",
               format="heatmap", instant=True),),
            kind="buckets", span=8),
        PanelSpec(
            "Resize pause p50 / p90 (range)",
            "Quantiles of the resize pause over the dashboard's time range.",
            (q(f"histogram_quantile(0.5, {bucket_rate('elastic_resize_seconds', '$__range')})", "p50",
               instant=True),
             q(f"histogram_quantile(0.9, {bucket_rate('elastic_resize_seconds', '$__range')})", "p90",
               instant=True)),
            kind="stat", unit="s", span=8),
        PanelSpec(
            "Worker failures",
            "Workers lost unexpectedly per interval (elastic_worker_failures_total). Each costs at most one "
            "step of work; the group re-forms without them.",
            (q(f"increase({sel('elastic_worker_failures_total')}[$__interval])", "failures"),),
            kind="bars", span=8, min=0),
        PanelSpec(
            "Skipped steps by reason",
            "Steps that did not update the model (elastic_skipped_steps_total), e.g. non-finite gradients.",
            (q(f"sum by (reason) (increase({sel('elastic_skipped_steps_total')}[$__interval]))",
               "{{reason}}"),),
            kind="bars", span=8, min=0),
        PanelSpec(
            "Checkpoints: written and duration",
            "Durable checkpoints per interval (elastic_checkpoints_total) and the mean time to write one "
            "(elastic_checkpoint_seconds).",
            (q(f"increase({sel('elastic_checkpoints_total')}[$__interval])", "checkpoints"),
             q(f"increase({sel('elastic_checkpoint_seconds_sum')}[$__rate_interval]) "
               f"/ increase({sel('elastic_checkpoint_seconds_count')}[$__rate_interval])", "mean seconds")),
            kind="bars", span=8, min=0, right_axis=("mean seconds",), right_unit="s"),
    )),
    RowSpec("Controller", (
        PanelSpec(
            "Decisions by action",
            "Policy decisions per interval (elastic_controller_decisions_total): grow, shrink or noop.",
            (q(f"sum by (action) (increase({sel('elastic_controller_decisions_total')}[$__interval]))",
               "{{action}}"),),
            kind="bars", span=6, min=0),
        PanelSpec(
            "Desired vs capacity vs current workers",
            "What the policy wants (desired), what the cluster can host (capacity) and what runs (workers).",
            (q(sel("elastic_controller_desired_workers"), "desired"),
             q(sel("elastic_controller_capacity_workers"), "capacity"),
             q(sel("elastic_workers"), "workers")),
            span=6, min=0),
        PanelSpec(
            "Actuation time",
            "Time for the actuator (local Ray, Ray autoscaler, KubeRay) to carry out a resize, by bucket "
            "over the dashboard's range (elastic_controller_actuation_seconds).",
            (q(f"sum by (le) (increase({sel('elastic_controller_actuation_seconds_bucket')}[$__range]))",
               "{{le}}", format="heatmap", instant=True),),
            kind="buckets", span=6),
        PanelSpec(
            "Reconcile errors",
            "Reconcile iterations that failed per interval (elastic_controller_reconcile_errors_total).",
            (q(f"increase({sel('elastic_controller_reconcile_errors_total')}[$__interval])", "errors"),),
            kind="bars", span=6, min=0),
    )),
)

RESIZE_ANNOTATION_EXPR = f"sum by (direction, cause) (changes({sel('elastic_resizes_total')}[$__interval])) > 0"
