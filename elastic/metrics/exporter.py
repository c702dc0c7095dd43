"""The /metrics HTTP endpoint of a registry."""

from __future__ import annotations

import errno
import socket
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from elastic.metrics.registry import MetricsError


class Exporter:
    """A running /metrics HTTP endpoint; ``close()`` stops it and frees the port."""

    def __init__(self, server: Any, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self.addr = addr
        self.port: int = server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_exporter(registry: CollectorRegistry, addr: str = "127.0.0.1", port: int = 0) -> Exporter:
    """Serves ``registry`` at http://addr:port/metrics in a daemon thread; port 0 picks a free port."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise MetricsError(f"metrics.port: must be an integer in 0..65535, got {port!r}")
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsError(f"metrics.port: {port} is already in use on {addr}") from exc
        if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
            raise MetricsError(f"metrics.addr: cannot bind {addr} (not an address of this machine)") from exc
        raise MetricsError(f"metrics: cannot serve on {addr}:{port}: {exc.strerror or exc}") from exc
    return Exporter(server, thread, addr)
