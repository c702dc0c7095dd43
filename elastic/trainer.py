"""ElasticTrainer: the driver loop that ties the worker group, the controller and checkpoints together.

One step, top to bottom (``_train``): apply the target size at the boundary (grow / shrink in
place) -> plan the global batch -> run it on every rank -> commit the plan if the update was
applied -> record metrics -> checkpoint every N steps. The controller runs in its own thread and
only moves the target; the training thread alone touches the group.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from elastic.checkpoint import CheckpointManager
from elastic.config import JobSpec
from elastic.metrics import ControllerMetrics, NullTrainerMetrics, StepRecord, TrainerMetrics, start_exporter
from elastic.sampler import ElasticSampler

logger = logging.getLogger("elastic")

#: Newcomers that are ready join together; one that waited this long joins without the others.
GROW_BATCH_WAIT_S = 5.0
#: workers.steps_per_call = auto: a call carries about this much work, and at most this many steps,
#: once this many steps at the current world size were timed.
CALL_TARGET_S = 0.5
MAX_AUTO_STEPS_PER_CALL = 128
MIN_TIMED_STEPS = 3
#: Seconds a first worker may take to start (process, imports, dataset) before the job gives up.
STARTUP_TIMEOUT_S = 300.0


class TrainerError(RuntimeError):
    """The job cannot continue (one-line message; a checkpoint was written where possible)."""


@dataclass(frozen=True)
class ResizeEvent:
    """One change of the group's size. Every duration runs from the event that caused it."""

    time_s: float
    """Wall time at which training resumed at the new size."""
    progress: float
    from_workers: int
    to_workers: int
    direction: str
    cause: str
    pause_s: float
    """Seconds without training: for a planned resize, from the step boundary where the trainer
    acted on the decision to the first step at the new size; for a failure, from the fault's first
    sign (see ``elastic.group.FaultTiming``) to the first step at the new size."""
    since_decision_s: float | None = None
    """Planned resizes: from the decision (the target set by the controller or by hand) to the first
    step at the new size; newcomers warm up while the old group trains, so this exceeds the pause."""
    detection_s: float | None = None
    """Failures: from the fault's first sign to the driver knowing (and aborting the collectives)."""
    reform_s: float | None = None
    """Failures: from detection to the group re-formed at the new size."""


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


