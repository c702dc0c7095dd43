"""This project side by side with Ray Train 2.60's elastic ``TorchTrainer``, alternating in one run.

    python -m benchmarks.vs_ray_train [--reps 3] [--scenarios grow,loss,e2e] [--out benchmarks/results/vs_ray_train.md]

Both systems train the same job: the digits CNN (``examples.digits``), batch 32 per worker, SGD
(lr 0.05, momentum 0.9, weight decay 5e-4) wrapped in this project's AdaScale, in the global sample
order of ``ElasticSampler`` (seed 0), one Ray node per worker slot on a ``ray.cluster_utils`` cluster
of 1-CPU nodes started fresh for every run (each run is its own process). Ray Train runs with fair
settings: health check every 0.1 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), elastic resize monitor
every 2 s, worker-group start timeout 20 s instead of 60 s (measured better for it), unlimited
retries (``FailureConfig(max_failures=-1)``); its loop reports a checkpoint (model, optimizer +
AdaScale, sampler position, step) every ``CHECKPOINT_EVERY_STEPS`` steps and resumes from
``ray.train.get_checkpoint()``. This project checkpoints as often (it never reads them back here).

Scenarios (times from the first completed step):
- ``grow``: 1 node; 3 more nodes at ``GROW_AT_S``; ends ``STEADY_S`` after training at 4.
- ``loss``: 4 nodes; rank 1's node is removed (``remove_node(allow_graceful=False)``) at
  ``LOSS_AT_S``; ends ``STEADY_S`` after training at 3.
- ``e2e``: 1 node; +3 nodes at ``E2E_GROW_AT_S``, rank 1's node removed at ``E2E_LOSS_AT_S``;
  ends when tau reaches ``E2E_TOTAL_PROGRESS``.

Per run: time from the event (capacity added, node removed) to the first step at the new size;
time without training (no step running: the longest gap around the event); steps lost (completed
steps rolled back + in-flight steps abandoned; Ray Train's in-flight step at a kill is not visible
and not counted); samples replayed (samples of rolled-back steps, trained again) and skipped; wall
time; final test accuracy; peak PSS of the run's process tree (driver, GCS, raylets, workers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import write_text
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SYSTEMS = ("elastic", "ray-train")
SCENARIOS = ("grow", "loss", "e2e")
CHECKPOINT_EVERY_STEPS = 50
GROW_AT_S = 8.0
LOSS_AT_S = 8.0
STEADY_S = 8.0
E2E_GROW_AT_S = 8.0
E2E_LOSS_AT_S = 30.0
#: Large enough that both capacity changes land before the end (at 1 worker a step takes a few ms).
E2E_TOTAL_PROGRESS = 16000
#: A run that has not finished after this long is stopped and reported as such.
RUN_LIMIT_S = float(os.environ.get("VS_RAY_TRAIN_RUN_LIMIT_S", "420"))
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
RAY_TRAIN_MONITOR_INTERVAL_S = 2.0


def job_dict(total_progress: float, run_dir: str, initial_workers: int) -> dict[str, Any]:
    """The job both systems train (this project's spec format; Ray Train's loop reads the same)."""
    return {
        "name": "vs-ray-train",
        "task": "examples.digits:DigitsTask",
        "batch_size_per_worker": 32,
        "total_progress": total_progress,
        "seed": 0,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "lr_schedule": {"kind": "step", "milestones": [0.5, 0.75], "gamma": 0.1},
        "adascale": {"enabled": True},
        "workers": {"min": 1, "max": 4, "initial": initial_workers},
        "scaling": {"policy": "available", "interval_s": 0.5},
        "cluster": {"backend": "local", "num_cpus_per_worker": 1.0},
        "checkpoint": {"every_steps": CHECKPOINT_EVERY_STEPS, "keep_last": 2, "dir": f"{run_dir}/checkpoints"},
        "metrics": {"enabled": False, "log": False},
        "run_dir": run_dir,
    }


# ====================================================================== measuring
class PeakPss(threading.Thread):
    """Samples the PSS of this process and all its descendants every ``interval_s``; keeps the peak."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_pss_bytes(os.getpid()))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak_bytes


def tree_pss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total


