"""Reliability table: each failure scenario once on the embedded local Ray cluster, with figures.

    python -m benchmarks.chaos [--out benchmarks/results/chaos.md]

For every scenario: how it was triggered, what happened, samples lost or duplicated (from the
exactly-once ledger check), steps of work lost, and the time to recover. Worker failures run at 4
workers and hit each rank position in turn (rank 0, the rendezvous host, included); their recovery
is measured from the fault itself (its wall time stamped just before it is applied) to training at
the new size, with the trainer's split: detection (the fault's first sign -> the driver knows and
aborts every collective) and re-formation (-> the group is whole at 3). The same scenarios run as
assertions in tests/test_chaos.py and tests/test_elastic_ray.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_text

from tests.elastic_runs import ROOT, check_exactly_once, digits_spec, read_ledger
from tests.fault_injection import FaultAtEachRank, recovery_rows
from tests.test_chaos import KillAtSteps

DIGITS_TRAIN_LEN = 1438


def _ledger_verdict(run_dir: Path) -> tuple[str, int]:
    entries = read_ledger(run_dir)
    try:
        counts = check_exactly_once(entries, DIGITS_TRAIN_LEN, seed=0)
        return "0", counts["samples"]
    except AssertionError as exc:
        return f"MISMATCH: {exc}", 0


def _stamp(line: str) -> float:
    """Seconds of a train.log line's timestamp."""
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _at_each_rank(base: Path, fault: str, how: str, what: str):
    """4 workers; the fault hits rank 1, 0, 3, 2 in turn (each after the group is back at 4)."""
    from elastic_app.wiring import make_trainer

    run_dir = base / fault
    chaos = FaultAtEachRank(fault, ranks=[1, 0, 3, 2], steps_between=40)
    policy = "available" if fault == "node" else "fixed"  # a removed node's capacity comes back through the controller
    spec = digits_spec(run_dir, **{"workers.initial": 4, "workers.max": 4, "scaling.policy": policy})
    s = make_trainer(spec, ledger=True, on_step=chaos, show_progress=False).run()
    lost, _ = _ledger_verdict(run_dir)
    rows = recovery_rows(chaos, s)
    per_rank = lambda key: ", ".join(f"r{r['rank']} {r[key]:.2f}" for r in rows)  # noqa: E731
    return (what, how, f"{s.worker_failures} failures at 4 workers, one per rank position; re-formed at 3, "
                       f"regrown to 4 each time; tau {s.progress:.0f}",
            lost, f"{s.extra['abandoned_steps']} of {s.worker_failures}", per_rank("to_new_size_s"),
            per_rank("detection_s"), per_rank("reform_s"))


def scenario_kills(base: Path):
    return _at_each_rank(base, "sigkill", "os.kill(worker pid, SIGKILL) 10 ms after a call ended (inside the next call)",
                         "SIGKILL a worker mid-call, at each rank position")


def scenario_node(base: Path):
    return _at_each_rank(base, "node", "cluster_utils remove_node(allow_graceful=False) of the rank's node, 10 ms "
                         "after a call ended; clock started before the hand-off to the main thread that removes it",
                         "Remove a Ray node mid-call, at each rank position")


def scenario_hang(base: Path):
    return _at_each_rank(base, "sigstop", "os.kill(worker pid, SIGSTOP): the process neither dies nor answers",
                         "A worker hangs (SIGSTOP), at each rank position")


def scenario_all_lost(base: Path):
    from elastic_app.wiring import make_trainer

    run_dir = base / "all"
    chaos = KillAtSteps([140], every_worker=True)
    spec = digits_spec(run_dir, total_progress=1500, **{"workers.initial": 2, "checkpoint.every_steps": 25})
    s = make_trainer(spec, ledger=True, on_step=chaos, show_progress=False).run()
    log = (run_dir / "train.log").read_text().splitlines()
    stamps = [_stamp(line) for key in ("lost every worker", "resumed with") for line in log if key in line][:2]
    recover = f"{stamps[1] - stamps[0]:.1f}" if len(stamps) == 2 else "-"
    redone = next((m.group(1) for line in log if (m := re.search(r"\((\d+) step\(s\) redone\)", line))), "?")
    lost, _ = _ledger_verdict(run_dir)
    return ("Lose every worker", "SIGKILL both workers in one step",
            "waited for capacity, started 2 new workers, resumed from the newest checkpoint (every 25 steps)",
            lost, f"{redone} (since the checkpoint)", f"{recover} (from the log line of the loss, not from the kill)", "-", "-")


