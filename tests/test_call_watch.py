"""elastic/call_watch.py: how long the driver sleeps while a call runs (no Ray cluster needed)."""

from __future__ import annotations

import pytest

from elastic.call_watch import POLL_S, wait_timeout_s


def test_a_call_on_time_is_slept_through_until_heartbeats_are_due():
    assert wait_timeout_s(2.0, 0.5, busy=False) == pytest.approx(1.5)


@pytest.mark.parametrize("elapsed_s", [2.0, 1.99, 5.0])
def test_heartbeats_due_means_polling(elapsed_s):
    assert wait_timeout_s(2.0, elapsed_s, busy=False) == POLL_S


def test_a_known_fault_or_a_heartbeat_out_means_polling():
    assert wait_timeout_s(2.0, 0.1, busy=True) == POLL_S
