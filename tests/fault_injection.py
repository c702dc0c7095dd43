"""Fault injection at each rank position of a running ElasticTrainer (tests and benchmarks.chaos).

:class:`FaultAtEachRank` is an ``on_step`` hook: whenever the group is whole again (back at its
full size, some steps past the previous fault), it injects the next fault into the next rank
position, from a timer thread so that it lands inside a call. It stamps the wall time just before
the fault, so recoveries are measured from the fault itself, never from its detection.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

#: Ways to take a rank down.
FAULTS = ("sigkill", "node", "sigstop")


@dataclass
class Injection:
    rank: int
    fault: str
    worker_id: str
    pid: int
    at_s: float = 0.0
    """Wall time just before the fault was applied (0 until it was)."""
    first_step_s: float | None = None
    """Wall time at which the first call at the smaller size had completed (the on_step after it)."""


@dataclass
class FaultAtEachRank:
    """Inject ``fault`` into rank ``ranks[0]``, then ``ranks[1]``, ... of a group of ``full_size``.

    Each injection waits until the group is back at ``full_size`` (the trainer regrows it) and
    ``steps_between`` steps have passed; after the last recovery and ``steps_between`` more steps it
    asks the trainer to stop. ``delay_s`` puts the fault inside the next call."""

    fault: str
    ranks: list[int]
    full_size: int = 4
    steps_between: int = 40
    delay_s: float = 0.01
    injections: list[Injection] = field(default_factory=list)
    _mark: int = 0
    _stopped: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault: {self.fault!r} is not one of {', '.join(FAULTS)}")

    def __call__(self, trainer: Any) -> None:
        group, steps = trainer.group, trainer.steps
        last = self.injections[-1] if self.injections else None
        if last is not None and last.at_s and last.first_step_s is None:
            if len(failure_events(trainer)) == len(self.injections):  # training resumed, a call completed
                last.first_step_s = time.time()
                self._mark = steps
            return
        if last is not None and not last.at_s:
            return  # the timer has not fired yet
        if group.size != self.full_size or steps < self._mark + self.steps_between:
            return
        if len(self.injections) == len(self.ranks):
            trainer.request_stop()
            return
        rank = self.ranks[len(self.injections)]
        member = group.members[rank]
        injection = Injection(rank, self.fault, member.worker_id, member.info["pid"])
        self.injections.append(injection)
        threading.Timer(self.delay_s, self._inject, (trainer, injection, member.node_id)).start()

    def _inject(self, trainer: Any, injection: Injection, node_id: str) -> None:
        injection.at_s = time.time()
        if self.fault == "sigkill":
            os.kill(injection.pid, signal.SIGKILL)
        elif self.fault == "sigstop":
            os.kill(injection.pid, signal.SIGSTOP)  # the group must find it hung and kill it
        else:
            # Stamped before the hand-off to the main thread that removes the node, so the
            # measured recovery includes that hand-off (it can only make it look slower).
            trainer.backend.cluster.remove_node(node_id, False)


def failure_events(run: Any) -> list[Any]:
    """The failure resizes of a trainer or of its summary."""
    return [r for r in run.resizes if r.cause == "failure"]


def recovery_rows(chaos: FaultAtEachRank, summary: Any) -> list[dict[str, float]]:
    """Per injection: seconds from the fault to training at the new size (the trainer's resize
    event), to the first completed call, and the trainer's detection / re-formation split."""
    rows = []
    for injection, event in zip(chaos.injections, failure_events(summary)):
        rows.append({
            "rank": injection.rank,
            "to_new_size_s": event.time_s - injection.at_s,
            "to_first_call_done_s": (injection.first_step_s - injection.at_s) if injection.first_step_s else float("nan"),
            "detection_s": event.detection_s if event.detection_s is not None else float("nan"),
            "reform_s": event.reform_s if event.reform_s is not None else float("nan"),
            "trainer_pause_s": event.pause_s,
        })
    return rows
