"""Job-spec sections of where the job runs and what it leaves behind: cluster backend, runtime_env,
checkpoints, metrics."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from elastic.config.fields import Bool, Float, Int, Problems, Section


class ClusterConfig(Section):
    """Where the workers run and which actuator adds or removes capacity."""

    backend: Literal["local", "ray", "kuberay"] = "local"
    """``local`` (Ray nodes started on this machine); ``ray`` (an existing Ray cluster, scaled via the
    Ray autoscaler); ``kuberay`` (a KubeRay RayCluster whose worker group replicas are patched)."""
    address: Optional[str] = None
    """Ray address (``ray://host:10001`` or ``auto``); required for backend=ray."""
    namespace: Optional[str] = None
    """Kubernetes namespace of the RayCluster; required for backend=kuberay."""
    raycluster: Optional[str] = None
    """Name of the RayCluster resource; required for backend=kuberay."""
    group: Optional[str] = None
    """Worker group (workerGroupSpecs[].groupName) to resize; required for backend=kuberay."""
    num_cpus_per_worker: Float = Field(default=1.0, gt=0)
    """CPUs reserved for each worker actor."""
    use_gpu: Bool = False
    """Give each worker one GPU (nccl); false = CPU workers (gloo)."""
    retain_heap: Bool = True
    """Workers keep the heap memory they free for the next step (glibc malloc options, see
    ``elastic/allocator.py``) instead of faulting it back in page by page; false leaves the C
    allocator as it is. Ignored where LD_PRELOAD or MALLOC_* variables choose the allocator."""

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        problems = Problems("ClusterConfig")
        needed = {"ray": ("address",), "kuberay": ("namespace", "raycluster", "group")}
        # A KubeRay job's driver also connects to its Ray head: address is allowed there (default auto).
        allowed = {"address": ("ray", "kuberay")}
        for backend, fields in needed.items():
            for name in fields:
                value = getattr(self, name)
                users = allowed.get(name, (backend,))
                if self.backend == backend and not value:
                    problems.add((name,), f"required for backend={backend}", value)
                elif self.backend not in users and value is not None:
                    problems.add((name,), f"only used by backend={' or '.join(users)} (got backend={self.backend})", value)
        problems.raise_if_any()
        return self


class CheckpointConfig(Section):
    """Durable checkpoints for resuming after a full restart."""

    dir: str = Field(default="checkpoints", min_length=1)
    """Directory of the checkpoints; in a job spec the default is ``<run_dir>/checkpoints``."""
    every_steps: Int = Field(default=100, ge=1)
    """Write a checkpoint every this many optimizer steps (>= 1)."""
    keep_last: Int = Field(default=3, ge=1)
    """Keep this many newest checkpoints; older ones are deleted (>= 1)."""


class MetricsConfig(Section):
    """Prometheus exporter and the run's metrics log."""

    enabled: Bool = True
    """Serve Prometheus metrics over HTTP."""
    addr: str = Field(default="127.0.0.1", min_length=1)
    """Address the exporter binds (``0.0.0.0`` to be scraped from other hosts)."""
    port: Int = Field(default=9464, ge=0, le=65535)
    """Exporter port, 0..65535; 0 picks a free port."""
    log: Bool = True
    """Also write a JSONL metrics log in the run directory (read by ``elastic report``)."""


class RuntimeEnvConfig(Section):
    """Ray's ``runtime_env`` for the job's workers: how the task's code and packages reach them.

    Left empty, the directory the task module is imported from reaches the workers: on ``local`` and
    ``kuberay`` through ``PYTHONPATH`` (one machine, one image), on ``ray`` as an uploaded
    ``working_dir`` (nodes may be other machines); an installed task package is not shipped."""

    working_dir: Optional[str] = None
    """Directory uploaded to every worker and made its working directory (Ray's ``working_dir``)."""
    py_modules: list[str] = Field(default_factory=list)
    """Local package directories or wheel/zip paths uploaded and importable on the workers."""
    pip: list[str] = Field(default_factory=list)
    """Requirements installed into a per-job virtualenv on every node (needs the package index)."""
    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables of the worker processes."""
    excludes: list[str] = Field(default_factory=list)
    """gitignore-style patterns left out of ``working_dir`` and ``py_modules`` uploads."""

