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
import math
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
from elastic.trainer_state import Phase, TrainerStateMachine

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
#: ... and after this long without them, the user is told once.
STARTUP_NOTICE_S = 30.0


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


class ElasticTrainer:
    """Runs one job spec to ``total_progress`` on the configured cluster backend.

    Args:
        spec: the validated job spec.
        resume: continue from the newest valid checkpoint in ``spec.checkpoint.dir``.
        start_over: move an earlier run's directory aside (``<run_dir>.<run id>``) and start afresh;
            without it or ``resume``, a run directory holding another run is refused (RunDirError).
        registry: Prometheus registry (tests pass a fresh one); a new one by default.
        ledger: also write ``ledger.jsonl`` (every committed step's sample indices per rank).
        on_step: called after every step with the trainer (tests use it to inject failures).
        show_progress: draw a live progress line (rich) on a terminal, else log a line every few seconds.
        backend: where the workers run (``controller.backends.make_backend(spec)``: ``start``,
            ``serve``, ``shutdown``, ``worker_actor_options``, ``release_id``, ``actuator``).
        start_controller: ``(trainer, stop_event) -> thread or None``: starts what moves the target
            (a reconcile loop, or the link to the Kubernetes operator). The library never imports the
            controller: ``elastic_app.wiring.make_trainer`` puts these together.
    """

    def __init__(self, spec: JobSpec, resume: bool = False, registry: Any = None, ledger: bool = False,
                 on_step: Callable[[ElasticTrainer], None] | None = None, show_progress: bool = True,
                 start_over: bool = False, backend: Any = None,
                 start_controller: Callable[[ElasticTrainer, threading.Event], threading.Thread | None] | None = None
                 ) -> None:
        self.spec = spec
        self.resume = resume
        self.start_over = start_over  # move an earlier run's directory aside instead of refusing it
        self.run_id = ""
        self._stop_signal: int | None = None
        self._resumed_from_step: int | None = None
        self._elapsed_before_s = 0.0  # training time of earlier attempts (from the checkpoint)
        self.run_dir = Path(spec.run_dir)
        self.on_step = on_step
        self.show_progress = show_progress
        self.backend: Any = backend
        self._start_controller_fn = start_controller
        self._registry = registry
        self._ledger_path = self.run_dir / "ledger.jsonl" if ledger else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.state = TrainerStateMachine()
        """starting -> training <-> resizing | recovering | checkpointing -> stopping -> done (or failed)."""
        self._target = spec.workers.initial
        self.target_cause = "schedule"
        """The cause recorded for resizes toward the target (schedule, controller, manual; set by the wiring)."""
        # A triggered target (a schedule step announced ahead): applied at the first step boundary at
        # which tau >= at_progress or elapsed >= at_time_s; (None, None) means at once.
        self._target_at: tuple[float | None, float | None] = (None, None)
        self._late_said: tuple[int, float | None, float | None] | None = None
        self._hold_at: float | None = None  # tau of the next announced trigger: no call runs past it
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
        self.group: Any = None
        self.sampler: ElasticSampler | None = None
        self.metrics: Any = NullTrainerMetrics()
        self._exporter: Any = None
        self._prefetch_batches = 0
        self._loader_workers = 0
        every = spec.evaluation.every_progress
        self._next_eval_progress = every if every is not None else float("inf")
        self._last_eval: dict[str, float] = {}
        self._evaluations: list[dict[str, float]] = []

    # ================================================================ public entry point
    def run(self) -> RunSummary:
        """Raises RunDirError (directory locked, or another run's), RunFinished (``resume`` of a
        finished run: nothing started), or what training raised."""
        from elastic.rundir import open_run

        mode = "resume" if self.resume else "start_over" if self.start_over else "fresh"
        try:
            run_lock, record, notes = open_run(self.run_dir, self.spec.checkpoint.dir, self.spec.name,
                                               self.spec.total_progress, mode)
        except OSError as exc:
            raise TrainerError(f"run_dir: cannot write to {self.run_dir}: {exc.strerror or exc}") from None
        try:
            return self._run_locked(record, notes)
        finally:
            run_lock.release()

    def _run_locked(self, record, notes: list[str]) -> RunSummary:
        if self.backend is None:
            raise TrainerError("no cluster backend given: build the trainer with elastic_app.wiring.make_trainer(spec)")
        self.run_id = record.run_id
        try:
            log_handler = logging.FileHandler(self.run_dir / "train.log")
        except OSError as exc:
            raise TrainerError(f"run_dir: cannot write to {self.run_dir}: {exc.strerror or exc}") from None
        log_handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{self.run_id}] %(name)s: %(message)s"))
        log_handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(log_handler)
        for name in ("elastic", "controller"):  # the run's log keeps INFO whatever the console shows
            package_logger = logging.getLogger(name)
            if package_logger.getEffectiveLevel() > logging.INFO:
                package_logger.setLevel(logging.INFO)
        for note in notes:
            logger.warning("%s", note)
        self.checkpoints = CheckpointManager(self.spec.checkpoint.dir, keep_last=self.spec.checkpoint.keep_last)
        result: dict[str, Any] = {}
        try:
            self._setup_metrics()
            # SIGINT / SIGTERM stop at the next step boundary from here on (a second one aborts);
            # the local backend keeps these handlers when Ray installs its own while starting nodes.
            with _first_interrupt_stops(self._stop, self._on_stop_signal):
                self.backend.start(self.spec.workers.initial)
                if self.backend.needs_main_thread:
                    # The local cluster adds and removes nodes on the main thread; training runs beside it.
                    done = threading.Event()
                    thread = threading.Thread(target=self._train_into, args=(result, done), name="elastic-train",
                                              daemon=True)  # an abort (second signal) must not wait for it
                    thread.start()
                    self.backend.serve(done)
                    thread.join()
                else:
                    self._train_into(result, None)
        except BaseException as exc:
            result.setdefault("error", exc)
        finally:
            try:
                self._shutdown()
            finally:
                self._record_run_end(record, result.get("summary"), "error" in result)
                logging.getLogger().removeHandler(log_handler)
                log_handler.close()
        if "error" in result:
            raise result["error"]
        return result["summary"]

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _record_run_end(self, record, summary: RunSummary | None, failed: bool) -> None:
        """``run.json`` says how the run ended, for ``--resume`` and for whoever finds the directory."""
        from dataclasses import replace

        status = "failed" if failed or summary is None else "stopped" if summary.stopped_early else "finished"
        try:
            replace(record, status=status, progress=float(self._last.get("progress", 0.0)),
                    checkpoint_step=self.checkpoints.latest_step(), steps=self._steps,
                    elapsed_s=self._elapsed_before_s + time.monotonic() - self._started_s).write(self.run_dir)
        except OSError as exc:
            logger.warning("could not update %s/run.json: %s", self.run_dir, exc)

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
            self.target_cause = "manual"
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
    def set_target_workers(self, n: int, reason: str, at_progress: float | None = None,
                           at_time_s: float | None = None) -> None:
        n = min(max(n, self.spec.workers.min), self.spec.workers.max)
        with self._lock:
            if (n, (at_progress, at_time_s)) != (self._target, self._target_at):
                logger.info("target %d -> %d workers: %s", self._target, n, reason)
                self._target_set_s = time.time()
            self._target = n
            self._target_at = (at_progress, at_time_s)
            if at_progress is not None:
                self._hold_at = at_progress
        self.metrics.set_target_workers(n)

    def expect_resize(self, at_progress: float | None, at_time_s: float | None = None) -> None:
        """A scheduled resize comes at this trigger (its capacity is being added): calls end there.
        ``None`` withdraws it (the capacity did not come)."""
        with self._lock:
            self._hold_at = at_progress

    def _trigger_due(self, at: tuple[float | None, float | None]) -> bool:
        """Whether a target with trigger ``at`` may be applied at this boundary."""
        at_progress, at_time_s = at
        if at_progress is None and at_time_s is None:
            return True
        if at_progress is not None and self.progress >= at_progress:
            return True
        return at_time_s is not None and time.monotonic() - self._started_s >= at_time_s

    def released_workers(self) -> list[str]:
        with self._lock:
            return list(self._released)

    def current_workers(self) -> int:
        return self.group.size if self.group is not None else 0

    def target_workers(self) -> int:
        with self._lock:
            return self._target

    def observation(self) -> dict[str, Any]:
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
        return self.observation()

    @property
    def elapsed_s(self) -> float:
        """Seconds since this trainer started."""
        return time.monotonic() - self._started_s

    @property
    def last_resize_s(self) -> float | None:
        """``time.monotonic()`` of the last resize (None before any)."""
        return self._last_resize_s

    def worker_startup_s(self) -> float | None:
        """The longest start-up (spawn to ready) among the workers started lately; None before any."""
        return max(self.group.startup_s) if self.group is not None and self.group.startup_s else None

    def progress_rate_per_s(self) -> float | None:
        """tau per second at the current size: the last gain over the median step time."""
        with self._lock:
            times = self._step_times.get(self.current_workers())
            gain = self._last.get("gain")
            if not times or gain is None:
                return None
            return float(gain) / max(statistics.median(times), 1e-9)

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
        initial = self._startable_workers()
        self.group.spawn(initial)
        ready = self._wait_ready_or_stop(initial)
        if not ready and self._stop.is_set():
            raise TrainerError("stopped while the first workers were starting (the newest checkpoint, if any, stands)")
        if not ready:
            raise TrainerError(f"no worker started within {STARTUP_TIMEOUT_S:.0f} s; is there capacity on the cluster?")
        dataset_len = ready[0].info["dataset_len"]
        biggest = spec.global_batch_size(spec.workers.max)
        if dataset_len < biggest:
            raise TrainerError(f"dataset has {dataset_len} samples, smaller than one global batch of {biggest} "
                               f"at workers.max={spec.workers.max}")
        self.sampler = ElasticSampler(dataset_len, spec.seed)
        # The workers' loaders keep this many micro-batches in flight; the steps after each call are
        # planned (not committed) so that they stay busy across the call boundary.
        self._prefetch_batches = int(ready[0].info.get("prefetch_batches", 0))
        self._loader_workers = int(ready[0].info.get("loader_workers", 0))
        if restored is not None:
            self._restore(restored)
        self.group.start(ready, restored["worker"] if restored else None)
        self.metrics.set_target_workers(self._target)
        self.state.enter(Phase.TRAINING, f"{spec.name}: {self.group.size} worker(s), tau "
                                         f"{self._last.get('progress', 0.0):.1f} / {spec.total_progress:g}")
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
                self._await_announced_target()
                resize = self._apply_target(boundary_s)
                if self.group.size == 0:
                    self.state.enter(Phase.RECOVERING, "every worker lost")
                    self._recover_all_lost()
                    self.state.enter(Phase.TRAINING, f"resumed with {self.group.size} worker(s)")
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
                outcomes = self.group.run_steps(plans, expected_step_s=self._median_step_s(world),
                                                lookahead=self.sampler.lookahead(plans[-1], self._prefetch_batches))
                boundary_s = time.perf_counter()
                recovery_s = sum(o.recovery_s for o in outcomes)
                step_s = (boundary_s - step_started - recovery_s) / len(outcomes)
                steps_before = self._steps
                for outcome, plan in zip(outcomes, plans):
                    if outcome.lost_workers:
                        self.state.enter(Phase.RECOVERING, f"lost {', '.join(outcome.lost_workers)}")
                        self._record_failure(outcome, world)
                        self.state.enter(Phase.TRAINING, f"re-formed at {self.group.size} worker(s)")
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
                # An evaluation is not part of a resize pause measured from this boundary.
                boundary_s += self._maybe_evaluate(display)
                if self._consecutive_skips >= spec.failure.max_consecutive_skipped_steps:
                    raise TrainerError(f"{self._consecutive_skips} steps in a row had non-finite gradients "
                                       "(failure.max_consecutive_skipped_steps); lower the learning rate")
            tau = float(self._last.get("progress", 0.0))
            self.state.enter(Phase.STOPPING, f"tau {tau:.1f} reached total {spec.total_progress:g}"
                             if tau >= spec.total_progress else f"stop requested at tau {tau:.1f}")
            # Stopped by a signal: the checkpoint first, and no evaluation, which may take longer than
            # the grace period left (Kubernetes: 30 s by default); the next run evaluates.
            evaluation = {} if self._stop_signal is not None else self.group.evaluate()
            if evaluation:
                self._record_eval(evaluation, tau)
            if self.group.size > 0:
                self._checkpoint()
            self.state.enter(Phase.DONE, f"{self._steps} steps, tau {tau:.1f}")
            for missed in self.missed_schedule_steps():
                logger.warning("schedule step %d (%d workers at %s) never happened: %s", missed["step"],
                               missed["workers"], f"tau {missed['at_progress']:g}" if missed["at_progress"] is not None
                               else f"{missed['at_time_s']:g} s", missed["reason"])
        except BaseException as exc:
            self.state.fail(f"{type(exc).__name__}: {exc}".splitlines()[0])
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

    # ---------------------------------------------------------------- starting
    def _startable_workers(self) -> int:
        """``workers.initial``, or fewer when the cluster has room for fewer (said once); the backend
        raises its one-line error (the CLI exits 2) when there is no room for ``workers.min``."""
        spec = self.spec
        capacity = self.backend.startable_workers(spec.workers.min, spec.workers.initial)
        if capacity < spec.workers.initial:
            logger.warning("starting %d worker(s), not workers.initial=%d: the cluster has room for %d",
                           capacity, spec.workers.initial, capacity)
            with self._lock:
                self._target = capacity
        return capacity

    def _wait_ready_or_stop(self, count: int) -> list:
        """The first workers, waited for in short slices so that a stop request is heard at once."""
        started = time.monotonic()
        deadline = started + STARTUP_TIMEOUT_S
        said = False
        ready = self.group.poll_ready()
        while len(ready) < count and time.monotonic() < deadline and not self._stop.is_set() and self.group.pending:
            ready = self.group.wait_ready(count, min(1.0, max(0.0, deadline - time.monotonic())))
            if not said and time.monotonic() - started > STARTUP_NOTICE_S:
                said = True
                logger.warning("%d of %d worker(s) not started after %.0f s (placed and importing the task); "
                               "waiting up to %.0f s: is the cluster's room taken by other jobs? Ctrl-C stops",
                               count - len(ready), count, STARTUP_NOTICE_S, STARTUP_TIMEOUT_S)
        return ready

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
        scale = world * spec.accumulation_steps
        tau = float(self._last.get("progress", 0.0))
        count = min(count, max(1, int((spec.total_progress - tau) // scale)))
        # Nor past a scheduled resize's trigger: ceil((at - tau) / S) steps cannot carry tau beyond the
        # first boundary at or after it, whatever the gains.
        with self._lock:
            at_progress = self._hold_at
        if at_progress is not None and tau < at_progress:
            count = min(count, max(1, math.ceil((at_progress - tau) / scale)))
        return count

    # ---------------------------------------------------------------- evaluation during training
    def _maybe_evaluate(self, display: _ProgressDisplay) -> float:
        """evaluation.every_progress: evaluate on rank 0 once tau passed the next multiple; returns
        the seconds it took (0 if it did not run)."""
        every = self.spec.evaluation.every_progress
        progress = float(self._last.get("progress", 0.0))
        if every is None or progress < self._next_eval_progress or progress >= self.spec.total_progress:
            return 0.0
        started = time.perf_counter()
        self._next_eval_progress = (progress // every + 1) * every
        self._record_eval(self.group.evaluate(), progress)
        display.update(self._last, self.group.size, self.sampler.samples_consumed)
        return time.perf_counter() - started

    def _record_eval(self, evaluation: dict[str, float], progress: float) -> None:
        with self._lock:
            self._last_eval = dict(evaluation)
            self._last["eval"] = dict(evaluation)
        self._evaluations.append({"progress": progress, "step": self._steps, **evaluation})
        self.metrics.record_eval(evaluation, progress, self._steps)
        logger.info("evaluation at tau %.1f: %s", progress,
                    "  ".join(f"{k} {v:.4g}" for k, v in evaluation.items()))

    # ---------------------------------------------------------------- resizing at a boundary
    def _apply_target(self, boundary_s: float) -> tuple[int, int, str, str] | None:
        """Grow or shrink toward the target; returns (from, to, direction, cause) if the group changed.

        New workers are started as soon as a target above the size is known, triggered or not; the
        group changes only once the target's trigger (if any) has fired."""
        with self._lock:
            target, at = self._target, self._target_at
            cause = self.target_cause
        size, pending = self.group.size, len(self.group.pending)
        if size == 0:
            return None  # nothing to grow from: _recover_all_lost restores the checkpoint first
        due = self._trigger_due(at)
        if target > size:
            if size + pending < target:
                self.group.spawn(target - size - pending)
            if not due:
                return None  # warming up ahead of the trigger
            ready = self.group.poll_ready()
            triggered = at != (None, None)
            if triggered and len(ready) < target - size:
                ready = self._late_workers(target - size, at)
            all_ready = len(ready) == len(self.group.pending)
            if ready and (triggered or all_ready or self.group.oldest_ready_wait_s() > GROW_BATCH_WAIT_S):
                joining = ready[: target - size]
                self.state.enter(Phase.RESIZING, f"grow {size} -> {size + len(joining)} ({cause})")
                self.group.grow(joining)
                self.state.enter(Phase.TRAINING, f"grown to {self.group.size}")
                return size, self.group.size, "grow", cause
            return None
        if pending:
            self.group.cancel_pending()
        if target < size and due:
            self.state.enter(Phase.RESIZING, f"shrink {size} -> {target} ({cause})")
            released, _ = self.group.shrink(size - target)
            self.state.enter(Phase.TRAINING, f"shrunk to {self.group.size}")
            with self._lock:
                self._released.extend(self.backend.release_id(m) for m in released)
            return size, self.group.size, "shrink", cause
        return None

    def _await_announced_target(self) -> None:
        """At an announced trigger whose target has not come yet (its capacity is still being added):
        wait for it (scaling.late_workers=wait, up to late_wait_s), else go on."""
        with self._lock:
            hold, target_at = self._hold_at, self._target_at[0]
        if hold is None or self.progress < hold:
            return
        if target_at != hold and self.spec.scaling.late_workers == "wait":
            logger.warning("scheduled resize at tau %.1f: waiting up to %.0f s for its capacity", self.progress,
                           self.spec.scaling.late_wait_s)
            deadline = time.monotonic() + self.spec.scaling.late_wait_s
            while time.monotonic() < deadline and not self._stop.is_set():
                with self._lock:
                    if self._target_at[0] == hold:
                        break
                time.sleep(0.02)
        with self._lock:
            if self._hold_at == hold:
                self._hold_at = None

    def _late_workers(self, needed: int, at: tuple[float | None, float | None]) -> list:
        """A trigger has fired before its new workers are ready: wait for them (scaling.late_workers)
        up to scaling.late_wait_s, or go on and say so once."""
        s = self.spec.scaling
        if self._late_said == (needed, *at):  # waited (or said so) once for this trigger already
            return self.group.poll_ready()
        self._late_said = (needed, *at)
        if s.late_workers == "wait":
            logger.warning("scheduled resize at tau %.1f: waiting up to %.0f s for %d new worker(s) to be ready",
                           self.progress, s.late_wait_s, needed)
            ready = self.group.wait_ready(needed, s.late_wait_s)
            if len(ready) < needed:
                logger.warning("scheduled resize: %d of %d new worker(s) ready after %.0f s; going on with them",
                               len(ready), needed, s.late_wait_s)
            return ready
        logger.warning("scheduled resize at tau %.1f: new workers not ready yet; training on at %d worker(s) "
                       "until they are (scaling.late_workers=continue)", self.progress, self.group.size)
        return self.group.poll_ready()

    def missed_schedule_steps(self) -> list[dict[str, Any]]:
        """Schedule steps whose resize never happened, each with why (for the summary and the log).

        A step counts as done when the group reached its size at or after its trigger (tau, or any
        time for a time trigger), or was at that size already."""
        if self.spec.scaling.policy != "schedule":
            return []
        elapsed = time.monotonic() - self._started_s
        missed, size = [], self.spec.workers.initial
        events = [e for e in self._resizes if e.cause != "failure"]
        cursor = 0  # resizes before this one answered earlier steps
        for number, step in enumerate(self.spec.scaling.steps, start=1):
            wanted = min(max(step.workers, self.spec.workers.min), self.spec.workers.max)
            after = step.at_progress if step.at_time_s is None else 0.0
            if wanted == size:
                continue
            match = next((i for i in range(cursor, len(events))
                          if events[i].to_workers == wanted and events[i].progress >= after - 1e-9), None)
            if match is not None:
                size, cursor = wanted, match + 1
                continue
            reached = (step.at_progress is not None and self.progress >= step.at_progress) or (
                step.at_time_s is not None and elapsed >= step.at_time_s)
            reason = "its workers never joined (no capacity came)" if reached else "the job finished first"
            missed.append({"step": number, "at_progress": step.at_progress, "at_time_s": step.at_time_s,
                           "workers": wanted, "reason": reason})
        return missed

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
        verified = self._check_loaded_samples(outcome, plan)
        task_metrics = _mean_of_dicts([r.get("metrics", {}) for r in outcome.results])
        self._steps += 1
        with self._lock:
            self._last = {**report, "loss": sum(losses) / len(losses), "step_s": step_s,
                          "metrics": task_metrics, "eval": self._last_eval}
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
            samples=samples, samples_per_s=rate, goodput=rate * report["efficiency"],
            task_metrics=task_metrics))
        if self._ledger_path is not None:
            with self._ledger_path.open("a") as f:
                f.write(json.dumps({"step": self._steps, "world_size": world, "epoch": plan.epoch_before,
                                    "cursor": plan.cursor_before, "gain": report["gain"],
                                    "progress": report["progress"], "skipped": report["skipped"],
                                    "verified_ranks": verified,
                                    "consumed": {str(k): list(v) for k, v in outcome.consumed.items()}}) + "\n")

    def _check_loaded_samples(self, outcome, plan) -> int:
        """Each rank reports a checksum of the sample keys its input pipeline actually delivered;
        they must be the plan's, or a prefetched batch of another step was trained on."""
        from elastic.data import keys_checksum

        verified = 0
        for r in outcome.results:
            rank = r.get("rank")
            if rank is None or "samples_crc" not in r:
                continue
            expected = keys_checksum(k for mb in plan.shard_keys(rank) for k in mb)
            if r["samples_crc"] != expected:
                raise TrainerError(f"step {self._steps + 1}: rank {rank} trained on other samples than planned "
                                   "(input pipeline out of step); stopping before the data is counted")
            verified += 1
        return verified

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
        if self._stop_signal is not None:
            # Whoever signalled the driver may be tearing the workers down too (a pod's SIGTERM, a
            # terminal's Ctrl-C reaches the whole process group): not a failure of the job.
            logger.info("lost %s while stopping", ", ".join(outcome.lost_workers))
            return
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
        resume_phase = self.state.phase
        transit = resume_phase in (Phase.TRAINING, Phase.STOPPING)  # not while starting, recovering or failing
        if transit:
            self.state.enter(Phase.CHECKPOINTING, f"step {self._steps}")
        state = {"worker": worker_state, "sampler": self.sampler.state_dict(), "trainer": self.state_dict()}
        path = self.checkpoints.save(self._steps, state)
        self.metrics.record_checkpoint(time.perf_counter() - started)
        if transit:
            self.state.enter(resume_phase, f"checkpoint of step {self._steps} written")
        logger.debug("checkpoint %s", path)

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own counters, as a checkpoint keeps them (the sampler and workers have theirs)."""
        return {"steps": self._steps, "skipped": self._skipped, "progress": float(self._last.get("progress", 0.0)),
                "workers": self.group.size if self.group is not None else 0, "failures": self._failures,
                "abandoned_steps": self._abandoned_steps, "resizes": len(self._resizes), "run_id": self.run_id,
                "elapsed_s": self._elapsed_before_s + time.monotonic() - self._started_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps, self._skipped, self._failures = int(state["steps"]), int(state["skipped"]), int(state["failures"])
        self._abandoned_steps = int(state.get("abandoned_steps", 0))
        self._last = {"progress": float(state["progress"])}

    def _load_checkpoint(self) -> dict[str, Any] | None:
        loaded = self.checkpoints.load_latest()
        if loaded is None:
            logger.warning("no checkpoint in %s: starting from the beginning", self.spec.checkpoint.dir)
            return None
        step, state = loaded
        logger.info("resuming from checkpoint step %d (tau %.1f)", step, state["trainer"]["progress"])
        owner = state["trainer"].get("run_id")
        if owner and owner != self.run_id:
            logger.warning("checkpoint step %d was written by run %s, not this run (%s)", step, owner, self.run_id)
        if self._resumed_from_step is None:  # the first load of this process: what --resume continued
            self._resumed_from_step = step
            self._elapsed_before_s = float(state["trainer"].get("elapsed_s", 0.0))
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.load_state_dict(state["trainer"])

    # ---------------------------------------------------------------- setup / teardown
    def _setup_metrics(self) -> None:
        from prometheus_client import CollectorRegistry

        registry = self._registry if self._registry is not None else CollectorRegistry()
        log = self.run_dir / "metrics.jsonl" if self.spec.metrics.log else None
        self.metrics = TrainerMetrics(self.spec.name, registry=registry, log_path=log)
        self.controller_metrics = ControllerMetrics(self.spec.name, registry=registry, log_path=log)
        if log is not None:  # the run this log belongs to (and, after a resume, where the attempt starts)
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"kind": "run", "time_s": time.time(), "job_name": self.spec.name,
                                    "run_id": self.run_id, "resume": self.resume}) + "\n")
        if self.spec.metrics.enabled:
            self._exporter = _start_exporter_or_free_port(registry, self.spec.metrics)
            logger.info("metrics at %s", self._exporter.url)

    def _start_controller(self, stop: threading.Event) -> threading.Thread | None:
        return self._start_controller_fn(self, stop) if self._start_controller_fn is not None else None

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
            extra={"abandoned_steps": self._abandoned_steps, "missed_schedule_steps": self.missed_schedule_steps(),
                   "evaluations": list(self._evaluations), "loader_workers": self._loader_workers},
            run_id=self.run_id, stop_signal=self._stop_signal, resumed_from_step=self._resumed_from_step,
            total_elapsed_s=self._elapsed_before_s + time.monotonic() - self._started_s,
        )


def _start_exporter_or_free_port(registry: Any, settings) -> Any:
    """The exporter on ``metrics.port``; when that is the default port (not set in the spec) and
    taken, e.g. by a second job on this machine, on a free port instead."""
    from elastic.metrics import MetricsError

    try:
        return start_exporter(registry, settings.addr, settings.port)
    except MetricsError as exc:
        if "port" in settings.model_fields_set or settings.port == 0 or "already in use" not in str(exc):
            raise
        logger.warning("metrics port %d is taken (%s); serving on a free port", settings.port, exc)
        return start_exporter(registry, settings.addr, 0)


#: Signals that stop a run at the next step boundary (SIGTERM: what Kubernetes sends a pod).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _mean_of_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for d in dicts for k in d})
    return {k: sum(d[k] for d in dicts if k in d) / sum(1 for d in dicts if k in d) for k in names}


@contextlib.contextmanager
def _first_interrupt_stops(stop: threading.Event, on_signal: Callable[[int], None] | None = None):
    """In the main thread: the first SIGINT or SIGTERM asks for a stop at the next call boundary
    (checkpoint, summary) instead of breaking into a call; a second one interrupts at once
    (KeyboardInterrupt). The handlers are installed even where SIGINT is ignored, as in a driver
    started in the background by a non-interactive shell (``elastic run job.yaml &``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        if on_signal is not None:
            on_signal(signum)
        logger.warning("%s: stopping at the next step boundary with a checkpoint (again to abort)",
                       signal.Signals(signum).name)
        stop.set()

    previous = {signum: signal.signal(signum, on_interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


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
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, samples consumed)
        if enabled and self.console.is_terminal:
            from rich.live import Live

            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.start()

    def update(self, last: dict[str, Any], workers: int, samples: int) -> None:
        if not self.enabled:
            return
        rate = self.recent_rate(time.monotonic(), samples)
        line = (f"tau {last['progress']:8.1f}/{self.total:g}  workers {workers}  scale {last['scale']:g}  "
                f"gain {last['gain']:5.2f}  lr {last['learning_rate']:.4g}  loss {last['loss']:.4f}  "
                + (f"{rate:7.0f} samples/s" if rate is not None else "    ... samples/s"))
        extra = {**last.get("metrics", {}), **{f"eval_{k}": v for k, v in last.get("eval", {}).items()}}
        if extra:
            line += "  " + "  ".join(f"{k} {v:.4g}" for k, v in extra.items())
        if self._live is not None:
            self._live.update(line)
        elif time.monotonic() - self._last_log >= self.LOG_EVERY_S:
            self._last_log = time.monotonic()
            logger.info(line)

    RATE_WINDOW_S = 10.0

    def recent_rate(self, now_s: float, samples: int) -> float | None:
        """Samples per second over about the last ``RATE_WINDOW_S`` (None until two updates): counted
        from this process's first update, so a resumed run's restored count never enters the rate."""
        self._recent.append((now_s, samples))
        while len(self._recent) > 2 and now_s - self._recent[1][0] >= self.RATE_WINDOW_S:
            self._recent.popleft()
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
