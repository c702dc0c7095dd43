"""Deciding and acting on the number of workers: pure policies, actuators and the reconcile loop.

Importing this package (or controller.policy / controller.loop) never imports ray, kubernetes or torch.
"""

from controller.actuators.base import ActuationError, Actuator
from controller.loop import ControllerMetrics, NullControllerMetrics, ReconcileLoop, TrainerControl
from controller.policy import (
    AvailablePolicy,
    Decision,
    FixedPolicy,
    GoodputPolicy,
    JobSnapshot,
    NoopDecision,
    Policy,
    ResizeDecision,
    SchedulePolicy,
    ScheduleStep,
    make_policy,
    predicted_efficiency,
    predicted_gain,
)

__all__ = [
    "ActuationError",
    "Actuator",
    "AvailablePolicy",
    "ControllerMetrics",
    "Decision",
    "FixedPolicy",
    "GoodputPolicy",
    "JobSnapshot",
    "NoopDecision",
    "NullControllerMetrics",
    "Policy",
    "ReconcileLoop",
    "ResizeDecision",
    "SchedulePolicy",
    "ScheduleStep",
    "TrainerControl",
    "make_policy",
    "predicted_efficiency",
    "predicted_gain",
]
