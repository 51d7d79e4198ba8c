"""Out of disk and unwritable places: refused before any work with nothing created; and a disk
that fills up *during* a checkpoint leaves the run resumable from the previous one."""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import runs
from posttrain.cli import main
from posttrain.config import load_config
from posttrain.models.loading import latest_checkpoint
from posttrain.runs import RunDirError, check_writable
from posttrain.trainers.rl_run import train_rl

Usage = namedtuple("Usage", "total used free")
TINY = ["model.name=tiny-random", "rollout.num_prompts=2", "rollout.num_completions=4", "rollout.max_new_tokens=6",
        "trainer.steps=3", "trainer.checkpoint_every=1", "trainer.eval_problems=4", "trainer.lr=1e-2",
        "trainer.micro_batch_size=8", "reward={type: format, pattern: '[0-9]', match: search}"]


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def full_disk(monkeypatch):
    calls = []

    def disk_usage(path):
        calls.append(Path(path))
        return Usage(total=10 * 2**30, used=10 * 2**30 - 5 * 2**20, free=5 * 2**20)  # 5 MB free

    monkeypatch.setattr(runs.shutil, "disk_usage", disk_usage)
    return calls


def test_check_writable_detects_too_little_free_space(tmp_path, full_disk):
    with pytest.raises(RunDirError, match=r"only 5 MB free under .*needs at least 200 MB"):
        check_writable(tmp_path / "a" / "b" / "run")
    assert full_disk == [tmp_path]  # measured on the nearest existing ancestor
    check_writable(tmp_path / "run", min_free_mb=1)  # enough for a smaller requirement


def test_check_writable_rejects_a_file_as_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "file" / "run", tmp_path / "file" / "deeper" / "run"):
        with pytest.raises(RunDirError, match="is not a directory"):
            check_writable(target)


def test_full_disk_stops_training_before_anything_is_created(tmp_path, full_disk, capsys):
    before = _tree(tmp_path)
    with pytest.raises(RunDirError, match="MB free"):
        train_rl(load_config(None, TINY), output_dir=str(tmp_path / "runs" / "r1"), quiet=True)
    assert _tree(tmp_path) == before
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: tiny-random\n")
    before = _tree(tmp_path)
    assert main(["rl", str(cfg), "--output-dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MB free" in err[0]
    assert _tree(tmp_path) == before


def test_file_as_parent_stops_training_before_anything_is_created(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    before = _tree(tmp_path)
    with pytest.raises(RunDirError, match="not a directory"):
        train_rl(load_config(None, TINY), output_dir=str(tmp_path / "file" / "run"), quiet=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: tiny-random\n")
    assert main(["rl", str(cfg), "--output-dir", str(tmp_path / "file" / "run")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert _tree(tmp_path) == sorted(before + ["c.yaml"])


def test_resume_checks_free_space_too(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_rl(load_config(None, TINY), output_dir=str(run), quiet=True, stop_after=1)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: Usage(1, 1, 0))
    with pytest.raises(RunDirError, match="MB free"):
        train_rl(load_config(run / "config.yaml"), output_dir=str(run), resume=True, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # not touched


def test_disk_full_during_a_checkpoint_leaves_the_run_resumable(tmp_path, monkeypatch):
    """ENOSPC while step 2's checkpoint is written: the error surfaces (no silent half
    checkpoint), step 1's checkpoint stays the latest, and a resume redoes step 2 exactly."""
    straight = tmp_path / "straight"
    train_rl(load_config(None, TINY), output_dir=str(straight), quiet=True)

    run = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            Path(f).write_bytes(b"\0" * 100)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(runs.torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        train_rl(load_config(None, TINY), output_dir=str(run), quiet=True)
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "step_1"
    assert [p.name for p in (run / "checkpoints").glob("step_2*")][0].startswith("step_2.tmp-")

    train_rl(load_config(run / "config.yaml"), output_dir=str(run), resume=True, quiet=True)
    a = load_file(straight / "checkpoints" / "step_3" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step_3" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    shutil.rmtree(straight)
