"""Benchmarks: a reduced scale sweep and the quick overhead run produce their tables; the synthetic task."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import overhead, scale_sweep, scale_sweep_train
from benchmarks.common import markdown_table, median_ci
from benchmarks.scale_sweep_report import summarize
from benchmarks.scale_sweep_train import RULES, TASKS, RunResult, RunSpec
from elastic.task import load_task
from examples.synthetic import SyntheticTask, SyntheticTaskError


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The benchmarks pin torch to one thread; give the rest of the session its threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _table_rows(text: str) -> list[list[str]]:
    """The data rows of the markdown table in ``text`` (header and separator dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


# ------------------------------------------------------------------------------ synthetic task
def test_synthetic_task_is_deterministic_and_noisy_only_in_training():
    a, b = SyntheticTask(seed=3), SyntheticTask(seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(SyntheticTask(seed=4).x_train, a.x_train)
    clean = SyntheticTask(seed=3, label_noise=0.0)
    assert torch.equal(clean.x_train, a.x_train) and torch.equal(clean.y_test, a.y_test)
    flipped = float((clean.y_train != a.y_train).float().mean())
    # 20% of the labels are redrawn uniformly: 7/8 of those land on another class.
    assert flipped == pytest.approx(0.2 * 7 / 8, abs=0.03)


def test_synthetic_task_trains_past_linear_and_chance():
    task = load_task("examples.synthetic:SyntheticTask", {"num_train": 2048})
    torch.manual_seed(0)
    model = task.build_model()
    before = task.evaluate(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = task.train_dataset()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(data), (32,), generator=gen)
        opt.zero_grad()
        task.loss(model, data[idx]).backward()
        opt.step()
    after = task.evaluate(model)
    assert set(after) == {"accuracy", "loss"}
    assert before["accuracy"] < 0.3 < 0.75 < after["accuracy"]
    assert after["loss"] < before["loss"]


@pytest.mark.parametrize("kwargs, field", [
    ({"label_noise": 1.0}, "label_noise"), ({"num_classes": 1}, "num_classes"),
    ({"hidden": -1}, "hidden"), ({"separation": 0.0}, "separation"), ({"num_train": 0}, "num_train"),
])
def test_synthetic_task_rejects_bad_arguments(kwargs, field):
    with pytest.raises(SyntheticTaskError, match=field):
        SyntheticTask(**kwargs)


# -------------------------------------------------------------------------------- scale sweep
def test_reduced_scale_sweep_cli_writes_table_and_figure(tmp_path):
    assert scale_sweep.main(["--seeds", "1", "--scales", "1,4", "--total-progress", "60",
                             "--processes", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "scale_sweep.md").read_text()
    assert (tmp_path / "scale_sweep.png").stat().st_size > 10_000
    rows = _table_rows(text)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (task, str(s), rule) for task in sorted(TASKS) for s in (1, 4) for rule in RULES
    ]
    for task, s, rule, acc, loss, steps, speedup, gain, diverged in rows:
        s, steps, gain = int(s), int(steps), float(gain)
        assert diverged == "0/1"  # no NaN or inf in the loss
        assert 0.0 <= float(acc.split(" +- ")[0]) <= 100.0 and math.isfinite(float(loss))
        if rule == "adascale":
            assert 1.0 <= gain <= s
            assert math.ceil(60 / s) <= steps <= 60
            assert float(speedup.rstrip("x")) == pytest.approx(60 / steps, rel=0.01)
        else:
            assert steps == math.ceil(60 / s)
            assert gain == (s if rule == "lsw" else 1.0)
    adascale_s4 = [float(r[7]) for r in rows if r[1] == "4" and r[2] == "adascale"]
    assert all(g > 1.0 for g in adascale_s4)  # the gain moved: the sweep is not trivially identity


def test_rules_apply_their_learning_rates():
    setup = scale_sweep_train.TaskSetup(name="synthetic", task_path="examples.synthetic:SyntheticTask",
                                  total_progress=40, base_lr=0.05, micro_batch=8,
                                  task_args={"num_train": 512, "num_test": 256})
    runs = {rule: scale_sweep_train.train_run(RunSpec(setup, rule, 4, 0)) for rule in RULES}
    lsw_lrs = [lr for _, lr in runs["lsw"].lr_trace]
    # LSW: lr * S after a warm-up of 5.5% of T = 2.2 tau (steps at tau 0, 4, ...), decayed at 50% and 75%.
    assert lsw_lrs[0] == pytest.approx(0.05 * 4 * 1 / 2.2)
    assert lsw_lrs[1] == pytest.approx(0.05 * 4)
    assert lsw_lrs[-1] == pytest.approx(0.05 * 4 * 0.01)
    assert [lr for _, lr in runs["identity"].lr_trace][:2] == pytest.approx([0.05, 0.05])
    ada = runs["adascale"]
    assert ada.progress >= 40 and ada.lr_trace[0][0] == 0.0
    for tau, lr in ada.lr_trace:
        schedule = 0.01 if tau >= 30 else 0.1 if tau >= 20 else 1.0
        assert 0.05 * schedule <= lr * (1 + 1e-9) and lr <= 0.05 * 4 * schedule * (1 + 1e-9)


def test_summarize_aggregates_over_seeds():
    def res(seed, acc, steps, gain):
        return RunResult(task="t", rule="adascale", scale=8, seed=seed, accuracy=acc, loss=0.5, steps=steps,
                         progress=100.0, mean_gain=gain, diverged=False, wall_s=1.0)

    (row,) = summarize([res(0, 0.90, 20, 5.0), res(1, 0.94, 30, 3.0)], {"t": 100})
    assert row.accuracy_mean == pytest.approx(0.92)
    assert row.accuracy_std == pytest.approx(math.sqrt(2) * 0.02)
    assert row.speedup == pytest.approx(100 / 25)
    assert row.mean_gain == pytest.approx(4.0)
    assert row.seeds == 2 and row.diverged == 0


def test_bad_sweep_config_raises_typed_errors():
    with pytest.raises(scale_sweep_train.SweepError, match="rule"):
        RunSpec(TASKS["digits"], "sqrt", 2, 0)
    with pytest.raises(scale_sweep_train.SweepError, match="total_progress"):
        scale_sweep_train.TaskSetup(name="x", task_path="a:B", total_progress=0, base_lr=0.1, micro_batch=4)
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(("a",), [(1, 2)])


# ----------------------------------------------------------------------------------- overhead
def test_overhead_quick_writes_its_table(tmp_path):
    assert overhead.main(["--quick", "--steps", "3", "--warmup", "1", "--repeats", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "overhead_quick.md").read_text()
    rows = _table_rows(text)
    assert [r[0] for r in rows] == [c.label for c in overhead.QUICK]
    for _, params, bare_ms, ada_ms, ratio, interval, pairs, target in rows:
        assert int(params.replace(",", "")) > 1000
        assert float(bare_ms) > 0 and float(ada_ms) > 0
        assert 0.3 < float(ratio) < 3.0
        assert pairs == "6" and re.fullmatch(r"\d\.\d{3}-\d\.\d{3}", interval)
        assert target == "reported only"  # digits is no target
    assert "--steps 3 --warmup 1 --repeats 2" in text


def test_overhead_result_pairs_ratios_and_judges_targets():
    config = overhead.OverheadConfig("resnet18", 32, 1)
    bare = tuple(100.0 for _ in range(15))
    ratios = [1.00, 1.01, 0.99, 1.02, 1.015, 1.005, 1.0, 1.03, 0.98, 1.01, 1.0, 1.01, 1.02, 0.995, 1.0]
    result = overhead.OverheadResult(config, 11_000_000, bare, tuple(100.0 * r for r in ratios))
    assert result.ratio == pytest.approx(1.005)
    assert result.interval == pytest.approx(median_ci(ratios))
    assert result.meets_target is True
    assert "<= 1.02: met" in overhead.format_table([result])
    slow = overhead.OverheadResult(overhead.OverheadConfig("gpt", 8, 1, 2), 1, bare, tuple(104.0 for _ in bare))
    assert slow.meets_target is False and "**missed**" in overhead.format_table([slow])
    assert overhead.OverheadResult(overhead.OverheadConfig("digits", 8), 1, bare, bare).meets_target is None


def test_overhead_rejects_unknown_model():
    with pytest.raises(overhead.OverheadError, match="model"):
        overhead.OverheadConfig("resnet", 32)
    assert overhead.main(["--models", "vgg"]) == 2


def test_representative_models_have_the_advertised_sizes():
    from benchmarks.models import check_sizes

    sizes = check_sizes()
    assert 10e6 < sizes["resnet18"] < 12e6 and 10e6 < sizes["gpt"] < 12e6 and sizes["digits"] < 20_000


def test_median_ci_is_the_order_statistics_interval():
    values = [1.0 + i / 100 for i in range(15)]
    assert median_ci(values) == (values[3], values[11])
    assert median_ci(values[:5]) is None




# ------------------------------------------------------------------------------ docs/benchmarks.md
def test_docs_benchmarks_page_regenerates_exactly_from_the_results():
    from benchmarks import docs

    assert docs.main(["--check"]) == 0, "docs/benchmarks.md is stale: run python -m benchmarks.docs"


def test_docs_page_orders_files_and_demotes_headings(tmp_path):
    from benchmarks import docs

    (tmp_path / "zeta.md").write_text("| a |\n|---|\n| 1 |\n")
    (tmp_path / "overhead.md").write_text("# AdaScale cost\n\n```\n# not a heading\n```\n")
    text = docs.render(tmp_path)
    assert text.index("## AdaScale cost") < text.index("## zeta")
    assert "# not a heading" in text and "## not a heading" not in text
    out = tmp_path / "docs" / "page.md"
    assert docs.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 1
    assert docs.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert docs.main(["--results", str(tmp_path), "--out", str(out), "--check"]) == 0
