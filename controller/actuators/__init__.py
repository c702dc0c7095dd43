"""Actuators: one module per backend (local Ray nodes, Ray autoscaler, KubeRay RayCluster).

Only the protocol is imported here; backends import their client libraries lazily, so importing
this package never pulls in ray or kubernetes.
"""

from controller.actuators.base import ActuationError, Actuator, ActuatorConfigError

__all__ = ["Actuator", "ActuationError", "ActuatorConfigError"]