class ElasticTrainer:
    """Runs one job spec to ``total_progress`` on the configured cluster backend.

    Args:
        spec: the validated job spec.
        resume: continue from the newest valid checkpoint in ``spec.checkpoint.dir``.
        registry: Prometheus registry (tests pass a fresh one); a new one by default.
        ledger: also write ``ledger.jsonl`` (every committed step's sample indices per rank).
        on_step: called after every step with the trainer (tests use it to inject failures).
        show_progress: draw a live progress line (rich) on a terminal, else log a line every few seconds.
    """

    def __init__(self, spec: JobSpec, resume: bool = False, registry: Any = None, ledger: bool = False,
                 on_step: Callable[[ElasticTrainer], None] | None = None, show_progress: bool = True,
                 operator_client: Any = None) -> None:
        self.spec = spec
        self.resume = resume
        self.run_dir = Path(spec.run_dir)
        self.on_step = on_step
        self.show_progress = show_progress
        self.operator_client = operator_client  # set in a driver pod: the operator decides, we report
        self._registry = registry
        self._ledger_path = self.run_dir / "ledger.jsonl" if ledger else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._target = spec.workers.initial
        self._target_cause = "schedule"
        self._released: list[str] = []
        self._resizes: list[ResizeEvent] = []
        self._step_times: dict[int, collections.deque] = {}
        self._last: dict[str, Any] = {}
        self._steps = 0
        self._skipped = 0
        self._consecutive_skips = 0
        self._failures = 0
        self._abandoned_steps = 0
        self._call_in_flight = False
        self._started_s = time.monotonic()
        self._last_resize_s: float | None = None
        self._target_set_s = time.time()  # wall time of the newest target change (the decision)
        self._unrecorded_failure: tuple[Any, int, int] | None = None  # (fault timing, from, to) until training resumes
        self.backend: Any = None
        self.group: Any = None
        self.sampler: ElasticSampler | None = None
        self.metrics: Any = NullTrainerMetrics()
        self._exporter: Any = None

    # ================================================================ public entry point
    def run(self) -> RunSummary:
        from elastic.backends import make_backend

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log_handler = logging.FileHandler(self.run_dir / "train.log")
        except OSError as exc:
            raise TrainerError(f"run_dir: cannot write to {self.run_dir}: {exc.strerror or exc}") from None
        log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log_handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(log_handler)
        for name in ("elastic", "controller"):  # the run's log keeps INFO whatever the console shows
            package_logger = logging.getLogger(name)
            if package_logger.getEffectiveLevel() > logging.INFO:
                package_logger.setLevel(logging.INFO)
        self.checkpoints = CheckpointManager(self.spec.checkpoint.dir, keep_last=self.spec.checkpoint.keep_last)
        self._setup_metrics()
        self.backend = make_backend(self.spec)
        result: dict[str, Any] = {}
        try:
            self.backend.start(self.spec.workers.initial)
            if self.backend.needs_main_thread:
                # The local cluster adds and removes nodes on the main thread; training runs beside it.
                done = threading.Event()
                thread = threading.Thread(target=self._train_into, args=(result, done), name="elastic-train")
                thread.start()
                try:
                    self.backend.serve(done)
                except KeyboardInterrupt:
                    logger.warning("interrupted: stopping at the next step boundary with a checkpoint")
                    self._stop.set()
                    self.backend.serve(done)
                thread.join()
            else:
                with _first_interrupt_stops(self._stop):
                    self._train_into(result, None)
        finally:
            self._shutdown()
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
        if "error" in result:
            raise result["error"]
        return result["summary"]

    def request_stop(self) -> None:
        """Finish the current step, evaluate, checkpoint and return a summary (``stopped_early``)."""
        self._stop.set()

    def resize(self, workers: int, reason: str = "manual") -> None:
        """Resize by hand: capacity first (timed like the controller's), then the target."""
        started = time.monotonic()
        if workers > self.current_workers():
            self.backend.actuator.scale_to(workers)
        self.controller_metrics.record_actuation(time.monotonic() - started)
        with self._lock:
            self._target_cause = "manual"
        self.set_target_workers(workers, reason)

    @property
    def steps(self) -> int:
        """Optimizer steps completed (skipped ones included)."""
        return self._steps

    @property
    def resizes(self) -> tuple[ResizeEvent, ...]:
        """Resizes so far (failures included, once training resumed at the new size)."""
        return tuple(self._resizes)

    @property
    def worker_failures(self) -> int:
        return self._failures

    @property
    def progress(self) -> float:
        return float(self._last.get("progress", 0.0))

    # ================================================================ controller interface
    def set_target_workers(self, n: int, reason: str) -> None:
        n = min(max(n, self.spec.workers.min), self.spec.workers.max)
        with self._lock:
            if n != self._target:
                logger.info("target %d -> %d workers: %s", self._target, n, reason)
                self._target_set_s = time.time()
            self._target = n
        self.metrics.set_target_workers(n)

    def released_workers(self) -> list[str]:
        with self._lock:
            return list(self._released)

    def current_workers(self) -> int:
        return self.group.size if self.group is not None else 0

    def target_workers(self) -> int:
        with self._lock:
            return self._target

    def _observation(self) -> dict[str, Any]:
        """The trainer's view for the controller or the operator: one consistent read under the lock."""
        with self._lock:
            last = dict(self._last)
            times = {ws: statistics.median(d) for ws, d in self._step_times.items() if d}
            released = tuple(self._released)
            target = self._target
        # The estimates are of scale-1 quantities: still valid after shrinking to one worker.
        estimated = bool(last.get("num_estimates"))
        return {"workers": self.current_workers(), "target_workers": target,
                "progress": float(last.get("progress", 0.0)), "gain": float(last.get("gain", 1.0)),
                "grad_variance": last.get("grad_variance") if estimated else None,
                "grad_sqnorm": last.get("grad_sqnorm") if estimated else None,
                "step_time_s": times, "released_pods": released}

    def report(self) -> dict[str, Any]:
        """What a driver pod publishes in its ElasticJob's status.trainer (controller.operator_link)."""
        return self._observation()

    def snapshot(self):
        from controller.policy import JobSnapshot

        seen = self._observation()
        return JobSnapshot(
            now_s=time.monotonic(),
            current_workers=seen["workers"],
            min_workers=self.spec.workers.min,
            max_workers=self.spec.workers.max,
            capacity_workers=self.backend.actuator.capacity_workers(),
            progress=seen["progress"],
            total_progress=self.spec.total_progress,
            grad_variance=seen["grad_variance"],
            grad_sqnorm=seen["grad_sqnorm"],
            accumulation_steps=self.spec.accumulation_steps,
            step_time_s_by_workers=seen["step_time_s"],
            last_resize_s=self._last_resize_s,
            elapsed_s=time.monotonic() - self._started_s,
        )

    # ================================================================ the training loop
    def _train_into(self, result: dict[str, Any], done: threading.Event | None) -> None:
        try:
            result["summary"] = self._train()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result["error"] = exc
        finally:
            if done is not None:
                done.set()

    def _train(self) -> RunSummary:
        from elastic.group import WorkerGroup

        spec = self.spec
        restored = self._load_checkpoint() if self.resume else None
        self.group = WorkerGroup(spec, self.backend.worker_actor_options(), spec.name)
        self.group.spawn(spec.workers.initial)
        ready = self.group.wait_ready(spec.workers.initial, STARTUP_TIMEOUT_S)
        if not ready:
            raise TrainerError(f"no worker started within {STARTUP_TIMEOUT_S:.0f} s; is there capacity on the cluster?")
        dataset_len = ready[0].info["dataset_len"]
        biggest = spec.global_batch_size(spec.workers.max)
        if dataset_len < biggest:
            raise TrainerError(f"dataset has {dataset_len} samples, smaller than one global batch of {biggest} "
                               f"at workers.max={spec.workers.max}")
        self.sampler = ElasticSampler(dataset_len, spec.seed)
        if restored is not None:
            self._restore(restored)
        self.group.start(ready, restored["worker"] if restored else None)
        self.metrics.set_target_workers(self._target)
        logger.info("training %s: %d worker(s), tau %.1f / %g", spec.name, self.group.size,
                    self._last.get("progress", 0.0), spec.total_progress)

        controller_stop = threading.Event()
        controller = self._start_controller(controller_stop)
        display = _ProgressDisplay(spec, enabled=self.show_progress)
        boundary_s = time.perf_counter()
        try:
            while self._last.get("progress", 0.0) < spec.total_progress:
                if self._stop.is_set():
                    logger.warning("stopping early on request at tau %.1f", self._last.get("progress", 0.0))
                    break
                resize = self._apply_target(boundary_s)
                if self.group.size == 0:
                    self._recover_all_lost()
                    boundary_s = time.perf_counter()
                    continue
                world = self.group.size
                plans = self.sampler.plan_many(spec.global_batch_size(world), world, spec.accumulation_steps,
                                               self._steps_per_call(world))
                step_started = time.perf_counter()
                if resize is not None:
                    self._record_resize(*resize, pause_s=step_started - boundary_s)
                if self._unrecorded_failure is not None:
                    self._record_failure_resize()
                # Until its outcomes are all recorded, the workers may hold updates of steps the
                # sampler has not committed: no checkpoint may be taken from them meanwhile.
                self._call_in_flight = len(plans) > 1
                outcomes = self.group.run_steps(plans, expected_step_s=self._median_step_s(world))
                boundary_s = time.perf_counter()
                recovery_s = sum(o.recovery_s for o in outcomes)
                step_s = (boundary_s - step_started - recovery_s) / len(outcomes)
                steps_before = self._steps
                for outcome, plan in zip(outcomes, plans):
                    if outcome.lost_workers:
                        self._record_failure(outcome, world)
                    if not outcome.completed:
                        self._abandoned_steps += 1
                        continue
                    self.sampler.commit(plan)
                    self._record_step(outcome, plan, world, step_s)
                    display.update(self._last, world, self.sampler.samples_consumed)
                    if self.on_step is not None:
                        self.on_step(self)
                self._call_in_flight = False
                if not any(o.completed for o in outcomes) and self.on_step is not None:
                    self.on_step(self)
                # A call never runs past a checkpoint step, so the group's state is that step's.
                if self._steps // spec.checkpoint.every_steps > steps_before // spec.checkpoint.every_steps:
                    self._checkpoint()
                if self._consecutive_skips >= spec.failure.max_consecutive_skipped_steps:
                    raise TrainerError(f"{self._consecutive_skips} steps in a row had non-finite gradients "
                                       "(failure.max_consecutive_skipped_steps); lower the learning rate")
            evaluation = self.group.evaluate()
            self._checkpoint()
        except BaseException:
            if self._call_in_flight:
                logger.warning("no checkpoint at the stop: it came in the middle of a call of several steps, "
                               "whose updates are not all recorded; the newest checkpoint (step %d or earlier) stands",
                               self._steps)
            elif self.group is not None and self.group.size > 0 and self.sampler is not None:
                try:
                    self._checkpoint()
                except Exception as exc:  # noqa: BLE001 - the original error matters more
                    logger.warning("could not write a checkpoint while stopping: %s", exc)
            raise
        finally:
            display.close()
            controller_stop.set()
            if controller is not None:
                controller.join(timeout=10)
        return self._summary(evaluation)

    # ---------------------------------------------------------------- steps per call
    def _median_step_s(self, world: int) -> float | None:
        with self._lock:
            times = self._step_times.get(world)
            return statistics.median(times) if times and len(times) >= MIN_TIMED_STEPS else None

    def _steps_per_call(self, world: int) -> int:
        """How many steps the next call hands the workers (``workers.steps_per_call``), bounded so
        that the call ends at the next checkpoint step and cannot carry tau past the total."""
        spec = self.spec
        setting = spec.workers.steps_per_call
        if setting == "auto":
            step_s = self._median_step_s(world)
            count = 1 if step_s is None else int(CALL_TARGET_S / max(step_s, 1e-6))
            count = min(max(count, 1), MAX_AUTO_STEPS_PER_CALL)
        else:
            count = int(setting)
        every = spec.checkpoint.every_steps
        count = min(count, every - self._steps % every)
        # A step advances tau by its gain, at most S = world * accumulation_steps.
        remaining = spec.total_progress - float(self._last.get("progress", 0.0))
        count = min(count, max(1, int(remaining // (world * spec.accumulation_steps))))
        return count

    # ---------------------------------------------------------------- resizing at a boundary
    def _apply_target(self, boundary_s: float) -> tuple[int, int, str, str] | None:
        """Grow or shrink toward the target; returns (from, to, direction, cause) if the group changed."""
        with self._lock:
            target = self._target
            cause = self._target_cause
        size, pending = self.group.size, len(self.group.pending)
        if size == 0:
            return None  # nothing to grow from: _recover_all_lost restores the checkpoint first
        if target > size:
            if size + pending < target:
                self.group.spawn(target - size - pending)
            ready = self.group.poll_ready()
            all_ready = len(ready) == len(self.group.pending)
            if ready and (all_ready or self.group.oldest_ready_wait_s() > GROW_BATCH_WAIT_S):
                joining = ready[: target - size]
                self.group.grow(joining)
                return size, self.group.size, "grow", cause
            return None
        if pending:
            self.group.cancel_pending()
        if target < size:
            released, _ = self.group.shrink(size - target)
            with self._lock:
                self._released.extend(self.backend.release_id(m) for m in released)
            return size, self.group.size, "shrink", cause
        return None

    def _recover_all_lost(self) -> None:
        """Every worker is gone: wait for capacity, then resume from the newest checkpoint."""
        wait_s = self.spec.failure.wait_for_workers_s
        logger.error("lost every worker; waiting up to %.0f s for capacity", wait_s)
        need = max(self._target, self.spec.workers.min)
        if len(self.group.pending) < need:
            self.group.spawn(need - len(self.group.pending))
        ready = self.group.wait_ready(1, wait_s + STARTUP_TIMEOUT_S)
        if not ready:
            raise TrainerError(f"lost every worker and none came back within {wait_s:.0f} s; "
                               f"resume later with --resume from {self.spec.checkpoint.dir}")
        restored = self._load_checkpoint()
        lost_steps = self._steps - (restored["trainer"]["steps"] if restored else 0)
        if restored is not None:
            self._restore(restored)
        else:
            self.sampler.load_state_dict({**self.sampler.state_dict(), "epoch": 0, "cursor": 0})
            self._steps, self._last = 0, {}
        self.group.start(ready, restored["worker"] if restored else None)
        logger.warning("resumed with %d worker(s) from %s (%d step(s) redone)", self.group.size,
                       f"checkpoint step {self._steps}" if restored else "the start", lost_steps)

    # ---------------------------------------------------------------- records
    def _record_step(self, outcome, plan, world: int, step_s: float) -> None:
        spec = self.spec
        report = outcome.results[0]
        losses = [r["loss"] for r in outcome.results]
        self._steps += 1
        with self._lock:
            self._last = {**report, "loss": sum(losses) / len(losses), "step_s": step_s}
            self._step_times.setdefault(world, collections.deque(maxlen=50)).append(step_s)
        if report["skipped"]:
            self._skipped += 1
            self._consecutive_skips += 1
            self.metrics.record_skip("nonfinite")
            logger.warning("step %d skipped: non-finite gradients (%d in a row)", self._steps, self._consecutive_skips)
        else:
            self._consecutive_skips = 0
        samples = plan.global_batch
        rate = samples / step_s if step_s > 0 else 0.0
        self.metrics.record_step(StepRecord(
            step=self._steps, time_s=time.time(), workers=world, target_workers=self._target,
            global_batch_size=samples, scale=report["scale"], gain=report["gain"],
            efficiency=report["efficiency"], progress=report["progress"],
            learning_rate=report["learning_rate"], grad_variance=report["grad_variance"],
            grad_sqnorm=report["grad_sqnorm"], loss=self._last["loss"], step_seconds=step_s,
            samples=samples, samples_per_s=rate, goodput=rate * report["efficiency"]))
        if self._ledger_path is not None:
            with self._ledger_path.open("a") as f:
                f.write(json.dumps({"step": self._steps, "world_size": world, "epoch": plan.epoch_before,
                                    "cursor": plan.cursor_before, "gain": report["gain"],
                                    "progress": report["progress"], "skipped": report["skipped"],
                                    "consumed": {str(k): list(v) for k, v in outcome.consumed.items()}}) + "\n")

    def _record_resize(self, from_workers: int, to_workers: int, direction: str, cause: str, pause_s: float) -> None:
        now = time.time()
        with self._lock:
            since_decision_s = max(pause_s, now - self._target_set_s)
        event = ResizeEvent(now, self._last.get("progress", 0.0), from_workers, to_workers, direction, cause, pause_s,
                            since_decision_s=since_decision_s)
        self._resizes.append(event)
        self._last_resize_s = time.monotonic()
        self.metrics.record_resize(direction, cause, pause_s, from_workers, to_workers)
        logger.info("resized %d -> %d workers in place (%s, %s) at tau %.1f; %.3f s after the decision, "
                    "paused %.3f s", from_workers, to_workers, direction, cause, event.progress, since_decision_s, pause_s)

    def _record_failure(self, outcome, world: int) -> None:
        """Counts the failure now; its resize is recorded when training resumes at the new size
        (``_record_failure_resize``), so that its pause runs from the fault to that moment."""
        lost = len(outcome.lost_workers)
        self._failures += lost
        self.metrics.record_failure(lost)
        fault = outcome.fault
        logger.warning("worker failure: lost %s; step %s; %s", ", ".join(outcome.lost_workers),
                       "kept" if outcome.completed else "redone",
                       f"re-formed with {self.group.size} worker(s): detected {fault.detection_s:.3f} s after the "
                       f"fault's first sign, re-formed {fault.reformed_s - fault.detected_s:.3f} s after detection"
                       if fault is not None and fault.reformed_s else "no survivor")
        if fault is not None and self.group.size > 0:
            self._unrecorded_failure = (fault, world, self.group.size)
            with self._lock:  # the fault is the decision behind the regrow that follows
                self._target_set_s = fault.evidence_s

    def _record_failure_resize(self) -> None:
        fault, from_workers, to_workers = self._unrecorded_failure
        self._unrecorded_failure = None
        now = time.time()
        pause_s = max(0.0, now - fault.evidence_s)
        self._resizes.append(ResizeEvent(now, self._last.get("progress", 0.0), from_workers, to_workers, "shrink",
                                         "failure", pause_s, detection_s=fault.detection_s,
                                         reform_s=max(0.0, fault.reformed_s - fault.detected_s)))
        self._last_resize_s = time.monotonic()
        if to_workers < from_workers:
            self.metrics.record_resize("shrink", "failure", pause_s, from_workers, to_workers)
        logger.warning("training again at %d worker(s) %.3f s after the fault's first sign (detection %.3f s, "
                       "re-formation %.3f s)", to_workers, pause_s, fault.detection_s,
                       max(0.0, fault.reformed_s - fault.detected_s))

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        from elastic.group import RankLostError

        started = time.perf_counter()
        try:
            worker_state = self.group.state()
        except RankLostError as exc:
            # The next step finds the dead worker and re-forms (or, with none left, resumes from
            # the previous checkpoint); this one is skipped rather than written from a guess.
            logger.warning("checkpoint at step %d skipped: %s", self._steps, exc)
            return
        state = {
            "worker": worker_state,
            "sampler": self.sampler.state_dict(),
            "trainer": {"steps": self._steps, "skipped": self._skipped, "progress": float(self._last.get("progress", 0.0)),
                        "workers": self.group.size, "failures": self._failures},
        }
        path = self.checkpoints.save(self._steps, state)
        self.metrics.record_checkpoint(time.perf_counter() - started)
        logger.debug("checkpoint %s", path)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            logger.warning("no checkpoint in %s: starting from the beginning", self.spec.checkpoint.dir)
            return None
        step, state = loaded
        logger.info("resuming from checkpoint step %d (tau %.1f)", step, state["trainer"]["progress"])
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        t = state["trainer"]
        self._steps, self._skipped, self._failures = t["steps"], t["skipped"], t["failures"]
        self._last = {"progress": t["progress"]}

    # ---------------------------------------------------------------- setup / teardown
    def _setup_metrics(self) -> None:
        from prometheus_client import CollectorRegistry

        registry = self._registry if self._registry is not None else CollectorRegistry()
        log = self.run_dir / "metrics.jsonl" if self.spec.metrics.log else None
        self.metrics = TrainerMetrics(self.spec.name, registry=registry, log_path=log)
        self.controller_metrics = ControllerMetrics(self.spec.name, registry=registry, log_path=log)
        if self.spec.metrics.enabled:
            self._exporter = start_exporter(registry, self.spec.metrics.addr, self.spec.metrics.port)
            logger.info("metrics at %s", self._exporter.url)

    def _start_controller(self, stop: threading.Event) -> threading.Thread | None:
        from controller.loop import ReconcileLoop

        if self.operator_client is not None:
            from controller.operator_link import OperatorLink

            self._target_cause = "controller"
            link = OperatorLink(self.operator_client, self)
            return link.start(stop, self.spec.scaling.interval_s)

        loop = ReconcileLoop(self._policy(), self.backend.actuator, self.snapshot, self,
                             metrics=self.controller_metrics)
        self._target_cause = {"schedule": "schedule", "fixed": "manual"}.get(self.spec.scaling.policy, "controller")
        return loop.start(stop, self.spec.scaling.interval_s)

    def _policy(self):
        from controller.policy import make_policy

        s = self.spec.scaling
        if s.policy == "fixed":
            return make_policy("fixed")
        if s.policy == "schedule":
            return make_policy("schedule", steps=[step.model_dump() for step in s.steps])
        if s.policy == "goodput":
            return make_policy("goodput", min_efficiency=s.min_efficiency, hysteresis=s.hysteresis, cooldown_s=s.cooldown_s)
        return make_policy("available")

    def _shutdown(self) -> None:
        if self.group is not None:
            try:
                self.group.shutdown()
            except Exception as exc:  # noqa: BLE001
                logger.debug("group shutdown: %s", exc)
        if self.backend is not None:
            self.backend.shutdown()
        if self._exporter is not None:
            self._exporter.close()
        self.metrics.close()

    def _summary(self, evaluation: dict[str, float]) -> RunSummary:
        return RunSummary(
            name=self.spec.name, progress=self._last.get("progress", 0.0), total_progress=self.spec.total_progress,
            steps=self._steps, skipped_steps=self._skipped,
            samples=self.sampler.samples_consumed if self.sampler else 0,
            elapsed_s=time.monotonic() - self._started_s, evaluation=evaluation, resizes=tuple(self._resizes),
            worker_failures=self._failures, final_workers=self.group.size, run_dir=str(self.run_dir),
            checkpoint_step=self.checkpoints.latest_step(),
            metrics_url=self._exporter.url if self._exporter is not None else None,
            stopped_early=self._last.get("progress", 0.0) < self.spec.total_progress,
            extra={"abandoned_steps": self._abandoned_steps},
        )


@contextlib.contextmanager
def _first_interrupt_stops(stop: threading.Event):
    """In the main thread: the first Ctrl-C asks for a stop at the next call boundary (evaluate,
    checkpoint, summary) instead of breaking into a call; a second one interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        logger.warning("interrupted: stopping at the next step boundary with a checkpoint (Ctrl-C again to abort)")
        stop.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _ProgressDisplay:
    """A live line on a terminal (rich), or a log line every few seconds elsewhere."""

    LOG_EVERY_S = 5.0

    def __init__(self, spec: JobSpec, enabled: bool) -> None:
        from rich.console import Console

        self.total = spec.total_progress
        self.console = Console(stderr=True)
        self.enabled = enabled
        self._live = None
        self._last_log = 0.0
        self._started = time.monotonic()
        self._last_samples = 0
        if enabled and self.console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, last: dict[str, Any], workers: int, samples: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._started
        line = (f"tau {last['progress']:8.1f}/{self.total:g}  workers {workers}  scale {last['scale']:g}  "
                f"gain {last['gain']:5.2f}  lr {last['learning_rate']:.4g}  loss {last['loss']:.4f}  "
                f"{samples / max(elapsed, 1e-9):7.0f} samples/s")
        if self._live is not None:
            self._live.update(line)
        elif time.monotonic() - self._last_log >= self.LOG_EVERY_S:
            self._last_log = time.monotonic()
            logger.info(line)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
