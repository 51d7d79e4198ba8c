"""Environments inside the RL loop (tiny model): multi-turn episodes train with no loss on the
environment's tokens, log their episode metrics, and bad environment configs fail up front."""

import json

import pytest

from posttrain.config import ConfigError, load_config
from posttrain.trainers import rl
from posttrain.trainers.rl_run import train_rl

GAME = ["model.name=tiny-random", "task={name: guess_the_number, low: 1, high: 8, max_turns: 3, test_size: 4}",
        "environment={type: guess_the_number, low: 1, high: 8, max_turns: 3}", "reward={type: numeric}",
        "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=4", "trainer.eval_problems=4",
        "trainer.threads=1", "trainer.lr=1e-3"]


def test_multi_turn_episodes_train_without_loss_on_environment_tokens(tmp_path, monkeypatch):
    seen = []
    original = rl.RLUpdate.learn
    monkeypatch.setattr(rl.RLUpdate, "learn", lambda self, r, *a: original(self, r, *a) if seen.append(r) is None else None)
    summary = train_rl(load_config(None, GAME + ["trainer.steps=2"]), output_dir=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 2
    for r in seen:
        env_tokens = (r.completion_mask == 1) & (r.action_mask == 0)
        assert (r.loss_mask[env_tokens] == 0).all()  # observations are attended to, never trained on
        assert (r.advantages[env_tokens] == 0).all()
        assert (r.loss_mask <= r.policy_mask).all()
    assert any(((r.completion_mask == 1) & (r.action_mask == 0)).any() for r in seen)  # some episode had 2+ turns
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(1 <= row["env/turns_mean"] <= 3 for row in rows)
    assert 0 < rows[0]["env/env_token_frac"] < 1


def test_bad_environment_configs_fail_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="distributed.rollout_workers=0"):
        load_config(None, GAME + ["distributed.rollout_workers=1"])
    with pytest.raises(ValueError, match="unknown environment type 'chess'"):
        train_rl(load_config(None, GAME[:2] + ["environment={type: chess}"] + GAME[3:]),
                 output_dir=str(tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run").exists()
