"""Durable, atomic, verified checkpoints: resume exactly after a full restart.

On disk, in the checkpoint directory::

    ckpt-00000100.pt        torch.save of the state dict (model, optimizer, AdaScale, sampler, step, ...)
    ckpt-00000100.sha256    "<sha256 hex>  ckpt-00000100.pt\\n"  (``sha256sum -c`` format)

A checkpoint is visible only once complete: the payload is written to a hidden temp file in the same
directory, flushed and fsync'ed, its checksum file is put in place, then the payload is renamed over
its final name and the directory is fsync'ed. A crash at any point leaves either the previous set of
checkpoints or the new one, plus at most some ``.ckpt-*.tmp`` files that loading ignores and the next
:class:`CheckpointManager` removes.

Loading uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors, numbers, strings,
``None`` and dicts / lists / tuples of them (what ``state_dict()`` methods return), never pickled
objects. The newest checkpoint whose checksum matches is loaded; a corrupt or truncated one is
skipped with a warning naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import torch

__all__ = ["CheckpointError", "CheckpointManager"]

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^ckpt-(\d{8,})\.pt$")
_CHECKSUM = re.compile(r"^ckpt-(\d{8,})\.sha256$")
_TEMP_PREFIX = ".ckpt-"
_TEMP_SUFFIX = ".tmp"
_READ_CHUNK = 1 << 20

# Leaf values that torch.load(weights_only=True) restores (exact types: a numpy float64 is a float
# subclass that pickles as a numpy global and would be refused at load time).
_PLAIN_LEAVES = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or no checkpoint can be read; the message is one line."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint of ``step``: ``ckpt-<step:08d>.pt``."""
    return f"ckpt-{step:08d}.pt"


def checksum_name(step: int) -> str:
    """File name of the checksum of ``step``'s checkpoint: ``ckpt-<step:08d>.sha256``."""
    return f"ckpt-{step:08d}.sha256"


