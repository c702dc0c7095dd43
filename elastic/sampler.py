"""ElasticSampler: one deterministic global order of samples, consumed exactly once across resizes.

The data order of a job is fixed by ``(seed, epoch)`` alone: epoch ``e`` is the permutation
``permutation(e)`` of ``range(dataset_len)`` and the epochs are read back to back. A single global
cursor counts the samples consumed in the current epoch. Each optimizer step takes the next
``global_batch`` samples from the cursor and splits them among the current ranks and micro-batches,
so the sequence of samples the job sees is the same whatever sequence of world sizes it runs at;
a resize only changes how the next batch is cut up.

The driver owns the sampler and uses it in two phases so that a failed step consumes nothing::

    plan = sampler.plan(global_batch=world * batch_per_worker * acc,
                        world_size=world, accumulation_steps=acc)
    for rank in range(world):
        send(rank, plan.shard(rank))        # `acc` micro-batches of `batch_per_worker` indices
    if all_ranks_finished_the_step:
        sampler.commit(plan)                # only now does the cursor move
    # on a failure the plan is dropped; the survivors re-plan the same samples at the new size

Several steps can be handed out at once: ``sampler.plan(..., after=previous_plan)`` plans the step
that follows an uncommitted plan (``plan_many`` chains ``count`` of them); the plans are committed
in order, as far as the steps completed.

A global batch may span an epoch boundary: it takes the rest of epoch ``e`` and then the start of
epoch ``e + 1``, so every sample of every epoch is consumed exactly once and no batch is short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["ElasticSampler", "SamplerError", "StalePlanError", "StepPlan", "pack_keys", "unpack_keys"]


class SamplerError(ValueError):
    """A sampler request that cannot be served (bad batch geometry, bad state dict, bad rank)."""


class StalePlanError(SamplerError):
    """A plan committed after the sampler moved on (another plan was committed, or state loaded)."""


@dataclass(frozen=True)
class StepPlan:
    """The samples of one optimizer step, and the sampler position after it is committed."""

    indices: tuple[int, ...]
    """The global batch, in global order (rank 0's micro-batches first, then rank 1's, ...)."""
    world_size: int
    """Number of ranks the batch is split among."""
    accumulation_steps: int
    """Micro-batches (backward passes) per rank in this step."""
    epoch_before: int
    """Epoch of the sampler state this plan was made from."""
    cursor_before: int
    """Cursor of the sampler state this plan was made from."""
    epoch_after: int
    """Epoch after commit (an epoch finished exactly at the end of the batch counts as the next one)."""
    cursor_after: int
    """Samples consumed in ``epoch_after`` after commit, in ``[0, dataset_len)``."""

    @property
    def global_batch(self) -> int:
        """Number of samples in the step, over all ranks and micro-batches."""
        return len(self.indices)

    @property
    def micro_batch_size(self) -> int:
        """Samples per micro-batch on one rank (the per-worker batch), B = global / (world * acc)."""
        return len(self.indices) // (self.world_size * self.accumulation_steps)

    def shard(self, rank: int) -> list[list[int]]:
        """Rank ``rank``'s ``accumulation_steps`` micro-batches, each a list of ``micro_batch_size`` indices.

        Rank r takes the contiguous slice ``[r * B * acc, (r + 1) * B * acc)`` of ``indices``.
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise SamplerError(f"rank: must be an int in [0, {self.world_size}) (got {rank!r})")
        micro = self.micro_batch_size
        start = rank * micro * self.accumulation_steps
        return [
            list(self.indices[start + k * micro : start + (k + 1) * micro])
            for k in range(self.accumulation_steps)
        ]

    def shard_keys(self, rank: int) -> list[list[tuple[int, int]]]:
        """:meth:`shard` with each index's epoch: micro-batches of ``(epoch, index)`` sample keys.

        A batch that spans the epoch boundary ends with ``cursor_after`` samples of the next epoch."""
        micro = self.micro_batch_size
        start = rank * micro * self.accumulation_steps
        boundary = len(self.indices) - (self.cursor_after if self.epoch_after > self.epoch_before else 0)
        keys = []
        for k, indices in enumerate(self.shard(rank)):
            first = start + k * micro
            keys.append([(self.epoch_before if first + j < boundary else self.epoch_before + 1, i)
                         for j, i in enumerate(indices)])
        return keys

    def packed_shard(self, rank: int) -> list[list[int]]:
        """:meth:`shard_keys`, each micro-batch packed by :func:`pack_keys`: the form the driver sends."""
        return [pack_keys(keys) for keys in self.shard_keys(rank)]


