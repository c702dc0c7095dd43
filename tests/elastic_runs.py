"""Shared pieces of the Ray integration tests: job specs, a scripted resize/kill driver, ledger checks."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from elastic.config import JobSpec, parse_job_spec
from elastic.sampler import ElasticSampler

ROOT = Path(__file__).resolve().parents[1]


def digits_spec(run_dir: Path, **overrides: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "digits-test",
        "task": "examples.digits:DigitsTask",
        "batch_size_per_worker": 32,
        "total_progress": 100000,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "workers": {"min": 1, "max": 3, "initial": 2},
        "scaling": {"policy": "fixed", "interval_s": 0.5},
        "checkpoint": {"every_steps": 50, "keep_last": 2},
        "metrics": {"enabled": False, "log": True},
        # DataLoader worker processes with prefetch: the ledger checks hold with batches loaded ahead.
        "data": {"num_workers": 1, "prefetch_factor": 2},
        "run_dir": str(run_dir),
    }
    return parse_job_spec(data, overrides=overrides)


class GrowShrinkKill:
    """Drives a run from its on_step hook: grow 2 -> 3, shrink 3 -> 2, SIGKILL a worker mid-step,
    wait for the replacement, then stop. Each phase waits for the previous one to have happened."""

    STEPS_BETWEEN = 20
    SECONDS_BETWEEN = 2.5  # so a 1 s Prometheus scrape sees every phase

    def __init__(self) -> None:
        self.phase = "start"
        self.mark = 0
        self.mark_s = 0.0
        self.killed_pid: int | None = None
        self.log: list[tuple[str, int, int]] = []

    def _enter(self, phase: str, trainer) -> None:
        self.phase, self.mark, self.mark_s = phase, trainer.steps, time.monotonic()
        self.log.append((phase, trainer.steps, trainer.group.size))

    def __call__(self, trainer) -> None:
        group, steps = trainer.group, trainer.steps
        since = steps - self.mark if time.monotonic() - self.mark_s >= self.SECONDS_BETWEEN else 0
        if self.phase == "start" and steps >= 5:
            self._enter("growing", trainer)
            trainer.resize(3, "test: grow")
        elif self.phase == "growing" and group.size == 3:
            self._enter("grown", trainer)
        elif self.phase == "grown" and since >= self.STEPS_BETWEEN:
            self._enter("shrinking", trainer)
            trainer.resize(2, "test: shrink")
        elif self.phase == "shrinking" and group.size == 2:
            self._enter("shrunk", trainer)
        elif self.phase == "shrunk" and since >= self.STEPS_BETWEEN:
            self._enter("killing", trainer)
            self.killed_pid = group.members[1].info["pid"]
            # Lands while the next step runs (steps take ~10-40 ms here).
            threading.Timer(0.005, os.kill, (self.killed_pid, signal.SIGKILL)).start()
        elif self.phase == "killing" and trainer.worker_failures >= 1:
            self._enter("recovering", trainer)
        elif self.phase == "recovering" and group.size == 2:
            self._enter("recovered", trainer)
        elif self.phase == "recovered" and since >= self.STEPS_BETWEEN:
            self._enter("done", trainer)
            trainer.request_stop()


def read_ledger(run_dir: Path) -> list[dict[str, Any]]:
    """Committed steps in order; a step redone after a restart replaces the lost one."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in (Path(run_dir) / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry
        for later in [s for s in by_step if s > entry["step"]]:
            del by_step[later]  # a resumed run redid these steps
    return [by_step[s] for s in sorted(by_step)]


def check_exactly_once(entries: list[dict[str, Any]], dataset_len: int, seed: int) -> dict[str, int]:
    """Asserts the consumed samples are exactly the sampler's global order, each once per epoch."""
    consumed: list[int] = []
    for e in entries:
        ranks = sorted(int(r) for r in e["consumed"])
        assert ranks == list(range(e["world_size"])), f"step {e['step']}: ranks {ranks}"
        for r in ranks:
            consumed.extend(e["consumed"][str(r)])
    sampler = ElasticSampler(dataset_len, seed)
    epochs = -(-len(consumed) // dataset_len)
    expected = [int(i) for ep in range(epochs) for i in sampler.permutation(ep)][: len(consumed)]
    assert consumed == expected, "consumed samples differ from the global order (lost or duplicated samples)"
    full_epochs = len(consumed) // dataset_len
    for ep in range(full_epochs):
        chunk = consumed[ep * dataset_len:(ep + 1) * dataset_len]
        assert sorted(chunk) == list(range(dataset_len)), f"epoch {ep} is not a permutation"
    return {"samples": len(consumed), "full_epochs": full_epochs}