class _HashingWriter:
    """File wrapper that hashes what torch.save writes, so the payload is not read back."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


class _SkipCheckpoint(Exception):
    """This checkpoint is unreadable; fall back to an older one."""


class CheckpointManager:
    """Writes checkpoints atomically, keeps the newest ``keep_last``, loads the newest valid one.

    Args:
        directory: checkpoint directory; created if missing. A probe file is written at construction,
            so an unwritable directory fails here rather than at the first save.
        keep_last: number of newest checkpoints kept; older ones are deleted after each save.

    Raises:
        CheckpointError: the directory cannot be created or written.
    """

    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise CheckpointError(f"checkpoint.keep_last: must be an int >= 1 (got {keep_last!r})")
        self._dir = Path(directory)
        self._keep_last = keep_last
        probe = self._dir / f"{_TEMP_PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}{_TEMP_SUFFIX}"
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"probe")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(f"checkpoint.dir: cannot write to {self._dir}: {_reason(exc)}") from exc
        self._remove_temp_files()

    @property
    def directory(self) -> Path:
        """The checkpoint directory."""
        return self._dir

    @property
    def keep_last(self) -> int:
        """Number of newest checkpoints kept."""
        return self._keep_last

    # -- writing -------------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step`` (atomically), then prune to ``keep_last``.

        Returns the path of the checkpoint file.

        Raises:
            CheckpointError: ``state`` holds something ``torch.load(weights_only=True)`` would refuse,
                or the write failed (disk full, permissions); no partial checkpoint is left visible.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint step: must be an int >= 0 (got {step!r})")
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint state: must be a dict (got {type(state).__name__})")
        _check_loadable(state, "state")

        final = self._dir / checkpoint_name(step)
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        temp_payload = self._dir / f"{_TEMP_PREFIX}{step:08d}.pt.{token}{_TEMP_SUFFIX}"
        temp_checksum = self._dir / f"{_TEMP_PREFIX}{step:08d}.sha256.{token}{_TEMP_SUFFIX}"
        try:
            with open(temp_payload, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(dict(state), writer)
                f.flush()
                os.fsync(f.fileno())
            digest = writer.sha256.hexdigest()
            with open(temp_checksum, "w", encoding="ascii") as f:
                f.write(f"{digest}  {final.name}\n")
                f.flush()
                os.fsync(f.fileno())
            # Checksum first: a visible payload always has its checksum next to it.
            os.replace(temp_checksum, self._dir / checksum_name(step))
            os.replace(temp_payload, final)
            _fsync_directory(self._dir)
        except Exception as exc:
            for leftover in (temp_payload, temp_checksum):
                leftover.unlink(missing_ok=True)
            raise CheckpointError(f"checkpoint.dir: cannot write {final}: {_reason(exc)}") from exc
        self._prune()
        return final

    def _prune(self) -> None:
        steps = self.steps()
        keep = set(steps[-self._keep_last :])
        oldest_kept = min(keep) if keep else None
        for step in steps:
            if step not in keep:
                self._remove(self._dir / checkpoint_name(step))
                self._remove(self._dir / checksum_name(step))
        # Checksums whose payload never appeared (a crash between the two renames).
        for path in self._dir.iterdir():
            match = _CHECKSUM.match(path.name)
            if match and oldest_kept is not None and int(match.group(1)) < oldest_kept:
                if not (self._dir / checkpoint_name(int(match.group(1)))).exists():
                    self._remove(path)

    def _remove_temp_files(self) -> None:
        for path in self._dir.iterdir():
            if path.name.startswith(_TEMP_PREFIX) and path.name.endswith(_TEMP_SUFFIX):
                logger.info("removing %s left by an interrupted checkpoint write", path)
                self._remove(path)

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove %s: %s", path, _reason(exc))

    # -- reading -------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete-looking checkpoints on disk, oldest first (not verified)."""
        steps = []
        for path in self._dir.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and path.is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """Step of the newest checkpoint on disk, or None; not verified (see :meth:`load_latest`)."""
        steps = self.steps()
        return steps[-1] if steps else None

    def load_latest(self, map_location: str | torch.device | None = "cpu") -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest checkpoint that verifies, or None if there is none.

        A checkpoint whose checksum file is missing or does not match, or that torch cannot read, is
        skipped with a warning and the previous one is tried.

        Raises:
            CheckpointError: checkpoints exist but none is readable, or a checkpoint is intact but holds
                objects that ``weights_only=True`` refuses (not a corruption: falling back would
                silently lose progress).
        """
        steps = self.steps()
        if not steps:
            return None
        reasons: list[str] = []
        for step in reversed(steps):
            try:
                return step, self._load_verified(step, map_location)
            except _SkipCheckpoint as skip:
                reasons.append(f"{checkpoint_name(step)}: {skip}")
                logger.warning("skipping checkpoint %s: %s", self._dir / checkpoint_name(step), skip)
        raise CheckpointError(
            f"checkpoint.dir: none of the {len(steps)} checkpoints in {self._dir} is readable "
            f"(newest {reasons[0]})"
        )

    def load(self, step: int, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
        """The verified state of checkpoint ``step``.

        Raises:
            CheckpointError: it is missing, corrupt, or refused by ``weights_only=True``.
        """
        try:
            return self._load_verified(step, map_location)
        except _SkipCheckpoint as skip:
            raise CheckpointError(f"{self._dir / checkpoint_name(step)}: {skip}") from None

    def _load_verified(self, step: int, map_location: str | torch.device | None) -> dict[str, Any]:
        path = self._dir / checkpoint_name(step)
        expected = self._expected_digest(step)
        try:
            actual = _sha256_of(path)
        except OSError as exc:
            raise _SkipCheckpoint(f"cannot read: {_reason(exc)}") from exc
        if actual != expected:
            raise _SkipCheckpoint(
                f"sha256 mismatch (file is corrupt or truncated: {path.stat().st_size} bytes, "
                f"sha256 {actual[:12]}..., expected {expected[:12]}...)"
            )
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable payload is reported the same way
            refused = _weights_only_refusal(exc)
            if refused is not None:
                raise CheckpointError(
                    f"{path}: refused by torch.load(weights_only=True): {refused}; a checkpoint may hold "
                    "only tensors, numbers, strings, None and dicts/lists/tuples of them"
                ) from None
            raise _SkipCheckpoint(f"torch.load failed: {_reason(exc)}") from exc
        if not isinstance(state, dict):
            raise _SkipCheckpoint(f"holds a {type(state).__name__}, not a state dict")
        return state

    def _expected_digest(self, step: int) -> str:
        path = self._dir / checksum_name(step)
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError:
            raise _SkipCheckpoint(f"checksum file {path.name} is missing") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise _SkipCheckpoint(f"cannot read checksum file {path.name}: {_reason(exc)}") from exc
        fields = text.split()
        if len(fields) != 2 or not re.fullmatch(r"[0-9a-f]{64}", fields[0]) or fields[1] != checkpoint_name(step):
            raise _SkipCheckpoint(f"checksum file {path.name} is malformed")
        return fields[0]

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self._dir)!r}, keep_last={self._keep_last})"


def _check_loadable(value: Any, where: str) -> None:
    """Refuse, at save time, what torch.load(weights_only=True) would refuse at resume time."""
    kind = type(value)
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in _PLAIN_LEAVES:
                raise CheckpointError(f"checkpoint {where}: key {key!r} of type {_type_name(key)} cannot be stored")
            _check_loadable(item, f"{where}[{key!r}]")
    elif kind in (list, tuple, set):
        for i, item in enumerate(value):
            _check_loadable(item, f"{where}[{i}]")
    elif isinstance(value, torch.Tensor) or kind in _PLAIN_LEAVES:
        return
    else:
        raise CheckpointError(
            f"checkpoint {where}: cannot store a {_type_name(value)} (torch.load(weights_only=True) refuses it); "
            "store tensors, numbers, strings, None and dicts/lists/tuples of them, e.g. obj.state_dict()"
        )


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _weights_only_refusal(exc: Exception) -> str | None:
    """The one-line cause if ``exc`` is torch.load refusing an object under weights_only, else None."""
    text = str(exc)
    if "Weights only load failed" not in text:
        return None
    match = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global[^\n]*)?$", text, re.MULTILINE)
    return match.group(1).strip() if match else "an object that is not allowed"


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    # Makes the renames durable; not supported on every platform/filesystem, where it is best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
