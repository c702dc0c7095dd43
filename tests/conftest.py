"""Shared test setup: local Ray needs no auth token and loopback addresses (ENVIRONMENT.md)."""

import os
import sys

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from tests.prometheus_util import prometheus_server  # noqa: E402,F401  (session fixture)


def pytest_sessionfinish(session, exitstatus):
    session.config._elastic_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process without interpreter finalization, with pytest's own exit status.

    After every test has passed and the summary is printed, torch 2.13 can still crash while the
    interpreter tears down (SIGSEGV / SIGABRT from gloo or DataLoader state; see
    ``elastic.distributed.exit_spawned_rank``, the same remedy for spawned ranks), which turned a
    586-passed run into exit code 139. Nothing is left to run or report at this point."""
    status = getattr(config, "_elastic_exitstatus", None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
