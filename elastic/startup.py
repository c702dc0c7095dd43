"""Starting a run's first workers: as many as the cluster has room for, waited for in short slices
(a stop request is heard at once), and checked against the job (the dataset holds a global batch)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from elastic.config import JobSpec
from elastic.errors import TrainerError

logger = logging.getLogger("elastic")

#: Seconds a first worker may take to start (process, imports, dataset) before the job gives up.
STARTUP_TIMEOUT_S = 300.0
#: ... and after this long without them, the user is told once.
STARTUP_NOTICE_S = 30.0


def startable_workers(spec: JobSpec, backend: Any) -> int:
    """``workers.initial``, or fewer when the cluster has room for fewer (said once); the backend
    raises its one-line error (the CLI exits 2) when there is no room for ``workers.min``."""
    capacity = backend.startable_workers(spec.workers.min, spec.workers.initial)
    if capacity < spec.workers.initial:
        logger.warning("starting %d worker(s), not workers.initial=%d: the cluster has room for %d",
                       capacity, spec.workers.initial, capacity)
    return capacity


def wait_ready_or_stop(group: Any, count: int, stop: threading.Event) -> list:
    """The first workers ready within ``STARTUP_TIMEOUT_S`` (fewer on a stop request)."""
    started = time.monotonic()
    deadline = started + STARTUP_TIMEOUT_S
    said = False
    ready = group.poll_ready()
    while len(ready) < count and time.monotonic() < deadline and not stop.is_set() and group.pending:
        ready = group.wait_ready(count, min(1.0, max(0.0, deadline - time.monotonic())))
        if not said and time.monotonic() - started > STARTUP_NOTICE_S:
            said = True
            logger.warning("%d of %d worker(s) not started after %.0f s (placed and importing the task); "
                           "waiting up to %.0f s: is the cluster's room taken by other jobs? Ctrl-C stops",
                           count - len(ready), count, STARTUP_NOTICE_S, STARTUP_TIMEOUT_S)
    return ready


def dataset_len_of(spec: JobSpec, ready: list, stopped: bool) -> int:
    """The dataset's length as the first ready worker reports it; raises when no worker started or
    the dataset is smaller than one global batch at ``workers.max``."""
    if not ready and stopped:
        raise TrainerError("stopped while the first workers were starting (the newest checkpoint, if any, stands)")
    if not ready:
        raise TrainerError(f"no worker started within {STARTUP_TIMEOUT_S:.0f} s; is there capacity on the cluster?")
    dataset_len = ready[0].info["dataset_len"]
    biggest = spec.global_batch_size(spec.workers.max)
    if dataset_len < biggest:
        raise TrainerError(f"dataset has {dataset_len} samples, smaller than one global batch of {biggest} "
                           f"at workers.max={spec.workers.max}")
    return dataset_len


def wait_after_all_lost(spec: JobSpec, group: Any, target_workers: int) -> list:
    """Every worker is gone: start the target's worth again (at least ``workers.min``) and wait up to
    ``failure.wait_for_workers_s`` (plus a start-up) for one of them."""
    wait_s = spec.failure.wait_for_workers_s
    logger.error("lost every worker; waiting up to %.0f s for capacity", wait_s)
    need = max(target_workers, spec.workers.min)
    if len(group.pending) < need:
        group.spawn(need - len(group.pending))
    ready = group.wait_ready(1, wait_s + STARTUP_TIMEOUT_S)
    if not ready:
        raise TrainerError(f"lost every worker and none came back within {wait_s:.0f} s; "
                           f"resume later with --resume from {spec.checkpoint.dir}")
    return ready
