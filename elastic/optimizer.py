"""The job's optimizer: the spec's torch optimizer (or the task's own), wrapped in AdaScale with the
learning-rate schedule in tau (the spec's, or the task's ``lr_schedule`` hook)."""

from __future__ import annotations

from typing import Any

import torch

from elastic.adascale import AdaScale
from elastic.config import JobSpec
from elastic.schedules import make_schedule
from elastic.task import TaskError


def build_optimizer(spec: JobSpec, params) -> torch.optim.Optimizer:
    o = spec.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    betas = o.betas or (0.9, 0.999)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=betas, weight_decay=o.weight_decay)


def _task_optimizer(spec: JobSpec, task: Any, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """(optimizer, torch LR scheduler or None): the spec's, or the task's ``build_optimizer(model)``."""
    has_hook = callable(getattr(task, "build_optimizer", None))
    if spec.optimizer.name != "task":
        if has_hook:
            raise TaskError(f"optimizer.name: the task defines build_optimizer(model) but the spec names "
                            f"{spec.optimizer.name!r}; set optimizer: {{name: task}} to use it")
        return build_optimizer(spec, model.parameters()), None
    if not has_hook:
        raise TaskError("optimizer.name: 'task' needs a build_optimizer(model) method on the task")
    built = task.build_optimizer(model)
    optimizer, scheduler = built if isinstance(built, tuple) else (built, None)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TaskError(f"build_optimizer must return a torch.optim.Optimizer or (optimizer, lr_scheduler), "
                        f"got {type(optimizer).__name__}")
    return optimizer, scheduler


def _lr_schedule(spec: JobSpec, task: Any):
    """The multiplier of the base lr as a function of tau: the task's hook, or the spec's schedule."""
    hook = getattr(task, "lr_schedule", None)
    if callable(hook):
        total = spec.total_progress
        return lambda tau: float(hook(tau, total))
    s = spec.lr_schedule
    return make_schedule(s.kind, spec.total_progress, s.milestones, s.gamma, s.warmup_fraction)


def build_adascale(spec: JobSpec, model: torch.nn.Module, task: Any = None, grad_scaler: Any = None) -> AdaScale:
    """AdaScale around the configured optimizer; with adascale disabled, S is pinned to 1 (gain 1)."""
    adascale, _ = build_adascale_and_scheduler(spec, model, task, grad_scaler)
    return adascale


def build_adascale_and_scheduler(spec: JobSpec, model: torch.nn.Module, task: Any,
                                 grad_scaler: Any) -> tuple[AdaScale, Any]:
    """(AdaScale, the task's torch LR scheduler or None): what a worker trains with."""
    optimizer, lr_scheduler = _task_optimizer(spec, task, model)
    scale = None if spec.adascale.enabled else 1
    extra = {"grad_scaler": grad_scaler} if grad_scaler is not None else {}
    opt = AdaScale(optimizer, scale=scale, accumulation_steps=spec.accumulation_steps,
                   lr_schedule=_lr_schedule(spec, task), **extra)
    return opt, lr_scheduler
