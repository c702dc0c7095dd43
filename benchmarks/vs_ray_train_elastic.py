"""This project's side of ``benchmarks.vs_ray_train``: the job on ``ElasticTrainer`` with the local
backend, capacity changed by a thread on the scenario's schedule, resizes read off the trainer's summary."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.vs_ray_train_scenarios import E2E_TOTAL_PROGRESS, RUN_LIMIT_S, STEADY_S, job_dict, schedule


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
        for what, at_s in schedule(scenario):
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
        if scenario != "e2e" and len(events) == len(schedule(scenario)):
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
