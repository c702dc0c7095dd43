#!/usr/bin/env bash
# Creates .venv with the pinned dependencies (idempotent). Usage: bash scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)${1:-}
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  extra=""
  [ "${1:-}" = "--test" ] && extra="[test]"
  .venv/bin/python -m pip install -q -e ".${extra}"
  touch "$stamp"
fi
