"""ElasticTrainer: the driver loop that ties the worker group, the controller and checkpoints together.

One step, top to bottom (``_train``): apply the target size at the boundary (grow / shrink in
place) -> plan the global batch -> run it on every rank -> commit the plan if the update was
applied -> record metrics -> checkpoint every N steps. The controller runs in its own thread and
only moves the target; the training thread alone touches the group.

Its collaborators, one concept each: ``elastic.startup`` (the first workers), ``elastic.targets``
(the target and its triggers), ``elastic.group_sizing`` (grow / shrink at a boundary),
``elastic.call_plan`` (steps per call), ``elastic.run_progress`` (tau, counters and the newest
``elastic.step_report.StepReport``), ``elastic.ledger`` (which samples a step trained on),
``elastic.resizes``, ``elastic.evaluations``, ``elastic.run_checkpoints``, ``elastic.run_metrics``,
``elastic.progress`` (what shows the run's progress), ``elastic.main_thread`` (signals, serving the
backend) and ``elastic.summary``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

from elastic.call_plan import CALL_TARGET_S, MAX_AUTO_STEPS_PER_CALL, MIN_TIMED_STEPS, steps_per_call
from elastic.config import JobSpec
from elastic.errors import TrainerError
from elastic.evaluations import Evaluations
from elastic.group_sizing import GroupSizer
from elastic.ledger import SampleLedger, verify_loaded_samples
from elastic.main_thread import first_interrupt_stops, train_beside_backend
from elastic.metrics import NullTrainerMetrics
from elastic.progress import LoggedProgress, NoProgress, ProgressView
from elastic.step_report import StepReport
from elastic.resizes import ResizeEvent, ResizeLog
from elastic.run_checkpoints import RunCheckpoints
from elastic.run_metrics import start_run_metrics
from elastic.run_progress import RunProgress
from elastic.run_scope import held_run_dir
from elastic.sampler import ElasticSampler
from elastic.startup import dataset_len_of, startable_workers, wait_after_all_lost, wait_ready_or_stop
from elastic.summary import RunSummary
from elastic.targets import WorkerTarget, log_missed_schedule_steps, missed_schedule_steps
from elastic.trainer_state import Phase, TrainerStateMachine

# Also importable from here, where they were defined before the split.
__all__ = ["CALL_TARGET_S", "MAX_AUTO_STEPS_PER_CALL", "ElasticTrainer", "ResizeEvent", "RunSummary", "StepReport",
           "TrainerError"]

logger = logging.getLogger("elastic")


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
        show_progress: without ``progress``: log a progress line every few seconds (else nothing).
        progress: what shows each recorded step (``elastic.progress.ProgressView``); the command
            line's is a live line on a terminal (``elastic_app.progress.LiveProgress``).
        run_log: ``(run_dir, run_id) -> context manager`` entered while the run holds its directory
            (``elastic_app.run_log.train_log`` keeps ``train.log`` there); nothing by default.
        backend: where the workers run (``controller.backends.make_backend(spec)``: ``start``,
            ``serve``, ``shutdown``, ``worker_actor_options``, ``release_id``, ``actuator``).
        start_controller: ``(trainer, stop_event) -> thread or None``: starts what moves the target
            (a reconcile loop, or the link to the Kubernetes operator). The library never imports the
            controller: ``elastic_app.wiring.make_trainer`` puts these together.
    """

    def __init__(self, spec: JobSpec, resume: bool = False, registry: Any = None, ledger: bool = False,
                 on_step: Callable[[ElasticTrainer], None] | None = None, show_progress: bool = True,
                 start_over: bool = False, backend: Any = None,
                 start_controller: Callable[[ElasticTrainer, threading.Event], threading.Thread | None] | None = None,
                 progress: ProgressView | None = None,
                 run_log: Callable[[Path, str], ContextManager[Any]] | None = None) -> None:
        self.spec = spec
        self.resume = resume
        self.start_over = start_over  # move an earlier run's directory aside instead of refusing it
        self.run_id = ""
        self._stop_signal: int | None = None
        self.run_dir = Path(spec.run_dir)
        self.on_step = on_step
        self.progress_view: ProgressView = progress if progress is not None else (
            LoggedProgress(spec.total_progress) if show_progress else NoProgress())
        self._run_log = run_log if run_log is not None else (lambda run_dir, run_id: contextlib.nullcontext())
        self.backend: Any = backend
        self._start_controller_fn = start_controller
        self._registry = registry
        self._ledger = SampleLedger(self.run_dir / "ledger.jsonl") if ledger else None
        self._stop = threading.Event()
        self.state = TrainerStateMachine()
        """starting -> training <-> resizing | recovering | checkpointing -> stopping -> done (or failed)."""
        self._target = WorkerTarget(spec.workers.initial)
        self._sizer = GroupSizer(spec, self._target, self.state)
        self._run = RunProgress()
        self._resizes = ResizeLog()
        self._evaluations = Evaluations(spec)
        self._call_in_flight = False
        self._started_s = time.monotonic()
        self.group: Any = None
        self.sampler: ElasticSampler | None = None
        self.metrics: Any = NullTrainerMetrics()
        self._exporter: Any = None
        self._prefetch_batches = 0
        self._loader_workers = 0

    # ================================================================ public entry point
    def run(self) -> RunSummary:
        """Raises RunDirError (directory locked, or another run's), RunFinished (``resume`` of a
        finished run: nothing started), or what training raised."""
        if self.backend is None:
            raise TrainerError("no cluster backend given: build the trainer with elastic_app.wiring.make_trainer(spec)")
        mode = "resume" if self.resume else "start_over" if self.start_over else "fresh"
        with held_run_dir(self.spec, mode, self._run_log, self._run_json_fields) as held:
            self.run_id = held.run_id
            self.checkpoints = RunCheckpoints(self.spec, self.state)
            try:
                run_metrics = start_run_metrics(self.spec, self.run_dir, self._registry, self.run_id, self.resume)
                self.metrics, self.controller_metrics = run_metrics.trainer, run_metrics.controller
                self._exporter = run_metrics.exporter
                # SIGINT / SIGTERM stop at the next step boundary from here on (a second one aborts);
                # the local backend keeps these handlers when Ray installs its own while starting nodes.
                with first_interrupt_stops(self._stop, self._on_stop_signal):
                    self.backend.start(self.spec.workers.initial)
                    held.summary = train_beside_backend(self.backend, self._train)
            finally:
                self._shutdown()
        return held.summary

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _run_json_fields(self) -> dict[str, Any]:
        checkpoints = getattr(self, "checkpoints", None)  # None when the run failed before making it
        return {"progress": self._run.progress, "checkpoint_step": checkpoints.latest_step() if checkpoints else None,
                "steps": self._run.steps,
                "elapsed_s": (checkpoints.elapsed_before_s if checkpoints else 0.0) + self.elapsed_s}

    def request_stop(self) -> None:
        """Finish the current step, evaluate, checkpoint and return a summary (``stopped_early``)."""
        self._stop.set()

    def resize(self, workers: int, reason: str = "manual") -> None:
        """Resize by hand: capacity first (timed like the controller's), then the target."""
        started = time.monotonic()
        if workers > self.current_workers():
            self.backend.actuator.scale_to(workers)
        self.controller_metrics.record_actuation(time.monotonic() - started)
        self.target_cause = "manual"
        self.set_target_workers(workers, reason)

    @property
    def steps(self) -> int:
        """Optimizer steps completed (skipped ones included)."""
        return self._run.steps

    @property
    def resizes(self) -> tuple[ResizeEvent, ...]:
        """Resizes so far (failures included, once training resumed at the new size)."""
        return tuple(self._resizes.events)

    @property
    def worker_failures(self) -> int:
        return self._run.failures

    @property
    def progress(self) -> float:
        return self._run.progress

    @property
    def last_report(self) -> StepReport | None:
        """The newest step recorded by this process since its start or the last restore."""
        return self._run.report

    # ================================================================ controller interface
    @property
    def target_cause(self) -> str:
        """The cause recorded for resizes toward the target (schedule, controller, manual; set by the wiring)."""
        return self._target.cause

    @target_cause.setter
    def target_cause(self, cause: str) -> None:
        self._target.cause = cause

    def set_target_workers(self, n: int, reason: str, at_progress: float | None = None,
                           at_time_s: float | None = None) -> None:
        """The target, applied at the next step boundary; with a trigger, at the first one at which
        tau >= at_progress or elapsed_s >= at_time_s (new workers start warming up at once)."""
        n = min(max(n, self.spec.workers.min), self.spec.workers.max)
        self._target.set(n, reason, (at_progress, at_time_s))
        self.metrics.set_target_workers(n)

    def expect_resize(self, at_progress: float | None, at_time_s: float | None = None) -> None:
        """A scheduled resize comes at this trigger (its capacity is being added): calls end there.
        ``None`` withdraws it (the capacity did not come)."""
        self._target.expect(at_progress)

    def released_workers(self) -> list[str]:
        return self._sizer.released()

    def current_workers(self) -> int:
        return self.group.size if self.group is not None else 0

    def target_workers(self) -> int:
        return self._target.workers

    def observation(self) -> dict[str, Any]:
        """The trainer's view for the controller or the operator (``controller.k8s.contract.TrainerReport``'s
        fields): workers, target_workers, progress, gain, grad_variance, grad_sqnorm, step_time_s, released_pods."""
        return {"workers": self.current_workers(), "target_workers": self._target.workers, **self._run.observed(),
                "released_pods": tuple(self._sizer.released())}

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
        return self._resizes.last_resize_s

    def worker_startup_s(self) -> float | None:
        """The longest start-up (spawn to ready) among the workers started lately; None before any."""
        return max(self.group.startup_s) if self.group is not None and self.group.startup_s else None

    def progress_rate_per_s(self) -> float | None:
        """tau per second at the current size: the last gain over the median step time."""
        return self._run.rate_per_s(self.current_workers())

    def missed_schedule_steps(self) -> list[dict[str, Any]]:
        """Schedule steps whose resize never happened, each with why (``elastic.targets``)."""
        return missed_schedule_steps(self.spec, self._resizes.events, self._run.progress, self.elapsed_s)

    # ================================================================ the training loop
    def _train(self) -> RunSummary:
        from elastic.group import WorkerGroup

        spec = self.spec
        restored = self._load_checkpoint() if self.resume else None
        self.group = WorkerGroup(spec, self.backend.worker_actor_options(), spec.name)
        initial = self._startable_workers()
        self.group.spawn(initial)
        ready = wait_ready_or_stop(self.group, initial, self._stop)
        self.sampler = ElasticSampler(dataset_len_of(spec, ready, self._stop.is_set()), spec.seed)
        # The workers' loaders keep this many micro-batches in flight; the steps after each call are
        # planned (not committed) so that they stay busy across the call boundary.
        self._prefetch_batches = int(ready[0].info.get("prefetch_batches", 0))
        self._loader_workers = int(ready[0].info.get("loader_workers", 0))
        if restored is not None:
            self._restore(restored)
        self.group.start(ready, restored["worker"] if restored else None)
        self.metrics.set_target_workers(self._target.workers)
        self.state.enter(Phase.TRAINING, f"{spec.name}: {self.group.size} worker(s), tau "
                                         f"{self._run.progress:.1f} / {spec.total_progress:g}")
        logger.info("training %s: %d worker(s), tau %.1f / %g", spec.name, self.group.size,
                    self._run.progress, spec.total_progress)

        controller_stop = threading.Event()
        controller = self._start_controller_fn(self, controller_stop) if self._start_controller_fn else None
        self.progress_view.start()
        boundary_s = time.perf_counter()
        try:
            while self._run.progress < spec.total_progress:
                if self._stop.is_set():
                    logger.warning("stopping early on request at tau %.1f", self._run.progress)
                    break
                self._target.await_announced(self._run.progress, spec, self._stop)
                resize = self._sizer.apply(self.group, self.backend.release_id, self._run.progress, self.elapsed_s)
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
                    self._resizes.planned(*resize, pause_s=step_started - boundary_s, progress=self._run.progress,
                                          decided_s=self._target.decided_s, metrics=self.metrics)
                if self._resizes.failure_pending:
                    self._resizes.failure_resumed(self._run.progress, self.metrics)
                # Until its outcomes are all recorded, the workers may hold updates of steps the
                # sampler has not committed: no checkpoint may be taken from them meanwhile.
                self._call_in_flight = len(plans) > 1
                outcomes = self.group.run_steps(plans, expected_step_s=self._run.median_step_s(world, MIN_TIMED_STEPS),
                                                lookahead=self.sampler.lookahead(plans[-1], self._prefetch_batches))
                boundary_s = time.perf_counter()
                recovery_s = sum(o.recovery_s for o in outcomes)
                step_s = (boundary_s - step_started - recovery_s) / len(outcomes)
                steps_before = self._run.steps
                for outcome, plan in zip(outcomes, plans):
                    if outcome.lost_workers:
                        self.state.enter(Phase.RECOVERING, f"lost {', '.join(outcome.lost_workers)}")
                        self._record_failure(outcome, world)
                        self.state.enter(Phase.TRAINING, f"re-formed at {self.group.size} worker(s)")
                    if not outcome.completed:
                        self._run.abandoned_steps += 1
                        continue
                    self.sampler.commit(plan)
                    self._record_step(outcome, plan, world, step_s)
                    if self.on_step is not None:
                        self.on_step(self)
                self._call_in_flight = False
                if not any(o.completed for o in outcomes) and self.on_step is not None:
                    self.on_step(self)
                # A call never runs past a checkpoint step, so the group's state is that step's.
                if self._run.steps // spec.checkpoint.every_steps > steps_before // spec.checkpoint.every_steps:
                    self._checkpoint()
                # An evaluation is not part of a resize pause measured from this boundary.
                boundary_s += self._maybe_evaluate()
                if self._run.consecutive_skips >= spec.failure.max_consecutive_skipped_steps:
                    raise TrainerError(f"{self._run.consecutive_skips} steps in a row had non-finite gradients "
                                       "(failure.max_consecutive_skipped_steps); lower the learning rate")
            evaluation = self._finish()
        except BaseException as exc:
            self.state.fail(f"{type(exc).__name__}: {exc}".splitlines()[0])
            if self._call_in_flight:
                logger.warning("no checkpoint at the stop: it came in the middle of a call of several steps, "
                               "whose updates are not all recorded; the newest checkpoint (step %d or earlier) stands",
                               self._run.steps)
            elif self.group is not None and self.group.size > 0 and self.sampler is not None:
                try:
                    self._checkpoint()
                except Exception as exc:  # noqa: BLE001 - the original error matters more
                    logger.warning("could not write a checkpoint while stopping: %s", exc)
            raise
        finally:
            self.progress_view.close()
            controller_stop.set()
            if controller is not None:
                controller.join(timeout=10)
        return self._summary(evaluation)

    def _finish(self) -> dict[str, float]:
        """At the total (or on a stop request): the final evaluation and checkpoint."""
        tau = self._run.progress
        self.state.enter(Phase.STOPPING, f"tau {tau:.1f} reached total {self.spec.total_progress:g}"
                         if tau >= self.spec.total_progress else f"stop requested at tau {tau:.1f}")
        # Stopped by a signal: the checkpoint first, and no evaluation, which may take longer than
        # the grace period left (Kubernetes: 30 s by default); the next run evaluates.
        evaluation = {} if self._stop_signal is not None else self.group.evaluate()
        if evaluation:
            self._record_eval(evaluation, tau)
        if self.group.size > 0:
            self._checkpoint()
        self.state.enter(Phase.DONE, f"{self._run.steps} steps, tau {tau:.1f}")
        log_missed_schedule_steps(self.missed_schedule_steps())
        return evaluation

    def _startable_workers(self) -> int:
        capacity = startable_workers(self.spec, self.backend)
        if capacity < self.spec.workers.initial:
            self._target.lower_to(capacity)
        return capacity

    def _steps_per_call(self, world: int) -> int:
        return steps_per_call(self.spec, world, self._run.median_step_s(world, MIN_TIMED_STEPS), self._run.steps,
                              self._run.progress, self._target.hold_at)

    def _maybe_evaluate(self) -> float:
        """evaluation.every_progress: evaluate on rank 0 once tau passed the next multiple; returns
        the seconds it took (0 if it did not run)."""
        progress = self._run.progress
        if not self._evaluations.due(progress):
            return 0.0
        started = time.perf_counter()
        self._record_eval(self.group.evaluate(), progress)
        self._show_progress(self.group.size)
        return time.perf_counter() - started

    def _record_eval(self, evaluation: dict[str, float], progress: float) -> None:
        self._evaluations.record(evaluation, progress, self._run.steps, self.metrics)
        self._run.record_evaluation(evaluation)

    def _show_progress(self, workers: int) -> None:
        report = self._run.report
        if report is not None:
            self.progress_view.update(report, workers, self.sampler.samples_consumed)

    def _recover_all_lost(self) -> None:
        """Every worker is gone: wait for capacity, then resume from the newest checkpoint."""
        ready = wait_after_all_lost(self.spec, self.group, self._target.workers)
        restored = self._load_checkpoint()
        lost_steps = self._run.steps - (restored["trainer"]["steps"] if restored else 0)
        if restored is not None:
            self._restore(restored)
        else:
            self.sampler.load_state_dict({**self.sampler.state_dict(), "epoch": 0, "cursor": 0})
            self._run.restart()
        self.group.start(ready, restored["worker"] if restored else None)
        logger.warning("resumed with %d worker(s) from %s (%d step(s) redone)", self.group.size,
                       f"checkpoint step {self._run.steps}" if restored else "the start", lost_steps)

    # ---------------------------------------------------------------- records
    def _record_step(self, outcome, plan, world: int, step_s: float) -> None:
        verified = verify_loaded_samples(outcome.results, plan, self._run.steps + 1)
        report = StepReport.from_ranks(outcome.results, step_s, self._evaluations.latest)
        self._run.record(report, world)
        if report.skipped:
            self.metrics.record_skip("nonfinite")
        self.metrics.record_step(report.step_record(self._run.steps, world, self._target.workers, plan.global_batch))
        if self._ledger is not None:
            self._ledger.write(self._run.steps, world, plan, report, verified, outcome.consumed)
        self._show_progress(world)

    def _record_failure(self, outcome, world: int) -> None:
        if self._stop_signal is not None:
            # Whoever signalled the driver may be tearing the workers down too (a pod's SIGTERM, a
            # terminal's Ctrl-C reaches the whole process group): not a failure of the job.
            logger.info("lost %s while stopping", ", ".join(outcome.lost_workers))
            return
        self._run.failures += self._resizes.workers_lost(outcome, world, self.group.size, self.metrics)
        if outcome.fault is not None and self.group.size > 0:
            self._target.decided_at(outcome.fault.evidence_s)  # the fault is the decision behind the regrow

    # ---------------------------------------------------------------- checkpoints (elastic.run_checkpoints)
    def _checkpoint(self) -> None:
        self.checkpoints.save(self._run.steps, self.group, self.sampler, self, self.metrics)

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own counters, as a checkpoint keeps them (the sampler and workers have theirs)."""
        return {**self._run.state_dict(), "workers": self.current_workers(), "resizes": len(self._resizes.events),
                "run_id": self.run_id, "elapsed_s": self.checkpoints.elapsed_before_s + self.elapsed_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run.load_state_dict(state)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        return self.checkpoints.load_latest(self.run_id)

    def _restore(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.load_state_dict(state["trainer"])

    # ---------------------------------------------------------------- the end
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
        run = self._run
        return RunSummary(
            name=self.spec.name, progress=run.progress, total_progress=self.spec.total_progress, steps=run.steps,
            skipped_steps=run.skipped, samples=self.sampler.samples_consumed if self.sampler else 0,
            elapsed_s=self.elapsed_s, evaluation=evaluation, resizes=self.resizes, worker_failures=run.failures,
            final_workers=self.group.size, run_dir=str(self.run_dir), checkpoint_step=self.checkpoints.latest_step(),
            metrics_url=self._exporter.url if self._exporter is not None else None,
            stopped_early=run.progress < self.spec.total_progress,
            extra={"abandoned_steps": run.abandoned_steps, "missed_schedule_steps": self.missed_schedule_steps(),
                   "evaluations": list(self._evaluations.history), "loader_workers": self._loader_workers},
            run_id=self.run_id, stop_signal=self._stop_signal, resumed_from_step=self.checkpoints.resumed_from_step,
            total_elapsed_s=self.checkpoints.elapsed_before_s + self.elapsed_s,
        )
