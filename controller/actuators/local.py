"""The embedded backend: a real multi-node Ray cluster on this machine (``ray.cluster_utils``).

Each worker slot is one Ray node with one ``elastic_worker`` resource (base.WORKER_RESOURCE, as on KubeRay worker pods), so adding capacity
starts a raylet and removing it kills one, exactly as a cloud node coming and going would.

``ray.cluster_utils`` installs signal handlers when it starts a node, which Python allows only on
the main thread; the controller runs in its own thread, so node changes are handed to the main
thread through :class:`MainThreadExecutor` (the trainer serves it while training runs elsewhere).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from controller.actuators.base import WORKER_RESOURCE, ActuationError

logger = logging.getLogger(__name__)

SLOT_RESOURCE = WORKER_RESOURCE  # the same mechanism as KubeRay worker pods (base.WORKER_RESOURCE)


def local_ray_environment(loopback: bool = True) -> None:
    """Environment every local Ray process needs here (ENVIRONMENT.md): no auth token, and for a
    cluster that lives on this machine alone, loopback addresses only."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Ray reads this once at import; a driver that imported ray already needs it set there too.
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Workers are CPU-bound torch processes on a small machine: one thread each unless told otherwise.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@contextlib.contextmanager
def preserved_file(path: Path) -> Iterator[None]:
    """Puts ``path`` back as it was (content, or absent) after the block.

    ``ray.cluster_utils.Cluster`` writes its address into Ray's ``ray_current_cluster`` file when it
    starts and deletes that file when it shuts down; that file is what ``ray.init(address="auto")``
    and ``elastic run`` with ``cluster.address: auto`` connect to. An embedded cluster that is private
    to one job must neither become another job's "auto" cluster nor erase the address of a cluster
    that someone started with ``ray start``.
    """
    path = Path(path)
    try:
        before: bytes | None = path.read_bytes()
    except OSError:
        before = None
    try:
        yield
    finally:
        try:
            if before is None:
                path.unlink(missing_ok=True)
            elif not path.exists() or path.read_bytes() != before:
                path.write_bytes(before)
        except OSError as exc:
            logger.warning("could not restore %s: %s", path, exc)


def ray_address_file() -> Path:
    """Ray's ``ray_current_cluster`` file for the default temp directory."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


@contextlib.contextmanager
def kept_signal_handlers(*signums: int) -> Iterator[None]:
    """Starting a Ray node in this process installs Ray's SIGTERM handler (kill the node's processes,
    exit 1); the trainer's own handler (stop at a step boundary, checkpoint) must stay in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in signums}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


class MainThreadExecutor:
    """Runs callables on the thread that created it, for APIs that must be called from there."""

    def __init__(self) -> None:
        self._owner = threading.get_ident()
        self._calls: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()

    def call(self, fn: Callable[[], Any], timeout_s: float = 300.0) -> Any:
        if threading.get_ident() == self._owner:
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        return future.result(timeout=timeout_s)

    def serve(self, until: threading.Event, poll_s: float = 0.05) -> None:
        """Run submitted calls on this thread until ``until`` is set."""
        while not until.is_set():
            self.run_pending(poll_s)
        self.run_pending(0.0)

    def run_pending(self, wait_s: float = 0.0) -> None:
        try:
            fn, future = self._calls.get(timeout=wait_s) if wait_s > 0 else self._calls.get_nowait()
        except queue.Empty:
            return
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)


