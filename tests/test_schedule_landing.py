"""Scheduled resizes land where the schedule says: new workers are warmed ahead of the trigger, calls
stop at it, the resize happens within one step of it, and a step that never happened is reported."""

from __future__ import annotations

import pytest

from elastic_app.wiring import make_trainer
from tests.elastic_runs import digits_spec

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_schedule_resizes_within_one_step_of_each_trigger(tmp_path):
    # Digits at one worker runs hundreds of steps per second of tau: without announcing ahead and
    # stopping calls at the triggers, the grow came thousands of tau late (issue 21).
    spec = digits_spec(tmp_path, **{
        "total_progress": 900, "workers": {"min": 1, "max": 2, "initial": 1},
        "scaling": {"policy": "schedule", "interval_s": 0.5,
                    "steps": [{"at_progress": 250, "workers": 2}, {"at_progress": 500, "workers": 1},
                              {"at_time_s": 3600, "workers": 2}]},
        "checkpoint": {"every_steps": 1000, "keep_last": 1},
    })
    summary = make_trainer(spec, show_progress=False).run()
    planned = [(r.direction, r.from_workers, r.to_workers, r.progress) for r in summary.resizes if r.cause == "schedule"]
    assert [p[:3] for p in planned] == [("grow", 1, 2), ("shrink", 2, 1)], summary.resizes
    # One step advances tau by at most S (1 before the grow, 2 before the shrink).
    grow_tau, shrink_tau = planned[0][3], planned[1][3]
    assert 250 <= grow_tau < 251, grow_tau
    assert 500 <= shrink_tau < 502, shrink_tau
    # The third step (an hour in) never comes: reported, not silent.
    missed = summary.extra["missed_schedule_steps"]
    assert [(m["step"], m["reason"]) for m in missed] == [(3, "the job finished first")]
    assert summary.progress >= 900
