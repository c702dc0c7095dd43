"""Unit tests of controller.loop with fake actuator, trainer and clock: no Ray, no sleeps."""

from __future__ import annotations

import logging
import threading

import pytest

from controller.actuators.base import ActuationError, Actuator
from controller.loop import LoopConfigError, ReconcileLoop, decision_action
from controller.policy import (
    AvailablePolicy,
    FixedPolicy,
    JobSnapshot,
    NoopDecision,
    ResizeDecision,
    SchedulePolicy,
)


class World:
    """A fake cluster + trainer sharing one ordered call log."""

    def __init__(self, workers: int = 2, capacity: int = 8) -> None:
        self.calls: list[tuple] = []
        self.effects: list[tuple] = []  # state changes only: what a duplicate call must not add
        self.capacity = capacity  # what the cluster can provide
        self.hosted = [f"w{i}" for i in range(workers)]  # capacity actually provisioned
        self.live = list(self.hosted)  # workers training
        self.target = workers
        self.target_triggers: list[tuple] = []
        self.expected: list[float | None] = []  # expect_resize calls
        self.due_at: float | None = None
        self.released: list[str] = []
        self.progress = 0.0
        self._next_id = workers
        self.fail_scale = False

    # -- Actuator
    name = "fake"

    def capacity_workers(self) -> int:
        return self.capacity

    def scale_to(self, target_workers: int, release=()) -> None:
        self.calls.append(("scale_to", target_workers, tuple(release)))
        if self.fail_scale:
            raise ActuationError("fake: cloud said no")
        while len(self.hosted) < target_workers:
            self.hosted.append(f"w{self._next_id}")
            self._next_id += 1
            self.effects.append(("add", self.hosted[-1]))
        # Graceful: only named workers are removed, never more than asked.
        for name in release:
            if len(self.hosted) > target_workers and name in self.hosted:
                self.hosted.remove(name)
                self.effects.append(("remove", name))

    # -- TrainerControl
    def set_target_workers(self, n: int, reason: str, at_progress=None, at_time_s=None) -> None:
        self.calls.append(("set_target", n))
        self.target_triggers.append((n, at_progress, at_time_s))
        if n != self.target:
            self.effects.append(("target", n))
        self.target = n
        self.due_at = at_progress

    def expect_resize(self, at_progress, at_time_s=None) -> None:
        self.expected.append(at_progress)

    def released_workers(self):
        return tuple(self.released)

    def current_workers(self) -> int:
        return len(self.live)

    # -- simulation
    def step_boundary(self) -> None:
        """The trainer reaches a step boundary: it shrinks or grows to its target (once its trigger fired)."""
        if self.due_at is not None and self.progress < self.due_at:
            return
        while len(self.live) > self.target:
            self.released.append(self.live.pop())
        for name in self.hosted:
            if len(self.live) < self.target and name not in self.live and name not in self.released:
                self.live.append(name)

    def observe(self) -> JobSnapshot:
        return JobSnapshot(
            now_s=0.0,
            current_workers=len(self.live),
            min_workers=1,
            max_workers=8,
            capacity_workers=self.capacity,
            progress=self.progress,
        )


class Metrics:
    def __init__(self) -> None:
        self.decisions: list[tuple[str, int, int]] = []
        self.actuations: list[float] = []
        self.errors = 0

    def record_decision(self, action: str, desired: int, capacity: int) -> None:
        self.decisions.append((action, desired, capacity))

    def record_actuation(self, seconds: float) -> None:
        self.actuations.append(seconds)

    def record_reconcile_error(self) -> None:
        self.errors += 1


class TickClock:
    def __init__(self, step_s: float = 0.25) -> None:
        self.now_s, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now_s += self.step_s
        return self.now_s


def make_loop(world: World, policy=None, metrics=None) -> ReconcileLoop:
    return ReconcileLoop(policy or AvailablePolicy(), world, world.observe, world, metrics=metrics, clock=TickClock())


