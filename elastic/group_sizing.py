"""Moving the group toward the target at a step boundary: grow (new workers start as soon as a
target above the size is known, triggered or not, and join once its trigger fired) or shrink (the
released workers are remembered until the controller removes their capacity)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from elastic.config import JobSpec
from elastic.targets import NOW, Trigger, WorkerTarget, trigger_due
from elastic.trainer_state import Phase, TrainerStateMachine

logger = logging.getLogger("elastic")

#: Newcomers that are ready join together; one that waited this long joins without the others.
GROW_BATCH_WAIT_S = 5.0


class GroupSizer:
    def __init__(self, spec: JobSpec, target: WorkerTarget, state: TrainerStateMachine) -> None:
        self.target = target
        self.state = state
        self._late_workers = LateWorkers(spec)
        self._lock = threading.Lock()
        self._released: list[str] = []

    def released(self) -> list[str]:
        """Ids (``backend.release_id``) of the workers released so far, oldest first."""
        with self._lock:
            return list(self._released)

    def apply(self, group: Any, release_id: Callable[[Any], str], progress: float,
              elapsed_s: float) -> tuple[int, int, str, str] | None:
        """Grow or shrink toward the target; returns (from, to, direction, cause) if the group changed."""
        target, at, cause = self.target.read()
        size, pending = group.size, len(group.pending)
        if size == 0:
            return None  # nothing to grow from: the trainer restores the checkpoint first
        due = trigger_due(at, progress, elapsed_s)
        if target > size:
            if size + pending < target:
                group.spawn(target - size - pending)
            if not due:
                return None  # warming up ahead of the trigger
            ready = group.poll_ready()
            triggered = at != NOW
            if triggered and len(ready) < target - size:
                ready = self._late_workers.ready(group, target - size, at, progress)
            all_ready = len(ready) == len(group.pending)
            if ready and (triggered or all_ready or group.oldest_ready_wait_s() > GROW_BATCH_WAIT_S):
                joining = ready[: target - size]
                self.state.enter(Phase.RESIZING, f"grow {size} -> {size + len(joining)} ({cause})")
                group.grow(joining)
                self.state.enter(Phase.TRAINING, f"grown to {group.size}")
                return size, group.size, "grow", cause
            return None
        if pending:
            group.cancel_pending()
        if target < size and due:
            self.state.enter(Phase.RESIZING, f"shrink {size} -> {target} ({cause})")
            released, _ = group.shrink(size - target)
            self.state.enter(Phase.TRAINING, f"shrunk to {group.size}")
            with self._lock:
                self._released.extend(release_id(m) for m in released)
            return size, group.size, "shrink", cause
        return None


class LateWorkers:
    """A trigger has fired before its new workers are ready: wait for them (scaling.late_workers=wait)
    up to scaling.late_wait_s, or go on and say so; once per trigger."""

    def __init__(self, spec: JobSpec) -> None:
        self.scaling = spec.scaling
        self._said: tuple[int, float | None, float | None] | None = None

    def ready(self, group: Any, needed: int, at: Trigger, progress: float) -> list:
        """The new workers ready now (after the wait, if there is one for this trigger)."""
        s = self.scaling
        if self._said == (needed, *at):  # waited (or said so) once for this trigger already
            return group.poll_ready()
        self._said = (needed, *at)
        if s.late_workers == "wait":
            logger.warning("scheduled resize at tau %.1f: waiting up to %.0f s for %d new worker(s) to be ready",
                           progress, s.late_wait_s, needed)
            ready = group.wait_ready(needed, s.late_wait_s)
            if len(ready) < needed:
                logger.warning("scheduled resize: %d of %d new worker(s) ready after %.0f s; going on with them",
                               len(ready), needed, s.late_wait_s)
            return ready
        logger.warning("scheduled resize at tau %.1f: new workers not ready yet; training on at %d worker(s) "
                       "until they are (scaling.late_workers=continue)", progress, group.size)
        return group.poll_ready()
