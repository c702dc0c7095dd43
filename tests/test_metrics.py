"""Unit tests of elastic.metrics: names, labels, values, the event log and the exporter."""

from __future__ import annotations

import json
import math
import re
import socket
import urllib.request
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from elastic.metrics import (
    CONTROLLER_METRIC_NAMES,
    TRAINER_METRIC_NAMES,
    ControllerMetrics,
    MetricsError,
    NullTrainerMetrics,
    StepRecord,
    TrainerMetrics,
    start_exporter,
)

JOB = "unit-job"

# The contract, spelled out here rather than imported, so a rename in metrics.py fails this test.
DESIGN_TRAINER = """elastic_workers elastic_target_workers elastic_global_batch_size elastic_scale
elastic_gain_ratio elastic_statistical_efficiency elastic_progress elastic_learning_rate
elastic_gradient_variance elastic_gradient_sqnorm elastic_loss elastic_goodput elastic_steps_total
elastic_samples_total elastic_step_seconds elastic_resizes_total elastic_resize_seconds
elastic_worker_failures_total elastic_skipped_steps_total elastic_checkpoints_total
elastic_checkpoint_seconds elastic_eval_metric""".split()
DESIGN_CONTROLLER = """elastic_controller_desired_workers elastic_controller_capacity_workers
elastic_controller_decisions_total elastic_controller_actuation_seconds
elastic_controller_reconcile_errors_total""".split()


def make_step(**overrides) -> StepRecord:
    base = dict(step=7, time_s=1_700_000_000.0, workers=4, target_workers=4, global_batch_size=128,
                scale=4.0, gain=3.0, efficiency=0.75, progress=21.5, learning_rate=0.3,
                grad_variance=2.5, grad_sqnorm=0.5, loss=1.25, step_seconds=0.04, samples=128,
                samples_per_s=3200.0, goodput=2400.0)
    base.update(overrides)
    return StepRecord(**base)


def exposed_names(registry: CollectorRegistry) -> set[str]:
    names = set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
    return names


def value(registry, name, **labels):
    return registry.get_sample_value(name, {"job_name": JOB, **labels})


def test_contract_names_match_design():
    assert list(TRAINER_METRIC_NAMES) == DESIGN_TRAINER
    assert list(CONTROLLER_METRIC_NAMES) == DESIGN_CONTROLLER


def test_every_design_metric_is_exposed_with_job_name_label():
    registry = CollectorRegistry()
    trainer = TrainerMetrics(JOB, registry=registry)
    trainer.record_step(make_step())
    trainer.record_eval({"accuracy": 0.9}, progress=21.5, step=7)
    ControllerMetrics(JOB, registry=registry).record_decision("noop", 4, 4)
    names = exposed_names(registry)
    for name in DESIGN_TRAINER + DESIGN_CONTROLLER:
        series = name + "_count" if name.endswith("_seconds") else name
        assert series in names, f"{series} not exposed"
    for family in registry.collect():
        for sample in family.samples:
            assert sample.labels.get("job_name") == JOB, sample


def test_gauges_appear_with_their_first_value_counters_at_zero():
    """Before the first step a gain or efficiency of 0 would be false (and trip the efficiency alert)."""
    registry = CollectorRegistry()
    m = TrainerMetrics(JOB, registry=registry)
    c = ControllerMetrics(JOB, registry=registry)
    names = exposed_names(registry)
    for gauge in ("elastic_workers", "elastic_gain_ratio", "elastic_statistical_efficiency",
                  "elastic_controller_desired_workers"):
        assert gauge not in names
    assert value(registry, "elastic_steps_total") == 0
    assert value(registry, "elastic_worker_failures_total") == 0
    assert value(registry, "elastic_controller_reconcile_errors_total") == 0
    m.set_target_workers(2)
    assert value(registry, "elastic_target_workers") == 2 and value(registry, "elastic_workers") is None
    m.record_step(make_step(workers=2))
    c.record_decision("noop", 2, 3)
    assert value(registry, "elastic_workers") == 2
    assert value(registry, "elastic_controller_capacity_workers") == 3


def test_record_step_sets_gauges_counters_and_histogram():
    registry = CollectorRegistry()
    m = TrainerMetrics(JOB, registry=registry)
    rec = make_step()
    m.record_step(rec)
    m.record_step(replace(rec, step=8, loss=1.0, step_seconds=0.2))
    assert value(registry, "elastic_workers") == 4
    assert value(registry, "elastic_target_workers") == 4
    assert value(registry, "elastic_global_batch_size") == 128
    assert value(registry, "elastic_scale") == 4.0
    assert value(registry, "elastic_gain_ratio") == 3.0
    assert value(registry, "elastic_statistical_efficiency") == 0.75
    assert value(registry, "elastic_progress") == 21.5
    assert value(registry, "elastic_learning_rate") == 0.3
    assert value(registry, "elastic_gradient_variance") == 2.5
    assert value(registry, "elastic_gradient_sqnorm") == 0.5
    assert value(registry, "elastic_loss") == 1.0
    assert value(registry, "elastic_goodput") == 2400.0
    assert value(registry, "elastic_steps_total") == 2
    assert value(registry, "elastic_samples_total") == 256
    assert value(registry, "elastic_step_seconds_count") == 2
    assert value(registry, "elastic_step_seconds_sum") == pytest.approx(0.24)
    assert value(registry, "elastic_step_seconds_bucket", le="0.05") == 1
    assert value(registry, "elastic_step_seconds_bucket", le="0.25") == 2


