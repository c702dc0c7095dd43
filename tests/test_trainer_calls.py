"""How many steps the trainer hands the workers per call (workers.steps_per_call); no Ray needed."""

from __future__ import annotations

import pytest

from elastic.call_plan import StepTimes
from elastic.config import parse_job_spec
from elastic.trainer import CALL_TARGET_S, MAX_AUTO_STEPS_PER_CALL, ElasticTrainer
from elastic_app.wiring import make_trainer


def trainer(tmp_path, steps_per_call="auto", every_steps=1000, total=30000.0, accumulation=1) -> ElasticTrainer:
    spec = parse_job_spec({
        "name": "calls", "task": "examples.digits:DigitsTask", "batch_size_per_worker": 8,
        "accumulation_steps": accumulation, "total_progress": total, "optimizer": {"name": "sgd", "lr": 0.1},
        "workers": {"min": 1, "max": 4, "steps_per_call": steps_per_call},
        "checkpoint": {"every_steps": every_steps}, "run_dir": str(tmp_path),
    })
    return make_trainer(spec, show_progress=False)


def timed(t: ElasticTrainer, world: int, step_s: float, count: int = 5) -> None:
    t._run._step_times = StepTimes()
    for _ in range(count):
        t._run._step_times.record(world, step_s)


def test_auto_starts_with_one_step_then_fills_the_call_target(tmp_path):
    t = trainer(tmp_path)
    assert t._steps_per_call(2) == 1  # nothing timed at this size yet
    timed(t, 2, 0.01)
    assert t._steps_per_call(2) == int(CALL_TARGET_S / 0.01)
    assert t._steps_per_call(3) == 1  # a new size is timed afresh
    timed(t, 2, 0.0001)
    assert t._steps_per_call(2) == MAX_AUTO_STEPS_PER_CALL
    timed(t, 2, 5.0)
    assert t._steps_per_call(2) == 1  # long steps: one per call


def test_fixed_setting_and_bounds(tmp_path):
    t = trainer(tmp_path, steps_per_call=16, every_steps=50, total=3000.0)
    assert t._steps_per_call(2) == 16
    t._run.steps = 45
    assert t._steps_per_call(2) == 5  # the call ends on the checkpoint step
    t._run.steps = 50
    assert t._steps_per_call(2) == 16
    # tau cannot pass the total: a step adds at most S = world * accumulation_steps
    t._run.progress = 3000.0 - 20.0
    assert t._steps_per_call(2) == 10
    assert t._steps_per_call(4) == 5
    t._run.progress = 3000.0 - 3.0
    assert t._steps_per_call(4) == 1  # never zero


def test_accumulation_counts_in_the_tau_bound(tmp_path):
    t = trainer(tmp_path, steps_per_call=64, accumulation=4, total=3000.0)
    t._run.progress = 3000.0 - 64.0
    assert t._steps_per_call(2) == 8


@pytest.mark.parametrize("value", [0, -1, "fast", 1.5, True])
def test_steps_per_call_rejects_bad_values(tmp_path, value):
    from elastic.config import ConfigError

    with pytest.raises(ConfigError, match="steps_per_call: must be 'auto' or an int >= 1"):
        trainer(tmp_path, steps_per_call=value)


def test_first_ctrl_c_asks_for_a_stop_and_the_second_interrupts():
    """Attached to an existing cluster the driver trains in the main thread: the first SIGINT must
    not break into a call of several steps (whose updates would not all be recorded)."""
    import os
    import signal
    import threading
    import time

    from elastic.main_thread import first_interrupt_stops

    stop = threading.Event()
    before = signal.getsignal(signal.SIGINT)
    with first_interrupt_stops(stop):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