def pack_keys(keys: Iterable[Sequence[int]]) -> list[int]:
    """A micro-batch's ``(epoch, index)`` keys as one flat list ``[epoch0, index0, epoch1, index1, ...]``.

    Ray serialises a list of ints in one piece (13 us for 384 keys), where a list of tuples costs
    one pickled object per key (400 us), on both sides of every call."""
    return [int(x) for key in keys for x in key]


def unpack_keys(flat: Sequence[Any]) -> list[tuple[int, int]]:
    """The ``(epoch, index)`` keys of a list made by :func:`pack_keys` (keys still given as pairs,
    as callers of ``ElasticWorker.train_steps`` passed them before, are taken as they are)."""
    if len(flat) and not isinstance(flat[0], (int, np.integer)):
        return [(int(epoch), int(index)) for epoch, index in flat]
    if len(flat) % 2:
        raise SamplerError(f"packed sample keys come in (epoch, index) pairs: got {len(flat)} ints")
    return list(zip(flat[::2], flat[1::2]))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SamplerError(f"{name}: must be an int >= 1 (got {value!r})")
    return int(value)


class ElasticSampler:
    """Deterministic global sample order with a single cursor; see the module docstring.

    Args:
        dataset_len: number of samples N of the map-style dataset (indices ``0 .. N-1``).
        seed: seeds the per-epoch permutations; the same ``(seed, epoch)`` always gives the same order.
    """

    # Permutations of the current and the next epoch are all a batch can touch.
    _CACHE_EPOCHS = 2

    def __init__(self, dataset_len: int, seed: int = 0) -> None:
        self._dataset_len = _positive_int("dataset_len", dataset_len)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise SamplerError(f"seed: must be an int (got {seed!r})")
        self._seed = int(seed)
        self._epoch = 0
        self._cursor = 0
        self._permutations: dict[int, np.ndarray] = {}

    # -- position ---------------------------------------------------------------------------
    @property
    def dataset_len(self) -> int:
        """Number of samples in one epoch."""
        return self._dataset_len

    @property
    def seed(self) -> int:
        """Seed of the per-epoch permutations."""
        return self._seed

    @property
    def epoch(self) -> int:
        """Epoch the next sample comes from."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """Samples consumed in the current epoch, in ``[0, dataset_len)``."""
        return self._cursor

    @property
    def samples_consumed(self) -> int:
        """Samples consumed since the start of the job, across epochs."""
        return self._epoch * self._dataset_len + self._cursor

    # -- order ------------------------------------------------------------------------------
    def permutation(self, epoch: int) -> np.ndarray:
        """The order of epoch ``epoch``: a permutation of ``range(dataset_len)`` (read-only array)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise SamplerError(f"epoch: must be an int >= 0 (got {epoch!r})")
        epoch = int(epoch)
        perm = self._permutations.get(epoch)
        if perm is None:
            # SeedSequence mixes (seed, epoch) into independent streams; the modulus folds negative
            # seeds into the unsigned range it requires without colliding with small positive ones.
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self._seed % 2**64, epoch])))
            perm = rng.permutation(self._dataset_len)
            perm.setflags(write=False)
            if len(self._permutations) >= self._CACHE_EPOCHS:
                self._permutations.pop(max(self._permutations, key=lambda e: abs(e - epoch)))
            self._permutations[epoch] = perm
        return perm

    # -- stepping ---------------------------------------------------------------------------
    def plan(self, global_batch: int, world_size: int, accumulation_steps: int,
             after: StepPlan | None = None) -> StepPlan:
        """The next ``global_batch`` samples split for ``world_size`` ranks; does not advance.

        ``after``: plan the step that follows that (uncommitted) plan instead of the current
        position, to hand several steps to the workers at once; commit the plans in order.

        Raises:
            SamplerError: ``global_batch`` is not a multiple of ``world_size * accumulation_steps``,
                or larger than the dataset.
        """
        global_batch = _positive_int("global_batch", global_batch)
        world_size = _positive_int("world_size", world_size)
        accumulation_steps = _positive_int("accumulation_steps", accumulation_steps)
        per_step = world_size * accumulation_steps
        if global_batch % per_step:
            raise SamplerError(
                f"global_batch: must be divisible by world_size * accumulation_steps = "
                f"{world_size} * {accumulation_steps} = {per_step} (got {global_batch})"
            )
        n = self._dataset_len
        if global_batch > n:
            raise SamplerError(f"dataset has {n} samples, smaller than one global batch of {global_batch}")

        if after is None:
            epoch, cursor = self._epoch, self._cursor
        elif isinstance(after, StepPlan):
            epoch, cursor = after.epoch_after, after.cursor_after
        else:
            raise SamplerError(f"after: must be a StepPlan or None (got {type(after).__name__})")
        end = cursor + global_batch
        head = self.permutation(epoch)[cursor : min(end, n)]
        if end < n:
            indices, epoch_after, cursor_after = head, epoch, end
        else:
            # The batch finishes this epoch and (unless it ends exactly on the boundary) takes the
            # first samples of the next: no short batch, and no sample of either epoch is skipped.
            cursor_after = end - n
            tail = self.permutation(epoch + 1)[:cursor_after]
            indices, epoch_after = np.concatenate([head, tail]), epoch + 1
        return StepPlan(
            indices=tuple(indices.tolist()),
            world_size=world_size,
            accumulation_steps=accumulation_steps,
            epoch_before=epoch,
            cursor_before=cursor,
            epoch_after=epoch_after,
            cursor_after=cursor_after,
        )

    def plan_many(self, global_batch: int, world_size: int, accumulation_steps: int, count: int) -> list[StepPlan]:
        """``count`` consecutive steps from the current position (each planned ``after`` the one
        before it); does not advance. Commit them in order, as far as the steps completed."""
        plans: list[StepPlan] = []
        for _ in range(_positive_int("count", count)):
            plans.append(self.plan(global_batch, world_size, accumulation_steps, after=plans[-1] if plans else None))
        return plans

    def lookahead(self, after: StepPlan, micro_batches: int) -> list[StepPlan]:
        """The steps that follow ``after`` at its geometry (same world size and accumulation),
        enough of them for ``micro_batches`` micro-batches per rank; [] for 0. Does not advance.

        The workers' input pipelines prefetch these while the current steps run; the plans are
        never committed: if the next call plans other steps (a resize, a failure), they are dropped."""
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 0:
            raise SamplerError(f"micro_batches: must be an int >= 0 (got {micro_batches!r})")
        plans: list[StepPlan] = []
        for _ in range(-(-micro_batches // after.accumulation_steps)):
            plans.append(self.plan(after.global_batch, after.world_size, after.accumulation_steps,
                                   after=plans[-1] if plans else after))
        return plans

    def commit(self, plan: StepPlan) -> None:
        """Mark ``plan``'s samples consumed: move to ``(plan.epoch_after, plan.cursor_after)``.

        Raises:
            StalePlanError: the plan was made from another state (e.g. a second plan made before the
                first was committed, or the same plan committed twice).
        """
        if not isinstance(plan, StepPlan):
            raise SamplerError(f"plan: must be a StepPlan (got {type(plan).__name__})")
        if (plan.epoch_before, plan.cursor_before) != (self._epoch, self._cursor):
            raise StalePlanError(
                f"stale plan: made at epoch={plan.epoch_before} cursor={plan.cursor_before}, "
                f"but the sampler is at epoch={self._epoch} cursor={self._cursor}; plan the step again"
            )
        self._epoch, self._cursor = plan.epoch_after, plan.cursor_after

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "cursor", "seed", "dataset_len"}`` as plain ints (checkpoint-safe)."""
        return {
            "epoch": self._epoch,
            "cursor": self._cursor,
            "seed": self._seed,
            "dataset_len": self._dataset_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the position in ``state``; the seed is taken from ``state``.

        Raises:
            SamplerError: a key is missing or not an int, the position is out of range, or the state
                was saved for a dataset of another size.
        """
        if not isinstance(state, dict):
            raise SamplerError(f"sampler state: must be a dict (got {type(state).__name__})")
        values: dict[str, int] = {}
        for key in ("epoch", "cursor", "seed", "dataset_len"):
            value = state.get(key)
            if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensor / numpy scalar
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, int):
                raise SamplerError(f"sampler state: {key!r} must be an int (got {value!r})")
            values[key] = value
        unknown = sorted(set(state) - set(values))
        if unknown:
            raise SamplerError(f"sampler state: unknown keys {unknown}")
        if values["dataset_len"] != self._dataset_len:
            raise SamplerError(
                f"sampler state: saved for a dataset of {values['dataset_len']} samples, "
                f"but this dataset has {self._dataset_len}"
            )
        if values["epoch"] < 0 or not 0 <= values["cursor"] < self._dataset_len:
            raise SamplerError(
                f"sampler state: position out of range (epoch={values['epoch']}, cursor={values['cursor']}, "
                f"dataset_len={self._dataset_len})"
            )
        if values["seed"] != self._seed:
            self._permutations.clear()
        self._seed, self._epoch, self._cursor = values["seed"], values["epoch"], values["cursor"]

    def __repr__(self) -> str:
        return (
            f"ElasticSampler(dataset_len={self._dataset_len}, seed={self._seed}, "
            f"epoch={self._epoch}, cursor={self._cursor})"
        )
