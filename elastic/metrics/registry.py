"""What every metric of this package shares: the ``job_name`` label, registration in an injectable
``CollectorRegistry`` (a duplicate is a :class:`MetricsError`), gauges that appear with their first
value, and the checks of recorded values."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Gauge


class MetricsError(ValueError):
    """A metrics setting or a recorded value is invalid; the message names the field."""


JOB_LABEL = "job_name"


class LazyGauge:
    """A labelled gauge that is exposed only once it has a value.

    Counters start at 0 (so increase() sees the first event), but a gauge read before the first step
    would report a false value: a gain ratio of 0 is outside [1, S], and an efficiency of 0 while the
    group is still forming would trip ElasticEfficiencyCollapsed.
    """

    def __init__(self, parent: Gauge, labels: dict[str, str]) -> None:
        self._parent = parent
        self._labels = labels
        self._child: Any = None

    def set(self, value: float) -> None:
        if self._child is None:
            self._child = self._parent.labels(**self._labels)
        self._child.set(value)


def register(metric_cls: type, name: str, doc: str, registry: CollectorRegistry,
             labels: tuple[str, ...] = (), **kwargs: Any) -> Any:
    try:
        return metric_cls(name, doc, (JOB_LABEL, *labels), registry=registry, **kwargs)
    except ValueError as exc:  # client_python raises ValueError on duplicates
        raise MetricsError(f"metrics registry: {name} is already registered ({exc}); "
                           "use one TrainerMetrics / ControllerMetrics per registry") from exc


def check_job_name(job_name: str) -> str:
    if not isinstance(job_name, str) or not job_name:
        raise MetricsError(f"metrics job_name: must be a non-empty string, got {job_name!r}")
    return job_name


def check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise MetricsError(f"{field}: {value!r} is not one of {', '.join(allowed)}")


def check_seconds(field: str, seconds: float) -> None:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise MetricsError(f"{field}: must be a finite number of seconds >= 0, got {seconds!r}")