def scenario_driver(base: Path):
    import yaml

    run_dir = base / "driver"
    job = base / "driver.yaml"
    spec = yaml.safe_load((ROOT / "examples/quickstart.yaml").read_text())
    spec.update({"total_progress": 1200, "run_dir": str(run_dir), "scaling": {"policy": "fixed"},
                 "workers": {"min": 1, "max": 2, "initial": 2}, "checkpoint": {"every_steps": 40},
                 "metrics": {"enabled": False}})
    job.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "elastic_app.cli", "run", str(job), "--ledger", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = run_dir / "ledger.jsonl"
    while first.poll() is None and not (ledger.exists() and len(ledger.read_text().splitlines()) >= 130):
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = len(ledger.read_text().splitlines())
    started = time.monotonic()
    second = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True)
    resumed_in = "-"
    log = (run_dir / "train.log").read_text()
    ckpt = [line for line in log.splitlines() if "resuming from checkpoint step" in line]
    ckpt_step = int(ckpt[-1].split("step ")[1].split()[0]) if ckpt else -1
    lost, _ = _ledger_verdict(run_dir)
    resumed_in = f"{time.monotonic() - started:.0f} (whole restart: cluster, workers, run)"
    return ("Kill the driver (and its local cluster)", "os.killpg(driver, SIGKILL), then `elastic run --resume`",
            f"exit {second.returncode}; resumed at checkpoint step {ckpt_step} with its cursor, tau, optimizer, AdaScale",
            lost, f"{killed_at - ckpt_step} (since the checkpoint)", resumed_in, "-", "-")


def scenario_corrupt(base: Path):
    from elastic_app.wiring import make_trainer

    run_dir = base / "corrupt"
    spec = digits_spec(run_dir, total_progress=400, **{"workers.initial": 1, "checkpoint.every_steps": 50})
    make_trainer(spec, show_progress=False).run()
    newest = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    spec2 = digits_spec(run_dir, total_progress=600, **{"workers.initial": 1, "checkpoint.every_steps": 50})
    s = make_trainer(spec2, resume=True, show_progress=False).run()
    log = (run_dir / "train.log").read_text()
    warn = next((line.split(": ", 1)[1] for line in log.splitlines() if "skipping checkpoint" in line), "?")
    return ("Corrupt the newest checkpoint", "flip one byte in the middle of ckpt-00000400.pt, then resume",
            f"detected: `{warn.split('/')[-1][:90]}`; resumed from the previous one; tau {s.progress:.0f}",
            "0 (resumed from an exact state)", "50 (since the previous checkpoint)", "-", "-", "-")


def scenario_nan(base: Path):
    from elastic_app.wiring import make_trainer

    run_dir = base / "nan"
    spec = digits_spec(run_dir, total_progress=800, task="tests.chaos_tasks:PoisonedDigitsTask",
                       task_args={"poison": [5, 700, 1300]}, **{"workers.initial": 2})
    s = make_trainer(spec, ledger=True, show_progress=False).run()
    lost, _ = _ledger_verdict(run_dir)
    return ("NaN gradients", "3 training samples are NaN images: any batch holding one has a NaN loss on one rank",
            f"{s.skipped_steps} steps skipped on every rank, counted in elastic_skipped_steps_total; estimates and tau untouched",
            f"{lost} (a skipped step's samples are consumed, not applied)", "0", "-", "-", "-")


SCENARIOS = [scenario_kills, scenario_node, scenario_hang, scenario_all_lost, scenario_driver, scenario_corrupt,
             scenario_nan]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/chaos.md")
    parser.add_argument("--only", help="comma-separated scenario function names")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    chosen = [f for f in SCENARIOS if not args.only or f.__name__ in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="elastic-chaos-") as tmp:
        for scenario in chosen:
            t0 = time.monotonic()
            rows.append(scenario(Path(tmp)))
            print(f"{scenario.__name__}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    header = ("| scenario | how it was triggered | what happened | samples lost or duplicated | steps of work lost "
              "| from the fault to training at the new size (s) | detection (s) | re-formation (s) |\n"
              "|---|---|---|---|---|---|---|---|\n")
    table = header + "".join("| " + " | ".join(row) + " |\n" for row in rows)
    load = os.getloadavg()
    text = (f"Measured {time.strftime('%Y-%m-%d')} on this 2-core machine (load average {load[0]:.1f}); "
            f"`python -m benchmarks.chaos`\n\n{table}")
    print(text)
    write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
