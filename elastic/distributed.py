"""Process-group teardown that does not abort the interpreter at exit."""

from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def destroy_process_group() -> None:
    """``dist.destroy_process_group()``, after collecting garbage.

    A DDP model kept alive past its process group by a reference cycle (DDP's own, or a comm hook
    bound to an optimizer) is destroyed during interpreter finalization instead, and with torch
    2.13 and gloo that aborted the process ("terminate called without an active exception",
    SIGABRT) in about one run in three of a spawned 2-rank DDP loop, plain DDP included. Callers
    drop their own references first (return from the function that built the model); the cycles
    go here, while the group still exists."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_spawned_rank() -> NoReturn:
    """End a rank started by ``torch.multiprocessing.spawn`` now, with exit code 0, skipping
    interpreter finalization. Call it after :func:`destroy_process_group`, once the rank's results
    are written (a file, not a multiprocessing queue, whose feeder thread this would cut off).

    ``destroy_process_group`` makes the exit abort above rare, not impossible: with no DDP model or
    optimizer left after its ``gc.collect()`` (checked with ``gc.get_objects()``), a spawned gloo
    rank of the tests still died at exit with SIGABRT twice in two sessions' test runs, and
    ``mp.spawn`` reports that as a failed rank. ``spawn``
    children otherwise end with ``sys.exit``, which runs finalization. Stdout and stderr are
    flushed first. Reached only on success: an exception still goes to ``mp.spawn``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
