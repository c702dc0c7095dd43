"""A run owns its directory (issue 19): identity, a lock while running, no silent reuse. No Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from elastic.rundir import RunDirError, RunFinished, RunRecord, open_run, previous_run

ROOT = Path(__file__).resolve().parents[1]


def open_(run_dir: Path, mode="fresh", total=100.0, checkpoint_dir: Path | None = None):
    return open_run(run_dir, checkpoint_dir or run_dir / "checkpoints", "job", total, mode)


def leave_checkpoints(run_dir: Path, *steps: int) -> None:
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    for step in steps:
        (ckpt / f"ckpt-{step:08d}.pt").write_bytes(b"x")


def test_a_clean_directory_gets_a_new_run_id_and_a_lock(tmp_path):
    lock, record, notes = open_(tmp_path / "run")
    try:
        assert record.run_id and record.status == "running" and notes == []
        on_disk = RunRecord.read(tmp_path / "run")
        assert on_disk.run_id == record.run_id
        holder = json.loads((tmp_path / "run" / ".lock").read_text())
        assert holder["run_id"] == record.run_id and holder["pid"] == os.getpid()
    finally:
        lock.release()
    lock2, record2, _ = open_(tmp_path / "run2")
    lock2.release()
    assert record2.run_id != record.run_id


def test_a_second_job_on_a_running_directory_is_refused_naming_the_first(tmp_path):
    lock, record, _ = open_(tmp_path)
    try:
        with pytest.raises(RunDirError) as refused:
            open_(tmp_path, mode="resume")
        message = str(refused.value)
        assert "\n" not in message and "in use by run " + record.run_id in message
        assert f"pid {os.getpid()}" in message
    finally:
        lock.release()
    lock, _, _ = open_(tmp_path, mode="resume")  # free again once released
    lock.release()


def test_the_lock_is_held_by_another_process_and_dropped_when_it_dies(tmp_path):
    """flock: a second process is refused; a SIGKILLed holder leaves no stale lock."""
    code = ("import sys, time; from elastic.rundir import open_run; "
            "open_run(sys.argv[1], sys.argv[1] + '/checkpoints', 'job', 10.0); print('locked', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            open_(tmp_path, mode="resume")
    finally:
        holder.kill()
        holder.wait()
    lock, record, _ = open_(tmp_path, mode="resume")  # the dead holder's run is resumed, same id
    lock.release()


def test_a_fresh_start_over_another_runs_checkpoints_is_refused(tmp_path):
    """Issue 19: a fresh run pruned the old run's checkpoints and reported its step as its own."""
    leave_checkpoints(tmp_path, 100, 200)
    with pytest.raises(RunDirError) as refused:
        open_(tmp_path)
    message = str(refused.value)
    assert "checkpoint step 200" in message and "--resume" in message and "--start-over" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000100.pt", "ckpt-00000200.pt"]
    assert not (tmp_path / ".lock").read_text().strip()  # refused: the lock was let go