class LocalRayCluster:
    """A head node plus one Ray node per worker slot, all on this machine.

    Args:
        num_cpus_per_worker: logical CPUs of each worker node (the worker actor reserves them).
        max_workers: the most worker nodes this cluster will start.
        temp_dir: Ray's session directory root (keep it short: socket paths have a length limit).
    """

    def __init__(self, num_cpus_per_worker: float = 1.0, max_workers: int = 4, temp_dir: str | None = None,
                 gpus_per_worker: int = 0, runtime_env: dict[str, Any] | None = None) -> None:
        self.num_cpus_per_worker = num_cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.max_workers = max_workers
        self.temp_dir = temp_dir
        self.runtime_env = runtime_env or None
        self.executor = MainThreadExecutor()
        self._cluster: Any = None
        self._nodes: dict[str, Any] = {}  # node id (hex) -> ray._private.node.Node
        self._lock = threading.Lock()
        self.capacity_limit = max_workers  # lowered by tests to simulate lost spot capacity

    @property
    def address(self) -> str:
        if self._cluster is None:
            raise ActuationError("local: the cluster is not started")
        return self._cluster.address

    def start(self, initial_workers: int) -> None:
        """Start the head and ``initial_workers`` worker nodes, and connect this driver (main thread)."""
        local_ray_environment()
        import ray
        from ray.cluster_utils import Cluster

        started = time.monotonic()
        head_args: dict[str, Any] = {"num_cpus": 0, "include_dashboard": False}
        if self.temp_dir:
            head_args["temp_dir"] = self.temp_dir
        with preserved_file(ray_address_file()), kept_signal_handlers(signal.SIGTERM, signal.SIGINT):
            self._cluster = Cluster(initialize_head=True, head_node_args=head_args)
            ray.init(address=self._cluster.address, logging_level="WARNING", log_to_driver=True,
                     runtime_env=self.runtime_env)
        for _ in range(initial_workers):
            self._add_node()
        logger.info("local Ray cluster up at %s with %d worker nodes in %.1f s",
                    self._cluster.address, initial_workers, time.monotonic() - started)

    def shutdown(self) -> None:
        import ray

        if self._cluster is None:
            return
        ray.shutdown()
        with preserved_file(ray_address_file()):
            self._cluster.shutdown()
        self._cluster = None
        self._nodes.clear()

    # ------------------------------------------------------------------ node management
    def node_ids(self) -> list[str]:
        with self._lock:
            return list(self._nodes)

    def add_nodes(self, count: int) -> None:
        for _ in range(count):
            self.executor.call(self._add_node)

    def remove_node(self, node_id: str, graceful: bool = True) -> bool:
        """Remove one worker node (kills whatever runs there). False if it is not ours."""
        with self._lock:
            node = self._nodes.pop(node_id, None)
        if node is None:
            return False
        self.executor.call(lambda: self._cluster.remove_node(node, allow_graceful=graceful))
        logger.info("local: removed node %s", node_id[:8])
        return True

    def _add_node(self) -> str:
        with kept_signal_handlers(signal.SIGTERM, signal.SIGINT):
            node = self._cluster.add_node(num_cpus=self.num_cpus_per_worker, num_gpus=self.gpus_per_worker,
                                          resources={SLOT_RESOURCE: 1})
        with self._lock:
            self._nodes[node.node_id] = node
        logger.info("local: added node %s (%d worker nodes)", node.node_id[:8], len(self._nodes))
        return node.node_id

    def worker_actor_options(self) -> dict[str, Any]:
        """Ray actor options that put one worker on one slot node."""
        return {"num_cpus": self.num_cpus_per_worker, "num_gpus": self.gpus_per_worker,
                "resources": {SLOT_RESOURCE: 1}}


class LocalActuator:
    """Actuator over a :class:`LocalRayCluster`; ``release`` names node ids."""

    name = "local"

    def __init__(self, cluster: LocalRayCluster) -> None:
        self.cluster = cluster

    def capacity_workers(self) -> int:
        return min(self.cluster.capacity_limit, self.cluster.max_workers)

    def scale_to(self, target_workers: int, release: Sequence[str] = ()) -> None:
        if target_workers > self.capacity_workers():
            raise ActuationError(f"local: {target_workers} workers exceed capacity {self.capacity_workers()}")
        for node_id in release:
            if len(self.cluster.node_ids()) <= target_workers:
                break
            self.cluster.remove_node(node_id)
        missing = target_workers - len(self.cluster.node_ids())
        if missing > 0:
            self.cluster.add_nodes(missing)
