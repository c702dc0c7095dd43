"""A run owns its directory: an identity, a lock while it runs, no silent reuse of another run's state.

On disk, in the run directory::

    run.json      {"run_id", "name", "status", "progress", "total_progress", "checkpoint_step", ...}
    .lock         held with ``flock`` by the driver while the run is running (holder written inside)

Three ways to open a run directory (:func:`open_run`):

- ``fresh`` (the default): the directory must not hold another run's state (``run.json``,
  checkpoints, a metrics log or a ledger); a fresh start over it would prune the old checkpoints,
  report the old run's step as its own and append to the old metrics log.
- ``resume``: continue the run recorded there (same run id); a run already finished is reported as
  such (:class:`RunFinished`) so the driver exits without starting a cluster.
- ``start_over``: the old run is moved aside to ``<run_dir>.<old run id>`` (never deleted), and a new
  run starts in an empty directory.

The lock is an advisory ``flock`` on ``.lock``: the kernel drops it when the process dies (also on
SIGKILL), so a crashed run never leaves the directory locked. It guards one machine or one shared
file system with working ``flock`` (NFSv4, most cluster file systems); it is not a distributed lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

__all__ = ["OpenMode", "RunDirError", "RunFinished", "RunLock", "RunRecord", "open_run", "previous_run"]

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
#: Files that only a run writes: their presence means a run used this directory.
RUN_ARTIFACTS = ("metrics.jsonl", "ledger.jsonl")
_CHECKPOINT = re.compile(r"^ckpt-(\d{8,})\.pt$")

OpenMode = Literal["fresh", "resume", "start_over"]


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (one line; the CLI exits 2)."""


class RunFinished(Exception):
    """``--resume`` of a run that already reached its total progress; nothing to do."""

    def __init__(self, record: RunRecord, run_dir: Path) -> None:
        super().__init__(f"{run_dir}: run {record.run_id} already finished at tau {record.progress:.1f} / "
                         f"{record.total_progress:g} (checkpoint step {record.checkpoint_step}); nothing to do")
        self.record = record


@dataclass(frozen=True)
class RunRecord:
    """What ``run.json`` says about the run that owns a directory."""

    run_id: str
    name: str
    status: str = "running"  # running | finished | stopped | failed
    started_at: str = ""
    progress: float = 0.0
    total_progress: float = 0.0
    checkpoint_step: int | None = None
    steps: int = 0
    elapsed_s: float = 0.0  # training time over every attempt of this run
    attempts: int = 1

    @staticmethod
    def read(run_dir: Path) -> RunRecord | None:
        path = Path(run_dir) / RUN_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RunDirError(f"run_dir: {path} is unreadable ({exc}); move it aside or start over") from None
        known = {k: v for k, v in data.items() if k in RunRecord.__dataclass_fields__}
        if not isinstance(known.get("run_id"), str):
            raise RunDirError(f"run_dir: {path} has no run_id; move it aside or start over")
        return RunRecord(**known)

    def write(self, run_dir: Path) -> None:
        """Atomically replaces ``run.json``."""
        path = Path(run_dir) / RUN_FILE
        temp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")
        os.replace(temp, path)


