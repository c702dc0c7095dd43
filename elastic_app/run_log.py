"""The run's own log: ``train.log`` in the run directory, at INFO whatever the console shows."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

from elastic.errors import TrainerError


@contextlib.contextmanager
def train_log(run_dir: Path, run_id: str) -> Iterator[None]:
    """While the trainer holds ``run_dir`` (its ``run_log`` hook): every record of INFO or above that
    reaches the root logger also goes to ``run_dir/train.log``, tagged with the run id; the ``elastic``
    and ``controller`` loggers log INFO at least."""
    try:
        handler = logging.FileHandler(Path(run_dir) / "train.log")
    except OSError as exc:
        raise TrainerError(f"run_dir: cannot write to {run_dir}: {exc.strerror or exc}") from None
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{run_id}] %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    for name in ("elastic", "controller"):
        package_logger = logging.getLogger(name)
        if package_logger.getEffectiveLevel() > logging.INFO:
            package_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
