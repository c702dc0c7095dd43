"""The trainer's explicit states: allowed transitions are logged with their reason, others raise."""

from __future__ import annotations

import logging

import pytest

from elastic.trainer_state import ALLOWED, Phase, TrainerStateMachine, TransitionError


def test_a_run_through_every_working_state_is_logged(caplog):
    machine = TrainerStateMachine()
    with caplog.at_level(logging.INFO, logger="elastic"):
        for phase, reason in [(Phase.TRAINING, "1 worker"), (Phase.RESIZING, "grow 1 -> 4 (schedule)"),
                              (Phase.TRAINING, "grown"), (Phase.RECOVERING, "lost w2"), (Phase.TRAINING, "re-formed"),
                              (Phase.CHECKPOINTING, "step 100"), (Phase.TRAINING, "written"),
                              (Phase.STOPPING, "tau reached"), (Phase.CHECKPOINTING, "final"),
                              (Phase.STOPPING, "written"), (Phase.DONE, "500 steps")]:
            machine.enter(phase, reason)
    assert machine.phase is Phase.DONE
    assert [(t.source.value, t.target.value) for t in machine.history][:3] == [
        ("starting", "training"), ("training", "resizing"), ("resizing", "training")]
    assert "state training -> resizing: grow 1 -> 4 (schedule)" in caplog.text
    assert "state recovering -> training" not in caplog.text  # back to training is logged at debug only


def test_disallowed_transitions_raise_and_failure_is_final():
    machine = TrainerStateMachine()
    with pytest.raises(TransitionError, match="starting -> resizing"):
        machine.enter(Phase.RESIZING, "no group yet")
    machine.enter(Phase.TRAINING, "go")
    machine.enter(Phase.TRAINING, "again")  # staying is a no-op
    assert len(machine.history) == 1
    machine.fail("TrainerError: boom")
    machine.fail("twice")  # failing a failed run changes nothing
    assert machine.phase is Phase.FAILED and len(machine.history) == 2
    assert ALLOWED[Phase.DONE] == ALLOWED[Phase.FAILED] == frozenset()
