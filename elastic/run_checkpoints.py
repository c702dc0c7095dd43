"""The run's checkpoints: written at a step boundary from the workers', the sampler's and the
trainer's state; the newest valid one loaded on a resume, or after every worker was lost."""

from __future__ import annotations

import logging
import time
from typing import Any

from elastic.checkpoint import CheckpointManager
from elastic.config import JobSpec
from elastic.trainer_state import Phase, TrainerStateMachine

logger = logging.getLogger("elastic")


class RunCheckpoints:
    def __init__(self, spec: JobSpec, state: TrainerStateMachine) -> None:
        self.manager = CheckpointManager(spec.checkpoint.dir, keep_last=spec.checkpoint.keep_last)
        self.directory = spec.checkpoint.dir
        self.state = state
        self.resumed_from_step: int | None = None
        """The checkpoint step this process first loaded (what ``--resume`` continued); None if none."""
        self.elapsed_before_s = 0.0
        """Training time of the run's earlier attempts (from that checkpoint)."""

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, group: Any, sampler: Any, trainer: Any, metrics: Any) -> None:
        """The checkpoint of ``step`` (``trainer``: what has ``state_dict()``); skipped, and said so,
        when a worker is found lost while its state is gathered."""
        from elastic.group import RankLostError

        started = time.perf_counter()
        try:
            worker_state = group.state()
        except RankLostError as exc:
            # The next step finds the dead worker and re-forms (or, with none left, resumes from
            # the previous checkpoint); this one is skipped rather than written from a guess.
            logger.warning("checkpoint at step %d skipped: %s", step, exc)
            return
        resume_phase = self.state.phase
        transit = resume_phase in (Phase.TRAINING, Phase.STOPPING)  # not while starting, recovering or failing
        if transit:
            self.state.enter(Phase.CHECKPOINTING, f"step {step}")
        path = self.manager.save(step, {"worker": worker_state, "sampler": sampler.state_dict(),
                                        "trainer": trainer.state_dict()})
        metrics.record_checkpoint(time.perf_counter() - started)
        if transit:
            self.state.enter(resume_phase, f"checkpoint of step {step} written")
        logger.debug("checkpoint %s", path)

    def load_latest(self, run_id: str) -> dict[str, Any] | None:
        """The newest valid checkpoint's state, or None (said so: training starts afresh)."""
        loaded = self.manager.load_latest()
        if loaded is None:
            logger.warning("no checkpoint in %s: starting from the beginning", self.directory)
            return None
        step, state = loaded
        logger.info("resuming from checkpoint step %d (tau %.1f)", step, state["trainer"]["progress"])
        owner = state["trainer"].get("run_id")
        if owner and owner != run_id:
            logger.warning("checkpoint step %d was written by run %s, not this run (%s)", step, owner, run_id)
        if self.resumed_from_step is None:  # the first load of this process: what --resume continued
            self.resumed_from_step = step
            self.elapsed_before_s = float(state["trainer"].get("elapsed_s", 0.0))
        return state
