"""Elastic-batch training on Ray with AdaScale SGD: resize in place, keep the learning rate right."""

from elastic.adascale import AdaScale, AdaScaleError, gain_ratio
from elastic.schedules import Constant, Cosine, Exponential, LinearWarmup, Step, make_schedule

__all__ = [
    "AdaScale",
    "AdaScaleError",
    "gain_ratio",
    "Constant",
    "Cosine",
    "Exponential",
    "LinearWarmup",
    "Step",
    "make_schedule",
]
__version__ = "0.1.0"
