"""Process-group teardown that does not abort the interpreter at exit."""

from __future__ import annotations

import gc

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