def test_resize_failure_skip_checkpoint_and_target():
    registry = CollectorRegistry()
    m = TrainerMetrics(JOB, registry=registry)
    # Label combinations exist at zero before the first event, so increase() sees the first one.
    assert value(registry, "elastic_resizes_total", direction="grow", cause="schedule") == 0
    assert value(registry, "elastic_skipped_steps_total", reason="nonfinite") == 0
    m.record_resize("grow", "schedule", pause_s=0.8, from_workers=2, to_workers=4)
    m.record_resize("shrink", "failure", pause_s=1.5, from_workers=4, to_workers=3)
    m.record_failure()
    m.record_failure(count=2)
    m.record_skip("nonfinite")
    m.record_checkpoint(0.3)
    m.set_target_workers(6)
    assert value(registry, "elastic_resizes_total", direction="grow", cause="schedule") == 1
    assert value(registry, "elastic_resizes_total", direction="shrink", cause="failure") == 1
    assert value(registry, "elastic_resizes_total", direction="grow", cause="controller") == 0
    assert value(registry, "elastic_resize_seconds_count") == 2
    assert value(registry, "elastic_resize_seconds_sum") == pytest.approx(2.3)
    assert value(registry, "elastic_workers") == 3
    assert value(registry, "elastic_worker_failures_total") == 3
    assert value(registry, "elastic_skipped_steps_total", reason="nonfinite") == 1
    assert value(registry, "elastic_checkpoints_total") == 1
    assert value(registry, "elastic_checkpoint_seconds_sum") == pytest.approx(0.3)
    assert value(registry, "elastic_target_workers") == 6


@pytest.mark.parametrize("call, message", [
    (lambda m: m.record_resize("sideways", "schedule", 1.0, 2, 4),
     "resize direction: 'sideways' is not one of grow, shrink"),
    (lambda m: m.record_resize("grow", "whim", 1.0, 2, 4), "resize cause: 'whim' is not one of"),
    (lambda m: m.record_resize("grow", "schedule", 1.0, 4, 2), "does not match 4 -> 2"),
    (lambda m: m.record_resize("shrink", "schedule", 1.0, 2, 2), "does not match 2 -> 2"),
    (lambda m: m.record_resize("grow", "schedule", -1.0, 2, 4), "resize pause_s: must be"),
    (lambda m: m.record_checkpoint(float("nan")), "checkpoint seconds: must be"),
    (lambda m: m.record_failure(0), "failure count: must be >= 1"),
    (lambda m: m.set_target_workers(0), "target_workers: must be >= 1"),
    (lambda m: m.record_skip(""), "skip reason"),
])
def test_invalid_values_raise_one_line_errors(call, message):
    m = TrainerMetrics(JOB, registry=CollectorRegistry())
    with pytest.raises(MetricsError, match=re.escape(message)) as info:
        call(m)
    assert "\n" not in str(info.value)


def test_step_record_validation_names_the_field():
    with pytest.raises(MetricsError, match="StepRecord.workers: must be >= 1"):
        make_step(workers=0)
    with pytest.raises(MetricsError, match="StepRecord.step_seconds"):
        make_step(step_seconds=float("nan"))


def test_two_trainer_metrics_on_one_registry_is_a_clear_error():
    registry = CollectorRegistry()
    TrainerMetrics(JOB, registry=registry)
    with pytest.raises(MetricsError, match="elastic_workers is already registered"):
        TrainerMetrics("other", registry=registry)


def test_default_registry_is_private_per_instance():
    a, b = TrainerMetrics("a"), TrainerMetrics("b")  # would collide on a shared global registry
    assert a.registry is not b.registry


def test_controller_metrics():
    registry = CollectorRegistry()
    c = ControllerMetrics(JOB, registry=registry)
    assert value(registry, "elastic_controller_decisions_total", action="shrink") == 0
    c.record_decision("grow", desired=4, capacity=6)
    c.record_decision("noop", desired=4, capacity=5)
    c.record_actuation(2.5)
    c.record_reconcile_error()
    assert value(registry, "elastic_controller_decisions_total", action="grow") == 1
    assert value(registry, "elastic_controller_decisions_total", action="noop") == 1
    assert value(registry, "elastic_controller_desired_workers") == 4
    assert value(registry, "elastic_controller_capacity_workers") == 5
    assert value(registry, "elastic_controller_actuation_seconds_count") == 1
    assert value(registry, "elastic_controller_reconcile_errors_total") == 1
    with pytest.raises(MetricsError, match="decision action: 'jump'"):
        c.record_decision("jump", 1, 1)


