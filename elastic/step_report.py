"""StepReport: what the driver knows after a recorded step, built once from the ranks' reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from elastic.metrics import StepRecord


@dataclass(frozen=True)
class StepReport:
    """The newest recorded optimizer step, as every reader sees it (the observation for the
    controller and the operator, the progress display, the metrics line).

    The optimizer's values are rank 0's: after the all-reduce every rank holds the same S, r_t and
    tau. The loss and the task's metrics are means over the ranks."""

    progress: float
    """tau after the step (scale-invariant iterations)."""
    gain: float
    """AdaScale's gain ratio r_t, in [1, S]."""
    scale: float
    """AdaScale's S (workers x accumulation steps)."""
    efficiency: float
    """gain / scale."""
    learning_rate: float
    """Effective learning rate of the step."""
    grad_variance: float
    """Smoothed sigma^2 estimate (only meaningful once ``estimated``)."""
    grad_sqnorm: float
    """Smoothed mu^2 estimate (only meaningful once ``estimated``)."""
    num_estimates: int
    """Steps whose statistics entered the estimates."""
    skipped: bool
    """Non-finite gradients: the update was not applied."""
    loss: float
    """Mean of the ranks' losses."""
    step_s: float
    """Wall seconds of the step (its call's time over the call's steps, recovery excluded)."""
    metrics: Mapping[str, float] = field(default_factory=dict)
    """The task's metrics, each the mean over the ranks that reported it."""
    evaluation: Mapping[str, float] = field(default_factory=dict)
    """The newest evaluation's results (empty before any)."""

    @classmethod
    def from_ranks(cls, results: Sequence[Mapping[str, Any]], step_s: float,
                   evaluation: Mapping[str, float]) -> StepReport:
        """From the per-rank dicts a worker's ``train_step`` returns (rank 0's first)."""
        first = results[0]
        losses = [r["loss"] for r in results]
        return cls(progress=first["progress"], gain=first["gain"], scale=first["scale"],
                   efficiency=first["efficiency"], learning_rate=first["learning_rate"],
                   grad_variance=first["grad_variance"], grad_sqnorm=first["grad_sqnorm"],
                   num_estimates=first["num_estimates"], skipped=first["skipped"], loss=sum(losses) / len(losses),
                   step_s=step_s, metrics=_mean_of_dicts([r.get("metrics", {}) for r in results]),
                   evaluation=dict(evaluation))

    @property
    def estimated(self) -> bool:
        """Whether sigma^2 and mu^2 are estimates yet (they are of scale-1 quantities: still valid
        after shrinking to one worker)."""
        return bool(self.num_estimates)

    def with_evaluation(self, evaluation: Mapping[str, float]) -> StepReport:
        return replace(self, evaluation=dict(evaluation))

    def step_record(self, step: int, workers: int, target_workers: int, samples: int) -> StepRecord:
        """The metrics' record of this step (one ``metrics.jsonl`` line, the Prometheus series)."""
        rate = samples / self.step_s if self.step_s > 0 else 0.0
        return StepRecord(
            step=step, time_s=time.time(), workers=workers, target_workers=target_workers,
            global_batch_size=samples, scale=self.scale, gain=self.gain, efficiency=self.efficiency,
            progress=self.progress, learning_rate=self.learning_rate, grad_variance=self.grad_variance,
            grad_sqnorm=self.grad_sqnorm, loss=self.loss, step_seconds=self.step_s, samples=samples,
            samples_per_s=rate, goodput=rate * self.efficiency, task_metrics=dict(self.metrics))


def _mean_of_dicts(dicts: list[Mapping[str, float]]) -> dict[str, float]:
    names = sorted({k for d in dicts for k in d})
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in names}
