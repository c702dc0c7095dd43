"""What the driver's main thread does during a run: it hears SIGINT / SIGTERM (a stop at the next
step boundary; a second one aborts), and serves the backend where the backend needs it (the local
cluster adds and removes nodes on the main thread) while training runs beside it."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator, TypeVar

logger = logging.getLogger("elastic")

T = TypeVar("T")

#: Signals that stop a run at the next step boundary (SIGTERM: what Kubernetes sends a pod).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def first_interrupt_stops(stop: threading.Event, on_signal: Callable[[int], None] | None = None) -> Iterator[None]:
    """In the main thread: the first SIGINT or SIGTERM asks for a stop at the next call boundary
    (checkpoint, summary) instead of breaking into a call; a second one interrupts at once
    (KeyboardInterrupt). The handlers are installed even where SIGINT is ignored, as in a driver
    started in the background by a non-interactive shell (``elastic run job.yaml &``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        if on_signal is not None:
            on_signal(signum)
        logger.warning("%s: stopping at the next step boundary with a checkpoint (again to abort)",
                       signal.Signals(signum).name)
        stop.set()

    previous = {signum: signal.signal(signum, on_interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def train_beside_backend(backend: Any, train: Callable[[], T]) -> T:
    """``train()`` here, or, where ``backend.needs_main_thread``, in a thread of its own while this
    (main) thread runs ``backend.serve(done)``; what it raised is raised here."""
    if not backend.needs_main_thread:
        return train()
    result: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            result["value"] = train()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            result["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=run, name="elastic-train", daemon=True)  # an abort (second signal) must not wait for it
    thread.start()
    backend.serve(done)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