def test_fake_world_satisfies_actuator_protocol():
    assert isinstance(World(), Actuator)


def test_grow_adds_capacity_before_telling_the_trainer(caplog):
    world, metrics = World(workers=2, capacity=4), Metrics()
    with caplog.at_level(logging.INFO, logger="controller.loop"):
        decision = make_loop(world, metrics=metrics).reconcile_once()
    assert isinstance(decision, ResizeDecision) and decision.target_workers == 4
    assert world.calls == [("scale_to", 4, ()), ("set_target", 4)]
    assert metrics.decisions == [("grow", 4, 4)]
    assert metrics.actuations == [0.25]
    assert metrics.errors == 0
    assert "Deciding to resize from 2 -> 4 workers, since available:" in caplog.text


def test_shrink_tells_trainer_first_and_removes_only_released_capacity():
    world, metrics = World(workers=4, capacity=2), Metrics()
    loop = make_loop(world, metrics=metrics)
    loop.reconcile_once()
    # Nothing released yet: the trainer is told, capacity stays.
    assert world.calls == [("set_target", 2)]
    assert len(world.hosted) == 4
    assert metrics.decisions == [("shrink", 2, 2)]
    world.step_boundary()  # the trainer releases w3 and w2
    assert world.released == ["w3", "w2"]
    decision = loop.reconcile_once()
    assert isinstance(decision, NoopDecision)
    assert world.calls[-1] == ("scale_to", 2, ("w3", "w2"))
    assert world.hosted == ["w0", "w1"]
    assert metrics.decisions[-1] == ("noop", 2, 2)


def test_shrink_removes_capacity_at_once_when_trainer_released_synchronously():
    world = World(workers=3, capacity=1)

    def set_and_release(n: int, reason: str) -> None:
        World.set_target_workers(world, n, reason)
        world.step_boundary()

    world.set_target_workers = set_and_release  # type: ignore[method-assign]
    make_loop(world).reconcile_once()
    assert world.calls == [("set_target", 1), ("scale_to", 1, ("w2", "w1"))]
    assert world.hosted == ["w0"]


def test_restarted_loop_with_same_observations_takes_no_duplicate_action():
    world = World(workers=2, capacity=4)
    make_loop(world).reconcile_once()
    effects_after_first = list(world.effects)
    assert effects_after_first == [("add", "w2"), ("add", "w3"), ("target", 4)]
    # Controller restarts before the trainer reached a step boundary: same observation.
    make_loop(world).reconcile_once()
    assert world.effects == effects_after_first
    # Every call the restarted loop made repeats one the first loop made (idempotent).
    first_calls = world.calls[:2]
    assert world.calls[2:] == first_calls
    # Once the trainer has grown, a restarted loop makes no call at all.
    world.step_boundary()
    calls_before = len(world.calls)
    assert isinstance(make_loop(world).reconcile_once(), NoopDecision)
    assert len(world.calls) == calls_before


def test_restarted_loop_after_shrink_does_not_remove_more():
    world = World(workers=4, capacity=2)
    loop = make_loop(world)
    loop.reconcile_once()
    world.step_boundary()
    loop.reconcile_once()
    effects = list(world.effects)
    for _ in range(3):  # restarts; the trainer still lists the released ids
        make_loop(world).reconcile_once()
    assert world.effects == effects
    assert world.hosted == ["w0", "w1"]
    assert world.target == 2


def test_actuator_error_is_counted_and_trainer_is_not_told(caplog):
    world, metrics = World(workers=1, capacity=3), Metrics()
    world.fail_scale = True
    with caplog.at_level(logging.WARNING, logger="controller.loop"):
        decision = make_loop(world, metrics=metrics).reconcile_once()
    assert decision == ResizeDecision(3, decision.reason)
    assert world.calls == [("scale_to", 3, ())]
    assert world.target == 1
    assert metrics.errors == 1
    assert len(metrics.actuations) == 1  # the failed call was timed too
    assert "cloud said no" in caplog.text
    # The next pass retries and succeeds.
    world.fail_scale = False
    make_loop(world, metrics=metrics).reconcile_once()
    assert world.target == 3 and metrics.errors == 1


