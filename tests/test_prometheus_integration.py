"""A real Prometheus scrapes the elastic exporter; every dashboard and rule expression returns data.

The job under test is fed by ``feed_synthetic`` (a scripted run through TrainerMetrics and
ControllerMetrics: 2 workers, a controller-driven grow to 4, worker failures, a skipped step,
checkpoints, decisions, reconcile errors). To check the same wiring against a real elastic run, replace
the body of the ``job_under_test`` fixture: it only has to return a ``JobUnderTest`` whose exporter
Prometheus can scrape, after the run has produced the events listed in its docstring.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from prometheus_client import CollectorRegistry

from elastic.metrics import ControllerMetrics, StepRecord, TrainerMetrics, start_exporter
from tests.prometheus_util import (
    DASHBOARD_PATH,
    RULES_PATH,
    PrometheusServer,
    dashboard_expressions,
    prometheus_server,  # noqa: F401  (the session fixture, re-exported for this module)
    rule_expressions,
    signal_expr,
    substitute,
)

pytestmark = pytest.mark.prometheus

JOB_NAME = "synthetic-job"
TOTAL_PROGRESS = 3000
SCRAPE_GAP_S = 1.3  # > the 1 s scrape interval: every phase of the feed is scraped at least once


@dataclass(frozen=True)
class JobMetrics:
    trainer: TrainerMetrics
    controller: ControllerMetrics


@dataclass(frozen=True)
class JobUnderTest:
    """A job whose metrics Prometheus has scraped: it ran on 2 workers, grew once to 4, lost workers,
    skipped a step, wrote checkpoints, and its controller decided, acted and failed to reconcile."""

    job_name: str
    target: str  # host:port of its exporter
    total_progress: float


def feed_synthetic(metrics: JobMetrics, *, gap_s: float = SCRAPE_GAP_S) -> None:
    """A scripted short run, in phases separated by a scrape so that rates and changes see each one."""
    trainer, controller = metrics.trainer, metrics.controller
    state = {"step": 0, "tau": 0.0}

    def steps(n: int, workers: int) -> None:
        batch_per_worker = 32
        for _ in range(n):
            scale = float(workers)
            gain = 1.0 + 0.7 * (scale - 1.0)  # a plausible r_t in [1, S]
            state["tau"] += gain
            state["step"] += 1
            step_s = 0.02 + 0.005 * workers
            samples = batch_per_worker * workers
            trainer.record_step(StepRecord(
                step=state["step"], time_s=time.time(), workers=workers, target_workers=workers,
                global_batch_size=samples, scale=scale, gain=gain, efficiency=gain / scale,
                progress=state["tau"], learning_rate=0.1 * gain, grad_variance=4.0, grad_sqnorm=0.5,
                loss=2.0 / (1.0 + 0.05 * state["tau"]), step_seconds=step_s, samples=samples,
                samples_per_s=samples / step_s, goodput=samples / step_s * gain / scale))

    # Phase 1: two workers; the controller sees capacity for 2.
    controller.record_decision("noop", desired=2, capacity=2)
    steps(6, workers=2)
    trainer.record_checkpoint(0.4)
    trainer.record_eval({"accuracy": 0.91, "loss": 0.3}, progress=state["tau"], step=state["step"])
    time.sleep(gap_s)
    # Phase 2: capacity appears; the controller grows the job 2 -> 4 in place.
    controller.record_decision("grow", desired=4, capacity=4)
    trainer.set_target_workers(4)
    controller.record_actuation(2.5)
    trainer.record_resize("grow", "controller", pause_s=0.9, from_workers=2, to_workers=4)
    steps(6, workers=4)
    time.sleep(gap_s)
    # Phase 3: trouble: two workers die and come back, a non-finite step, the API flakes.
    trainer.record_failure(2)
    trainer.record_skip("nonfinite")
    for _ in range(3):
        controller.record_reconcile_error()
    controller.record_decision("noop", desired=4, capacity=4)
    steps(6, workers=4)
    trainer.record_checkpoint(0.6)
    time.sleep(gap_s)
    # Phase 4: steady at four workers.
    steps(6, workers=4)
    time.sleep(gap_s)


@pytest.fixture(scope="module")
def job_under_test(prometheus_server: PrometheusServer) -> Iterator[JobUnderTest]:  # noqa: F811
    registry = CollectorRegistry()
    metrics = JobMetrics(TrainerMetrics(JOB_NAME, registry=registry),
                         ControllerMetrics(JOB_NAME, registry=registry))
    exporter = start_exporter(registry)
    target = f"127.0.0.1:{exporter.port}"
    try:
        prometheus_server.set_targets([target])
        prometheus_server.wait_for_targets([target])  # the zero values of every counter are scraped
        feed_synthetic(metrics)
        yield JobUnderTest(JOB_NAME, target, TOTAL_PROGRESS)
    finally:
        exporter.close()
        metrics.trainer.close()


def _sub(expr: str, job: JobUnderTest) -> str:
    return substitute(expr, job_name=job.job_name, interval="1m", total_progress=job.total_progress)


def _wait_for_recording_rules(server: PrometheusServer, job: JobUnderTest) -> None:
    recorded = [name for name, _, is_alert in rule_expressions(yaml.safe_load(RULES_PATH.read_text()))
                if not is_alert]
    for name in recorded:
        server.wait_for_query(f'{name}{{job_name="{job.job_name}"}}', timeout_s=10)


def test_every_dashboard_and_rule_expression_returns_data(prometheus_server: PrometheusServer,  # noqa: F811
                                                          job_under_test: JobUnderTest):
    server, job = prometheus_server, job_under_test
    _wait_for_recording_rules(server, job)
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    rules = yaml.safe_load(RULES_PATH.read_text())
    checks = [(where, _sub(expr, job)) for where, expr in dashboard_expressions(dashboard)]
    # An alert's expression is empty unless it fires: check the comparison's inputs instead (op bool).
    checks += [(f"rule {name}" + (" (as bool)" if is_alert else ""), signal_expr(expr) if is_alert else expr)
               for name, expr, is_alert in rule_expressions(rules)]
    assert len(checks) > 30
    empty = [f"{where}: {expr}" for where, expr in checks if not server.query(expr)]
    assert not empty, "expressions that returned no data:\n" + "\n".join(empty)


def test_panel_queries_of_another_job_are_empty(prometheus_server: PrometheusServer,  # noqa: F811
                                                job_under_test: JobUnderTest):
    """The emptiness check above can fail: the same panels for a job that never ran show nothing."""
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    other = JobUnderTest("no-such-job", job_under_test.target, job_under_test.total_progress)
    leaked = [expr for _, expr in dashboard_expressions(dashboard) if prometheus_server.query(_sub(expr, other))]
    assert not leaked, leaked


def test_resize_is_visible(prometheus_server: PrometheusServer, job_under_test: JobUnderTest):  # noqa: F811
    server, job = prometheus_server, job_under_test
    sel = f'job_name="{job.job_name}"'
    grow = server.query(f'elastic_resizes_total{{{sel}, direction="grow", cause="controller"}}')
    assert [float(r["value"][1]) for r in grow] == [1.0]
    others = server.query(f'sum(elastic_resizes_total{{{sel}}}) - '
                          f'sum(elastic_resizes_total{{{sel}, direction="grow", cause="controller"}})')
    assert float(others[0]["value"][1]) == 0.0
    assert float(server.query(f"elastic_workers{{{sel}}}")[0]["value"][1]) == 4.0
    assert float(server.query(f"min_over_time(elastic_workers{{{sel}}}[1m])")[0]["value"][1]) == 2.0
    assert float(server.query(f"changes(elastic_resizes_total{{{sel}, direction=\"grow\"}}[1m])")
                 [0]["value"][1]) >= 1.0
    # The annotation expression of the dashboard finds the resize.
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    annotation = next(expr for where, expr in dashboard_expressions(dashboard) if where.startswith("annotation"))
    result = server.query(_sub(annotation, job))
    assert {(r["metric"]["direction"], r["metric"]["cause"]) for r in result} == {("grow", "controller")}


def test_alerts_that_should_fire_do(prometheus_server: PrometheusServer, job_under_test: JobUnderTest):  # noqa: F811
    server, job = prometheus_server, job_under_test
    alerts = {name: expr for name, expr, is_alert in rule_expressions(yaml.safe_load(RULES_PATH.read_text()))
              if is_alert}
    sel = f'{{job_name="{job.job_name}"}}'
    # The feed lost 2 workers and had 3 reconcile errors; steps never stopped.
    assert server.query(f"({alerts['ElasticWorkerFailuresRepeated']}) and on (job_name) elastic_workers{sel}")
    assert server.query(f"({alerts['ElasticControllerReconcileErrors']}) and on (job_name) elastic_workers{sel}")
    assert not server.query(f"({alerts['ElasticJobStalled']}) and on (job_name) elastic_workers{sel}")
    assert not server.query(f"({alerts['ElasticResizePauseHigh']}) and on (job_name) elastic_workers{sel}")


def test_labels_survive_the_scrape(prometheus_server: PrometheusServer, job_under_test: JobUnderTest):  # noqa: F811
    """honor_labels keeps job_name as the exporter wrote it; every elastic series carries it."""
    server, job = prometheus_server, job_under_test
    result = server.query(f'count by (__name__) ({{__name__=~"elastic_.*", instance="{job.target}"}})')
    names = {r["metric"]["__name__"] for r in result}
    assert "elastic_workers" in names and "elastic_controller_decisions_total" in names
    unlabelled = server.query(f'{{__name__=~"elastic_.*", instance="{job.target}", job_name=""}}')
    assert unlabelled == []
