"""RunSummary: what ``ElasticTrainer.run`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elastic.resizes import ResizeEvent


@dataclass(frozen=True)
class RunSummary:
    name: str
    progress: float
    total_progress: float
    steps: int
    skipped_steps: int
    samples: int
    elapsed_s: float
    evaluation: dict[str, float]
    resizes: tuple[ResizeEvent, ...]
    worker_failures: int
    final_workers: int
    run_dir: str
    checkpoint_step: int | None
    metrics_url: str | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""
    #: Signal that stopped the run (``signal.SIGTERM`` / ``SIGINT``), or None.
    stop_signal: int | None = None
    #: Checkpoint step this run resumed from (None for a fresh start); ``steps`` counts from 0.
    resumed_from_step: int | None = None
    #: Training time over every attempt of the run (``elapsed_s`` is this process's share).
    total_elapsed_s: float = 0.0

    @property
    def steps_this_run(self) -> int:
        return self.steps - (self.resumed_from_step or 0)