def timeline_figures(records: list[dict[str, Any]], event_s: float, new_world: int) -> dict[str, float]:
    """From executed-step records (``t0``, ``t1`` wall times, ``world``, ``step``, ``attempt``,
    ``cursor``, ``n``): seconds from ``event_s`` to the first step at ``new_world``, the longest
    stretch without a step between the event's last step before and that first step, and the steps
    and samples rolled back (trained in an attempt, then trained again after a restart)."""
    records = sorted(records, key=lambda r: r["t0"])
    first_new = next((r for r in records if r["world"] == new_world and r["t0"] >= event_s - 1e-3), None)
    if first_new is None:
        return {"to_new_size_s": float("nan"), "paused_s": float("nan"), "steps_rolled_back": 0, "samples_replayed": 0}
    # Steps may still run after the event (the old group until it notices, or a restart at an
    # intermediate size): the longest stretch of [event, first step at the new size] that no step covers.
    longest, covered_to = 0.0, event_s
    for r in records:
        if r["t0"] >= first_new["t0"]:
            break
        if r["t0"] > covered_to:
            longest = max(longest, r["t0"] - covered_to)
        covered_to = max(covered_to, r["t1"])
    longest = max(longest, first_new["t0"] - covered_to)
    return {"to_new_size_s": first_new["t0"] - event_s, "paused_s": longest, **rollbacks(records)}