def test_observation_error_is_counted_and_becomes_noop():
    world, metrics = World(), Metrics()

    def broken() -> JobSnapshot:
        raise ConnectionError("metrics endpoint down")

    loop = ReconcileLoop(AvailablePolicy(), world, broken, world, metrics=metrics)
    decision = loop.reconcile_once()
    assert isinstance(decision, NoopDecision)
    assert "metrics endpoint down" in decision.reason
    assert metrics.errors == 1
    assert world.calls == []


def test_trainer_error_is_counted():
    world, metrics = World(workers=2, capacity=2), Metrics()

    def boom(n: int, reason: str) -> None:
        raise RuntimeError("driver gone")

    world.set_target_workers = boom  # type: ignore[method-assign]
    world.live = world.live + ["w9"]  # 3 live, capacity 2: shrink
    make_loop(world, metrics=metrics).reconcile_once()
    assert metrics.errors == 1
    assert world.calls == []  # capacity untouched: the trainer never released anything


def test_schedule_policy_through_the_loop():
    world = World(workers=1, capacity=8)
    loop = make_loop(world, policy=SchedulePolicy([(10.0, None, 4), (20.0, None, 2)]))
    announced = loop.reconcile_once()  # no rate measured: the first step is prepared at once
    assert announced.at_progress == 10.0 and world.target_triggers[-1] == (4, 10.0, None)
    assert ("scale_to", 4, ()) in world.calls  # capacity first, as for any grow
    world.step_boundary()
    assert len(world.live) == 1  # prepared, not applied: tau 0 < 10
    world.progress = 10.0
    loop.reconcile_once()
    world.step_boundary()
    assert len(world.live) == 4
    world.progress = 20.0
    loop.reconcile_once()
    world.step_boundary()
    loop.reconcile_once()
    assert len(world.live) == 2 and len(world.hosted) == 2


def test_decision_action():
    s = JobSnapshot(now_s=0, current_workers=3, min_workers=1, max_workers=8, capacity_workers=8)
    assert decision_action(ResizeDecision(5, "x"), s) == ("grow", 5)
    assert decision_action(ResizeDecision(1, "x"), s) == ("shrink", 1)
    assert decision_action(ResizeDecision(3, "x"), s) == ("noop", 3)
    assert decision_action(NoopDecision("x"), s) == ("noop", 3)


def test_run_reconciles_until_stopped_and_survives_errors():
    world = World(workers=1, capacity=1)
    stop = threading.Event()
    passes = []

    class FlakyMetrics(Metrics):
        def record_decision(self, action, desired, capacity):
            passes.append(action)
            if len(passes) == 3:
                stop.set()
            if len(passes) == 1:
                raise RuntimeError("metrics sink broken")

    loop = ReconcileLoop(FixedPolicy(), world, world.observe, world, metrics=FlakyMetrics())
    thread = loop.start(stop, interval_s=0.0)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert passes == ["noop", "noop", "noop"]


def test_run_rejects_bad_interval():
    world = World()
    with pytest.raises(LoopConfigError, match="interval_s"):
        make_loop(world).run(threading.Event(), interval_s=-1)


def test_an_announced_grow_whose_capacity_fails_is_withdrawn():
    """The trainer is told the trigger before capacity is added (calls stop there); when the actuator
    fails, the trigger is withdrawn so the trainer does not wait at it for a target that never comes."""
    world = World(workers=1, capacity=8)
    world.fail_scale = True
    loop = make_loop(world, policy=SchedulePolicy([(10.0, None, 4)]))
    loop.reconcile_once()
    assert world.expected == [10.0, None]
    assert world.target == 1 and world.target_triggers == []
    world.fail_scale = False
    loop.reconcile_once()
    assert world.expected[-1] == 10.0 and world.target_triggers[-1] == (4, 10.0, None)