def test_event_log_one_json_object_per_line_flushed(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    m = TrainerMetrics(JOB, registry=CollectorRegistry(), log_path=log)
    c = ControllerMetrics(JOB, registry=CollectorRegistry(), log_path=log)
    m.record_step(make_step(loss=float("nan")))
    # Flushed per line: readable before close.
    first = json.loads(log.read_text().splitlines()[0])
    assert first["kind"] == "step" and first["time_s"] == 1_700_000_000.0
    assert first["loss"] is None  # non-finite becomes null: valid JSON for any reader
    assert first["workers"] == 4 and first["progress"] == 21.5 and first["samples_per_s"] == 3200.0
    m.record_resize("grow", "controller", 0.9, 2, 4)
    m.record_failure()
    m.record_skip("nonfinite")
    m.record_checkpoint(0.2)
    c.record_decision("shrink", 2, 2)
    m.close()
    c.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["kind"] for e in events] == ["step", "resize", "failure", "skip", "checkpoint", "decision"]
    assert events[1] | {"time_s": 0} == {"kind": "resize", "time_s": 0, "job_name": JOB, "direction": "grow",
                                         "cause": "controller", "pause_s": 0.9, "from_workers": 2, "to_workers": 4}
    assert all(isinstance(e["time_s"], float) for e in events)
    assert events[5]["action"] == "shrink"
    m2 = TrainerMetrics(JOB, registry=CollectorRegistry(), log_path=tmp_path / "explicit.jsonl")
    m2.record_checkpoint(0.1, time_s=123.5)  # an explicit event time overrides "now"
    assert json.loads((tmp_path / "explicit.jsonl").read_text())["time_s"] == 123.5
    m.record_failure()  # after close: metrics still count, nothing is written
    assert len(log.read_text().splitlines()) == 6


def test_null_trainer_metrics_has_the_same_methods():
    public = {n for n in dir(TrainerMetrics) if not n.startswith("_")}
    null_public = {n for n in dir(NullTrainerMetrics) if not n.startswith("_")}
    assert public <= null_public
    null = NullTrainerMetrics()
    null.record_step(make_step())
    null.record_resize("grow", "manual", 1.0, 1, 2)
    null.close()


def test_exporter_serves_registry_on_a_free_port():
    registry = CollectorRegistry()
    m = TrainerMetrics(JOB, registry=registry)
    m.record_step(make_step())
    exporter = start_exporter(registry)
    try:
        assert exporter.addr == "127.0.0.1" and exporter.port > 0
        assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"
        body = urllib.request.urlopen(exporter.url, timeout=5).read().decode()
        assert 'elastic_workers{job_name="unit-job"} 4.0' in body
        assert 'elastic_steps_total{job_name="unit-job"} 1.0' in body
    finally:
        exporter.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(exporter.url, timeout=2)


def test_exporter_port_in_use_is_a_clear_error():
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        with pytest.raises(MetricsError) as info:
            start_exporter(CollectorRegistry(), addr="127.0.0.1", port=port)
    assert str(info.value) == f"metrics.port: {port} is already in use on 127.0.0.1"


def test_exporter_rejects_bad_port_and_address():
    with pytest.raises(MetricsError, match="metrics.port: must be an integer"):
        start_exporter(CollectorRegistry(), port=70000)
    with pytest.raises(MetricsError, match="metrics.addr: cannot bind 10.255.255.1"):
        start_exporter(CollectorRegistry(), addr="10.255.255.1")


def test_nan_loss_is_exposed_as_nan():
    registry = CollectorRegistry()
    TrainerMetrics(JOB, registry=registry).record_step(make_step(loss=float("nan")))
    assert math.isnan(value(registry, "elastic_loss"))


def test_eval_metrics_are_gauges_by_name_and_logged(tmp_path):
    registry = CollectorRegistry()
    log = tmp_path / "metrics.jsonl"
    metrics = TrainerMetrics(JOB, registry=registry, log_path=log)
    metrics.record_step(make_step(task_metrics={"grad_norm": 2.0}))
    metrics.record_eval({"accuracy": 0.5, "loss": 1.5}, progress=10.0, step=3)
    metrics.record_eval({"accuracy": 0.75, "loss": float("nan")}, progress=20.0, step=6)
    assert registry.get_sample_value("elastic_eval_metric", {"job_name": JOB, "name": "accuracy"}) == 0.75
    metrics.close()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[0]["task_metrics"] == {"grad_norm": 2.0}
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["metrics"]["accuracy"] for e in evals] == [0.5, 0.75]
    assert evals[1]["metrics"]["loss"] is None and evals[1]["progress"] == 20.0
