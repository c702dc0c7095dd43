"""A run's directory, held for the run's duration: opened (``elastic.rundir.open_run``: the lock, a
fresh or resumed ``run.json``), the run's log hook entered, and at the end ``run.json`` saying how
the run ended, whatever happened."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from elastic.config import JobSpec
from elastic.errors import TrainerError

logger = logging.getLogger("elastic")


@dataclass
class HeldRun:
    run_id: str
    summary: Any = None
    """Set when training returned its summary (finished, or stopped early); None: failed."""


@contextlib.contextmanager
def held_run_dir(spec: JobSpec, mode: str, run_log: Callable[[Any, str], ContextManager[Any]],
                 end_fields: Callable[[], dict[str, Any]]) -> Iterator[HeldRun]:
    """``mode``: fresh, resume or start_over (``open_run``). ``end_fields()``: run.json's progress,
    checkpoint_step, steps and elapsed_s at the end. Raises RunDirError, RunFinished, or TrainerError
    when the directory cannot be written."""
    from elastic.rundir import open_run

    run_dir = Path(spec.run_dir)
    try:
        lock, record, notes = open_run(run_dir, spec.checkpoint.dir, spec.name, spec.total_progress, mode)
    except OSError as exc:
        raise TrainerError(f"run_dir: cannot write to {run_dir}: {exc.strerror or exc}") from None
    try:
        with run_log(run_dir, record.run_id):
            for note in notes:
                logger.warning("%s", note)
            held = HeldRun(record.run_id)
            try:
                yield held
            finally:
                summary = held.summary
                status = "failed" if summary is None else "stopped" if summary.stopped_early else "finished"
                try:
                    replace(record, status=status, **end_fields()).write(run_dir)
                except OSError as exc:
                    logger.warning("could not update %s/run.json: %s", run_dir, exc)
    finally:
        lock.release()
