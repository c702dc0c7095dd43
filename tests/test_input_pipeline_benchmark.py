"""benchmarks/input_pipeline.py: its decode-heavy job, its table, and its quick mode on a real local Ray cluster."""

from __future__ import annotations

import pytest
import torch

from benchmarks import input_pipeline
from benchmarks.decode_heavy import DecodeHeavyTask
from benchmarks.input_pipeline import ThroughputResult, report


def _rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def test_decode_heavy_samples_are_random_crops_of_decoded_jpegs():
    task = DecodeHeavyTask(images=8)
    ds = task.train_dataset()
    torch.manual_seed(0)
    a = ds[3]
    torch.manual_seed(1)
    b = ds[3]
    assert a["image"].shape == (3, 32, 32) and a["label"] == b["label"]
    assert not torch.equal(a["image"], b["image"])  # the crop / flip is drawn per access
    logits = task.build_model()(torch.stack([a["image"], b["image"]]))
    assert logits.shape == (2, 10)


def test_report_flags_the_target_on_the_paired_ratio():
    met = ThroughputResult(1, 3, 10, 4, [100.0, 110.0, 90.0], [99.0, 108.0, 88.0], 1.25, 40.0,
                           retained_samples_s=[99.0, 100.0, 80.0], plain_data_wait_ms=1.5)
    missed = ThroughputResult(2, 3, 10, 4, [100.0, 100.0, 100.0], [90.0, 95.0, 99.0])
    rows = _rows(report([met, missed], (10.0, 30.0), "cmd", "a", "b", 1.0))
    assert rows[0][0] == "1 vs 1 process" and rows[0][5] == ">= 0.97: met" and rows[0][6] == "40.0 / 1.2"
    assert rows[0][4].startswith(f"{met.paired_ratio:.3f} [0.978, 0.990]")
    assert rows[0][7] == "1.5"
    assert rows[0][8] == "1.080 [1.000, 1.100]"  # the control: elastic / plain with the workers' malloc options
    assert rows[1][0] == "2 vs plain DDP, 2 processes" and rows[1][5] == ">= 0.97: missed" and rows[1][8] == "not run"


@pytest.mark.ray
@pytest.mark.slow
def test_quick_mode_writes_the_table(tmp_path):
    assert input_pipeline.main(["--quick", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "input_pipeline.md").read_text()
    rows = _rows(text)
    assert len(rows) == 1 and rows[0][0] == "1 vs 1 process"
    plain, elastic, ratio = (float(x) for x in rows[0][1:4])
    assert plain > 0 and elastic > 0 and ratio == pytest.approx(elastic / plain, rel=0.01)
    assert "load average" in text and "decode + augment" in text and "Without Ray" in text