def new_run_id() -> str:
    """Sortable and unique enough for one user: ``20261205-121530-3fa2c1`` (UTC)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def _checkpoint_steps(directory: Path) -> list[int]:
    try:
        names = [p.name for p in Path(directory).iterdir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for m in map(_CHECKPOINT.match, names) if m)


@dataclass(frozen=True)
class PreviousRun:
    """What an earlier run left in the directories: its record (None for runs older than run.json),
    its checkpoint steps and the run-only files it wrote."""

    record: RunRecord | None
    checkpoint_steps: tuple[int, ...]
    artifacts: tuple[str, ...]

    @property
    def has_state(self) -> bool:
        """Checkpoints or logs to lose or to mix with (a run that failed before its first step has none)."""
        return bool(self.checkpoint_steps or self.artifacts)

    def describe(self) -> str:
        what = f"run {self.record.run_id} ({self.record.status}" if self.record else "an earlier run ("
        if self.record is not None:
            what += f", tau {self.record.progress:.1f} / {self.record.total_progress:g}"
            what += ", " if self.checkpoint_steps or self.artifacts else ""
        parts = []
        if self.checkpoint_steps:
            parts.append(f"checkpoint step {self.checkpoint_steps[-1]}")
        if self.artifacts:
            parts.append(", ".join(self.artifacts))
        return what + ", ".join(parts) + ")"


def previous_run(run_dir: Path, checkpoint_dir: Path) -> PreviousRun | None:
    """The earlier run whose state is in ``run_dir`` / ``checkpoint_dir``, or None when both are clean."""
    record = RunRecord.read(run_dir)
    steps = tuple(_checkpoint_steps(checkpoint_dir))
    artifacts = tuple(name for name in RUN_ARTIFACTS if _has_steps(Path(run_dir) / name))
    if record is None and not steps and not artifacts:
        return None
    return PreviousRun(record, steps, artifacts)


def _has_steps(path: Path) -> bool:
    """The log holds a step (a run that failed before its first step wrote at most a ``run`` event)."""
    try:
        with path.open("rb") as f:
            tail = b""
            while chunk := f.read(1 << 16):
                if b'"kind":"step"' in tail + chunk:
                    return True
                tail = chunk[-32:]
    except OSError:
        return False
    return False


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for as long as the run runs."""

    def __init__(self, run_dir: Path, field: str = "run_dir") -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.field = field
        self._fd: int | None = None
        #: The checkpoint directory's lock when it lies outside the run directory (released together).
        self.companion: RunLock | None = None

    def acquire(self, holder: dict) -> None:
        """Takes the lock and writes ``holder`` into the lock file.

        Raises:
            RunDirError: another process holds it; the message names that run.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                other = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            except ValueError:
                other = {}
            os.close(fd)
            raise RunDirError(f"{self.field}: {self.path.parent} is in use by {_holder_text(other)}; "
                              f"wait for it to end, or give this job another {self.field}") from None
        self._fd = fd
        self.set_holder(holder)

    def set_holder(self, holder: dict) -> None:
        """What a second job on this directory is told about the holder."""
        if self._fd is None:
            raise RunDirError(f"run_dir: {self.path} is not locked by this process")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)

    def release(self) -> None:
        # The file stays: unlinking it would let a third process lock a new inode while a second
        # one still waits on the old one.
        if self.companion is not None:
            self.companion.release()
            self.companion = None
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _holder_text(holder: dict) -> str:
    if not holder.get("run_id"):
        return "another run"
    return (f"run {holder['run_id']} of job {holder.get('name', '?')} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('started_at', '?')})")


def _aside_path(path: Path, tag: str) -> Path:
    candidate = path.with_name(f"{path.name}.{tag}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{tag}-{n}")
    return candidate


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def open_run(run_dir: str | Path, checkpoint_dir: str | Path, name: str, total_progress: float,
             mode: OpenMode = "fresh") -> tuple[RunLock, RunRecord, list[str]]:
    """Locks ``run_dir`` and decides whose run this is.

    Returns the held lock, the record of this run (already written to ``run.json`` with status
    ``running``) and notes for the log (what was moved aside).

    Raises:
        RunDirError: the directory is locked by a running job, or (``fresh``) holds another run.
        RunFinished: (``resume``) the run there already reached ``total_progress``; the lock is released.
    """
    # A checkpoint URI (object storage) is not a local directory: no listing or lock here.
    local_checkpoints = "://" not in str(checkpoint_dir)
    run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
    if not local_checkpoints:
        checkpoint_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "name": name, "started_at": started_at}
    lock = RunLock(run_dir)
    lock.acquire({**holder, "run_id": "(starting)"})
    notes: list[str] = []
    try:
        previous = previous_run(run_dir, checkpoint_dir)
        record = RunRecord(run_id=new_run_id(), name=name, started_at=started_at, total_progress=total_progress)
        if previous is not None and previous.has_state and mode == "fresh":
            raise RunDirError(
                f"run_dir: {run_dir} holds {previous.describe()}; continue it with --resume, or move it "
                f"aside and start a new run with --start-over")
        if previous is not None and previous.has_state and mode == "start_over":
            tag = previous.record.run_id if previous.record else "old-" + time.strftime("%Y%m%d-%H%M%S")
            moved = [(checkpoint_dir, _aside_path(checkpoint_dir, tag))] if (
                previous.checkpoint_steps and not _inside(checkpoint_dir, run_dir)) else []
            moved.append((run_dir, _aside_path(run_dir, tag)))
            for source, target in moved:
                source.rename(target)
                notes.append(f"moved the previous run's {source} to {target}")
            run_dir.mkdir(parents=True, exist_ok=True)
            new_lock = RunLock(run_dir)
            new_lock.acquire({**holder, "run_id": "(starting)"})
            lock.release()
            lock = new_lock
        elif previous is not None and mode == "resume" and previous.record is not None:
            old = previous.record
            if old.status == "finished" and old.progress >= total_progress:
                raise RunFinished(old, run_dir)
            record = replace(old, status="running", started_at=started_at, total_progress=total_progress,
                             attempts=old.attempts + 1)
        lock.set_holder({**holder, "run_id": record.run_id})
        if local_checkpoints and not _inside(checkpoint_dir, run_dir):  # nor may two runs share checkpoints
            companion = RunLock(checkpoint_dir, field="checkpoint.dir")
            try:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                companion.acquire({**holder, "run_id": record.run_id})
            except OSError as exc:
                raise RunDirError(f"checkpoint.dir: cannot write to {checkpoint_dir}: {exc.strerror or exc}") from None
            lock.companion = companion
        record.write(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock, record, notes
