"""Signals and exit codes (issue 19): SIGTERM / SIGINT stop at a step boundary with a checkpoint, a
summary marked as stopped and exit 143 / 130; a second job on the same run directory is refused;
a finished run resumed again exits 0 without a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from elastic_app.cli import exit_code_for_signal
from elastic.main_thread import first_interrupt_stops

ROOT = Path(__file__).resolve().parents[1]
#: What the README promises: from SIGTERM to the driver's exit, on the digits example here.
STOP_BOUND_S = 20.0


def test_exit_codes_follow_the_shell_convention():
    assert exit_code_for_signal(None) == 0
    assert exit_code_for_signal(signal.SIGINT) == 130
    assert exit_code_for_signal(signal.SIGTERM) == 143


def test_sigterm_and_ignored_sigint_both_stop(monkeypatch):
    """SIGTERM asks for a stop like Ctrl-C; SIGINT works even where the shell set it to SIG_IGN
    (a driver started with `&` by a script), and the previous handlers come back afterwards."""
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.getsignal(signal.SIGTERM)
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            stop, seen = threading.Event(), []
            with first_interrupt_stops(stop, seen.append):
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
                assert stop.is_set() and seen == [signum]
                with pytest.raises(KeyboardInterrupt):  # the second one aborts
                    os.kill(os.getpid(), signum)
                    time.sleep(0.05)
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is previous_term
    finally:
        signal.signal(signal.SIGINT, previous_int)


def _job(tmp_path: Path, **changes) -> Path:
    spec = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    spec.update({"name": "signals", "total_progress": 200000, "run_dir": str(tmp_path / "run"),
                 "scaling": {"policy": "fixed"}, "workers": {"min": 1, "max": 2, "initial": 2},
                 "checkpoint": {"every_steps": 40, "keep_last": 2}, "metrics": {"enabled": False, "log": True}})
    spec.update(changes)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    return job


def _steps_logged(run_dir: Path) -> int:
    log = run_dir / "metrics.jsonl"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if '"kind":"step"' in line)


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, count: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and _steps_logged(run_dir) < count:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be signalled"
    assert _steps_logged(run_dir) >= count, "the run made no progress in time"


@pytest.mark.ray
def test_sigterm_and_background_sigint_stop_with_a_checkpoint_and_exit_codes(tmp_path):
    job = _job(tmp_path)
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "400"}
    cmd = [sys.executable, "-m", "elastic_app.cli", "run", str(job), "--quiet"]

    # 1. SIGTERM to the driver alone, as Kubernetes sends it to a pod's main process.
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(first, run_dir, 60)
        # Its embedded cluster is not what `address: auto` of another job on this machine would find.
        from controller.actuators.local import ray_address_file

        (address,) = [line.split(" up at ")[1].split()[0] for line in (run_dir / "train.log").read_text().splitlines()
                      if "local Ray cluster up at" in line]
        recorded = ray_address_file().read_text() if ray_address_file().exists() else ""
        assert address not in recorded
        # A second job on the same run directory meanwhile: one line naming the running one, exit 2.
        second = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        record = json.loads((run_dir / "run.json").read_text())
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by run {record['run_id']}" in second.stderr and f"pid {first.pid}" in second.stderr
        signalled = time.monotonic()
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
        stop_s = time.monotonic() - signalled
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 143, err[-3000:]
    assert stop_s < STOP_BOUND_S, f"took {stop_s:.1f} s from SIGTERM to exit"
    assert "stopped by SIGTERM" in out, out
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "stopped"
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    stopped_step = int(ckpts[-1].stem.split("-")[1])
    assert stopped_step == record["steps"] == record["checkpoint_step"]  # the checkpoint is of the stop
    assert stopped_step % 40 != 0 or stopped_step == _steps_logged(run_dir)
    log = (run_dir / "train.log").read_text()
    assert f"[{record['run_id']}]" in log and "worker failure" not in log
    print(f"SIGTERM -> exit 143 in {stop_s:.2f} s at step {stopped_step}")

    # 2. Resume it in the background with SIGINT ignored (what `elastic run ... &` gets from a
    #    non-interactive shell), then SIGINT to its whole process group (as a terminal's Ctrl-C
    #    reaches every process of the job): it still stops, exit 130, no worker counted as failed.
    resumed = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        _wait_for_steps(resumed, run_dir, _steps_logged(run_dir) + 40)
        signalled = time.monotonic()
        os.killpg(resumed.pid, signal.SIGINT)
        out, err = resumed.communicate(timeout=120)
        stop_s = time.monotonic() - signalled
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    assert resumed.returncode == 130, err[-3000:]
    assert stop_s < STOP_BOUND_S
    assert "stopped by SIGINT" in out and f"this run (resumed at step {stopped_step})" in out, out
    again = json.loads((run_dir / "run.json").read_text())
    assert again["run_id"] == record["run_id"] and again["attempts"] == 2 and again["steps"] > stopped_step
    assert "worker failure" not in (run_dir / "train.log").read_text()
    print(f"background SIGINT -> exit 130 in {stop_s:.2f} s")


def test_a_finished_run_resumed_again_exits_0_without_a_cluster(tmp_path):
    from elastic.rundir import RunRecord

    run_dir = tmp_path / "run"
    job = _job(tmp_path, total_progress=500)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "ckpt-00000120.pt").write_bytes(b"x")
    RunRecord("20260101-000000-abcdef", "signals", status="finished", progress=503.2, total_progress=500,
              checkpoint_step=120, steps=120).write(run_dir)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "elastic_app.cli", "run", str(job), "--resume"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already finished at tau 503.2 / 500" in out.stdout
    assert "Ray cluster" not in out.stderr and not (run_dir / "train.log").exists()