def test_a_fresh_start_over_a_metrics_log_is_refused(tmp_path):
    """Two runs appending to one metrics.jsonl wrote interleaved step numbers."""
    (tmp_path / "metrics.jsonl").write_text('{"kind":"step"}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl"):
        open_(tmp_path)


def test_a_run_that_left_nothing_does_not_block_a_fresh_start(tmp_path):
    lock, record, _ = open_(tmp_path)
    # failed before its first step: the log holds only its run event
    (tmp_path / "metrics.jsonl").write_text('{"kind":"run","time_s":1.0,"run_id":"x"}\n')
    lock.release()
    lock, record2, _ = open_(tmp_path)
    lock.release()
    assert record2.run_id != record.run_id


def test_start_over_moves_the_old_run_aside_and_deletes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    lock, old, _ = open_(run_dir)
    lock.release()
    leave_checkpoints(run_dir, 300)
    (run_dir / "metrics.jsonl").write_text('{"kind":"step"}\n')
    lock, new, notes = open_(run_dir, mode="start_over")
    try:
        aside = tmp_path / f"run.{old.run_id}"
        assert (aside / "checkpoints" / "ckpt-00000300.pt").exists()
        assert (aside / "metrics.jsonl").exists()
        assert RunRecord.read(aside).run_id == old.run_id
        assert new.run_id != old.run_id
        assert previous_run(run_dir, run_dir / "checkpoints").record.run_id == new.run_id
        assert not (run_dir / "checkpoints").exists()
        assert any(str(aside) in note for note in notes)
        with pytest.raises(RunDirError, match="in use"):  # the new directory is locked
            open_(run_dir, mode="resume")
    finally:
        lock.release()


def test_start_over_moves_a_checkpoint_dir_outside_the_run_dir_too(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "ckpt-00000007.pt").write_bytes(b"x")
    lock, _, _ = open_(run_dir, mode="start_over", checkpoint_dir=ckpt)
    lock.release()
    assert [p.name for p in ckpt.iterdir()] == [".lock"]  # a fresh, locked checkpoint dir
    (moved,) = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.")]
    assert (moved / "ckpt-00000007.pt").exists()


def test_resume_keeps_the_run_id_and_counts_attempts(tmp_path):
    lock, first, _ = open_(tmp_path)
    lock.release()
    leave_checkpoints(tmp_path, 50)
    lock, again, _ = open_(tmp_path, mode="resume")
    lock.release()
    assert again.run_id == first.run_id and again.attempts == 2


def test_resume_of_a_finished_run_says_so(tmp_path):
    lock, record, _ = open_(tmp_path, total=100.0)
    lock.release()
    from dataclasses import replace

    replace(record, status="finished", progress=100.4, checkpoint_step=90).write(tmp_path)
    with pytest.raises(RunFinished, match=f"run {record.run_id} already finished at tau 100.4 / 100"):
        open_(tmp_path, mode="resume", total=100.0)
    assert not (tmp_path / ".lock").read_text().strip()
    # A longer total_progress continues the finished run.
    lock, again, _ = open_(tmp_path, mode="resume", total=200.0)
    lock.release()
    assert again.run_id == record.run_id and again.total_progress == 200.0


def test_a_stale_directory_is_refused_by_the_cli_with_exit_2(tmp_path):
    """`elastic run` on a directory with an older run's checkpoints: one line, exit 2, before any cluster."""
    run_dir = tmp_path / "run"
    leave_checkpoints(run_dir, 400)
    job = tmp_path / "job.yaml"
    job.write_text(f"""
name: stale
task: examples.digits:DigitsTask
batch_size_per_worker: 8
total_progress: 10
optimizer: {{name: sgd, lr: 0.1}}
run_dir: {run_dir}
metrics: {{enabled: false}}
""")
    started = time.monotonic()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-m", "elastic_app.cli", "run", str(job), "--quiet"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint step 400" in errors[0] and "--start-over" in errors[0]
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 60
    assert (run_dir / "checkpoints" / "ckpt-00000400.pt").exists()

    # --start-over: the old run goes aside (kept), a new run completes in the directory.
    out = subprocess.run([sys.executable, "-m", "elastic_app.cli", "run", str(job), "--quiet", "--start-over"], cwd=ROOT,
                         env={**env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert (aside / "checkpoints" / "ckpt-00000400.pt").exists()
    record = RunRecord.read(run_dir)
    assert record.status == "finished" and f"run {record.run_id}" in out.stdout
    assert record.checkpoint_step == record.steps and record.checkpoint_step != 400


def test_two_runs_cannot_share_a_checkpoint_dir(tmp_path):
    shared = tmp_path / "shared-ckpt"
    lock, record, _ = open_(tmp_path / "a", checkpoint_dir=shared)
    try:
        with pytest.raises(RunDirError, match=f"checkpoint.dir: {shared} is in use by run {record.run_id}"):
            open_(tmp_path / "b", checkpoint_dir=shared)
        assert not (tmp_path / "b" / ".lock").read_text().strip()  # b's own lock was let go
    finally:
        lock.release()
    lock, _, _ = open_(tmp_path / "b", checkpoint_dir=shared)  # free once a's run ended
    lock.release()


def test_a_checkpoint_uri_is_not_treated_as_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lock, _, _ = open_run(tmp_path / "run", "s3://bucket/ckpt", "job", 10.0)
    lock.release()
    assert not (tmp_path / "s3:").exists()
