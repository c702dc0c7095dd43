"""Shared test setup: local Ray needs no auth token and loopback addresses (ENVIRONMENT.md)."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from tests.prometheus_util import prometheus_server  # noqa: E402,F401  (session fixture)
