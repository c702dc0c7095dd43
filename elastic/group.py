"""The worker group: Ray actors running torch.distributed, re-formed in place at step boundaries.

- Grow: new actors start and warm up (imports, dataset, model) while the others train; at a step
  boundary the group re-forms and the newcomers take rank 0's state through the object store.
- Shrink: at a step boundary the leaving ranks are released (their actors end); survivors re-form.
- Failure: a rank dies mid-step, or hangs. The driver learns it from the first sign (a rank's call
  fails with RayActorError, a survivor reports a failed collective, or a rank stops answering the
  heartbeat once its call overruns), then pulls every other rank out of its collective at once
  through the out-of-band abort (``ElasticWorker.abort_collectives``; without it a survivor that is
  not next to the dead rank in gloo's ring waits for the whole collective timeout). Survivors
  report how many steps they completed, and the group re-forms around the most advanced survivor,
  whose state the others take. A step counts as completed only if a survivor finished its update,
  so its samples were used exactly once either way.

The group knows nothing of Kubernetes, policies or checkpoints; the trainer drives it.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from elastic.call_watch import CallWatch, FaultTiming
from elastic.sampler import StepPlan
from elastic.worker import COLLECTIVE_TIMEOUT_S, CONTROL_GROUP, ElasticWorker

logger = logging.getLogger(__name__)

#: How long a call outside a step (rendezvous, join, state) may take before its rank is declared dead.
STEP_TIMEOUT_S = COLLECTIVE_TIMEOUT_S + 30.0


class WorkerGroupError(RuntimeError):
    """The group cannot go on (e.g. the task raises on every rank); one-line message."""


class RankLostError(WorkerGroupError):
    """A call outside a step found its worker dead; the next step notices and re-forms the group."""


@dataclass
class Member:
    worker_id: str
    actor: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.info.get("node_id", "")

    @property
    def hostname(self) -> str:
        return self.info.get("hostname", "")


@dataclass
class Pending:
    member: Member
    ready_ref: Any
    spawned_s: float
    ready_s: float | None = None


@dataclass(frozen=True)
class StepOutcome:
    """What became of one step."""

    completed: bool
    """The optimizer update was applied (commit the plan)."""
    results: tuple[dict[str, Any], ...]
    """Reports of the ranks that completed it (rank order)."""
    lost_workers: tuple[str, ...] = ()
    """Workers that died during the step."""
    recovery_s: float = 0.0
    """Seconds spent re-forming after a failure (0 if none): from detection to the group re-formed."""
    consumed: Mapping[int, Sequence[int]] = field(default_factory=dict)
    """Sample indices used by each rank, when completed."""
    fault: FaultTiming | None = None
    """When a failure hit this step: what was seen, when (set on the outcome that carries lost_workers)."""


class WorkerGroup:
    """Driver-side handle of the data-parallel group (see the module docstring)."""

    def __init__(self, spec: Any, actor_options: Mapping[str, Any], name: str = "job") -> None:
        self._spec = spec  # a JobSpec (or its dict form), handed to every worker
        self._actor_options = dict(actor_options)
        # One thread trains; a second serves the out-of-band calls (ping, abort_collectives).
        self._remote = ray.remote(max_restarts=0, max_concurrency=1,
                                  concurrency_groups={CONTROL_GROUP: 1})(ElasticWorker)
        self._ids = itertools.count()
        self._name = name
        self.members: list[Member] = []
        self.pending: dict[str, Pending] = {}
        self.startup_s: collections.deque[float] = collections.deque(maxlen=20)
        """Seconds from spawn to ready of the workers started lately (newest last)."""
        self.generation = 0  # numbers the groups formed, so that a late abort hits only its own group
        self._in_sync: set[str] = set()  # members of the last group formed: replicas known to be identical

    @property
    def size(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------------ spawning
    def spawn(self, count: int) -> list[str]:
        """Start ``count`` actors; they warm up in the background (see :meth:`poll_ready`)."""
        started = []
        for _ in range(count):
            worker_id = f"{self._name}-w{next(self._ids)}"
            actor = self._remote.options(**self._actor_options).remote(self._spec, worker_id)
            member = Member(worker_id, actor)
            self.pending[worker_id] = Pending(member, actor.info.remote(), time.monotonic())
            started.append(worker_id)
        return started

    def poll_ready(self, timeout_s: float = 0.0) -> list[Member]:
        """Pending workers that finished warming up (waits up to ``timeout_s`` for the first)."""
        waiting = {p.ready_ref: p for p in self.pending.values() if p.ready_s is None}
        if waiting:
            done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=timeout_s)
            for ref in done:
                p = waiting[ref]
                try:
                    p.member.info = ray.get(ref)
                except RayTaskError as exc:
                    self.cancel_pending([p.member.worker_id])
                    raise WorkerGroupError(f"worker failed to start: {_first_line(exc.cause if exc.cause else exc)}") from None
                except RayActorError as exc:
                    self.pending.pop(p.member.worker_id, None)
                    if exc.actor_init_failed:  # the task or its data raised while being built
                        self.cancel_pending()
                        raise WorkerGroupError(f"worker failed to start: {_last_error_line(str(exc))}") from None
                    logger.warning("worker %s died while starting", p.member.worker_id)
                    continue
                p.ready_s = time.monotonic()
                self.startup_s.append(p.ready_s - p.spawned_s)
        return [p.member for p in self.pending.values() if p.ready_s is not None]

    def wait_ready(self, count: int, timeout_s: float) -> list[Member]:
        """Block until ``count`` pending workers are ready or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        ready = self.poll_ready()
        while len(ready) < count and time.monotonic() < deadline and self.pending:
            ready = self.poll_ready(timeout_s=min(0.5, max(0.0, deadline - time.monotonic())))
        return ready

    def oldest_ready_wait_s(self) -> float:
        ready = [p.ready_s for p in self.pending.values() if p.ready_s is not None]
        return time.monotonic() - min(ready) if ready else 0.0

    def cancel_pending(self, worker_ids: Sequence[str] | None = None) -> None:
        for worker_id in list(worker_ids if worker_ids is not None else self.pending):
            p = self.pending.pop(worker_id, None)
            if p is not None:
                ray.kill(p.member.actor, no_restart=True)

    # ------------------------------------------------------------------------ re-forming
    def grow(self, newcomers: Sequence[Member]) -> float:
        """Add ready workers at a step boundary; returns the pause in seconds."""
        for m in newcomers:
            self.pending.pop(m.worker_id, None)
        return self._reform(self.members + list(newcomers), needs_state={m.worker_id for m in newcomers})

    def shrink(self, count: int) -> tuple[list[Member], float]:
        """Release the ``count`` highest ranks at a step boundary; returns (released, pause_s)."""
        if not 0 < count < self.size:
            raise WorkerGroupError(f"cannot release {count} of {self.size} workers")
        started = time.perf_counter()
        leaving = self.members[-count:]
        for m in leaving:
            ray.kill(m.actor, no_restart=True)
        self._reform(self.members[:-count], needs_state=set())
        return leaving, time.perf_counter() - started

    def start(self, members: Sequence[Member], state: Mapping[str, Any] | None) -> float:
        """Form the first group (or a group after every worker was lost) from ``state`` (a checkpoint)
        or, when None, from the first member's freshly built model."""
        for m in members:
            self.pending.pop(m.worker_id, None)
        needs = {m.worker_id for m in members} if state is not None else {m.worker_id for m in members[1:]}
        return self._reform(list(members), needs_state=needs, state=state)

    def _reform(self, members: list[Member], needs_state: set[str], state: Any = None) -> float:
        """Rank 0 (members[0]) hosts the rendezvous; members in ``needs_state`` take ``state`` or,
        when None, rank 0's state via the object store. Retries without members that die meanwhile."""
        started = time.perf_counter()
        for attempt in range(3):
            try:
                host, port = ray.get(members[0].actor.open_rendezvous.remote(), timeout=STEP_TIMEOUT_S)
                payload = state
                if payload is None and needs_state:
                    payload = members[0].actor.state.remote()
                self.generation += 1
                # Every member is a replica of the last group or takes the state: the model crossed
                # once (object store), so DDP's construction broadcast would send it a second time.
                # Decided here, for all ranks alike (the broadcast is a collective).
                sync_init = any(m.worker_id not in self._in_sync and m.worker_id not in needs_state for m in members)
                refs = [
                    m.actor.join.remote(rank, len(members), host, port, payload if m.worker_id in needs_state else None,
                                        self.generation, sync_init)
                    for rank, m in enumerate(members)
                ]
                dead = []
                for m, ref in zip(members, refs):
                    try:
                        ray.get(ref, timeout=STEP_TIMEOUT_S)
                    except (RayActorError, GetTimeoutError):
                        dead.append(m)
                if not dead:
                    self.members = members
                    self._in_sync = {m.worker_id for m in members}
                    return time.perf_counter() - started
            except (RayActorError, GetTimeoutError):
                dead = [members[0]]
            logger.warning("re-forming: %d worker(s) died meanwhile (attempt %d)", len(dead), attempt + 1)
            for m in dead:
                ray.kill(m.actor, no_restart=True)
            members = [m for m in members if m not in dead]
            if not members:
                break
        self.members = []
        raise WorkerGroupError("could not form a group: every worker died while re-forming")

    # ------------------------------------------------------------------------ steps
    def run_step(self, plan: StepPlan) -> StepOutcome:
        """Run one step on every rank (see :meth:`run_steps`)."""
        return self.run_steps([plan])[-1]

    def run_steps(self, plans: Sequence[StepPlan], expected_step_s: float | None = None,
                  lookahead: Sequence[StepPlan] = ()) -> list[StepOutcome]:
        """Run consecutive steps, one actor call per rank for all of them; one outcome per step that ran.

        Every outcome but the last is completed. When a rank is lost, the group re-forms around the
        most advanced survivor: the steps it completed are kept, the step the failure hit is kept
        only if a survivor completed it (else abandoned: its outcome is the last, not completed) and
        the plans after it never ran. ``expected_step_s`` (the usual step time at this size) sets
        when heartbeats start and how long a silent rank is allowed (see the module constants).
        ``lookahead``: the plans expected next (not run; the workers' input pipelines prefetch them).
        """
        if not plans:
            return []
        refs = [m.actor.train_steps.remote([p.packed_shard(rank) for p in plans], [p.packed_shard(rank) for p in lookahead])
                for rank, m in enumerate(self.members)]
        call = CallWatch(self.members, refs, len(plans), expected_step_s, self.generation)
        call.wait()
        per_rank = call.results
        if call.fault is None and all(r is not None and len(r) == len(plans) and r[-1]["ok"] for r in per_rank):
            return [StepOutcome(True, tuple(r[k] for r in per_rank), consumed=_consumed(plan))  # type: ignore[index]
                    for k, plan in enumerate(plans)]

        lost = [m for m, r in zip(self.members, per_rank) if r is None]
        failed = [r[-1] for r in per_rank if r is not None and not r[-1]["ok"]]
        if not lost and any(not f["communication"] for f in failed):
            raise WorkerGroupError(f"the task failed on {len(failed)} worker(s): {failed[0]['error']}")
        return self._recover(plans, per_rank, lost, call.fault)

    def _recover(self, plans: Sequence[StepPlan], per_rank: list[list[dict[str, Any]] | None],
                 lost: list[Member], fault: FaultTiming | None) -> list[StepOutcome]:
        started = time.perf_counter()
        if fault is None:  # every call returned, one with a failed collective and no fault seen
            now = time.time()
            fault = FaultTiming("collective", now, now)
        for m in lost:
            ray.kill(m.actor, no_restart=True)
        survivors = [(m, r) for m, r in zip(self.members, per_rank) if r is not None]
        if not survivors:
            # Nothing survived to say how far the call got: the trainer resumes from a checkpoint.
            self.members = []
            return [StepOutcome(False, (), tuple(m.worker_id for m in lost), time.perf_counter() - started,
                                fault=fault)]
        # Some survivors may have finished an update before the failure reached them: the most
        # advanced one is the source of truth (its updates used every rank's gradient); the rest
        # take its state. Its completed steps are the call's completed steps.
        done = {m.worker_id: sum(1 for rep in r if rep["ok"]) for m, r in survivors}
        most = max(done.values())
        source = next(m for m, _ in survivors if done[m.worker_id] == most)
        lagging = {m.worker_id for m, _ in survivors if done[m.worker_id] < most}
        order = [source] + [m for m, _ in survivors if m is not source]
        hit = min(most, len(plans) - 1)  # the step the failure hit (the last one if all completed)
        logger.warning("lost %s in step %d of %d of this call; %d completed; re-forming with %d survivor(s)",
                       ", ".join(m.worker_id for m in lost) or "no worker (collective error)", hit + 1,
                       len(plans), most, len(order))
        self._reform(order, needs_state=lagging)
        recovery_s = time.perf_counter() - started
        fault = FaultTiming(fault.kind, fault.evidence_s, fault.detected_s, time.time())
        logger.warning("re-formed at %d worker(s): fault (%s) detected %.3f s after its first sign, "
                       "group re-formed %.3f s after detection", len(order), fault.kind, fault.detection_s,
                       fault.reformed_s - fault.detected_s)
        lost_ids = tuple(m.worker_id for m in lost)
        outcomes = []
        for k in range(min(most + 1, len(plans))):
            completed = k < most
            results = tuple(r[k] for _, r in survivors if k < len(r) and r[k]["ok"])
            last = k == min(most, len(plans) - 1)
            outcomes.append(StepOutcome(completed, results, lost_ids if last else (), recovery_s if last else 0.0,
                                        _consumed(plans[k]) if completed else {}, fault if last else None))
        return outcomes

    # ------------------------------------------------------------------------ other calls
    def state(self) -> dict[str, Any]:
        """Rank 0's state (model, optimizer + AdaScale, step count); RankLostError if it is gone."""
        try:
            return ray.get(self.members[0].actor.state.remote(), timeout=STEP_TIMEOUT_S)
        except (RayActorError, GetTimeoutError) as exc:
            raise RankLostError(f"rank 0 ({self.members[0].worker_id}) did not answer: {type(exc).__name__}") from None

    def evaluate(self) -> dict[str, float]:
        return ray.get(self.members[0].actor.evaluate.remote(), timeout=600)

    def shutdown(self) -> None:
        self.cancel_pending()
        for m in self.members:
            ray.kill(m.actor, no_restart=True)
        self.members = []


def _consumed(plan: StepPlan) -> dict[int, list[int]]:
    """Sample indices of each rank in a step (every rank of the plan, dead ones included)."""
    return {rank: [i for mb in plan.shard(rank) for i in mb] for rank in range(plan.world_size)}


def _last_error_line(text: str) -> str:
    """The exception line of a remote traceback ("TaskError: task: ..."), without Ray's framing."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if ":" in line and not line.startswith(("File ", "^", "(")) and "ray::" not in line:
            return line
    return lines[-1] if lines else "unknown error"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
