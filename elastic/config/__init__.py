"""The job spec: YAML (or a dict from the Kubernetes operator) -> validated, frozen config objects.

Parsed once, at the edge (STYLE.md rule 3). Every section is a small frozen pydantic model whose
fields carry their meaning in a docstring; unknown keys are refused with a did-you-mean. Errors come
back as one line each, field path first, with the allowed values and what was given::

    workers.min: must be <= workers.max (got min=5, max=2)
    optimzer: unknown key; did you mean 'optimizer'?
    scaling.steps[1].workers: must be within workers.min..workers.max = 1..4 (got 8)

Public functions: :func:`load_job_spec` (file -> JobSpec, raises :class:`ConfigError`),
:func:`parse_job_spec` (dict -> JobSpec), :func:`validate_job_spec` (every error, never raises),
:func:`parse_overrides` (``["workers.max=8"]`` -> ``{"workers.max": 8}`` for the CLI).

The task named by ``task`` is not imported here; the trainer does that.

The modules: ``fields`` (field types, the section base, one-line errors), the sections by concern
(``training``: optimizer, lr_schedule, adascale, data, training, evaluation; ``scaling``: workers,
scaling, failure; ``cluster``: cluster, runtime_env, checkpoint, metrics), ``job`` (JobSpec and the
checks across sections), ``errors`` (ConfigError and the error lines), ``loading`` (YAML, overrides).
"""

from __future__ import annotations

from elastic.config.cluster import CheckpointConfig, ClusterConfig, MetricsConfig, RuntimeEnvConfig
from elastic.config.errors import ConfigError
from elastic.config.job import JobSpec
from elastic.config.loading import load_job_spec, parse_job_spec, parse_overrides, validate_job_spec
from elastic.config.scaling import FailureConfig, ScalingConfig, ScalingStep, WorkersConfig
from elastic.config.training import (
    AdaScaleConfig,
    DataConfig,
    EvaluationConfig,
    LRScheduleConfig,
    OptimizerConfig,
    TrainingConfig,
)

__all__ = [
    "AdaScaleConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "FailureConfig",
    "JobSpec",
    "LRScheduleConfig",
    "MetricsConfig",
    "OptimizerConfig",
    "ScalingConfig",
    "RuntimeEnvConfig",
    "ScalingStep",
    "TrainingConfig",
    "WorkersConfig",
    "load_job_spec",
    "parse_job_spec",
    "parse_overrides",
    "validate_job_spec",
]
