"""Worker-group benchmarks: the quick modes produce their tables on a real local Ray cluster;
the table logic and the wide-MLP task without Ray."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import group_overhead, group_overhead_measure, resize_latency
from benchmarks.ray_common import MODELS, BenchmarkError, job_spec, markdown_table
from benchmarks.resize_latency import ResizeSample, summarize
from elastic.config import parse_job_spec
from elastic.task import load_task
from examples.wide_mlp import WideMLPError, WideMLPTask, parameter_count


def _tables(text: str) -> list[list[list[str]]]:
    """Data rows of every markdown table in ``text`` (header and separator dropped)."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            current.append([cell.strip() for cell in line.strip("|").split("|")])
        else:
            current = None
    return [t[2:] for t in tables]


# ------------------------------------------------------------------------------ no Ray
def test_wide_mlp_has_about_ten_million_parameters_and_trains():
    task = load_task("examples.wide_mlp:WideMLPTask", {})
    model = task.build_model()
    count = sum(p.numel() for p in model.parameters())
    assert count == parameter_count() == MODELS["wide-mlp"].parameters
    assert 9_500_000 < count < 11_000_000
    data = task.train_dataset()
    x, y = torch.utils.data.default_collate([data[i] for i in range(32)])
    assert x.shape == (32, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = task.loss(model, (x, y))
    first.backward()
    opt.step()
    assert task.loss(model, (x, y)).item() < first.item()
    assert set(task.evaluate(model)) == {"accuracy", "loss"}


def test_wide_mlp_synthetic_data_and_errors():
    small = WideMLPTask(hidden=8, depth=1, data="synthetic", num_train=100, num_test=10, seed=1)
    assert len(small.train_dataset()) == 100
    assert torch.equal(small.x_train, WideMLPTask(hidden=8, depth=1, data="synthetic", num_train=100, num_test=10, seed=1).x_train)
    assert sum(p.numel() for p in small.build_model().parameters()) == parameter_count(64, 8, 1, 10)
    with pytest.raises(WideMLPError, match="data: must be one of digits, synthetic"):
        WideMLPTask(data="imagenet")
    with pytest.raises(WideMLPError, match="depth: must be an int >= 1"):
        WideMLPTask(depth=0)


def test_digits_parameter_count_matches_the_model():
    from examples.digits import DigitsNet

    assert MODELS["digits"].parameters == sum(p.numel() for p in DigitsNet().parameters())


@pytest.mark.parametrize("model", list(MODELS))
def test_job_spec_is_a_valid_spec_of_the_model(model):
    parsed = job_spec(model, checkpoint_dir="/tmp/x")
    assert parse_job_spec(parsed.model_dump(mode="json", exclude_unset=True)) == parsed
    assert parsed.task == MODELS[model].task and parsed.batch_size_per_worker == 32
    assert parsed.metrics.enabled is False
    with pytest.raises(BenchmarkError, match="model: unknown 'resnet'"):
        job_spec("resnet")


def _sample(mode, frm, to, gap, extra=0.0, model="digits"):
    return ResizeSample(model, mode, frm, to, gap, extra, {"reform": gap})


def test_resize_summary_medians_and_ratio():
    samples = [
        _sample("in-place", 1, 2, 0.05, 0.01), _sample("in-place", 1, 2, 0.07), _sample("in-place", 1, 2, 0.5),
        _sample("restart", 1, 2, 9.0), _sample("restart", 1, 2, 12.0), _sample("restart", 1, 2, 6.0),
        _sample("in-place", 2, 1, 0.04), _sample("restart", 2, 1, 8.0),
    ]
    assert samples[0].pause_s == pytest.approx(0.06) and samples[0].resize == "grow 1->2"
    assert samples[-1].resize == "shrink 2->1"
    rows = summarize(samples)
    assert [r[2] for r in rows] == ["grow 1->2", "shrink 2->1"]
    grow = rows[0]
    assert grow[3] == 3 and grow[4] == "0.070" and grow[5] == "0.500"
    assert grow[6] == "9.00" and grow[7] == "12.00" and grow[8] == "129x"
    text = resize_latency.report(samples, "cmd", "load a", "load b", 1.0)
    assert "digits grow 1->2: in-place pause 0.070 s (meets the <= 1 s target)" in text
    assert "digits shrink 2->1: restart-based / in-place = 200x (meets the >= 10x target)" in text
    slow = summarize([_sample("in-place", 1, 2, 2.0), _sample("restart", 1, 2, 3.0)])
    assert "misses the <= 1 s target" in resize_latency.report(
        [_sample("in-place", 1, 2, 2.0), _sample("restart", 1, 2, 3.0)], "cmd", "a", "b", 1.0)
    assert slow[0][8] == "2x"


def test_overhead_report_flags_the_target():
    def result(group_ms):
        return group_overhead_measure.OverheadResult("digits", 1, 100, group_ms, 10.0, 9.0, 8.5, 1.0, 0.8, 1.0, 0.01, 0.0,
                                             paired_ratio=group_ms / 10.0 + 0.01)

    assert result(10.5).ratio == pytest.approx(1.05)
    met = _tables(group_overhead.report([result(10.5)], "cmd", "a", "b", 1.0))
    assert met[0][0][-1] == "<= 1.10: met" and met[1][0][3] == "9.00 / 8.50" and met[1][0][4] == "1.50"
    missed = _tables(group_overhead.report([result(12.0)], "cmd", "a", "b", 1.0))
    assert missed[0][0][-1] == "<= 1.10: missed"


def test_markdown_table_refuses_ragged_rows():
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines()[2] == "| 1 | 2 |"
    with pytest.raises(ValueError, match="row has 1 cells, expected 2"):
        markdown_table(["a", "b"], [[1]])


# ------------------------------------------------------------------------------ Ray: the quick modes
@pytest.fixture(scope="module")
def cluster():
    from benchmarks.ray_common import local_cluster

    with local_cluster(2) as c:
        yield c


@pytest.mark.ray
@pytest.mark.slow
def test_resize_latency_quick_table(cluster, tmp_path, capsys):
    assert resize_latency.main(["--quick", "--out", str(tmp_path)], cluster=cluster) == 0
    text = (tmp_path / "resize_latency.md").read_text()
    main_table, details = _tables(text)[:2]
    assert [(r[0], r[2]) for r in main_table] == [("digits", "grow 1->2"), ("digits", "shrink 2->1")]
    for row in main_table:
        inplace, restart = float(row[4]), float(row[6])
        assert 0 < inplace < restart, row
        assert row[8].endswith("x") and math.isfinite(float(row[8][:-1]))
    assert {(r[1], r[2]) for r in details} == {(rs, m) for rs in ("grow 1->2", "shrink 2->1") for m in ("in-place", "restart")}
    assert "load average" in text and "written to" in capsys.readouterr().out


@pytest.mark.ray
@pytest.mark.slow
def test_group_overhead_quick_table(cluster, tmp_path):
    assert group_overhead.main(["--quick", "--out", str(tmp_path)], cluster=cluster) == 0
    text = (tmp_path / "group_overhead.md").read_text()
    main_table, details = _tables(text)[:2]
    # One step per call, then the number `steps_per_call: auto` picks from that row's step time.
    assert [row[:3] for row in main_table] == [["digits", "9,930", "2"]] * len(main_table)
    assert main_table[0][3:5] == ["1", "40"]
    if len(main_table) == 2:
        assert int(main_table[1][3]) == group_overhead_measure.auto_steps_per_call(float(main_table[0][6])) > 1
    for row, detail in zip(main_table, details):
        ddp_ms, group_ms, ratio, paired = (float(x) for x in row[5:9])
        assert 0 < ddp_ms and 0 < group_ms and ratio == pytest.approx(group_ms / ddp_ms, rel=0.01) and paired > 0
        # Same initial weights, same samples, same optimizer: the two arms compute the same losses.
        assert float(detail[-1]) < 1e-4
    assert "load average" in text
