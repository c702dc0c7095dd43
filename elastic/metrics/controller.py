"""The reconcile loop's metrics: what it wanted, what the cluster could give, how acting went."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from elastic.metrics.event_log import EventLog
from elastic.metrics.registry import JOB_LABEL, LazyGauge, MetricsError, check_choice, check_job_name, check_seconds, register

# The contract of DESIGN.md; tests check that each name is exposed and that each is in a dashboard panel.
CONTROLLER_METRIC_NAMES: tuple[str, ...] = (
    "elastic_controller_desired_workers",
    "elastic_controller_capacity_workers",
    "elastic_controller_decisions_total",
    "elastic_controller_actuation_seconds",
    "elastic_controller_reconcile_errors_total",
)

DECISION_ACTIONS: tuple[str, ...] = ("grow", "shrink", "noop")
# Adding a Ray node locally takes seconds; a KubeRay pod on a fresh GPU node can take minutes.
ACTUATION_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ControllerMetrics:
    """The reconcile loop's metrics: what it wanted, what the cluster could give, how acting went."""

    def __init__(self, job_name: str, registry: CollectorRegistry | None = None,
                 log_path: Path | None = None) -> None:
        self.job_name = check_job_name(job_name)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        job = {JOB_LABEL: self.job_name}
        self._desired = LazyGauge(register(Gauge, "elastic_controller_desired_workers",
                                           "Workers the policy asked for at the last decision.", r), job)
        self._capacity = LazyGauge(register(Gauge, "elastic_controller_capacity_workers",
                                            "Workers the cluster could host at the last decision.", r), job)
        self._decisions = register(Counter, "elastic_controller_decisions_total",
                                   "Decisions of the policy, by action.", r, labels=("action",))
        for action in DECISION_ACTIONS:
            self._decisions.labels(action=action, **job)
        self._actuation = register(Histogram, "elastic_controller_actuation_seconds",
                                   "Time for the actuator to carry out a resize.", r,
                                   buckets=ACTUATION_SECONDS_BUCKETS).labels(**job)
        self._errors = register(Counter, "elastic_controller_reconcile_errors_total",
                                "Reconcile iterations that failed.", r).labels(**job)
        self._log = EventLog(log_path, self.job_name)

    def record_decision(self, action: str, desired: int, capacity: int, *,
                        time_s: float | None = None) -> None:
        check_choice("decision action", action, DECISION_ACTIONS)
        if desired < 0 or capacity < 0:
            raise MetricsError(f"decision: desired and capacity must be >= 0, got {desired}, {capacity}")
        self._decisions.labels(action=action, job_name=self.job_name).inc()
        self._desired.set(desired)
        self._capacity.set(capacity)
        self._log.write("decision", time_s, action=action, desired=desired, capacity=capacity)

    def record_actuation(self, seconds: float) -> None:
        check_seconds("actuation seconds", seconds)
        self._actuation.observe(seconds)

    def record_reconcile_error(self) -> None:
        self._errors.inc()

    def close(self) -> None:
        self._log.close()
