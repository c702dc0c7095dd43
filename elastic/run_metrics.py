"""The run's metrics: the trainer's and the controller's series on one registry, their JSON lines
log (``metrics.jsonl``) and the Prometheus exporter."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.config import JobSpec
from elastic.metrics import ControllerMetrics, MetricsError, TrainerMetrics, start_exporter

logger = logging.getLogger("elastic")


@dataclass(frozen=True)
class RunMetrics:
    trainer: TrainerMetrics
    controller: ControllerMetrics
    exporter: Any = None
    """The Prometheus exporter (``metrics.enabled``), else None."""


def start_run_metrics(spec: JobSpec, run_dir: Path, registry: Any, run_id: str, resume: bool) -> RunMetrics:
    """``registry``: the Prometheus registry (tests pass a fresh one); a new one when None."""
    from prometheus_client import CollectorRegistry

    registry = registry if registry is not None else CollectorRegistry()
    log = run_dir / "metrics.jsonl" if spec.metrics.log else None
    trainer = TrainerMetrics(spec.name, registry=registry, log_path=log)
    controller = ControllerMetrics(spec.name, registry=registry, log_path=log)
    if log is not None:  # the run this log belongs to (and, after a resume, where the attempt starts)
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "run", "time_s": time.time(), "job_name": spec.name,
                                "run_id": run_id, "resume": resume}) + "\n")
    exporter = None
    if spec.metrics.enabled:
        try:
            exporter = start_exporter_or_free_port(registry, spec.metrics)
        except BaseException:
            trainer.close()
            raise
        logger.info("metrics at %s", exporter.url)
    return RunMetrics(trainer, controller, exporter)


def start_exporter_or_free_port(registry: Any, settings) -> Any:
    """The exporter on ``metrics.port``; when that is the default port (not set in the spec) and
    taken, e.g. by a second job on this machine, on a free port instead."""
    try:
        return start_exporter(registry, settings.addr, settings.port)
    except MetricsError as exc:
        if "port" in settings.model_fields_set or settings.port == 0 or "already in use" not in str(exc):
            raise
        logger.warning("metrics port %d is taken (%s); serving on a free port", settings.port, exc)
        return start_exporter(registry, settings.addr, 0)
