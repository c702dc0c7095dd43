#!/usr/bin/env bash
# Fresh clone -> the main job: sets up .venv (pinned), then runs the elastic quickstart on an embedded
# local multi-node Ray cluster (1 -> 4 -> 2 workers, resized in place) and draws its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/elastic run examples/quickstart.yaml "$@"
.venv/bin/elastic report runs/digits-quickstart
