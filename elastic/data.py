"""The worker's input pipeline: its shard of the sampler's plan, fed through a torch DataLoader.

The driver hands each rank the sample keys ``(epoch, index)`` of the steps it must run, plus a
short *lookahead*: the keys of the steps that will follow if nothing changes. Every key goes into
:class:`PlanFeed`, the DataLoader's batch sampler, so the loader's worker processes decode and
augment the next micro-batches while the current one trains (``num_workers``, ``prefetch_factor``,
``pin_memory``, ``persistent_workers`` come from the job spec's ``data:`` section).

Exactly-once: the loader only ever loads what the driver planned, and every batch carries the keys
it was built from. :meth:`InputPipeline.next_batch` takes the keys the step wants; if the batch at
the head of the pipeline was built from other keys (a resize or a failure re-planned the steps that
were prefetched), every prefetched batch is discarded and loading restarts from the wanted keys.
Nothing is counted here: the driver's sampler commits a step only after every rank applied it.

Randomness: each sample is loaded under seeds derived from ``(seed, epoch, index)``
(:func:`sample_seed`), whichever rank, loader worker or world size loads it. So augmentations differ
between samples, ranks and epochs, and a run repeated with the same seed draws the same numbers for
the same sample, across resizes and restarts; nothing of the loader's random state needs a checkpoint.
"""

from __future__ import annotations

import collections
import functools
import os
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info

__all__ = [
    "InputPipeline",
    "LoaderSettings",
    "PipelineError",
    "PlanFeed",
    "SampleKey",
    "SeededDataset",
    "derive_seed",
    "keys_checksum",
    "resolve_num_workers",
    "sample_seed",
    "seed_everything",
]

SampleKey = tuple[int, int]
"""``(epoch, index)``: one sample of one epoch of the global order."""

