"""The whole job spec: :class:`JobSpec`, its own fields, the sections, and the checks across them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator

from elastic.config.cluster import CheckpointConfig, ClusterConfig, MetricsConfig, RuntimeEnvConfig
from elastic.config.fields import Float, Int, Problems, Section, field_error
from elastic.config.scaling import FailureConfig, ScalingConfig, WorkersConfig
from elastic.config.training import (
    AdaScaleConfig,
    DataConfig,
    EvaluationConfig,
    LRScheduleConfig,
    OptimizerConfig,
    TrainingConfig,
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _check_name(name: str) -> str:
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise field_error(
            "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending "
            f"with a letter or digit, at most 63 characters (got {name!r})"
        )
    return name


def _check_task(task: str) -> str:
    if not _IMPORT_PATH.match(task):
        raise field_error(f"must be an import path 'package.module:ClassName' (got {task!r})")
    return task


class JobSpec(Section):
    """A whole training job. Build it with :func:`load_job_spec` or :func:`parse_job_spec`."""

    name: Annotated[str, AfterValidator(_check_name)]
    """Job name, a DNS-1123 label (lowercase letters, digits, '-'; at most 63 characters)."""
    task: Annotated[str, AfterValidator(_check_task)]
    """Import path of the Task class, ``package.module:ClassName``."""
    task_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the Task constructor."""
    batch_size_per_worker: Int = Field(ge=1)
    """Samples per micro-batch on one worker; scale 1 = one worker's batch."""
    accumulation_steps: Int = Field(default=1, ge=1)
    """Micro-batches (backward passes) per worker per step; global batch = workers x batch x steps."""
    total_progress: Float = Field(gt=0)
    """Progress tau at which training stops, in scale-1 iterations."""
    seed: Int = 0
    """Seeds the model initialisation, the data order and every derived random stream: each
    sample's loading from (seed, epoch, index), each rank's step from (seed, rank, step)."""
    optimizer: OptimizerConfig
    """Base optimizer."""
    lr_schedule: LRScheduleConfig = Field(default_factory=LRScheduleConfig)
    """Learning-rate schedule in tau."""
    adascale: AdaScaleConfig = Field(default_factory=AdaScaleConfig)
    """AdaScale on/off."""
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    """Worker bounds."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Scaling policy and controller settings."""
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    """Cluster backend."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoints."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Metrics exporter and log."""
    run_dir: str = Field(default="", min_length=1)
    """Directory for the run's logs, metrics and report; default ``runs/<name>``."""
    failure: FailureConfig = Field(default_factory=FailureConfig)
    """Failure handling."""
    runtime_env: RuntimeEnvConfig = Field(default_factory=RuntimeEnvConfig)
    """Ray runtime_env of the workers (code, packages, environment variables)."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Input pipeline (DataLoader settings)."""
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    """Gradient clipping and numeric precision."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """Evaluation during training."""

    @model_validator(mode="before")
    @classmethod
    def _directories_default_to_run_dir(cls, data: Any) -> Any:
        # Defaults that depend on other fields are filled in before validation (the models are
        # frozen); when the fields they depend on are invalid, those fields' errors are reported.
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if data.get("run_dir") is None and isinstance(data.get("name"), str):
            data["run_dir"] = f"runs/{data['name']}"
        checkpoint = data.get("checkpoint", {})
        if isinstance(checkpoint, Mapping) and checkpoint.get("dir") is None and isinstance(data.get("run_dir"), str):
            data["checkpoint"] = {**checkpoint, "dir": str(Path(data["run_dir"]) / "checkpoints")}
        return data

    @model_validator(mode="after")
    def _check_across_sections(self) -> JobSpec:
        problems = Problems("JobSpec")
        low, high = self.workers.min, self.workers.max
        for i, step in enumerate(self.scaling.steps):
            if not low <= step.workers <= high:
                problems.add(
                    ("scaling", "steps", i, "workers"),
                    f"must be within workers.min..workers.max = {low}..{high} (got {step.workers})",
                    step.workers,
                )
            if step.at_progress is not None and step.at_progress >= self.total_progress:
                problems.add(
                    ("scaling", "steps", i, "at_progress"),
                    f"must be < total_progress = {self.total_progress:g} (got {step.at_progress:g})",
                    step.at_progress,
                )
        problems.raise_if_any()
        return self

    def global_batch_size(self, workers: int) -> int:
        """Samples per optimizer step at ``workers`` workers: workers x batch_size_per_worker x accumulation_steps."""
        return workers * self.batch_size_per_worker * self.accumulation_steps
