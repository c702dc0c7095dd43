"""The one place that puts a job together: the trainer (``elastic``), the cluster backend and its
actuator, and what moves the target (a reconcile loop with the job's policy, or, in a driver pod of
the Kubernetes operator, the link to the ElasticJob's status).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from controller.backends import make_backend
from controller.loop import ReconcileLoop
from controller.policy import JobSnapshot, policy_for
from elastic.config import JobSpec
from elastic.progress import NoProgress
from elastic.trainer import ElasticTrainer
from elastic_app.progress import LiveProgress
from elastic_app.run_log import train_log


def job_snapshot(trainer: ElasticTrainer) -> JobSnapshot:
    """The policy's view of a running trainer, from its observation (each part read under its own lock)."""
    seen = trainer.observation()
    spec = trainer.spec
    return JobSnapshot(
        now_s=time.monotonic(),
        current_workers=seen["workers"],
        min_workers=spec.workers.min,
        max_workers=spec.workers.max,
        capacity_workers=trainer.backend.actuator.capacity_workers(),
        progress=seen["progress"],
        total_progress=spec.total_progress,
        grad_variance=seen["grad_variance"],
        grad_sqnorm=seen["grad_sqnorm"],
        accumulation_steps=spec.accumulation_steps,
        step_time_s_by_workers=seen["step_time_s"],
        last_resize_s=trainer.last_resize_s,
        elapsed_s=trainer.elapsed_s,
        progress_rate_per_s=trainer.progress_rate_per_s(),
        worker_startup_s=trainer.worker_startup_s(),
    )


def start_reconcile_loop(trainer: ElasticTrainer, stop: threading.Event) -> threading.Thread:
    """The controller of a job run from the command line: observe -> decide (the job's policy) -> act."""
    loop = ReconcileLoop(policy_for(trainer.spec.scaling), trainer.backend.actuator, lambda: job_snapshot(trainer),
                         trainer, metrics=trainer.controller_metrics)
    trainer.target_cause = {"schedule": "schedule", "fixed": "manual"}.get(trainer.spec.scaling.policy, "controller")
    return loop.start(stop, trainer.spec.scaling.interval_s)


def operator_link_starter(client: Any):
    """In a driver pod: the operator decides; the trainer reports and follows ``status.targetWorkers``."""
    from controller.operator_link import OperatorLink

    def start(trainer: ElasticTrainer, stop: threading.Event) -> threading.Thread:
        trainer.target_cause = "controller"
        return OperatorLink(client, trainer).start(stop, trainer.spec.scaling.interval_s)

    return start


def make_trainer(spec: JobSpec, operator_client: Any = None, show_progress: bool = True,
                 **options: Any) -> ElasticTrainer:
    """An ElasticTrainer with the spec's cluster backend and its controller, ``train.log`` in the run
    directory, and (``show_progress``) a live progress line on a terminal, else a log line every few
    seconds; ``options`` are the trainer's own (resume, start_over, registry, ledger, on_step)."""
    start = operator_link_starter(operator_client) if operator_client is not None else start_reconcile_loop
    progress = LiveProgress(spec.total_progress) if show_progress else NoProgress()
    return ElasticTrainer(spec, backend=make_backend(spec), start_controller=start, progress=progress,
                          run_log=train_log, **options)
