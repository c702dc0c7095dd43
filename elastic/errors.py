"""TrainerError: the job cannot continue."""

from __future__ import annotations


class TrainerError(RuntimeError):
    """The job cannot continue (one-line message; a checkpoint was written where possible)."""
