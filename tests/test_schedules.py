"""Schedules are functions of tau with the documented shapes."""

import math

import pytest

from elastic.schedules import Constant, Cosine, Exponential, LinearWarmup, ScheduleError, Step, make_schedule


def test_step_schedule_milestones_are_fractions_of_total():
    s = Step(total_progress=1000, milestones=(0.5, 0.75), gamma=0.1)
    assert s(0) == 1.0 and s(499) == 1.0
    assert s(500) == pytest.approx(0.1) and s(749) == pytest.approx(0.1)
    assert s(750) == pytest.approx(0.01)


def test_cosine_and_exponential_end_points():
    c = Cosine(total_progress=100)
    assert c(0) == 1.0 and c(100) == pytest.approx(0.0) and c(50) == pytest.approx(0.5)
    e = Exponential(total_progress=100, final_factor=0.01)
    assert e(0) == 1.0 and e(100) == pytest.approx(0.01) and e(50) == pytest.approx(0.1)


def test_warmup_ramps_then_follows_inner():
    w = LinearWarmup(warmup=10, inner=Constant())
    assert w(0) == pytest.approx(0.1) and w(4) == pytest.approx(0.5) and w(9) == 1.0 and w(50) == 1.0


def test_make_schedule_builds_each_kind_and_rejects_bad_values():
    assert make_schedule("constant", 10)(5) == 1.0
    assert make_schedule("step", 10, milestones=[0.5], gamma=0.5)(6) == 0.5
    assert math.isclose(make_schedule("cosine", 10)(10), 0.0, abs_tol=1e-12)
    assert make_schedule("exponential", 10, gamma=0.5)(10) == pytest.approx(0.5)
    assert make_schedule("constant", 100, warmup_fraction=0.1)(0) == pytest.approx(0.1)
    with pytest.raises(ScheduleError, match="kind"):
        make_schedule("linear", 10)
    with pytest.raises(ScheduleError, match="increasing"):
        Step(total_progress=10, milestones=(0.7, 0.5))
    with pytest.raises(ScheduleError, match="total_progress"):
        Step(total_progress=0)
