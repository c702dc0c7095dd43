"""The trainer's states and the transitions between them, each logged with its reason.

    starting -> training <-> resizing | recovering | checkpointing
    training -> stopping -> done;  any state -> failed

``resizing`` is an in-place grow or shrink at a step boundary; ``recovering`` re-forms the group after
a worker was lost (or waits for capacity after losing them all); ``checkpointing`` writes a durable
checkpoint; ``stopping`` is the way out (total progress reached or a stop requested): evaluate,
checkpoint, summary. A transition that is not in the table is a bug and raises.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("elastic")


class Phase(str, enum.Enum):
    STARTING = "starting"
    TRAINING = "training"
    RESIZING = "resizing"
    RECOVERING = "recovering"
    CHECKPOINTING = "checkpointing"
    STOPPING = "stopping"
    DONE = "done"
    FAILED = "failed"


_WORK = (Phase.RESIZING, Phase.RECOVERING, Phase.CHECKPOINTING)
ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.TRAINING, Phase.STOPPING, Phase.FAILED}),
    Phase.TRAINING: frozenset({*_WORK, Phase.STOPPING, Phase.FAILED}),
    Phase.RESIZING: frozenset({Phase.TRAINING, Phase.RECOVERING, Phase.STOPPING, Phase.FAILED}),
    Phase.RECOVERING: frozenset({Phase.TRAINING, Phase.STOPPING, Phase.FAILED}),
    Phase.CHECKPOINTING: frozenset({Phase.TRAINING, Phase.STOPPING, Phase.DONE, Phase.FAILED}),
    Phase.STOPPING: frozenset({Phase.CHECKPOINTING, Phase.DONE, Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}


class TransitionError(RuntimeError):
    """A transition the table does not allow (a bug in the trainer)."""


@dataclass(frozen=True)
class Transition:
    time_s: float
    """``time.time()`` of the transition."""
    source: Phase
    target: Phase
    reason: str


@dataclass
class TrainerStateMachine:
    """The current phase and the transitions so far (the newest ``keep`` of them)."""

    phase: Phase = Phase.STARTING
    history: list[Transition] = field(default_factory=list)
    keep: int = 1000

    def enter(self, target: Phase, reason: str) -> None:
        """Move to ``target`` (a no-op when already there), logging why."""
        if target == self.phase:
            return
        if target not in ALLOWED[self.phase]:
            raise TransitionError(f"trainer state {self.phase.value} -> {target.value} is not allowed ({reason})")
        logger.log(logging.DEBUG if target in (Phase.TRAINING, Phase.CHECKPOINTING) else logging.INFO,
                   "state %s -> %s: %s", self.phase.value, target.value, reason)
        self.history.append(Transition(time.time(), self.phase, target, reason))
        del self.history[:-self.keep]
        self.phase = target

    def fail(self, reason: str) -> None:
        """Any state but done may fail."""
        if self.phase not in (Phase.DONE, Phase.FAILED):
            self.enter(Phase.FAILED, reason)
