"""Helpers shared by the benchmarks: thread pinning, batch fetching, markdown tables, result files."""

from __future__ import annotations

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
