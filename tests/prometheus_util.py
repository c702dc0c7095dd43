"""A real Prometheus server for tests, and helpers to pull PromQL out of the dashboard and the rules.

    from tests.prometheus_util import prometheus_server   # in a conftest.py: re-exports the fixture

``prometheus_server`` (session scope) starts ``prometheus`` on 127.0.0.1 (free port, temp config and
storage, 1 s scrape and rule-evaluation interval, ``honor_labels: true``, ``dashboards/rules.yaml``
loaded). Targets are added at any time with ``server.set_targets(["127.0.0.1:PORT"])`` (file-based
discovery, picked up within about a second), then ``server.wait_for_targets(...)`` and
``server.query(expr)``. Tests skip when the binary is missing: ``bash scripts/install_prometheus.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES_PATH = REPO / "dashboards" / "rules.yaml"
DASHBOARD_PATH = REPO / "dashboards" / "elastic-job.json"
INSTALL_HINT = "install it with: bash scripts/install_prometheus.sh"


class PrometheusError(RuntimeError):
    """The test server did not start, a target did not come up, or a query failed."""


def find_binary(name: str = "prometheus") -> str | None:
    """``$PROMETHEUS_BIN`` / ``$PROMTOOL_BIN`` if set, else the binary on PATH."""
    override = os.environ.get(f"{name.upper()}_BIN")
    return override if override else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """One prometheus process on 127.0.0.1 with its own config and storage under ``workdir``."""

    def __init__(self, workdir: Path, *, binary: str | None = None, scrape_interval_s: float = 1.0,
                 rule_files: tuple[Path, ...] = (RULES_PATH,)) -> None:
        self.binary = binary or find_binary("prometheus")
        if self.binary is None:
            raise PrometheusError(f"prometheus binary not found; {INSTALL_HINT}")
        self.workdir = Path(workdir)
        self.scrape_interval_s = scrape_interval_s
        self.rule_files = tuple(Path(p).resolve() for p in rule_files)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._targets_path = self.workdir / "targets.json"
        self._log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [{
                "job_name": "elastic",
                # Keep the exporter's labels as they are (job_name, and any job label) instead of
                # renaming clashes to exported_*.
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(self._targets_path)], "refresh_interval": interval}],
            }],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.set_targets([])
        config = self._write_config()
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = _free_port()
            log = self._log_path.open("ab")
            self._process = subprocess.Popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
            log.close()
            if self._wait_ready(timeout_s):
                return
            self.stop()
        raise PrometheusError(f"prometheus did not become ready; log tail:\n{self.log_tail()}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        return False

    def log_tail(self, lines: int = 30) -> str:
        if not self._log_path.exists():
            return "(no log)"
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = None

    # -- targets ---------------------------------------------------------------------------

    def set_targets(self, targets: list[str], labels: dict[str, str] | None = None) -> None:
        """Replaces the scraped targets ("host:port"); written atomically for file discovery."""
        groups = [{"targets": list(targets), "labels": dict(labels or {})}] if targets else []
        tmp = self._targets_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self._targets_path)

    def wait_for_targets(self, targets: list[str], timeout_s: float = 20.0) -> None:
        """Waits until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            data = self._get("/api/v1/targets", {"state": "active"})
            health = {t["discoveredLabels"].get("__address__", ""): t["health"] for t in data["activeTargets"]}
            if all(health.get(t) == "up" for t in targets):
                return
            time.sleep(0.2)
        raise PrometheusError(f"targets not up after {timeout_s:.0f} s: {targets}; seen: {health}")

    # -- queries ---------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry a JSON error body
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time_s: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the result list (empty when nothing matched). Bad PromQL raises."""
        params = {"query": expr}
        if time_s is not None:
            params["time"] = f"{time_s:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for_query(self, expr: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """Polls until ``expr`` returns something; returns that result (or [] at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.25)


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    if find_binary("prometheus") is None:
        pytest.skip(f"prometheus binary not on PATH; {INSTALL_HINT}")
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -------------------------------------------------------------------------------------------------
# PromQL extraction from the generated dashboard and rules
# -------------------------------------------------------------------------------------------------

def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every annotation of the dashboard JSON."""
    found = []
    for panel in dashboard.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []) or []:
                if target.get("expr"):
                    found.append((f"panel {inner.get('title')!r} ref {target.get('refId')}", target["expr"]))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            found.append((f"annotation {annotation.get('name')!r}", annotation["expr"]))
    return found


def rule_expressions(rules: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(name, expr, is_alert) for every rule of a Prometheus rules document."""
    found = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                found.append((rule["alert"], rule["expr"], True))
            else:
                found.append((rule["record"], rule["expr"], False))
    return found


def substitute(expr: str, *, job_name: str, interval: str = "1m", total_progress: float = 3000) -> str:
    """Replaces the Grafana variables with values Prometheus accepts."""
    values = {"job_name": job_name, "__rate_interval": interval, "__interval": interval,
              "__range": interval, "total_progress": f"{total_progress:g}"}
    for name in sorted(values, key=len, reverse=True):  # $__rate_interval before $__range etc.
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    if "$" in expr:
        raise ValueError(f"unsubstituted variable in {expr!r}")
    return expr


_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def signal_expr(expr: str) -> str:
    """The alert expression with every comparison turned into ``op bool``.

    An alert's expression is empty unless it fires; with ``bool`` it returns 0 or 1 for every series the
    comparison sees, so "empty" then means "the metrics it reads are missing", which is what a test of
    the wiring wants to know. Label matchers (inside braces) and strings are left alone.
    """
    out: list[str] = []
    i, depth, quote = 0, 0, ""
    while i < len(expr):
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(expr):
                out.append(expr[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif depth == 0:
            op = next((c for c in _COMPARISONS if expr.startswith(c, i)), None)
            if op is not None:
                rest = expr[i + len(op):]
                out.append(op)
                i += len(op)
                if not rest.lstrip().startswith("bool"):
                    out.append(" bool")
                continue
        out.append(ch)
        i += 1
    return "".join(out)
