"""Watching one ``train_steps`` call on every rank of the group: results, deaths, hangs.

The driver waits on every rank's call. The first sign of a fault is a rank's call failing with
RayActorError, a survivor reporting a failed collective, or a rank not answering its heartbeat once
its call overruns. That sign becomes an out-of-band abort of every rank still inside the call (see
``elastic.group``'s docstring and ``ElasticWorker.abort_collectives``). Heartbeats (a ``ping``
served beside the training thread) cost nothing while a call ends on time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import ray
from ray.exceptions import RayActorError

from elastic.worker import CONTROL_GROUP

logger = logging.getLogger(__name__)

#: How often the driver looks at a running call once heartbeats are due or a fault is known. Before
#: that it sleeps in ``ray.wait`` until a call returns or fails (a dead rank's call fails at once),
#: so a call that ends on time costs the driver no polling beside the training processes.
POLL_S = 0.02
#: Heartbeats start once a call runs this many times longer than its expected duration
#: (steps x the median step time at this size), and never before HEARTBEAT_AFTER_MIN_S; a call
#: that ends on time costs no heartbeat at all.
HEARTBEAT_AFTER_FACTOR = 2.0
HEARTBEAT_AFTER_MIN_S = 0.5
#: A rank whose heartbeat (a ``ping`` served beside the training thread) goes unanswered this long
#: is hung (stopped, swapping, wedged in native code) and is replaced; the allowance grows with the
#: step time, for steps that hold the interpreter lock between yields.
#: Without a measured step time yet (the first steps at a size), heartbeats start after this.
HEARTBEAT_AFTER_UNTIMED_S = 2.0
#: Seconds between two heartbeats of one rank.
HEARTBEAT_INTERVAL_S = 0.25
HANG_SILENCE_MIN_S = 1.5
HANG_SILENCE_STEP_FACTOR = 2.0
#: After a fault is known, a rank whose call has not returned and that does not answer a heartbeat
#: for this long is counted lost (its node may be gone before Ray says so: measured, a removed
#: node's worker gave no RayActorError within 1 s while its survivors had already failed).
LOST_SILENCE_S = 0.5


@dataclass(frozen=True)
class FaultTiming:
    """Wall-clock times (``time.time()``) of one failure, as the driver saw it."""

    kind: str
    """``died`` (a rank's call failed: process or node gone), ``collective`` (a survivor's
    collective failed first), ``hung`` (a rank stopped answering its heartbeat)."""
    evidence_s: float
    """The earliest sign of the fault: a survivor's failed collective, the driver seeing the death,
    or a hung rank's last sign of life (its last heartbeat answer, or its call's start)."""
    detected_s: float
    """When the driver knew and sent the abort to the other ranks."""
    reformed_s: float = 0.0
    """When the group was whole again at its new size (0 until re-formed)."""

    @property
    def detection_s(self) -> float:
        return max(0.0, self.detected_s - self.evidence_s)


class CallWatch:
    """Waits for one ``train_steps`` call on every rank, and turns the first sign of a fault into
    an abort of every rank still inside the call (see the module docstring).

    ``results[i]`` is rank i's list of step reports, or None when the rank is lost (its call failed
    with RayActorError, or it stopped answering heartbeats). ``fault`` is set when a rank was lost
    or a survivor's collective failed."""

    def __init__(self, members: Sequence[Any], refs: Sequence[Any], steps: int,
                 expected_step_s: float | None, generation: int) -> None:
        self.members, self.refs, self.generation = list(members), list(refs), generation
        self.results: list[list[dict[str, Any]] | None] = [None] * len(self.members)
        self.fault: FaultTiming | None = None
        self.started_s = time.time()
        expected_call_s = (expected_step_s or 0.0) * steps
        self.heartbeat_after_s = max(HEARTBEAT_AFTER_MIN_S, HEARTBEAT_AFTER_FACTOR * expected_call_s) \
            if expected_step_s is not None else HEARTBEAT_AFTER_UNTIMED_S
        self.hang_silence_s = max(HANG_SILENCE_MIN_S, HANG_SILENCE_STEP_FACTOR * (expected_step_s or 0.0))
        self._pending = {ref: i for i, ref in enumerate(self.refs)}
        self._pings: dict[Any, int] = {}          # ping ref -> rank
        self._ping_sent: dict[int, float] = {}    # rank -> when its unanswered ping went out
        self._last_alive: dict[int, float] = {}   # rank -> its last heartbeat answer (wall)
        self._answered: dict[int, float] = {}     # rank -> when the driver got that answer
        self._lost: set[int] = set()

    def wait(self) -> None:
        while self._pending:
            timeout_s = wait_timeout_s(self.heartbeat_after_s, time.time() - self.started_s,
                                       busy=self.fault is not None or bool(self._pings))
            ready, _ = ray.wait(list(self._pending) + list(self._pings), num_returns=1, timeout=timeout_s)
            if ready:  # take everything that is ready, not just the first
                ready, _ = ray.wait(list(self._pending) + list(self._pings),
                                    num_returns=len(self._pending) + len(self._pings), timeout=0)
            for ref in ready:
                if ref in self._pings:
                    self._heartbeat_answered(ref)
                else:
                    self._call_returned(ref)
            self._check_heartbeats()

    # ---------------------------------------------------------------- events
    def _call_returned(self, ref: Any) -> None:
        rank = self._pending.pop(ref)
        try:
            reports = ray.get(ref)
        except RayActorError:
            self._lose(rank, "died", time.time())
            return
        self.results[rank] = reports
        if reports and not reports[-1]["ok"]:
            # The first failed collective is the earliest sign of a rank lost elsewhere; a task
            # error also ends the call on every other rank (they would wait on this one).
            kind = "collective" if reports[-1].get("communication") else "task error"
            self._on_fault(kind, float(reports[-1].get("failed_at_s", time.time())))

    def _heartbeat_answered(self, ref: Any) -> None:
        rank = self._pings.pop(ref)
        self._ping_sent.pop(rank, None)
        self._answered[rank] = time.time()
        try:
            self._last_alive[rank] = float(ray.get(ref))
        except RayActorError:
            if rank not in self._lost and self.results[rank] is None:
                self._lose(rank, "died", time.time())

    def _check_heartbeats(self) -> None:
        now = time.time()
        overdue = now - self.started_s >= self.heartbeat_after_s
        if not (overdue or self.fault is not None):
            return
        silence_s = LOST_SILENCE_S if self.fault is not None else self.hang_silence_s
        for ref, rank in list(self._pending.items()):
            sent = self._ping_sent.get(rank)
            if sent is None and now - self._answered.get(rank, 0.0) >= HEARTBEAT_INTERVAL_S:
                ping = self.members[rank].actor.ping.options(concurrency_group=CONTROL_GROUP).remote()
                self._pings[ping] = rank
                self._ping_sent[rank] = now
            elif sent is not None and now - sent >= silence_s:
                del self._pending[ref]
                # A hang's first sign is its last sign of life; once a fault is known, a rank
                # silenced by it says nothing earlier about when it happened.
                evidence_s = self._last_alive.get(rank, self.started_s) if self.fault is None else now
                self._lose(rank, "hung" if self.fault is None else "died", evidence_s)

    # ---------------------------------------------------------------- decisions
    def _lose(self, rank: int, kind: str, evidence_s: float) -> None:
        self._lost.add(rank)
        self.results[rank] = None
        m = self.members[rank]
        if rank in self._ping_sent:
            logger.warning("rank %d (%s) answered no heartbeat for %.1f s: replacing it", rank, m.worker_id,
                           time.time() - self._ping_sent[rank])
        ray.kill(m.actor, no_restart=True)  # a hung process holds its connections open until it dies
        self._on_fault(kind, evidence_s)

    def _on_fault(self, kind: str, evidence_s: float) -> None:
        if self.fault is not None:
            if evidence_s < self.fault.evidence_s:
                self.fault = FaultTiming(self.fault.kind, evidence_s, self.fault.detected_s)
            return
        self.fault = FaultTiming(kind, min(evidence_s, time.time()), time.time())
        for ref, rank in self._pending.items():
            self.members[rank].actor.abort_collectives.options(concurrency_group=CONTROL_GROUP).remote(self.generation)


def wait_timeout_s(heartbeat_after_s: float, elapsed_s: float, busy: bool) -> float:
    """How long the driver may sleep in ``ray.wait`` for a call ``elapsed_s`` old: until heartbeats
    are due, or POLL_S once they are, or while a fault is known or a heartbeat is out (``busy``)."""
    quiet_s = heartbeat_after_s - elapsed_s
    return quiet_s if not busy and quiet_s > POLL_S else POLL_S
