#!/usr/bin/env bash
# Fresh clone -> the whole test suite: sets up .venv with the test extras, installs the Prometheus
# server (Debian package) for the integration tests, then runs every test (unit, Ray, Prometheus, Kubernetes API).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/install_prometheus.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
