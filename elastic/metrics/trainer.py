"""The trainer's metrics (one job per instance), the step record they are fed, and their null object."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from elastic.metrics.event_log import EventLog, json_safe
from elastic.metrics.registry import (
    JOB_LABEL,
    LazyGauge,
    MetricsError,
    check_choice,
    check_job_name,
    check_seconds,
    register,
)

# The contract of DESIGN.md; tests check that each name is exposed and that each is in a dashboard panel.
TRAINER_METRIC_NAMES: tuple[str, ...] = (
    "elastic_workers",
    "elastic_target_workers",
    "elastic_global_batch_size",
    "elastic_scale",
    "elastic_gain_ratio",
    "elastic_statistical_efficiency",
    "elastic_progress",
    "elastic_learning_rate",
    "elastic_gradient_variance",
    "elastic_gradient_sqnorm",
    "elastic_loss",
    "elastic_goodput",
    "elastic_steps_total",
    "elastic_samples_total",
    "elastic_step_seconds",
    "elastic_resizes_total",
    "elastic_resize_seconds",
    "elastic_worker_failures_total",
    "elastic_skipped_steps_total",
    "elastic_checkpoints_total",
    "elastic_checkpoint_seconds",
    "elastic_eval_metric",
)

RESIZE_DIRECTIONS: tuple[str, ...] = ("grow", "shrink")
RESIZE_CAUSES: tuple[str, ...] = ("schedule", "controller", "failure", "manual")
# Reasons known in advance are created at zero so that increase() sees the first skip.
KNOWN_SKIP_REASONS: tuple[str, ...] = ("nonfinite",)

# Buckets in seconds. A CPU step on the digits CNN is ~20 ms, a ResNet step on a GPU ~0.1-1 s.
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# An in-place resize pauses about a second; a restart-based one tens of seconds to minutes.
RESIZE_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CHECKPOINT_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class StepRecord:
    """Everything the trainer knows after one completed optimizer step (the values of that step)."""

    step: int
    """Index of the completed step (0-based or 1-based, as the trainer counts; only logged)."""
    time_s: float
    """Unix time at which the step completed."""
    workers: int
    """World size the step ran at."""
    target_workers: int
    """World size the trainer is heading for (the controller's or the schedule's target)."""
    global_batch_size: int
    """Samples per step over all workers and micro-batches."""
    scale: float
    """AdaScale's S."""
    gain: float
    """AdaScale's gain ratio r_t, in [1, S]."""
    efficiency: float
    """gain / scale."""
    progress: float
    """tau: scale-invariant iterations so far."""
    learning_rate: float
    """Effective learning rate applied at this step (r_t * base_lr * schedule(tau))."""
    grad_variance: float
    """Smoothed sigma^2 estimate."""
    grad_sqnorm: float
    """Smoothed mu^2 estimate."""
    loss: float
    """Training loss of the step (mean over the global batch)."""
    step_seconds: float
    """Wall time of the step."""
    samples: int
    """Samples consumed by this step (normally global_batch_size)."""
    samples_per_s: float
    """Throughput of this step."""
    goodput: float
    """samples_per_s * efficiency: samples per second worth of scale-1 progress."""
    task_metrics: Mapping[str, float] = field(default_factory=dict)
    """Scalar metrics the task's loss reported for the step (mean over micro-batches and ranks);
    only logged."""

    def __post_init__(self) -> None:
        for name in ("workers", "target_workers", "global_batch_size"):
            if getattr(self, name) < 1:
                raise MetricsError(f"StepRecord.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("step", "samples"):
            if getattr(self, name) < 0:
                raise MetricsError(f"StepRecord.{name}: must be >= 0, got {getattr(self, name)}")
        if not self.step_seconds >= 0:  # also rejects NaN
            raise MetricsError(f"StepRecord.step_seconds: must be >= 0, got {self.step_seconds}")


class TrainerMetrics:
    """The trainer's metrics (one job per instance) and its event log."""

    def __init__(self, job_name: str, registry: CollectorRegistry | None = None,
                 log_path: Path | None = None) -> None:
        self.job_name = check_job_name(job_name)
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        job = {JOB_LABEL: self.job_name}

        def gauge(name: str, doc: str) -> LazyGauge:
            return LazyGauge(register(Gauge, name, doc, r), job)

        self._workers = gauge("elastic_workers", "Workers in the current group (world size).")
        self._target_workers = gauge("elastic_target_workers", "Workers the trainer is heading for.")
        self._global_batch = gauge("elastic_global_batch_size", "Samples per step over all workers.")
        self._scale = gauge("elastic_scale", "AdaScale scale S (global batch / scale-1 batch).")
        self._gain = gauge("elastic_gain_ratio", "AdaScale gain ratio r_t of the last step, in [1, S].")
        self._efficiency = gauge("elastic_statistical_efficiency", "Gain ratio / scale, in (0, 1].")
        self._progress = gauge("elastic_progress", "tau: scale-invariant iterations so far.")
        self._lr = gauge("elastic_learning_rate", "Effective learning rate of the last step.")
        self._grad_var = gauge("elastic_gradient_variance", "Smoothed gradient variance estimate sigma^2.")
        self._grad_sqnorm = gauge("elastic_gradient_sqnorm", "Smoothed squared gradient norm estimate mu^2.")
        self._loss = gauge("elastic_loss", "Training loss of the last step.")
        self._goodput = gauge("elastic_goodput", "Samples per second times statistical efficiency.")

        self._steps = register(Counter, "elastic_steps_total", "Completed optimizer steps.", r).labels(**job)
        self._samples = register(Counter, "elastic_samples_total", "Samples consumed.", r).labels(**job)
        self._step_seconds = register(Histogram, "elastic_step_seconds", "Wall time of one step.", r,
                                      buckets=STEP_SECONDS_BUCKETS).labels(**job)

        self._resizes = register(Counter, "elastic_resizes_total", "Completed resizes of the worker group.",
                                 r, labels=("direction", "cause"))
        for direction in RESIZE_DIRECTIONS:
            for cause in RESIZE_CAUSES:
                self._resizes.labels(direction=direction, cause=cause, **job)
        self._resize_seconds = register(Histogram, "elastic_resize_seconds",
                                        "Time training was paused by a resize.", r,
                                        buckets=RESIZE_SECONDS_BUCKETS).labels(**job)
        self._failures = register(Counter, "elastic_worker_failures_total",
                                  "Workers lost unexpectedly (died, preempted).", r).labels(**job)
        self._skipped = register(Counter, "elastic_skipped_steps_total",
                                 "Steps skipped without updating the model.", r, labels=("reason",))
        for reason in KNOWN_SKIP_REASONS:
            self._skipped.labels(reason=reason, **job)
        self._checkpoints = register(Counter, "elastic_checkpoints_total",
                                     "Durable checkpoints written.", r).labels(**job)
        self._checkpoint_seconds = register(Histogram, "elastic_checkpoint_seconds",
                                            "Time to write one checkpoint.", r,
                                            buckets=CHECKPOINT_SECONDS_BUCKETS).labels(**job)
        self._eval = register(Gauge, "elastic_eval_metric",
                              "The task's evaluation metrics during training, by name.", r, labels=("name",))
        self._log = EventLog(log_path, self.job_name)

    def record_eval(self, metrics: Mapping[str, float], progress: float, step: int, *,
                    time_s: float | None = None) -> None:
        """One evaluation of the model during (or at the end of) training."""
        for name, value in metrics.items():
            if not name:
                raise MetricsError("eval metric name: must be a non-empty string")
            self._eval.labels(name=name, job_name=self.job_name).set(float(value))
        self._log.write("eval", time_s, progress=progress, step=step,
                        metrics={k: json_safe(float(v)) for k, v in metrics.items()})

    def record_step(self, rec: StepRecord) -> None:
        self._workers.set(rec.workers)
        self._target_workers.set(rec.target_workers)
        self._global_batch.set(rec.global_batch_size)
        self._scale.set(rec.scale)
        self._gain.set(rec.gain)
        self._efficiency.set(rec.efficiency)
        self._progress.set(rec.progress)
        self._lr.set(rec.learning_rate)
        self._grad_var.set(rec.grad_variance)
        self._grad_sqnorm.set(rec.grad_sqnorm)
        self._loss.set(rec.loss)
        self._goodput.set(rec.goodput)
        self._steps.inc()
        self._samples.inc(rec.samples)
        self._step_seconds.observe(rec.step_seconds)
        fields = asdict(rec)
        time_s = fields.pop("time_s")
        task_metrics = fields.pop("task_metrics")
        if task_metrics:
            fields["task_metrics"] = {k: json_safe(float(v)) for k, v in task_metrics.items()}
        self._log.write("step", time_s, **fields)

    def record_resize(self, direction: str, cause: str, pause_s: float,
                      from_workers: int, to_workers: int, *, time_s: float | None = None) -> None:
        """A completed resize; ``time_s`` (unix time, default now) is when training resumed."""
        check_choice("resize direction", direction, RESIZE_DIRECTIONS)
        check_choice("resize cause", cause, RESIZE_CAUSES)
        check_seconds("resize pause_s", pause_s)
        if to_workers < 1 or from_workers < 1 or (direction == "grow") != (to_workers > from_workers) \
                or to_workers == from_workers:
            raise MetricsError(f"resize direction: {direction!r} does not match {from_workers} -> {to_workers} workers")
        self._resizes.labels(direction=direction, cause=cause, job_name=self.job_name).inc()
        self._resize_seconds.observe(pause_s)
        self._workers.set(to_workers)
        self._log.write("resize", time_s, direction=direction, cause=cause, pause_s=pause_s,
                        from_workers=from_workers, to_workers=to_workers)

    def record_failure(self, count: int = 1, *, time_s: float | None = None) -> None:
        if count < 1:
            raise MetricsError(f"failure count: must be >= 1, got {count}")
        self._failures.inc(count)
        self._log.write("failure", time_s, count=count)

    def record_skip(self, reason: str, *, time_s: float | None = None) -> None:
        if not reason:
            raise MetricsError("skip reason: must be a non-empty string")
        self._skipped.labels(reason=reason, job_name=self.job_name).inc()
        self._log.write("skip", time_s, reason=reason)

    def record_checkpoint(self, seconds: float, *, time_s: float | None = None) -> None:
        check_seconds("checkpoint seconds", seconds)
        self._checkpoints.inc()
        self._checkpoint_seconds.observe(seconds)
        self._log.write("checkpoint", time_s, seconds=seconds)

    def set_target_workers(self, n: int) -> None:
        if n < 1:
            raise MetricsError(f"target_workers: must be >= 1, got {n}")
        self._target_workers.set(n)

    def close(self) -> None:
        self._log.close()


class NullTrainerMetrics:
    """Metrics switched off: same methods as TrainerMetrics, each does nothing."""

    def record_step(self, rec: StepRecord) -> None:
        pass

    def record_eval(self, metrics: Mapping[str, float], progress: float, step: int, *,
                    time_s: float | None = None) -> None:
        pass

    def record_resize(self, direction: str, cause: str, pause_s: float,
                      from_workers: int, to_workers: int, *, time_s: float | None = None) -> None:
        pass

    def record_failure(self, count: int = 1, *, time_s: float | None = None) -> None:
        pass

    def record_skip(self, reason: str, *, time_s: float | None = None) -> None:
        pass

    def record_checkpoint(self, seconds: float, *, time_s: float | None = None) -> None:
        pass

    def set_target_workers(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