#: Upper bound of ``data.num_workers: auto``.
AUTO_MAX_LOADER_WORKERS = 4


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from ``parts`` (ints or short tags) with numpy's SeedSequence.

    Distinct part tuples give statistically independent streams; the same tuple always gives the
    same seed, on every machine and in every process."""
    words = [p % 2**64 if isinstance(p, int) else zlib.crc32(p.encode()) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


_MASK64 = 2**64 - 1


@functools.lru_cache(maxsize=64)
def _epoch_seed(seed: int, epoch: int) -> int:
    return derive_seed(seed, "sample", epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed under which sample ``index`` of epoch ``epoch`` is loaded (and augmented).

    It is called once per sample in the loader processes, so it is cheaper than :func:`derive_seed`
    (~1 us against ~12 us): the epoch's seed comes from :func:`derive_seed` once, and the index is
    mixed in by the SplitMix64 finaliser (a well-mixed 64-bit bijection, of which the top 63 bits
    are kept, as :func:`derive_seed` keeps them)."""
    z = (_epoch_seed(seed, epoch) + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def seed_everything(seed: int, python: bool = True, numpy: bool = True) -> None:
    """Seed torch (CPU, and CUDA once initialised), and Python's ``random`` and numpy's legacy global
    generator unless ``python`` / ``numpy`` say not to.

    Called per sample: ``torch.manual_seed`` costs ~0.2 ms (it visits every accelerator backend),
    seeding the default generator directly ~2 us; ``random`` and numpy take ~6 us each in a loader process."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed)
    if python:
        random.seed(seed)
    if numpy:
        np.random.seed(seed % 2**32)


def keys_checksum(keys: Iterable[Sequence[int]]) -> int:
    """CRC32 of a sequence of ``(epoch, index)`` keys, in order (the driver checks what was loaded)."""
    flat = np.asarray([k for key in keys for k in key], dtype=np.int64)
    return zlib.crc32(flat.tobytes())


def resolve_num_workers(setting: int | str, cpus_per_worker: float) -> int:
    """``data.num_workers``: an int as given; ``auto`` = the worker's CPUs less the one that trains,
    at least 1 and at most :data:`AUTO_MAX_LOADER_WORKERS`, and 0 on a one-core machine."""
    if setting != "auto":
        return int(setting)
    if (os.cpu_count() or 1) < 2:
        return 0
    return max(1, min(AUTO_MAX_LOADER_WORKERS, int(cpus_per_worker) - 1))


class SeededDataset(Dataset):
    """Wraps the task's map-style dataset: item ``(epoch, index)`` is ``(key, dataset[index])``,
    loaded under :func:`sample_seed`. The DataLoader asks for whole micro-batches (``__getitems__``).

    In the training process itself (``num_workers=0``) every generator is seeded per sample and the
    global random states are restored after the batch, so that the step's own draws (dropout) are
    not disturbed. In a loader process torch is seeded per sample, and Python's ``random`` and numpy's
    global generator once ``__getitem__`` is seen drawing from them: until then the state of each is
    compared before and after every batch, and a batch that moved one is loaded again with it seeded
    (it is then seeded for every sample). Every draw is still the one of its sample's seed; a dataset
    that draws from torch alone (torchvision's transforms) skips ~12 us of seeding per sample, and a
    dataset that does draw from them loads one batch twice per loader process."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self._seeds_python = False  # this loader process saw __getitem__ draw from Python's random
        self._seeds_numpy = False   # ... from numpy's global generator

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> tuple[SampleKey, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[SampleKey]) -> list[tuple[SampleKey, Any]]:
        if get_worker_info() is None:
            saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
            try:
                return self._load(keys, python=True, numpy=True)
            finally:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])
        # Only the generators not yet seeded are watched (once both are, nothing is compared).
        python_before = None if self._seeds_python else random.getstate()
        numpy_before = None if self._seeds_numpy else _numpy_mark()
        items = self._load(keys, self._seeds_python, self._seeds_numpy)
        python_drew = python_before is not None and random.getstate() != python_before
        numpy_drew = numpy_before is not None and _numpy_mark() != numpy_before
        if python_drew or numpy_drew:
            self._seeds_python |= python_drew
            self._seeds_numpy |= numpy_drew
            items = self._load(keys, self._seeds_python, self._seeds_numpy)
        return items

    def _load(self, keys: Sequence[SampleKey], python: bool, numpy: bool) -> list[tuple[SampleKey, Any]]:
        items = []
        for epoch, index in keys:
            seed_everything(sample_seed(self.seed, epoch, index), python, numpy)
            items.append(((epoch, index), self.dataset[index]))
        return items


def _numpy_mark() -> tuple[Any, ...]:
    """Numpy's legacy global generator state, comparable: any draw changes it."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return key.tobytes(), pos, has_gauss, gauss


class PlanFeed:
    """The DataLoader's batch sampler: a queue of micro-batches (lists of keys) the worker appends to.

    The loader pulls from it as it has room (``prefetch_factor`` batches per loader worker); an empty
    feed just stops the pulling until the next call of the driver refills it."""

    def __init__(self) -> None:
        self._queue: collections.deque[list[SampleKey]] = collections.deque()

    def extend(self, batches: Iterable[list[SampleKey]]) -> None:
        self._queue.extend(batches)

    def clear(self) -> None:
        self._queue.clear()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> PlanFeed:
        return self

    def __next__(self) -> list[SampleKey]:
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()


class _KeyedCollate:
    """Splits the keys off the samples, collates the samples (picklable for spawned loader workers)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[SampleKey, Any]]) -> tuple[list[SampleKey], Any]:
        return [k for k, _ in items], self.collate([s for _, s in items])


