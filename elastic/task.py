"""The Task protocol: what a user writes to train with the elastic trainer."""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Task(Protocol):
    """Any class with these four methods; built as ``Task(**task_args)`` on every worker.

    The trainer moves each batch (as collated by ``default_collate``) to the worker's device,
    wraps the optimizer in AdaScale and owns the loop.
    """

    def build_model(self) -> torch.nn.Module: ...

    def train_dataset(self) -> torch.utils.data.Dataset: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


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
