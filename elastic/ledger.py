"""Which samples each step trained on: the ranks' checksums checked against the plan, and
``ledger.jsonl`` (``ElasticTrainer(ledger=True)``), every committed step's sample indices per rank,
so that a test can check that no sample was lost or trained twice across resizes and failures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elastic.errors import TrainerError
from elastic.step_report import StepReport


class SampleLedger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, step: int, workers: int, plan: Any, report: StepReport, verified_ranks: int,
              consumed: dict[int, Any]) -> None:
        """One committed step: ``plan`` (an ``elastic.sampler`` plan) and what each rank consumed."""
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "world_size": workers, "epoch": plan.epoch_before,
                                "cursor": plan.cursor_before, "gain": report.gain,
                                "progress": report.progress, "skipped": report.skipped,
                                "verified_ranks": verified_ranks,
                                "consumed": {str(k): list(v) for k, v in consumed.items()}}) + "\n")


def verify_loaded_samples(results: list[dict[str, Any]], plan: Any, step: int) -> int:
    """Each rank reports a checksum of the sample keys its input pipeline actually delivered; they
    must be the plan's, or a prefetched batch of another step was trained on. Returns the number of
    ranks checked; raises TrainerError before the step is counted."""
    from elastic.data import keys_checksum

    verified = 0
    for r in results:
        rank = r.get("rank")
        if rank is None or "samples_crc" not in r:
            continue
        expected = keys_checksum(k for mb in plan.shard_keys(rank) for k in mb)
        if r["samples_crc"] != expected:
            raise TrainerError(f"step {step}: rank {rank} trained on other samples than planned "
                               "(input pipeline out of step); stopping before the data is counted")
        verified += 1
    return verified
