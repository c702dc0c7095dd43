"""elastic.report draws a PNG from the event log that TrainerMetrics writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from elastic.metrics import StepRecord, TrainerMetrics
from elastic.report import ReportError, draw_report, read_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_synthetic_run(run_dir: Path, steps: int = 60) -> None:
    """Two workers, then four from step 20 (one resize), a failure, a NaN loss."""
    m = TrainerMetrics("report-job", registry=CollectorRegistry(), log_path=run_dir / "metrics.jsonl")
    tau, t = 0.0, 1_700_000_000.0
    for step in range(steps):
        workers = 2 if step < 20 else 4
        if step == 20:
            m.record_resize("grow", "schedule", pause_s=0.9, from_workers=2, to_workers=4, time_s=t)
        if step == 40:
            m.record_failure(time_s=t)
        gain = 1.0 + 0.8 * (workers - 1)
        tau += gain
        t += 0.05
        m.record_step(StepRecord(
            step=step, time_s=t, workers=workers, target_workers=workers, global_batch_size=32 * workers,
            scale=float(workers), gain=gain, efficiency=gain / workers, progress=tau,
            learning_rate=0.1 * gain, grad_variance=2.0, grad_sqnorm=0.5,
            loss=float("nan") if step == 30 else 2.0 / (1 + tau), step_seconds=0.05,
            samples=32 * workers, samples_per_s=640.0 * workers, goodput=640.0 * gain))
    m.close()


def test_draw_report_writes_png(tmp_path):
    write_synthetic_run(tmp_path)
    out = draw_report(tmp_path)
    assert out == tmp_path / "report.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000  # six panels of lines, not an empty canvas


def test_draw_report_custom_out(tmp_path):
    write_synthetic_run(tmp_path)
    out = draw_report(tmp_path, out=tmp_path / "plots" / "run.png")
    assert out == tmp_path / "plots" / "run.png" and out.read_bytes().startswith(PNG_MAGIC)


def test_read_log_splits_kinds_and_tolerates_truncated_last_line(tmp_path):
    write_synthetic_run(tmp_path, steps=25)
    log_path = tmp_path / "metrics.jsonl"
    with log_path.open("a") as f:
        f.write('{"kind": "step", "time_s": 17')  # crash mid-write
    log = read_log(log_path)
    assert len(log.steps) == 25 and len(log.resizes) == 1
    assert log.resizes[0]["to_workers"] == 4
    assert log.steps[0]["loss"] is not None
    assert log.steps[19]["time_s"] <= log.resizes[0]["time_s"] <= log.steps[20]["time_s"]


def test_missing_log_is_a_one_line_error(tmp_path):
    with pytest.raises(ReportError, match=r"metrics.jsonl does not exist") as info:
        draw_report(tmp_path)
    assert "\n" not in str(info.value)


def test_empty_log_is_a_one_line_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="has no step events"):
        draw_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "resize", "time_s": 1.0}) + "\n")
    with pytest.raises(ReportError, match="has no step events"):
        draw_report(tmp_path)


def test_corrupt_middle_line_names_the_line(tmp_path):
    good = json.dumps({"kind": "step", "time_s": 1.0})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(ReportError, match="line 2 is not JSON"):
        draw_report(tmp_path)


def test_run_ids_name_the_run_and_expose_a_mixed_log(tmp_path):
    from elastic.report import run_ids

    log_path = tmp_path / "metrics.jsonl"
    log_path.write_text('{"kind":"run","time_s":1.0,"run_id":"r1","resume":false}\n')
    write_synthetic_run(tmp_path, steps=5)
    with log_path.open("a") as f:
        f.write('{"kind":"run","time_s":1700000009.0,"run_id":"r1","resume":true}\n')
    assert run_ids(read_log(log_path)) == ["r1"]  # a resumed run is still one run
    with log_path.open("a") as f:
        f.write('{"kind":"run","time_s":1700000010.0,"run_id":"r2","resume":false}\n')
    assert run_ids(read_log(log_path)) == ["r1", "r2"]
    assert draw_report(tmp_path).read_bytes().startswith(PNG_MAGIC)


def test_evaluations_during_training_get_their_own_panel(tmp_path):
    write_synthetic_run(tmp_path, steps=30)
    m = TrainerMetrics("report-job", registry=CollectorRegistry(), log_path=tmp_path / "metrics.jsonl")
    for k, acc in enumerate((0.5, 0.7, 0.9)):
        m.record_eval({"accuracy": acc, "loss": 1.0 - acc}, progress=10.0 * (k + 1), step=10 * (k + 1),
                      time_s=1_700_000_000.0 + 0.5 * (k + 1))
    m.close()
    log = read_log(tmp_path / "metrics.jsonl")
    assert [e["metrics"]["accuracy"] for e in log.evals] == [0.5, 0.7, 0.9]
    with_eval = draw_report(tmp_path, out=tmp_path / "with.png").stat().st_size
    (tmp_path / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"kind":"eval"' not in line))
    without_eval = draw_report(tmp_path, out=tmp_path / "without.png").stat().st_size
    assert with_eval > without_eval  # one more panel, with two lines
