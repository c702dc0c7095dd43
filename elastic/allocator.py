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

:func:`retain_freed_memory` sets three glibc malloc options in this process:
- ``M_MMAP_THRESHOLD``: blocks up to 32 MiB come from the heap and are not mapped one by one.
- ``M_TRIM_THRESHOLD``: the top of the heap is trimmed only past 1 GiB free.
- ``M_TOP_PAD``: the heap grows 64 MiB at a time.

The worker sets them before its DataLoader starts its worker processes. Forked loader processes
inherit them; with ``data.multiprocessing_context`` spawn or forkserver they start without them.
The cost is that each such process's resident memory stays at its own peak, as with torch's CUDA
caching allocator; a loader's peak is a few batches. With these options the same ResNet-18 steps
took 342 faults each. The job spec switch is ``cluster.retain_heap`` (default on).

Nothing is changed where the user chose an allocator (``LD_PRELOAD`` of jemalloc, tcmalloc or
mimalloc, ``MALLOC_*`` variables, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``), or where the C library
is not glibc.
"""

from __future__ import annotations

import ctypes
import os

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
    tuned = sorted(k for k in environ if k.startswith("MALLOC_"))
    if tuned:
        return f"{tuned[0]} is set"
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc options"
    return None


def retain_freed_memory() -> str | None:
    """Set the malloc options above in this process: None when they were set, else why not."""
    reason = user_chose_allocator()
    if reason is not None:
        return reason
    libc = _glibc()
    if libc is None:
        return "the C library is not glibc"
    for param, value in _SETTINGS:
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            return f"glibc refused mallopt({param}, {value})"
    return None


def _glibc() -> ctypes.CDLL | None:
    """The process's own symbols (the ``mallopt`` its malloc obeys), when that malloc is glibc's."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # only glibc has it
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None
