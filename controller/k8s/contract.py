"""The driver <-> operator contract of an ElasticJob, without kopf (the driver imports only this).

Both sides go through the ElasticJob's status subresource:

* the driver (``ELASTIC_JOB_RESOURCE=namespace/name`` in its environment tells it which job it is)
  merge-patches ``status.trainer`` = :class:`TrainerReport` (``{workers, targetWorkers, progress,
  gain, gradVariance, gradSqnorm, stepTimeS: {"1": 0.21, ...}, releasedPods: [...], updatedAt}``)
  every few steps, with :class:`ElasticJobStatusClient`; ``releasedPods`` names the Ray worker pods
  (hostnames) the trainer stopped using after a shrink, the newest :data:`MAX_RELEASED_PODS` of them;
* the operator writes ``status.targetWorkers``; the driver grows or shrinks in place to it at the
  next step boundary. Grow: the operator raises the RayCluster's replicas first, then the target.
  Shrink: it lowers the target first and removes capacity only for the pods listed in
  ``releasedPods`` (graceful scale-down).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes

__all__ = ["ELASTICJOB", "MAX_RELEASED_PODS", "ContractError", "TrainerReport", "ElasticJobStatusClient",
           "now_iso", "epoch_s"]

ELASTICJOB = ("elastic.dev", "v1alpha1", "elasticjobs")
MAX_RELEASED_PODS = 32
"""How many released pod names a report carries (the newest). A released pod is listed in
``workersToDelete`` on the next reconcile pass and gone soon after; older names only grow the status."""


class ContractError(ValueError):
    """The driver's environment does not name its ElasticJob (one-line message)."""


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def epoch_s(iso: str | None) -> float | None:
    """Unix seconds of an ISO-8601 time (``Z`` accepted); None when absent or unreadable."""
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None
    except (AttributeError, ValueError):
        return None


@dataclass(frozen=True)
class TrainerReport:
    """What the driver publishes in ``status.trainer`` (the operator's observation of the trainer)."""

    workers: int
    """Workers training now (released ones excluded)."""
    target_workers: int
    """The size the trainer is moving to."""
    progress: float = 0.0
    """tau, scale-invariant iterations so far."""
    gain: float = 1.0
    """AdaScale gain ratio r_t of the last step."""
    grad_variance: float | None = None
    """sigma^2 estimate (None before the first estimate)."""
    grad_sqnorm: float | None = None
    """mu^2 estimate."""
    step_time_s: Mapping[int, float] = field(default_factory=dict)
    """Median step seconds by world size."""
    released_pods: tuple[str, ...] = ()
    """Ray worker pods (hostnames) the trainer released and whose capacity may go; oldest first."""
    updated_at: str = ""
    """ISO-8601 time of the report."""

    def __post_init__(self) -> None:
        # The trainer remembers every pod it ever released; only the newest can still be alive.
        newest = tuple(dict.fromkeys(self.released_pods))[-MAX_RELEASED_PODS:]
        object.__setattr__(self, "released_pods", newest)

    def to_status(self) -> dict[str, Any]:
        return {
            "workers": self.workers, "targetWorkers": self.target_workers, "progress": self.progress,
            "gain": self.gain, "gradVariance": self.grad_variance, "gradSqnorm": self.grad_sqnorm,
            "stepTimeS": {str(k): v for k, v in self.step_time_s.items()},
            "releasedPods": list(self.released_pods), "updatedAt": self.updated_at or now_iso(),
        }

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> TrainerReport | None:
        """Parse ``status.trainer``; None when absent or unusable (the driver has not reported yet)."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("workers"), int):
            return None
        try:
            return cls(
                workers=int(raw["workers"]), target_workers=int(raw.get("targetWorkers", raw["workers"])),
                progress=float(raw.get("progress") or 0.0), gain=float(raw.get("gain") or 1.0),
                grad_variance=None if raw.get("gradVariance") is None else float(raw["gradVariance"]),
                grad_sqnorm=None if raw.get("gradSqnorm") is None else float(raw["gradSqnorm"]),
                step_time_s={int(k): float(v) for k, v in (raw.get("stepTimeS") or {}).items()},
                released_pods=tuple(str(p) for p in raw.get("releasedPods") or ()),
                updated_at=str(raw.get("updatedAt") or ""),
            )
        except (TypeError, ValueError):
            return None


class ElasticJobStatusClient:
    """The driver's side of the contract: publish reports, read the operator's target.

    ``ElasticJobStatusClient.from_env()`` inside the driver (``ELASTIC_JOB_RESOURCE=ns/name``).
    """

    def __init__(self, namespace: str, name: str, api: kubernetes.client.CustomObjectsApi | None = None) -> None:
        self.namespace, self.name = namespace, name
        self._api = api if api is not None else kubernetes.client.CustomObjectsApi()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ElasticJobStatusClient:
        resource = environ.get("ELASTIC_JOB_RESOURCE", "")
        namespace, _, name = resource.partition("/")
        if not namespace or not name:
            raise ContractError(f"ELASTIC_JOB_RESOURCE: must be 'namespace/name', got {resource!r}")
        kubernetes.config.load_incluster_config()
        return cls(namespace, name)

    def publish(self, report: TrainerReport) -> None:
        self._api.patch_namespaced_custom_object_status(
            *ELASTICJOB[:2], self.namespace, ELASTICJOB[2], self.name, {"status": {"trainer": report.to_status()}},
            _content_type="application/merge-patch+json")

    def target_workers(self) -> int | None:
        obj = self._api.get_namespaced_custom_object_status(*ELASTICJOB[:2], self.namespace, ELASTICJOB[2], self.name)
        target = (obj.get("status") or {}).get("targetWorkers")
        return target if isinstance(target, int) else None
