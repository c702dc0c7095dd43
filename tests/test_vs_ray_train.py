"""The arithmetic of benchmarks.vs_ray_train (no Ray): step timelines -> recovery figures, and its table."""

from __future__ import annotations

import math

from benchmarks.vs_ray_train_figures import rollbacks, skipped_samples, timeline_figures
from benchmarks.vs_ray_train_report import table


def _steps(attempt: str, first_step: int, count: int, t0: float, world: int, cursor: int, step_s: float = 0.1):
    n = 32 * world
    return [{"attempt": attempt, "step": first_step + k, "t0": t0 + k * step_s, "t1": t0 + (k + 1) * step_s - 0.01,
             "world": world, "cursor": cursor + k * n, "n": n} for k in range(count)]


def test_a_restart_from_a_checkpoint_counts_its_rollback_and_pause():
    # 4 workers run steps 1-70 (t 0-7 s); the node goes at 6.5 s; the restart at 3 resumes from the
    # checkpoint at step 50 at t 40 s.
    before = _steps("a", 1, 70, 0.0, 4, 0)
    after = _steps("b", 51, 30, 40.0, 3, 50 * 128)
    figures = timeline_figures(before + after, event_s=6.5, new_world=3)
    assert figures["to_new_size_s"] == 40.0 - 6.5
    assert math.isclose(figures["paused_s"], 40.0 - before[-1]["t1"])  # the step in flight at 6.5 s ran on
    assert figures["steps_rolled_back"] == 20 and figures["samples_replayed"] == 20 * 128
    assert skipped_samples(before + after) == 0


def test_in_place_timeline_has_no_rollback_and_a_skip_is_seen():
    before = _steps("a", 1, 10, 0.0, 1, 0)
    after = _steps("a", 11, 10, 1.5, 4, 10 * 32)
    figures = timeline_figures(before + after, event_s=1.2, new_world=4)
    assert math.isclose(figures["to_new_size_s"], 0.3)
    assert math.isclose(figures["paused_s"], 0.3)  # from the event: the idle time before it is not its doing
    assert rollbacks(before + after) == {"steps_rolled_back": 0, "samples_replayed": 0}
    skipping = before + _steps("a", 11, 10, 1.5, 4, 10 * 32 + 64)
    assert skipped_samples(skipping) == 64


def test_a_size_never_reached_is_reported_as_missing():
    figures = timeline_figures(_steps("a", 1, 10, 0.0, 4, 0), event_s=0.5, new_world=3)
    assert math.isnan(figures["to_new_size_s"]) and math.isnan(figures["paused_s"])


def test_table_has_one_line_per_event_and_the_run_totals_once():
    rows = [{"scenario": "e2e", "system": "elastic", "steps_lost": 1, "samples_replayed": 0, "samples_skipped": 0,
             "wall_s": 80.0, "accuracy": 0.98, "peak_pss_gib": 2.5,
             "events": [{"event": "grow", "to_new_size_s": 4.0, "paused_s": 0.1},
                        {"event": "loss", "to_new_size_s": 1.2, "paused_s": 1.2, "detection_s": 0.3, "reform_s": 0.5}]}]
    lines = table(rows).splitlines()
    assert len(lines) == 4
    assert "| 0.300 / 0.500 |" in lines[3] and "0.98" in lines[2] and "0.98" not in lines[3]
