"""Helpers shared by the benchmarks: thread pinning, a confidence interval for
a median, batch fetching, markdown tables, result files."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

#: Where the benchmarks write their tables and figures unless told otherwise.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def single_thread() -> None:
    """One intra-op thread per process: on a 2-core machine this keeps timings stable and
    lets two benchmark processes run side by side without oversubscribing the cores."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval for the median of the population ``values`` came from:
    the k-th smallest and k-th largest value, with the largest k for which a Binomial(n, 1/2) count
    falls below k with probability at most (1 - confidence) / 2. Its coverage is at least
    ``confidence`` for any continuous distribution (n = 15: the 4th and 12th values, 96.5%).
    None when there are too few values for that coverage (fewer than 6 at 95%)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    ordered = sorted(values)
    n = len(ordered)
    tail = (1.0 - confidence) / 2.0
    k, below = 0, 0.0  # below: P(count < k + 1) for the k tried so far
    while k < n // 2:
        below += math.comb(n, k) / 2.0**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    return ordered[k - 1], ordered[n - k]


def fetch_batch(dataset: torch.utils.data.Dataset, indices: Sequence[int]) -> Any:
    """The batch of ``indices`` as ``default_collate`` would build it (fast path for TensorDataset)."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return tuple(t[index] for t in dataset.tensors)
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; cells are rendered with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row has {len(row)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
