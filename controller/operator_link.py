"""The driver's side of the ElasticJob contract, for jobs the Kubernetes operator runs.

Inside a driver pod (``ELASTIC_JOB_RESOURCE=namespace/name``) the operator owns the decisions: the
trainer runs no reconcile loop of its own; it publishes what it observes in ``status.trainer`` and
follows ``status.targetWorkers``. Released pods are reported so that KubeRay deletes those pods.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from controller.k8s.contract import ElasticJobStatusClient, TrainerReport

logger = logging.getLogger(__name__)


class OperatorLink:
    """Publish the trainer's report and follow the operator's target, every ``interval_s``.

    ``trainer`` provides ``report() -> TrainerReport`` fields as a dict (see ElasticTrainer.report),
    ``target_workers()`` and ``set_target_workers(n, reason)``.
    """

    def __init__(self, client: ElasticJobStatusClient, trainer: Any) -> None:
        self.client = client
        self.trainer = trainer

    def sync_once(self) -> int | None:
        """One round: publish, then adopt the operator's target. Returns that target (None if unset)."""
        self.client.publish(TrainerReport(**self.trainer.report()))
        target = self.client.target_workers()
        if target is not None and target != self.trainer.target_workers():
            self.trainer.set_target_workers(target, "operator: status.targetWorkers")
        return target

    def run(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                self.sync_once()
            except Exception as exc:  # noqa: BLE001 - an API hiccup must not stop training
                logger.warning("operator link: %s: %s", type(exc).__name__, exc)
            stop.wait(interval_s)

    def start(self, stop: threading.Event, interval_s: float) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop, interval_s), name="elastic-operator-link", daemon=True)
        thread.start()
        return thread
