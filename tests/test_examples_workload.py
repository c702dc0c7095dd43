"""The two realistic examples, reduced, run elastic 1 -> 2 -> 1 on a local Ray cluster."""

from __future__ import annotations

import math

import pytest

from elastic.config import load_job_spec
from elastic_app.wiring import make_trainer
from tests.elastic_runs import ROOT, check_exactly_once, read_ledger

pytestmark = [pytest.mark.ray, pytest.mark.slow]

class OneTwoOne:
    """on_step driver: grow to 2 workers at once, shrink back after ``steps`` steps at 2, stop after
    ``steps`` more (a reduced run is too short for the YAML's tau schedule to outwait a worker start)."""

    def __init__(self, steps: int) -> None:
        self.steps, self.phase, self.mark = steps, "start", 0

    def __call__(self, trainer) -> None:
        size, step = trainer.group.size, trainer.steps
        if self.phase == "start":
            self.phase = "growing"
            trainer.resize(2, "test: grow")
        elif self.phase == "growing" and size == 2:
            self.phase, self.mark = "grown", step
        elif self.phase == "grown" and step - self.mark >= self.steps:
            self.phase = "shrinking"
            trainer.resize(1, "test: shrink")
        elif self.phase == "shrinking" and size == 1:
            self.phase, self.mark = "shrunk", step
        elif self.phase == "shrunk" and step - self.mark >= self.steps:
            self.phase = "done"
            trainer.request_stop()


def run_reduced(tmp_path, yaml_name: str, steps_per_phase: int, **overrides):
    spec = load_job_spec(ROOT / "examples" / yaml_name, {
        "run_dir": str(tmp_path / "run"), "metrics": {"enabled": False, "log": True},
        "scaling": {"policy": "fixed", "steps": []}, "total_progress": 100000,
        "checkpoint": {"every_steps": 1000}, **overrides})
    driver = OneTwoOne(steps_per_phase)
    summary = make_trainer(spec, ledger=True, on_step=driver, show_progress=False).run()
    assert driver.phase == "done", driver.phase
    kinds = [(r.direction, r.from_workers, r.to_workers) for r in summary.resizes]
    assert ("grow", 1, 2) in kinds and ("shrink", 2, 1) in kinds, kinds
    evaluations = summary.extra["evaluations"]
    assert len(evaluations) >= 3, evaluations  # during training, and once at the end
    entries = read_ledger(tmp_path / "run")
    assert all(e["verified_ranks"] == len(e["consumed"]) for e in entries)
    return summary, entries


def test_jpeg_digits_example_reduced(tmp_path):
    from examples.jpeg_digits import JpegDigitsTask

    summary, entries = run_reduced(tmp_path, "jpeg_digits.yaml", 30, evaluation={"every_progress": 20},
                                   lr_schedule={"kind": "constant", "warmup_fraction": 0.0},
                                   task_args={"width": 8, "lr": 0.004, "eval_limit": 200})
    check_exactly_once(entries, len(JpegDigitsTask(eval_limit=1).train), seed=0)
    assert summary.extra["loader_workers"] == 1
    assert summary.evaluation["accuracy"] > 0.3  # ten classes: chance is 0.1
    assert any("train_accuracy" in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_charlm_example_reduced(tmp_path):
    summary, _ = run_reduced(tmp_path, "charlm.yaml", 30, evaluation={"every_progress": 20},
                             task_args={"block": 32, "dim": 64, "layers": 2, "heads": 2, "lr": 0.003,
                                        "max_bytes": 300_000, "val_chunks": 32, "warmup_fraction": 0.0})
    first, last = summary.extra["evaluations"][0], summary.evaluation
    assert last["val_loss"] < first["val_loss"] < math.log(256) + 0.5
    assert last["val_perplexity"] == pytest.approx(math.exp(last["val_loss"]))
    assert last["val_bits_per_byte"] < 6.0  # uniform bytes: 8 bits
