"""Chaos on the embedded local Ray cluster: repeated SIGKILLs, a node removed mid-step, every worker
lost, a corrupt newest checkpoint, NaN gradients. Each checks the exactly-once ledger and tau."""

from __future__ import annotations

import json
import os
import random
import signal
import threading

import pytest

from elastic.trainer import TrainerError
from elastic_app.wiring import make_trainer
from tests.elastic_runs import check_exactly_once, digits_spec, read_ledger

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DIGITS_TRAIN_LEN = 1438


def _tau_is_sum_of_gains(entries, start: float = 0.0) -> None:
    tau = start
    for e in entries:
        tau += 0.0 if e["skipped"] else e["gain"]
        assert e["progress"] == pytest.approx(tau, rel=1e-9), f"tau drifted at step {e['step']}"


class KillAtSteps:
    """SIGKILL one non-zero rank shortly after the chosen steps begin (several times in one run)."""

    def __init__(self, steps: list[int], every_worker: bool = False) -> None:
        self.steps = sorted(steps)
        self.every_worker = every_worker
        self.killed: list[int] = []

    def __call__(self, trainer) -> None:
        # on_step runs after each step; with several steps per call, after the call. A worker
        # already shot is still listed until the next call finds it dead: wait for that.
        if any(m.info["pid"] in self.killed for m in trainer.group.members):
            return
        if self.steps and trainer.steps >= self.steps[0] and trainer.group.size >= 2:
            self.steps.pop(0)
            members = trainer.group.members if self.every_worker else [random.choice(trainer.group.members[1:])]
            for m in members:
                pid = m.info["pid"]
                self.killed.append(pid)
                threading.Timer(0.004, os.kill, (pid, signal.SIGKILL)).start()


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    spec = digits_spec(tmp_path_factory.mktemp("calm"), total_progress=3000, **{"workers.initial": 2})
    return make_trainer(spec, show_progress=False).run()


def test_repeated_worker_kills_lose_no_sample(tmp_path, undisturbed):
    random.seed(7)
    # Four workers, so that all three kills find a second worker without waiting for a regrow
    # (steps run back to back in calls of several, so a one-worker stretch passes quickly).
    spec = digits_spec(tmp_path, total_progress=3000, **{"workers.initial": 4, "workers.max": 4})
    chaos = KillAtSteps(sorted(random.sample(range(60, 900), 3)))
    summary = make_trainer(spec, ledger=True, on_step=chaos, show_progress=False).run()
    assert len(chaos.killed) == 3 and summary.worker_failures == 3
    assert summary.progress >= 3000 and not summary.stopped_early
    assert summary.extra["abandoned_steps"] <= summary.worker_failures  # <= 1 step of work per failure
    entries = read_ledger(tmp_path)
    assert [e["step"] for e in entries] == list(range(1, summary.steps + 1))
    check_exactly_once(entries, DIGITS_TRAIN_LEN, seed=0)
    _tau_is_sum_of_gains(entries)
    assert abs(summary.evaluation["accuracy"] - undisturbed.evaluation["accuracy"]) <= 0.01


def test_node_removed_mid_step(tmp_path):
    """The node under a worker disappears (its raylet and the worker die); capacity comes back."""
    spec = digits_spec(tmp_path, **{"workers.initial": 2, "workers.max": 2, "scaling.policy": "available"})
    state = {"removed": None, "back_at": None}

    def remove_a_node(trainer):
        if state["removed"] is None and trainer.steps >= 80:
            node_id = trainer.group.members[1].node_id
            state["removed"] = node_id
            cluster = trainer.backend.cluster
            threading.Timer(0.004, cluster.remove_node, (node_id, False)).start()
        elif state["removed"] and trainer.worker_failures and trainer.group.size == 2:
            # The controller re-added capacity and the replacement joined: run a while, then stop.
            state["back_at"] = state["back_at"] or trainer.steps
            if trainer.steps >= state["back_at"] + 100:
                trainer.request_stop()

    summary = make_trainer(spec, ledger=True, on_step=remove_a_node, show_progress=False).run()
    assert state["removed"] and summary.worker_failures == 1
    assert state["back_at"] and summary.stopped_early and summary.final_workers == 2
    entries = read_ledger(tmp_path)
    check_exactly_once(entries, DIGITS_TRAIN_LEN, seed=0)
    _tau_is_sum_of_gains(entries)
    assert summary.extra["abandoned_steps"] <= 1


