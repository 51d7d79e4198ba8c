"""Online DPO and DNO-style iterations: pairs from the policy's own samples, the loss at an
iteration's start is exactly log 2, and a resumed run (reference updates included) is exact."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, DPOConfig, load_config
from posttrain.trainers.dpo import train_dpo
from posttrain.trainers.online_dpo import best_worst

ONLINE = ["model.name=tiny-random", "data.path=online", "task.max_operand=20",
          "reward={type: format, pattern: '^[0-9]', match: search}", "rollout.num_prompts=4",
          "rollout.num_completions=4", "rollout.max_new_tokens=4", "trainer.lr=1e-3", "trainer.eval_problems=8",
          "task.test_size=16", "trainer.threads=1", "trainer.autocast=none"]


def test_best_worst_pairs_by_hand():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.2, 0.9, 0.1])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    # group 0: first max is row 1, min row 0; group 1 all alike: no pair; group 2: max row 7, min row 8
    assert best_worst(rewards, groups) == ([1, 7], [0, 8])


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _evals(run):
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def test_held_out_pairs_are_the_initial_policys_ranked_samples_and_start_as_ties(tmp_path):
    cfg = load_config(None, ONLINE + ["trainer.steps=3", "data.held_out_prompts=12", "trainer.lr=1e-2"], cls=DPOConfig)
    train_dpo(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_3" / "trainer_state.pt", weights_only=True)
    pairs = state["held_out_pairs"]
    assert 0 < len(pairs) <= 12
    for p in pairs:  # the format reward: 1 when the completion starts with a digit, else 0
        assert p["chosen"][:1].isdigit() and not p["rejected"][:1].isdigit()
        assert len(p["chosen_rows"][1]) >= 1 and len(p["rejected_rows"][1]) >= 1
    before, after = _evals(tmp_path / "run")[0], _evals(tmp_path / "run")[-1]
    assert before["held_out_pairs"] == len(pairs) == after["held_out_pairs"]
    # before training the policy is the reference: every pair is a tie, loss log 2, margin 0, accuracy 0
    assert before["held_out_pref_loss"] == pytest.approx(math.log(2), abs=1e-9)
    assert before["held_out_reward_margin"] == pytest.approx(0.0, abs=1e-12)
    assert before["held_out_pref_accuracy"] == 0.0
    assert after["held_out_reward_margin"] != pytest.approx(0.0, abs=1e-9)  # the policy moved off the reference


def test_online_dpo_starts_at_log2_and_dno_iterations_restart_there(tmp_path):
    cfg = load_config(None, ONLINE + ["trainer.steps=4", "preference.reference_update_every=2"], cls=DPOConfig)
    train_dpo(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    rows = _rows(tmp_path / "run")
    assert any(r["online/pairs"] > 0 for r in rows)
    # policy = reference at step 1 and, after the update at the end of step 2, at step 3: h = 0
    for r in (rows[0], rows[2]):
        assert r["online/pairs"] > 0 and r["loss/preference"] == pytest.approx(math.log(2), abs=1e-6)
    assert [r.get("online/reference_updated", 0.0) for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert rows[1]["loss/preference"] != pytest.approx(math.log(2), abs=1e-6)  # the policy moved off the reference


def test_online_dpo_resumes_exactly_across_a_reference_update(tmp_path):
    overrides = ONLINE + ["trainer.steps=4", "trainer.checkpoint_every=1", "preference.reference_update_every=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_dpo(load_config(None, overrides, cls=DPOConfig), output_dir=str(straight), quiet=True)
    train_dpo(load_config(None, overrides, cls=DPOConfig), output_dir=str(split), quiet=True, stop_after=3)
    assert (split / "checkpoints" / "step_3" / "reference.safetensors").exists()  # updated at step 2
    train_dpo(load_config(split / "config.yaml", cls=DPOConfig), output_dir=str(split), resume=True, quiet=True)
    a, b = _rows(straight), _rows(split)
    assert [r.get("loss/preference") for r in a] == [r.get("loss/preference") for r in b]
    # the resumed run scores the held-out pairs it drew before training (kept in its checkpoints)
    held = [[e.get("held_out_pref_loss") for e in _evals(run)][-1] for run in (straight, split)]
    assert held[0] is not None and held[0] == held[1]
    wa = load_file(straight / "checkpoints" / "step_4" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_reference_updates_need_online_pairs_and_a_reference():
    with pytest.raises(ConfigError, match="preference.reference_update_every needs data.path=online"):
        load_config(None, ["preference.reference_update_every=2"], cls=DPOConfig)
    with pytest.raises(ConfigError, match="preference.reference_update_every"):
        load_config(None, ["data.path=online", "preference.loss=simpo", "preference.reference_update_every=2"],
                    cls=DPOConfig)
