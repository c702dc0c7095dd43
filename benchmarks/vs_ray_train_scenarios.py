"""The job and the scenarios of ``benchmarks.vs_ray_train``: what both systems train, and when capacity changes."""

from __future__ import annotations

import os
from typing import Any

SYSTEMS = ("elastic", "ray-train")
SCENARIOS = ("grow", "loss", "e2e")
CHECKPOINT_EVERY_STEPS = 50
GROW_AT_S = 8.0
LOSS_AT_S = 8.0
STEADY_S = 8.0
E2E_GROW_AT_S = 8.0
E2E_LOSS_AT_S = 30.0
#: Large enough that both capacity changes land before the end (at 1 worker a step takes a few ms).
E2E_TOTAL_PROGRESS = 16000
#: A run that has not finished after this long is stopped and reported as such.
RUN_LIMIT_S = float(os.environ.get("VS_RAY_TRAIN_RUN_LIMIT_S", "420"))
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
RAY_TRAIN_MONITOR_INTERVAL_S = 2.0


def job_dict(total_progress: float, run_dir: str, initial_workers: int) -> dict[str, Any]:
    """The job both systems train (this project's spec format; Ray Train's loop reads the same)."""
    return {
        "name": "vs-ray-train",
        "task": "examples.digits:DigitsTask",
        "batch_size_per_worker": 32,
        "total_progress": total_progress,
        "seed": 0,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "lr_schedule": {"kind": "step", "milestones": [0.5, 0.75], "gamma": 0.1},
        "adascale": {"enabled": True},
        "workers": {"min": 1, "max": 4, "initial": initial_workers},
        "scaling": {"policy": "available", "interval_s": 0.5},
        "cluster": {"backend": "local", "num_cpus_per_worker": 1.0},
        "checkpoint": {"every_steps": CHECKPOINT_EVERY_STEPS, "keep_last": 2, "dir": f"{run_dir}/checkpoints"},
        "metrics": {"enabled": False, "log": False},
        "run_dir": run_dir,
    }


def schedule(scenario: str) -> list[tuple[str, float]]:
    """(what, seconds after the first step) of each capacity change of ``scenario``."""
    return {"grow": [("grow", GROW_AT_S)], "loss": [("loss", LOSS_AT_S)],
            "e2e": [("grow", E2E_GROW_AT_S), ("loss", E2E_LOSS_AT_S)]}[scenario]
