"""Process rewards through the RL trainer: a step-level reward's scores become Rollouts.token_rewards
and reach pure / reinforce_plus_plus (issue 19 item 3). pure raises without token rewards, so a run
that completes its steps with pure has had them filled by the trainer."""

from __future__ import annotations

import json
import math

import pytest

from posttrain.config import load_config
from posttrain.tasks.stepwise_arithmetic import StepwiseArithmeticTask
from posttrain.trainers.rl_run import train_rl

BASE = ["model.name=tiny-random", "rollout.num_prompts=2", "rollout.num_completions=4", "rollout.max_new_tokens=6",
        "trainer.steps=2", "trainer.lr=1e-3", "trainer.eval_problems=2", "trainer.threads=1", "trainer.seed=0"]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides", [
    ("algorithm.advantage_estimator=pure", "reward={type: step_verifier}"),
    # 003-14's refinements with REINFORCE++ (outcome on the last token + shaped steps) and the KL in the reward
    ("algorithm.advantage_estimator=reinforce_plus_plus", "reward={type: step_verifier, shaping: clip_delta}",
     "algorithm.kl.in_reward=true", "algorithm.kl.coef=0.05", "trainer.mini_batches=2"),
], ids=["pure", "rpp_clip_delta_kl"])
def test_step_verifier_trains_on_stepwise_arithmetic(tmp_path, overrides):
    cfg = load_config(None, BASE + list(overrides))
    task = StepwiseArithmeticTask(test_size=4, train_size=16)
    summary = train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True, task=task)
    assert summary["steps"] == 2
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss/total"]) and "nonfinite_skipped" not in r
        # the verifier's step statistics are logged every step; the random model's lines are no equations
        assert r["reward_component/steps"] >= 0 and r["reward_component/step_accuracy"] == 0.0


def test_pure_moves_the_policy_on_step_scores_alone(tmp_path):
    # a PRM over prefixes ("has the prefix a digit?") gives the random model's samples different step
    # scores, so PURE's min-form advantages are not all 0 and the weights move; without an outcome
    # reward the scalar reward is 0 everywhere: every bit of signal came through token_rewards
    cfg = load_config(None, BASE + ["algorithm.advantage_estimator=pure", "algorithm.policy_loss=gpg",
                                    "reward={type: prefix_prm, reward: {type: format, pattern: '[0-9]'}}"])
    summary = train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 2
    rows = _rows(tmp_path / "run")
    assert all(r["reward/mean"] == 0.0 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows), "pure got no signal from the step scores"
