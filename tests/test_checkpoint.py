"""CheckpointManager: atomic writes, verified loads, fallback past corrupt checkpoints, pruning."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from elastic.checkpoint import CheckpointError, CheckpointManager
from elastic.sampler import ElasticSampler


def training_state(step: int) -> dict:
    """What the trainer stores: model, optimizer and sampler state, plus plain values."""
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    sampler = ElasticSampler(100, seed=3)
    sampler.commit(sampler.plan(10 * (step % 9 + 1), 2, 1))
    return {
        "step": step,
        "progress": 12.5 * step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "sampler": sampler.state_dict(),
        "history": [1, 2.0, "three", None, (4, 5)],
        "dtype": torch.float32,
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def visible_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def write_foreign_checkpoint(directory: Path, step: int, payload) -> Path:
    """A checkpoint in the documented on-disk format, written without the manager's checks."""
    path = directory / f"ckpt-{step:08d}.pt"
    torch.save(payload, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / f"ckpt-{step:08d}.sha256").write_text(f"{digest}  {path.name}\n")
    return path


# -- round trip and format ----------------------------------------------------------------------


def test_round_trip(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")  # created if missing
    assert manager.load_latest() is None and manager.latest_step() is None
    state = training_state(7)
    path = manager.save(7, state)
    assert path == tmp_path / "ckpt" / "ckpt-00000007.pt"
    step, loaded = manager.load_latest()
    assert step == 7
    assert_same(state, loaded)
    # The sampler resumes from what came back.
    resumed = ElasticSampler(100)
    resumed.load_state_dict(loaded["sampler"])
    assert resumed.state_dict() == state["sampler"]


def test_on_disk_format_is_payload_plus_sha256sum_file(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(123, {"x": torch.arange(3)})
    assert visible_files(tmp_path) == ["ckpt-00000123.pt", "ckpt-00000123.sha256"]
    digest = hashlib.sha256((tmp_path / "ckpt-00000123.pt").read_bytes()).hexdigest()
    assert (tmp_path / "ckpt-00000123.sha256").read_text() == f"{digest}  ckpt-00000123.pt\n"
    # Loadable by plain torch with weights_only=True.
    assert torch.equal(torch.load(tmp_path / "ckpt-00000123.pt", weights_only=True)["x"], torch.arange(3))


def test_ordered_dict_and_nested_containers_survive(tmp_path):
    manager = CheckpointManager(tmp_path)
    state = {"od": OrderedDict(b=torch.ones(2), a=1), "nested": {"l": [[torch.zeros(1)], {"k": "v"}]}, "set": {1, 2}}
    manager.save(1, state)
    _, loaded = manager.load_latest()
    assert list(loaded["od"]) == ["b", "a"] and loaded["set"] == {1, 2}
    assert torch.equal(loaded["nested"]["l"][0][0], torch.zeros(1))


def test_save_overwrites_same_step(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(5, {"v": 1})
    manager.save(5, {"v": 2})
    assert manager.load_latest() == (5, {"v": 2})


def test_load_specific_step(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": 1})
    manager.save(2, {"v": 2})
    assert manager.load(1) == {"v": 1}
    with pytest.raises(CheckpointError, match=r"ckpt-00000009.pt: checksum file ckpt-00000009.sha256 is missing"):
        manager.load(9)


# -- pruning ------------------------------------------------------------------------------------


def test_keep_last_prunes_oldest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save(step, {"step": step})
    assert manager.steps() == [30, 40] and manager.latest_step() == 40
    assert visible_files(tmp_path) == [
        "ckpt-00000030.pt",
        "ckpt-00000030.sha256",
        "ckpt-00000040.pt",
        "ckpt-00000040.sha256",
    ]


def test_keep_last_orders_by_step_not_by_name_or_time(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (300, 20, 1000):  # e.g. after a resume from an older checkpoint
        manager.save(step, {"step": step})
    assert manager.steps() == [300, 1000]


@pytest.mark.parametrize("keep_last", [0, -1, 1.5, True])
def test_keep_last_must_be_positive_int(tmp_path, keep_last):
    with pytest.raises(CheckpointError, match=r"checkpoint.keep_last: must be an int >= 1"):
        CheckpointManager(tmp_path, keep_last=keep_last)


# -- corruption and fallback --------------------------------------------------------------------


def test_truncated_newest_falls_back_with_one_line_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": torch.arange(100)})
    newest = manager.save(2, {"v": torch.arange(200)})
    newest.write_bytes(newest.read_bytes()[:-50])
    with caplog.at_level(logging.WARNING, logger="elastic.checkpoint"):
        step, state = manager.load_latest()
    assert step == 1 and torch.equal(state["v"], torch.arange(100))
    [record] = caplog.records
    message = record.getMessage()
    assert str(newest) in message and "sha256 mismatch (file is corrupt or truncated" in message
    assert "\n" not in message


def test_flipped_byte_is_detected(tmp_path, caplog):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": torch.zeros(64)})
    newest = manager.save(2, {"v": torch.ones(64)})
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the tensor payload: torch.load alone would not notice
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="elastic.checkpoint"):
        step, _ = manager.load_latest()
    assert step == 1
    assert "ckpt-00000002.pt" in caplog.text and "sha256 mismatch" in caplog.text


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: (d / "ckpt-00000002.sha256").unlink(), "checksum file ckpt-00000002.sha256 is missing"),
        (lambda d: (d / "ckpt-00000002.sha256").write_text("not a checksum\n"), "checksum file ckpt-00000002.sha256 is malformed"),
        (lambda d: (d / "ckpt-00000002.sha256").write_text("0" * 64 + "  ckpt-00000001.pt\n"), "is malformed"),
    ],
)
def test_bad_checksum_file_falls_back(tmp_path, caplog, damage, reason):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": 1})
    manager.save(2, {"v": 2})
    damage(tmp_path)
    with caplog.at_level(logging.WARNING, logger="elastic.checkpoint"):
        assert manager.load_latest() == (1, {"v": 1})
    assert reason in caplog.text


def test_matching_checksum_but_unreadable_payload_falls_back(tmp_path, caplog):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": 1})
    bogus = tmp_path / "ckpt-00000002.pt"
    bogus.write_bytes(b"this is not a zip file")
    (tmp_path / "ckpt-00000002.sha256").write_text(f"{hashlib.sha256(bogus.read_bytes()).hexdigest()}  {bogus.name}\n")
    with caplog.at_level(logging.WARNING, logger="elastic.checkpoint"):
        assert manager.load_latest() == (1, {"v": 1})
    assert "torch.load failed" in caplog.text


def test_all_corrupt_raises_one_line_error(tmp_path, caplog):
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        path = manager.save(step, {"v": torch.arange(10)})
        path.write_bytes(path.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="elastic.checkpoint"):
        with pytest.raises(CheckpointError) as info:
            manager.load_latest()
    message = str(info.value)
    assert message.startswith(f"checkpoint.dir: none of the 3 checkpoints in {tmp_path} is readable (newest ckpt-00000003.pt: sha256 mismatch")
    assert "\n" not in message
    assert len(caplog.records) == 3


# -- weights_only -------------------------------------------------------------------------------


class NotAllowed:
    """An arbitrary Python object: torch.load(weights_only=True) must refuse to unpickle it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_checkpoint_holding_arbitrary_object_is_refused_at_load(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": 1})
    write_foreign_checkpoint(tmp_path, 2, {"model": {"w": torch.ones(1)}, "extra": NotAllowed()})
    with pytest.raises(CheckpointError) as info:
        manager.load_latest()
    message = str(info.value)
    assert message == (
        f"{tmp_path / 'ckpt-00000002.pt'}: refused by torch.load(weights_only=True): "
        f"Unsupported global: GLOBAL {__name__}.NotAllowed; a checkpoint may hold only tensors, numbers, "
        "strings, None and dicts/lists/tuples of them"
    )


@pytest.mark.parametrize(
    ("state", "where", "what"),
    [
        ({"extra": NotAllowed()}, "state['extra']", f"{__name__}.NotAllowed"),
        ({"a": [1, {"b": __import__("numpy").float64(1.0)}]}, "state['a'][1]['b']", "numpy.float64"),
        ({"a": __import__("numpy").zeros(2)}, "state['a']", "numpy.ndarray"),
        ({"fn": print}, "state['fn']", "builtin_function_or_method"),
    ],
)
def test_save_refuses_what_weights_only_load_would_refuse(tmp_path, state, where, what):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {__import__('re').escape(where)}: cannot store a {what} "):
        manager.save(1, state)
    assert visible_files(tmp_path) == []


def test_save_validates_step_and_state(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint step: must be an int >= 0"):
        manager.save(-1, {})
    with pytest.raises(CheckpointError, match="checkpoint state: must be a dict"):
        manager.save(1, [1, 2])  # type: ignore[arg-type]


# -- crashes and unwritable directories ----------------------------------------------------------


def test_leftover_temp_files_are_invisible_and_cleaned_up(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": 1})
    # What a writer killed before its rename leaves behind.
    (tmp_path / ".ckpt-00000002.pt.999-abcd.tmp").write_bytes(b"partial")
    (tmp_path / ".ckpt-00000002.sha256.999-abcd.tmp").write_text("partial")
    assert manager.steps() == [1]
    assert manager.load_latest() == (1, {"v": 1})
    CheckpointManager(tmp_path)  # a restarted job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "ckpt-00000001.sha256"]


@pytest.mark.parametrize("failing_rename", [".pt", ".sha256"])
def test_failed_rename_leaves_no_partial_checkpoint(tmp_path, monkeypatch, failing_rename):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": 1})
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(failing_rename):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=r"checkpoint.dir: cannot write .*ckpt-00000002.pt: No space left on device$"):
        manager.save(2, {"v": 2})
    monkeypatch.undo()
    assert manager.steps() == [1]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert manager.load_latest() == (1, {"v": 1})


def test_process_killed_before_rename_leaves_previous_checkpoint(tmp_path):
    # A real crash: the child dies (os._exit, no cleanup) exactly when it would rename the payload.
    script = textwrap.dedent(
        f"""
        import os, torch
        from elastic.checkpoint import CheckpointManager
        manager = CheckpointManager({str(tmp_path)!r})
        manager.save(1, {{"v": 1}})
        real_replace = os.replace
        def crash_on_payload(src, dst):
            if str(dst).endswith(".pt"):
                os._exit(17)
            real_replace(src, dst)
        os.replace = crash_on_payload
        manager.save(2, {{"v": torch.arange(1000)}})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 17
    assert "ckpt-00000002.pt" not in visible_files(tmp_path)
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the partial payload
    manager = CheckpointManager(tmp_path)
    assert manager.load_latest() == (1, {"v": 1})
    manager.save(3, {"v": 3})  # the orphaned checksum of step 2 does not get in the way
    assert manager.load_latest() == (3, {"v": 3})


def test_unwritable_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=rf"^checkpoint.dir: cannot write to {blocker}/ckpt: Not a directory$"):
        CheckpointManager(blocker / "ckpt")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_fails_at_construction(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=r"checkpoint.dir: cannot write to .*ro: Permission denied"):
            CheckpointManager(read_only)
    finally:
        read_only.chmod(0o700)