class _SeedLoaderWorker:
    """worker_init_fn: a loader worker's own draws outside ``__getitem__`` (e.g. in a collate_fn)
    come from (seed, loader worker id); draws inside it are re-seeded per sample anyway."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, worker_id: int) -> None:
        seed_everything(derive_seed(self.seed, "loader-worker", worker_id))


@dataclass(frozen=True)
class LoaderSettings:
    """The resolved ``data:`` section of one worker."""

    num_workers: int = 0
    prefetch_factor: int = 2
    pin_memory: bool = False
    persistent_workers: bool = True
    multiprocessing_context: str | None = None

    @property
    def prefetch_batches(self) -> int:
        """Micro-batches the loader keeps in flight: ``prefetch_factor`` per loader worker (0 without)."""
        return self.prefetch_factor * self.num_workers


class PipelineError(RuntimeError):
    """The loader returned a batch of other samples than the step wanted (a bug, never silent)."""


class InputPipeline:
    """One worker's DataLoader over its shard of the plan; see the module docstring."""

    def __init__(self, dataset: Any, seed: int, settings: LoaderSettings,
                 collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.settings = settings
        self.feed = PlanFeed()
        workers = settings.num_workers
        self.loader = DataLoader(
            SeededDataset(dataset, seed),
            batch_sampler=self.feed,
            num_workers=workers,
            collate_fn=_KeyedCollate(collate_fn or default_collate),
            pin_memory=settings.pin_memory,
            prefetch_factor=settings.prefetch_factor if workers > 0 else None,
            persistent_workers=settings.persistent_workers and workers > 0,
            worker_init_fn=_SeedLoaderWorker(seed) if workers > 0 else None,
            multiprocessing_context=settings.multiprocessing_context if workers > 0 else None,
            generator=torch.Generator().manual_seed(derive_seed(seed, "loader")),
        )
        self._iterator: Any = None
        # Keys of the micro-batches handed to the feed and not yet taken, in order.
        self._expected: collections.deque[tuple[SampleKey, ...]] = collections.deque()
        self.discarded_batches = 0

    def submit(self, batches: Sequence[Sequence[SampleKey]]) -> None:
        """The micro-batches the next steps will ask for, in order (lookahead included).

        What the pipeline already holds is kept as far as it agrees with ``batches``; from the
        first disagreement on, everything prefetched is discarded and ``batches`` are loaded anew."""
        wanted = [tuple(tuple(k) for k in b) for b in batches]
        held = list(self._expected)
        agree = 0
        while agree < min(len(held), len(wanted)) and held[agree] == wanted[agree]:
            agree += 1
        if agree < len(held):
            self._restart(wanted)
            return
        new = wanted[agree:]
        self._expected.extend(new)
        self.feed.extend([list(b) for b in new])

    def next_batch(self, keys: Sequence[SampleKey]) -> Any:
        """The collated batch of exactly ``keys`` (submitted earlier, or loaded now if not)."""
        keys = tuple(tuple(k) for k in keys)
        if not self._expected or self._expected[0] != keys:
            self._restart([keys])
        self._expected.popleft()
        if self._iterator is None:
            self._iterator = iter(self.loader)
        try:
            got, batch = next(self._iterator)
        except StopIteration:
            # The loader ran dry between two calls (nothing in flight when the feed was refilled):
            # a new pass over the same feed picks up where it stopped.
            self._iterator = iter(self.loader)
            got, batch = next(self._iterator)
        if tuple(tuple(k) for k in got) != keys:
            raise PipelineError(f"the loader returned samples {got[:3]}... for a step that wants {list(keys[:3])}...")
        return batch

    def _restart(self, batches: list[tuple[SampleKey, ...]]) -> None:
        self.discarded_batches += len(self._expected)
        self.feed.clear()
        self._expected.clear()
        self._expected.extend(batches)
        self.feed.extend([list(b) for b in batches])
        if self._iterator is not None:
            if self.settings.num_workers > 0 and self.settings.persistent_workers:
                # A new pass over the persistent workers: the batches in flight are dropped.
                self._iterator = iter(self.loader)
            else:
                self._iterator = None  # drops (and, with worker processes, shuts down) the old pass

    def close(self) -> None:
        self.feed.clear()
        self._expected.clear()
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
