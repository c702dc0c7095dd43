"""The training process keeps the heap memory it frees, instead of handing it back to the kernel.

Each training step allocates and frees the same large blocks again and again: activations,
gradients, the collated batch. glibc's malloc gives such memory back to the kernel. Large blocks
are mapped and unmapped one by one, and the top of the heap is trimmed once it passes a threshold
that glibc adapts at run time. The next step then takes a page fault for each 4 KiB page it touches
again, and the kernel zeroes that page.

Whether a process falls into this depends on its allocation history, so two runs of the same code
can differ:
- A Ray actor running the decode-heavy ResNet of ``benchmarks/input_pipeline.py`` took 109,000 minor
  page faults per 40 steps. A spawned process running the same loop took 257.
- One process running the benchmark ResNet-18 took 36,700 faults per step.

:func:`retain_freed_memory` sets three glibc malloc options in this process. The setting is passed on
to DataLoader worker processes forked from it.
- ``M_MMAP_THRESHOLD``: blocks up to 32 MiB come from the heap and are not mapped one by one.
- ``M_TRIM_THRESHOLD``: the top of the heap is trimmed only past 1 GiB free.
- ``M_TOP_PAD``: the heap grows 64 MiB at a time.

The cost is that the process's resident memory stays at its peak, as with torch's CUDA caching
allocator. With these options the same ResNet-18 steps took 342 faults each. The job spec switch
is ``cluster.retain_heap`` (default on).

Nothing is changed where the user chose an allocator (``LD_PRELOAD`` of jemalloc or tcmalloc,
or any ``MALLOC_*`` tuning variable), or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

# glibc's <malloc.h> parameter numbers for mallopt().
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest accepted value on 64-bit (its dynamic ceiling)
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20

_SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
             (M_TOP_PAD, TOP_PAD_BYTES))


def user_chose_allocator(environ: dict[str, str] | os._Environ = os.environ) -> str | None:
    """Why the allocator is the user's to set (a preloaded malloc, glibc tuning variables), or None."""
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"LD_PRELOAD={preload}"
    tuned = sorted(k for k in environ if k.startswith("MALLOC_") or k.startswith("GLIBC_TUNABLES"))
    if tuned:
        return f"{tuned[0]} is set"
    return None


def retain_freed_memory() -> bool:
    """Set the malloc options above in this process; True when they were set (see the module doc)."""
    reason = user_chose_allocator()
    if reason is not None:
        logger.debug("heap left as configured: %s", reason)
        return False
    libc = _glibc()
    if libc is None:
        logger.debug("heap left as it is: the C library is not glibc")
        return False
    for param, value in _SETTINGS:
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            logger.debug("mallopt(%d, %d) was refused; heap left partly as it was", param, value)
            return False
    return True


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None