def rollbacks(records: list[dict[str, Any]]) -> dict[str, int]:
    """Steps (and their samples) completed in one attempt and done again by a later one."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    steps = sum(len(v) - 1 for v in by_step.values())
    samples = sum(r["n"] for v in by_step.values() for r in v[:-1])
    return {"steps_rolled_back": steps, "samples_replayed": samples}


def skipped_samples(records: list[dict[str, Any]]) -> int:
    """Samples never trained between the first and last step kept (the newest attempt of each step)."""
    kept: dict[int, dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: r["t0"]):
        kept[r["step"]] = r
    skipped, cursor = 0, None
    for step in sorted(kept):
        r = kept[step]
        if cursor is not None and r["cursor"] != cursor:
            skipped += max(0, r["cursor"] - cursor)
        cursor = r["cursor"] + r["n"]
    return skipped


# ====================================================================== this project
def run_elastic(scenario: str, workdir: Path) -> dict[str, Any]:
    from elastic.config import parse_job_spec
    from elastic.trainer import ElasticTrainer
    from controller.backends import make_backend
    from elastic_app.wiring import start_reconcile_loop
    from tests.elastic_runs import check_exactly_once, read_ledger

    initial = 4 if scenario == "loss" else 1
    total = E2E_TOTAL_PROGRESS if scenario == "e2e" else 1.0e9
    spec = parse_job_spec(job_dict(total, str(workdir / "elastic"), initial))
    events: list[tuple[str, float, int]] = []   # (what, wall time, size it leads to)
    state: dict[str, Any] = {"t_first": None}

    def capacity_schedule(trainer: Any) -> None:
        cluster, t0 = trainer.backend.cluster, state["t_first"]
        for what, at_s in _schedule(scenario):
            time.sleep(max(0.0, t0 + at_s - time.time()))
            if what == "grow":
                # Capacity first (the nodes are up, as on the Ray Train side), then the controller may use it.
                cluster.add_nodes(4 - len(cluster.node_ids()))
                events.append(("grow", time.time(), 4))
                cluster.capacity_limit = 4
            else:
                members = trainer.group.members
                if len(members) < 2:  # the group has not grown yet: an idle node goes (as on Ray Train's side)
                    idle = [n for n in cluster.node_ids() if n not in {m.node_id for m in members}]
                    node_id, size = idle[-1], len(members)
                else:
                    node_id, size = members[1].node_id, len(members) - 1
                cluster.capacity_limit = len(cluster.node_ids()) - 1  # the capacity is gone for good
                events.append(("loss", time.time(), size))
                cluster.remove_node(node_id, False)

    def on_step(trainer: Any) -> None:
        if state["t_first"] is None:
            state["t_first"] = time.time()
            threading.Thread(target=capacity_schedule, args=(trainer,), daemon=True).start()
        if scenario != "e2e" and len(events) == len(_schedule(scenario)):
            ev = [r for r in trainer.resizes if r.time_s >= events[-1][1] - 1e-3 and r.to_workers == events[-1][2]]
            if ev and time.time() - ev[0].time_s >= STEADY_S:
                trainer.request_stop()
        if time.time() - started > RUN_LIMIT_S:
            trainer.request_stop()

    def start_controller(trainer: Any, stop: threading.Event) -> threading.Thread:
        # The `available` policy follows capacity: pin it to the nodes this scenario starts with.
        trainer.backend.cluster.capacity_limit = initial
        return start_reconcile_loop(trainer, stop)

    started = time.time()
    summary = ElasticTrainer(spec, backend=make_backend(spec), start_controller=start_controller, ledger=True,
                             on_step=on_step, show_progress=False).run()
    wall_s = time.time() - started
    entries = read_ledger(Path(spec.run_dir))
    check_exactly_once(entries, 1438, seed=0)  # raises on any sample lost or repeated
    figures = []
    for what, at_s, size in events:
        ev = next((r for r in summary.resizes if r.time_s >= at_s - 1e-3 and r.to_workers == size), None)
        if ev is None:
            figures.append({"event": what, "to_new_size_s": float("nan"), "paused_s": float("nan")})
            continue
        paused = ev.time_s - at_s if what == "loss" else ev.pause_s  # a fault stops training at once
        figures.append({"event": what, "to_new_size_s": ev.time_s - at_s, "paused_s": paused,
                        "detection_s": ev.detection_s, "reform_s": ev.reform_s})
    return {"events": figures, "steps_lost": summary.extra["abandoned_steps"], "samples_replayed": 0,
            "samples_skipped": 0, "wall_s": wall_s, "accuracy": summary.evaluation.get("accuracy"),
            "progress": summary.progress, "stopped_early": summary.stopped_early,
            "exactly_once": "checked on the ledger"}


# ====================================================================== Ray Train
def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's worker loop: the same steps as this project's worker, with checkpoint + data
    position reported every CHECKPOINT_EVERY_STEPS steps and resumed from get_checkpoint()."""
    import datetime as _dt  # noqa: F401  (torch.distributed needs it imported in some builds)

    import ray.train
    import torch
    from torch.utils.data import default_collate

    from elastic.config import parse_job_spec
    from elastic.sampler import ElasticSampler
    from elastic.task import load_task
    from elastic.worker import build_adascale

    spec = parse_job_spec(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    attempt = f"{os.getpid()}-{time.time():.3f}"
    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    task = load_task(spec.task, spec.task_args)
    dataset = task.train_dataset()
    model = task.build_model()
    opt = build_adascale(spec, model)
    sampler = ElasticSampler(len(dataset), spec.seed)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if world > 1:
        opt.attach_ddp(ddp)
    opt.set_scale(world * spec.accumulation_steps)
    with open(config["ranks_file"], "a") as f:
        f.write(json.dumps({"attempt": attempt, "rank": rank, "world": world,
                            "node_id": ray.get_runtime_context().get_node_id()}) + "\n")
    log = open(config["timeline_file"], "a", buffering=1) if rank == 0 else None
    global_batch = spec.global_batch_size(world)
    while opt.progress < spec.total_progress and step < _stop_at_step(config["stop_file"]):
        t0 = time.time()
        plan = sampler.plan(global_batch, world, spec.accumulation_steps)
        cursor = sampler.samples_consumed
        micro_batches = plan.shard(rank)
        for indices in micro_batches:
            batch = default_collate([dataset[j] for j in indices])
            (task.loss(ddp, batch) / len(micro_batches)).backward()
        opt.step()
        opt.zero_grad()
        sampler.commit(plan)
        step += 1
        if log is not None:
            log.write(json.dumps({"attempt": attempt, "step": step, "t0": t0, "t1": time.time(), "world": world,
                                  "cursor": cursor, "n": global_batch, "progress": opt.progress}) + "\n")
        if step % CHECKPOINT_EVERY_STEPS == 0:
            _report_checkpoint(rank, step, model, opt, sampler)
    metrics = {"step": step, "progress": opt.progress}
    if rank == 0:
        metrics.update(task.evaluate(model))
        Path(config["final_file"]).write_text(json.dumps(metrics))
    ray.train.report(metrics)


def _stop_at_step(stop_file: str) -> float:
    """The step the driver asked every rank to stop at (a step far enough ahead that every rank
    reads it first: ranks that stopped at different steps would wait on each other for ever)."""
    try:
        return json.loads(Path(stop_file).read_text())["stop_at_step"]
    except (OSError, ValueError, KeyError):
        return float("inf")


def _report_checkpoint(rank: int, step: int, model: Any, opt: Any, sampler: Any) -> None:
    import ray.train
    import torch

    if rank != 0:
        ray.train.report({"step": step})
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": sampler.state_dict(),
                    "step": step}, Path(d) / "state.pt")
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_ray_train(scenario: str, workdir: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from controller.actuators.local import local_ray_environment

    os.environ.update(RAY_TRAIN_ENV)
    local_ray_environment()
    initial = 4 if scenario == "loss" else 1
    total = E2E_TOTAL_PROGRESS if scenario == "e2e" else 1.0e9
    files = {k: str(workdir / f"rt-{k}") for k in ("timeline_file", "ranks_file", "stop_file", "final_file")}
    for k in ("timeline_file", "ranks_file"):
        Path(files[k]).touch()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=bool(os.environ.get("VS_RAY_TRAIN_DEBUG")),
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                       # other clusters may run on this machine: name this one
                                       "RAY_ADDRESS": cluster.address}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(initial)]

    class Trainer(TorchTrainer):
        # fit() runs off the main thread here (the main thread changes the cluster, which
        # ray.cluster_utils allows only there); Ray Train's Ctrl-C handler can only go on the main one.
        def _register_sigint_handler(self, controller):  # noqa: D401
            return None

    trainer = Trainer(
        ray_train_loop,
        train_loop_config={"spec": job_dict(total, str(workdir / "rt"), initial), **files},
        scaling_config=ray.train.ScalingConfig(num_workers=(1, 4), use_gpu=False, resources_per_worker={"CPU": 1},
                                               elastic_resize_monitor_interval_s=RAY_TRAIN_MONITOR_INTERVAL_S),
        run_config=RunConfig(storage_path=str(workdir / "rt-storage"), name="vs",
                             failure_config=FailureConfig(max_failures=-1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result: dict[str, Any] = {}

    def fit() -> None:
        try:
            result["result"] = trainer.fit()
        except Exception as exc:  # noqa: BLE001 - reported in the table
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    started = time.time()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    timeline = lambda: _read_jsonl(files["timeline_file"])  # noqa: E731
    while not timeline() and thread.is_alive() and time.time() - started < RUN_LIMIT_S:
        time.sleep(0.05)
    t_first = timeline()[0]["t1"] if timeline() else time.time()
    events: list[tuple[str, float, int]] = []
    for what, at_s in _schedule(scenario):
        while time.time() < t_first + at_s and thread.is_alive():
            time.sleep(0.02)
        if what == "grow":
            nodes += [cluster.add_node(num_cpus=1) for _ in range(4 - len(nodes))]
            events.append(("grow", time.time(), 4))
        else:
            ranks = _read_jsonl(files["ranks_file"])
            rank1 = next((r for r in reversed(ranks) if r["rank"] == 1 and r["world"] == len(nodes)), None)
            victim = next((n for n in nodes if rank1 and n.node_id == rank1["node_id"]), None)
            size = len(nodes) - 1
            if victim is None:  # no group of this size yet: a node without a rank 1 goes
                used = {r["node_id"] for r in ranks[-ranks[-1]["world"]:]} if ranks else set()  # the newest group
                victim = next(n for n in reversed(nodes) if n.node_id not in used)
                size = max(r["world"] for r in ranks) if ranks else 1
            nodes.remove(victim)
            events.append(("loss", time.time(), size))
            cluster.remove_node(victim, allow_graceful=False)
    while thread.is_alive() and time.time() - started < RUN_LIMIT_S:
        if scenario != "e2e":
            recs = [r for r in timeline() if r["world"] == events[-1][2] and r["t0"] >= events[-1][1]]
            if recs and time.time() - recs[0]["t0"] >= STEADY_S:
                break
        time.sleep(0.2)
    last_step = max((r["step"] for r in timeline()), default=0)
    Path(files["stop_file"] + ".tmp").write_text(json.dumps({"stop_at_step": last_step + 10}))
    os.replace(files["stop_file"] + ".tmp", files["stop_file"])
    thread.join(timeout=120)
    wall_s = time.time() - started
    records = timeline()
    figures = []
    for what, at_s, size in events:
        f = timeline_figures(records, at_s, size)
        figures.append({"event": what, "to_new_size_s": f["to_new_size_s"], "paused_s": f["paused_s"]})
    rb = rollbacks(records)
    out = {"events": figures, "steps_lost": rb["steps_rolled_back"], "samples_replayed": rb["samples_replayed"],
           "samples_skipped": skipped_samples(records), "wall_s": wall_s,
           "progress": records[-1]["progress"] if records else 0.0,
           "attempts": len({r["attempt"] for r in records})}
    final = _read_jsonl(files["final_file"])
    out["accuracy"] = final[0].get("accuracy") if final else None
    if "result" not in result:
        out["error"] = result.get("error", "did not finish")
    ray.shutdown()
    cluster.shutdown()
    return out


def _schedule(scenario: str) -> list[tuple[str, float]]:
    return {"grow": [("grow", GROW_AT_S)], "loss": [("loss", LOSS_AT_S)],
            "e2e": [("grow", E2E_GROW_AT_S), ("loss", E2E_LOSS_AT_S)]}[scenario]


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


# ====================================================================== orchestration
RUNNERS: dict[str, Callable[[str, Path], dict[str, Any]]] = {"elastic": run_elastic, "ray-train": run_ray_train}


def child(system: str, scenario: str, out: Path) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    pss = PeakPss()
    pss.start()
    with tempfile.TemporaryDirectory(prefix="vsrt-") as tmp:
        row = RUNNERS[system](scenario, Path(tmp))
    row["peak_pss_gib"] = pss.stop() / 2**30
    out.write_text(json.dumps(row))
    return 0


def run_one(system: str, scenario: str, log: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", "benchmarks.vs_ray_train", "--child", system, scenario, "--result", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S + 180)
    try:
        row = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        row = {"events": [], "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    out.unlink(missing_ok=True)
    row.update(system=system, scenario=scenario)
    log(f"{scenario:5s} {system:9s} {time.time() - started:6.0f} s  " + json.dumps(
        {k: v for k, v in row.items() if k not in ("system", "scenario")}, default=str))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| scenario | system | run | event | to new size (s) | without training (s) | detection / re-formation (s) "
            "| steps lost | samples replayed / skipped | wall (s) | test accuracy | peak PSS (GiB) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    runs: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r["scenario"], r["system"])
        runs[key] = runs.get(key, 0) + 1
        events = r.get("events") or [{"event": "-"}]
        for i, e in enumerate(events):
            split = (f"{e['detection_s']:.3f} / {e['reform_s']:.3f}"
                     if e.get("detection_s") is not None and e.get("reform_s") is not None else "-")
            first = i == 0
            lines.append("| " + " | ".join([
                r["scenario"], r["system"], str(runs[key]), e.get("event", "-"), _f(e.get("to_new_size_s")),
                _f(e.get("paused_s")), split,
                str(r.get("steps_lost", "-")) if first else "",
                f"{r.get('samples_replayed', '-'):,} / {r.get('samples_skipped', '-')}" if first and "samples_replayed" in r else "",
                _f(r.get("wall_s"), 0) if first else "",
                _f(r.get("accuracy"), 4) if first else "",
                _f(r.get("peak_pss_gib"), 2) if first else "",
            ]) + " |" + (f" error: {r['error']}" if first and r.get("error") else ""))
    return head + "\n".join(lines) + "\n"


def summary_lines(rows: list[dict[str, Any]]) -> str:
    out = []
    for scenario in SCENARIOS:
        for system in SYSTEMS:
            mine = [r for r in rows if r["scenario"] == scenario and r["system"] == system]
            if not mine:
                continue
            for what in ("grow", "loss"):
                vals = [e["to_new_size_s"] for r in mine for e in r.get("events", []) if e.get("event") == what
                        and e.get("to_new_size_s") == e.get("to_new_size_s")]
                if vals:
                    out.append(f"- {scenario}, {system}, {what}: to new size median {statistics.median(vals):.2f} s "
                               f"(min {min(vals):.2f}, max {max(vals):.2f}, {len(vals)} runs)")
    return "\n".join(out)


def _f(x: Any, digits: int = 2) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", default=str(RESULTS / "vs_ray_train.md"))
    parser.add_argument("--rows", help="also append every run's row to this JSON-lines file")
    parser.add_argument("--table-from", help="write the table from a --rows file instead of running")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "SCENARIO"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], Path(args.result))
    scenarios = [s for s in args.scenarios.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for name, allowed, what in ((scenarios, SCENARIOS, "scenario"), (systems, SYSTEMS, "system")):
        bad = [x for x in name if x not in allowed]
        if bad:
            parser.error(f"{what}: unknown {bad}; allowed: {', '.join(allowed)}")
    import ray

    if args.table_from:
        rows = _read_jsonl(args.table_from)
        header = f"Rows of `{Path(args.table_from).name}` (Ray {ray.__version__})"
    else:
        rows = []
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        load_before = os.getloadavg()[0]
        for scenario in scenarios:
            for rep in range(args.reps):
                order = systems if rep % 2 == 0 else list(reversed(systems))  # alternate who goes first
                for system in order:
                    row = run_one(system, scenario, lambda m: print(m, file=sys.stderr, flush=True))
                    row["load_average"] = os.getloadavg()[0]
                    rows.append(row)
                    if args.rows:
                        with open(args.rows, "a") as f:
                            f.write(json.dumps(row) + "\n")
        header = (f"Measured {started} on this 2-core machine (load average {load_before:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after; Ray {ray.__version__}); "
                  f"`python -m benchmarks.vs_ray_train --reps {args.reps} --scenarios {','.join(scenarios)}`")
    text = f"{header}\n\n{table(rows)}\n{summary_lines(rows)}\n"
    print(text)
    write_text(Path(args.out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
