"""What a killed process can leave in a run directory, and how resume treats it (in-process,
fast): half-written or half-deleted checkpoints are never loaded and are cleaned up, a torn
metrics line or config write does not poison the resume, and rows of every JSONL log past the
checkpoint (reward errors included) are redone exactly once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain import runs
from posttrain.config import load_config
from posttrain.models.loading import latest_checkpoint
from posttrain.rewards.base import RewardOutput
from posttrain.rewards.registry import REWARDS, register_reward
from posttrain.runs import RunDir
from posttrain.trainers import rl_run
from posttrain.trainers.rl_run import train_rl

BASE = [
    "model.name=tiny-random",
    "reward={type: format, pattern: '[0-9]', match: search}",
    "rollout.num_prompts=2",
    "rollout.num_completions=4",
    "rollout.max_new_tokens=6",
    "trainer.lr=1e-2",
    "trainer.micro_batch_size=8",
    "trainer.checkpoint_every=1",
    "trainer.eval_problems=4",
    "trainer.seed=5",
]


def _cfg(*extra: str):
    return load_config(None, [*BASE, *extra])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight3(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    train_rl(_cfg("trainer.steps=3"), output_dir=str(run), quiet=True)
    return run


def test_leftovers_of_killed_processes_are_never_loaded_and_are_removed(tmp_path, straight3):
    run = tmp_path / "run"
    train_rl(_cfg("trainer.steps=3"), output_dir=str(run), quiet=True, stop_after=2)
    ckpts = run / "checkpoints"
    good = ckpts / "step_2"
    # What a kill can leave, plus a decoy that would win if COMPLETE were not required:
    writer_killed = ckpts / "step_3.tmp-424242"  # killed mid-write: files, no COMPLETE
    shutil.copytree(good, writer_killed)
    (writer_killed / "COMPLETE").unlink()
    renamer_killed = ckpts / "step_4.tmp-434343"  # killed between COMPLETE and the rename
    shutil.copytree(good, renamer_killed)
    deleter_killed = ckpts / "step_1.tmp-del-444444"  # killed while deleting an old checkpoint
    deleter_killed.mkdir()
    decoy = ckpts / "step_99"  # a step_N without COMPLETE (never written by posttrain)
    decoy.mkdir()
    save_file({"junk": torch.full((3,), float("nan"))}, decoy / "model.safetensors")
    torn = run / "metrics.jsonl.tmp555"  # an atomic rewrite killed before its rename
    torn.write_text('{"step": 1')

    assert latest_checkpoint(run) == good
    cfg = load_config(run / "config.yaml")
    train_rl(cfg, output_dir=str(run), resume=True, quiet=True)

    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert _same_weights(run / "checkpoints" / "step_3", straight3 / "checkpoints" / "step_3")
    for leftover in (writer_killed, renamer_killed, deleter_killed, decoy, torn):
        assert not leftover.exists(), f"{leftover.name} survived the resume"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_3"]


def test_a_kill_in_the_middle_of_deleting_a_checkpoint_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    from posttrain.models.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    for step in (1, 2):
        run.save_checkpoint(step, model, tok, {"step": step}, keep=2)

    def killed_midway(path, ignore_errors=False):  # deletes one file, then "dies"
        next(Path(path).glob("model.safetensors")).unlink()
        raise KeyboardInterrupt("simulated SIGKILL while deleting")

    monkeypatch.setattr(runs.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(3, model, tok, {"step": 3}, keep=2)  # prunes step_1
    monkeypatch.undo()
    names = sorted(p.name for p in run.checkpoints.iterdir())
    # step_1 was renamed away before the delete began: no "step_1" with COMPLETE but no weights
    assert "step_1" not in names and any(n.startswith("step_1.tmp-del-") for n in names), names
    for p in run.checkpoints.glob("step_*"):
        if p.name[5:].isdigit():
            assert (p / "COMPLETE").exists() and (p / "model.safetensors").exists()
    assert latest_checkpoint(run.path).name == "step_3"
    run.clean_stale()
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step_2", "step_3"]


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, straight3):
    run = tmp_path / "run"
    train_rl(_cfg("trainer.steps=3"), output_dir=str(run), quiet=True, stop_after=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss/total": 0.12')  # a kill in the middle of a write
    train_rl(load_config(run / "config.yaml"), output_dir=str(run), resume=True, quiet=True)
    rows, ref = _rows(run / "metrics.jsonl"), _rows(straight3 / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in ref]


def test_config_yaml_is_replaced_atomically_on_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_rl(_cfg("trainer.steps=3"), output_dir=str(run), quiet=True, stop_after=1)
    before = (run / "config.yaml").read_text()

    def dies_mid_write(cfg, path):
        Path(path).write_text(before[: len(before) // 3])  # a third of the file, then "SIGKILL"
        raise KeyboardInterrupt("simulated SIGKILL while writing config.yaml")

    monkeypatch.setattr(rl_run, "dump_config", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train_rl(load_config(run / "config.yaml", ["trainer.steps=4"]), output_dir=str(run), resume=True, quiet=True)
    # A torn config.yaml would silently resume with defaults (e.g. the real SmolLM2 model).
    assert (run / "config.yaml").read_text() == before
    assert load_config(run / "config.yaml").trainer.steps == 3


_FLAKY = "flaky_reliability_test"


class FlakyReward:
    """Fails on completions that contain a 7, else rewards digits (deterministic)."""

    name = _FLAKY

    def __call__(self, problem, completions):
        if any("7" in c for c in completions):
            raise RuntimeError("flaky reward: saw a 7")
        return RewardOutput(rewards=[float(any(ch.isdigit() for ch in c)) for c in completions])


def test_reward_error_rows_past_the_checkpoint_are_not_duplicated(tmp_path):
    if _FLAKY not in REWARDS:
        register_reward(_FLAKY)(FlakyReward)
    extra = [f"reward={{type: {_FLAKY}}}", "trainer.on_reward_error=zero", "trainer.steps=4",
             "trainer.checkpoint_every=2", "rollout.num_completions=8", "rollout.max_new_tokens=12"]
    straight = tmp_path / "straight"
    train_rl(_cfg(*extra), output_dir=str(straight), quiet=True)
    expected = _rows(straight / "reward_errors.jsonl")
    assert {r["step"] for r in expected} >= {3}, "the test needs reward errors at step 3"

    split = tmp_path / "split"
    train_rl(_cfg(*extra), output_dir=str(split), quiet=True, stop_after=3)  # step 3 logged, checkpoint 2
    assert latest_checkpoint(split).name == "step_2" and 3 in {r["step"] for r in _rows(split / "reward_errors.jsonl")}
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    assert _rows(split / "reward_errors.jsonl") == expected  # step 3's errors once, not twice


def test_summary_after_a_kill_between_final_eval_and_summary_matches_a_straight_run(tmp_path, straight3,
                                                                                     monkeypatch):
    run = tmp_path / "run"

    def killed(self, name, data):
        raise KeyboardInterrupt("simulated SIGKILL before summary.json")

    monkeypatch.setattr(RunDir, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        train_rl(_cfg("trainer.steps=3"), output_dir=str(run), quiet=True)
    monkeypatch.undo()
    assert [r["step"] for r in _rows(run / "eval.jsonl")] == [0, 3] and not (run / "summary.json").exists()
    summary = train_rl(load_config(run / "config.yaml"), output_dir=str(run), resume=True, quiet=True)
    expected = json.loads((straight3 / "summary.json").read_text())
    # evaluations read back from eval.jsonl used to keep their "step" key in summary.json
    assert summary["eval_before"] == expected["eval_before"] and summary["eval_after"] == expected["eval_after"]
