"""Expert iteration: the keep rule by hand, rounds on the tiny model, exact resume mid-round,
and a clear failure when a round has nothing correct to imitate."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.config import EIConfig, load_config
from posttrain.tasks.base import Problem
from posttrain.trainers.expert_iteration import NothingToImitateError, keep_correct, train_expert_iteration

DIGIT = ["model.name=tiny-random", "task.max_operand=20", "reward={type: format, pattern: '^[0-9]', match: search}",
         "rollout.num_completions=4", "rollout.max_new_tokens=4", "expert.prompts_per_round=8",
         "expert.steps_per_round=2", "data.batch_size=4", "trainer.lr=3e-3", "trainer.eval_problems=8",
         "task.test_size=16", "trainer.threads=1"]


def test_keep_correct_dedupes_and_caps_per_prompt():
    problems = [Problem("a", "qa"), Problem("b", "qb")]
    texts = ["1", " 1 ", "2", "x", "3", "7", "7"]
    flags = [True, True, True, False, True, True, True]
    groups = [0, 0, 0, 0, 0, 1, 1]
    kept = keep_correct(problems, texts, flags, groups, cap=2)
    # prompt a: "1" kept, " 1 " is its duplicate, "2" kept, "x" wrong, "3" over the cap of 2; prompt b: "7" once
    assert [(d.problem.id, d.completion) for d in kept] == [("a", "1"), ("a", "2"), ("b", "7")]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rounds_sample_filter_and_fine_tune_and_resume_exactly_mid_round(tmp_path):
    overrides = DIGIT + ["trainer.steps=4", "trainer.checkpoint_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_expert_iteration(load_config(None, overrides, cls=EIConfig), output_dir=str(straight), quiet=True)
    rows = _rows(straight)
    assert [r["expert/round"] for r in rows] == [1, 1, 2, 2]
    fresh = [r for r in rows if "expert/kept" in r]  # the first step of each round sampled
    assert [r["step"] for r in fresh] == [1, 3]
    for r in fresh:
        assert r["expert/samples"] == 32 and 1 <= r["expert/kept"] <= 8 * 4
        assert r["expert/kept"] <= r["expert/correct_frac"] * 32  # only correct samples are kept
    train_expert_iteration(load_config(None, overrides, cls=EIConfig), output_dir=str(split), quiet=True, stop_after=3)
    train_expert_iteration(load_config(split / "config.yaml", cls=EIConfig), output_dir=str(split), resume=True,
                           quiet=True)
    assert [r["loss/nll"] for r in _rows(split)] == [r["loss/nll"] for r in rows]
    wa = load_file(straight / "checkpoints" / "step_4" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_round_without_correct_samples_fails_clearly(tmp_path, capsys):
    impossible = [o for o in DIGIT if not o.startswith("reward=")] + ["reward={type: format, pattern: '^ZZZZ$'}"]
    with pytest.raises(NothingToImitateError, match="nothing to imitate"):
        train_expert_iteration(load_config(None, impossible + ["trainer.steps=2"], cls=EIConfig),
                               output_dir=str(tmp_path / "a"), quiet=True)
    code = main(["ei", "examples/expert_iteration.yaml", *impossible, "trainer.steps=2", "--output-dir",
                 str(tmp_path / "b")])
    assert code == 1 and "nothing to imitate" in capsys.readouterr().err
