"""Ray Train's side of ``benchmarks.vs_ray_train``: the same job in an elastic ``TorchTrainer`` whose
worker loop checkpoints and resumes; the driver changes the cluster on the scenario's schedule and
reads the recovery figures off the timeline rank 0 writes."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.vs_ray_train_figures import read_jsonl, rollbacks, skipped_samples, timeline_figures
from benchmarks.vs_ray_train_scenarios import (
    CHECKPOINT_EVERY_STEPS,
    E2E_TOTAL_PROGRESS,
    RAY_TRAIN_ENV,
    RAY_TRAIN_MONITOR_INTERVAL_S,
    RUN_LIMIT_S,
    STEADY_S,
    job_dict,
    schedule,
)

ROOT = Path(__file__).resolve().parents[1]


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
    timeline = lambda: read_jsonl(files["timeline_file"])  # noqa: E731
    while not timeline() and thread.is_alive() and time.time() - started < RUN_LIMIT_S:
        time.sleep(0.05)
    t_first = timeline()[0]["t1"] if timeline() else time.time()
    events: list[tuple[str, float, int]] = []
    for what, at_s in schedule(scenario):
        while time.time() < t_first + at_s and thread.is_alive():
            time.sleep(0.02)
        if what == "grow":
            nodes += [cluster.add_node(num_cpus=1) for _ in range(4 - len(nodes))]
            events.append(("grow", time.time(), 4))
        else:
            ranks = read_jsonl(files["ranks_file"])
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
    final = read_jsonl(files["final_file"])
    out["accuracy"] = final[0].get("accuracy") if final else None
    if "result" not in result:
        out["error"] = result.get("error", "did not finish")
    ray.shutdown()
    cluster.shutdown()
    return out
