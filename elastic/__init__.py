"""Elastic-batch training on Ray with AdaScale SGD: resize in place, keep the learning rate right.

The public names are imported lazily, so that light modules (config, metrics, report) do not pull
in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdaScale": "elastic.adascale",
    "AdaScaleError": "elastic.adascale",
    "gain_ratio": "elastic.estimators",
    "Constant": "elastic.schedules",
    "Cosine": "elastic.schedules",
    "Exponential": "elastic.schedules",
    "LinearWarmup": "elastic.schedules",
    "Step": "elastic.schedules",
    "make_schedule": "elastic.schedules",
    "ElasticSampler": "elastic.sampler",
    "ElasticTrainer": "elastic.trainer",
    "load_job_spec": "elastic.config",
    "get_context": "elastic.task",
    "WorkerContext": "elastic.task",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'elastic' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
