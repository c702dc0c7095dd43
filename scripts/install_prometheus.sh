#!/usr/bin/env bash
# Installs the Prometheus server and promtool from the distribution packages (Debian 12: 2.42).
# Idempotent: does nothing when `prometheus` and `promtool` are already on PATH.
# The packaged service is not started; tests run their own server on 127.0.0.1.
# Usage: bash scripts/install_prometheus.sh   (needs root, or sudo on PATH)
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  prometheus --version 2>&1 | head -n 1
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install_prometheus.sh: must run as root (or with sudo available) to apt-get install prometheus" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# --no-install-recommends keeps the node exporter and its service out; the package still ships promtool.
$SUDO apt-get install -y -q --no-install-recommends prometheus

# The Debian package starts a service on systems with init; we want no server listening on :9090.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl stop prometheus || true
fi

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
