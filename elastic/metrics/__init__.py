"""Prometheus metrics of the elastic trainer and the controller, the exporter, and the event log.

The metric names are a public contract (DESIGN.md, section Metrics): the Grafana dashboard and the
alert rules in ``dashboards/`` query exactly these names. Every series carries the label
``job_name`` (``job`` is reserved by Prometheus for the scrape job).

Every metric is registered in an injectable ``CollectorRegistry``. When none is given, the object
creates its own fresh registry (exposed as ``.registry``) so that two jobs in one process never
collide; to serve trainer and controller metrics from one endpoint, pass the same registry to both::

    registry = CollectorRegistry()
    trainer_metrics = TrainerMetrics("digits", registry=registry, log_path=run_dir / "metrics.jsonl")
    controller_metrics = ControllerMetrics("digits", registry=registry)
    exporter = start_exporter(registry, addr="127.0.0.1", port=9464)
    ...
    trainer_metrics.record_step(StepRecord(...))
    ...
    exporter.close(); trainer_metrics.close()

Besides the live metrics, ``log_path`` (optional) receives one JSON object per event and line
(``{"kind": "step", "time_s": ..., ...}``), flushed per line, so that ``elastic report`` can draw a
run after the fact and a crash loses at most the line being written.

The modules: ``trainer`` (TrainerMetrics, StepRecord, NullTrainerMetrics), ``controller``
(ControllerMetrics), ``exporter`` (the HTTP endpoint), ``event_log`` (the JSONL log), ``registry``
(what they share: the label, registration, MetricsError).
"""

from __future__ import annotations

from elastic.metrics.controller import CONTROLLER_METRIC_NAMES, DECISION_ACTIONS, ControllerMetrics
from elastic.metrics.exporter import Exporter, start_exporter
from elastic.metrics.registry import MetricsError
from elastic.metrics.trainer import (
    RESIZE_CAUSES,
    RESIZE_DIRECTIONS,
    TRAINER_METRIC_NAMES,
    NullTrainerMetrics,
    StepRecord,
    TrainerMetrics,
)

__all__ = [
    "CONTROLLER_METRIC_NAMES",
    "DECISION_ACTIONS",
    "RESIZE_CAUSES",
    "RESIZE_DIRECTIONS",
    "TRAINER_METRIC_NAMES",
    "ControllerMetrics",
    "Exporter",
    "MetricsError",
    "NullTrainerMetrics",
    "StepRecord",
    "TrainerMetrics",
    "start_exporter",
]
