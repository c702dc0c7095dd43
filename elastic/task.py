"""The Task protocol: what a user writes to train with the elastic trainer."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Task(Protocol):
    """Any class with these four methods; built as ``Task(**task_args)`` on every worker.

    The trainer moves each batch (as collated by ``default_collate``; tensors, tuples and dicts of
    them) to the worker's device, wraps the optimizer in AdaScale and owns the loop.

    Optional methods, used when the task defines them:

    - ``build_optimizer(model) -> Optimizer | (Optimizer, LRScheduler)``: with
      ``optimizer: {name: task}``; any torch.optim optimizer, with parameter groups (e.g. no weight
      decay on norms and biases). AdaScale wraps it and scales every group's lr by the gain. A
      torch LR scheduler on it is stepped after every applied update and composes with the gain.
    - ``lr_schedule(tau, total_progress) -> float``: the multiplier of the base lr at progress tau
      (scale-invariant iterations); replaces the spec's ``lr_schedule``.
    - ``collate(samples) -> batch``: instead of ``default_collate``.

    ``loss`` may return the loss tensor, or ``(loss, {"name": value, ...})``: scalar metrics of the
    step, averaged over micro-batches and ranks, shown in the progress line and the metrics log.
    ``train_dataset`` must be map-style (``__getitem__`` + ``__len__``): the sampler indexes it.
    Inside the worker, :func:`get_context` tells the rank, the world size and the step.
    """

    def build_model(self) -> torch.nn.Module: ...

    def train_dataset(self) -> torch.utils.data.Dataset: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


@dataclass(frozen=True)
class WorkerContext:
    """Where the calling code runs: set by the worker while it trains, evaluates or builds the task."""

    rank: int
    """This worker's rank in the current group; -1 before it first joins a group."""
    world_size: int
    """Ranks in the current group; 0 before the first group."""
    step: int
    """Optimizer steps completed by the job so far (the step being run is ``step + 1``)."""
    seed: int
    """The job's seed."""
    device: str
    """The worker's torch device, e.g. ``cpu`` or ``cuda:0``."""


_context = WorkerContext(rank=-1, world_size=0, step=0, seed=0, device="cpu")


def get_context() -> WorkerContext:
    """The current worker's context (rank, world size, step, seed, device).

    In a DataLoader worker process the values are those of when the process started (it outlives
    resizes): draw the randomness of ``__getitem__`` from the global generators, which the loader
    seeds per sample from (seed, epoch, index), not from the rank."""
    return _context


def set_context(context: WorkerContext) -> None:
    """Called by the worker (not by tasks)."""
    global _context
    _context = context


class TaskError(RuntimeError):
    """The task could not be imported, built or used (one-line message)."""


REQUIRED_METHODS = ("build_model", "train_dataset", "loss", "evaluate")


def resolve_task(path: str) -> type:
    """Import ``module:Class`` without building it (``elastic validate`` and ``run`` check this first)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task: {path!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's task failing
        raise TaskError(f"task: cannot import module {module_name!r}: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise TaskError(f"task: module {module_name!r} has no attribute {attr!r}")
    return cls


def load_task(path: str, task_args: dict[str, Any] | None = None) -> Task:
    """Import ``module:Class`` and build it with ``task_args``; every failure is a TaskError."""
    cls = resolve_task(path)
    try:
        task = cls(**(task_args or {}))
    except Exception as exc:  # noqa: BLE001
        raise TaskError(f"task: {path}(**task_args) raised {type(exc).__name__}: {exc}") from None
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise TaskError(f"task: {path} lacks the method(s) {', '.join(missing)} of the Task protocol")
    return task