def test_losing_every_worker_resumes_from_the_checkpoint(tmp_path):
    spec = digits_spec(tmp_path, total_progress=1500, **{"workers.initial": 2, "checkpoint.every_steps": 25})
    chaos = KillAtSteps([140], every_worker=True)
    summary = make_trainer(spec, ledger=True, on_step=chaos, show_progress=False).run()
    assert len(chaos.killed) == 2 and summary.progress >= 1500
    log = (tmp_path / "train.log").read_text()
    assert "lost every worker" in log and "resumed with" in log
    entries = read_ledger(tmp_path)  # steps after the checkpoint were redone; the ledger keeps the redo
    assert [e["step"] for e in entries] == list(range(1, summary.steps + 1))
    check_exactly_once(entries, DIGITS_TRAIN_LEN, seed=0)
    _tau_is_sum_of_gains(entries)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    spec = digits_spec(tmp_path, total_progress=400, **{"workers.initial": 1, "checkpoint.every_steps": 50,
                                                         "checkpoint.keep_last": 3})
    first = make_trainer(spec, show_progress=False).run()
    ckpts = sorted((tmp_path / "checkpoints").glob("ckpt-*.pt"))
    newest, previous = ckpts[-1], ckpts[-2]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    resumed_spec = digits_spec(tmp_path, total_progress=600, **{"workers.initial": 1, "checkpoint.every_steps": 50})
    second = make_trainer(resumed_spec, resume=True, show_progress=False).run()
    log = (tmp_path / "train.log").read_text()
    previous_step = int(previous.stem.split("-")[1])
    assert newest.name in log and f"resuming from checkpoint step {previous_step}" in log
    assert first.steps == int(newest.stem.split("-")[1])
    assert second.progress >= 600


def test_nan_gradients_skip_steps_on_every_rank(tmp_path):
    poison = [5, 700, 1300]
    spec = digits_spec(tmp_path, total_progress=800, task="tests.chaos_tasks:PoisonedDigitsTask",
                       task_args={"poison": poison}, **{"workers.initial": 2})
    summary = make_trainer(spec, ledger=True, show_progress=False).run()
    entries = read_ledger(tmp_path)
    poisoned_steps = [e for e in entries if set(poison) & {i for ids in e["consumed"].values() for i in ids}]
    skipped = [e for e in entries if e["skipped"]]
    assert poisoned_steps and [e["step"] for e in skipped] == [e["step"] for e in poisoned_steps]
    assert summary.skipped_steps == len(skipped)
    _tau_is_sum_of_gains(entries)  # skipped steps add nothing to tau
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["kind"] == "skip" and e["reason"] == "nonfinite"]) == len(skipped)
    check_exactly_once(entries, DIGITS_TRAIN_LEN, seed=0)


def test_too_many_nan_steps_stop_with_a_checkpoint(tmp_path):
    spec = digits_spec(tmp_path, total_progress=800, task="tests.chaos_tasks:PoisonedDigitsTask",
                       task_args={"poison_all": True},
                       **{"workers.initial": 1, "failure.max_consecutive_skipped_steps": 3})
    with pytest.raises(TrainerError, match="3 steps in a row had non-finite gradients"):
        make_trainer(spec, show_progress=False).run()
    assert sorted((tmp_path / "checkpoints").glob("ckpt-*.pt")), "no checkpoint was written at the stop"
