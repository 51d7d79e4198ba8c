"""HPT: the accuracy gate splits prompts between RL and SFT, and the RL loop trains on both."""

import json

import pytest
import torch

from posttrain.config import ConfigError, load_config
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.rollout.batch import Rollouts
from posttrain.tasks.base import Problem
from posttrain.trainers.hybrid import hpt_split
from posttrain.trainers.rl_run import train_rl


def _rollouts(rewards, groups, problems):
    n = len(rewards)
    return Rollouts(prompt_ids=torch.ones(n, 2, dtype=torch.long), prompt_mask=torch.ones(n, 2, dtype=torch.long),
                    completion_ids=torch.ones(n, 3, dtype=torch.long), completion_mask=torch.ones(n, 3),
                    group_ids=torch.tensor(groups), behaviour_logprobs=torch.zeros(n, 3), entropies=None,
                    truncated=torch.zeros(n, dtype=torch.bool), texts=["x"] * n,
                    problems=[problems[g] for g in groups], rewards=torch.tensor(rewards),
                    reward_components={"correct": torch.tensor(rewards)})


def test_the_gate_sends_rarely_solved_prompts_to_sft():
    _, tok = load_model_and_tokenizer("tiny-random")
    problems = [Problem("a", "1+1?", answer="2"), Problem("b", "2+2?", answer="4"), Problem("c", "?")]
    # pass rates: a 0/4 (<= 0.25: SFT), b 2/4 (RL), c 0/4 but no answer to imitate (stays RL)
    r = _rollouts([0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0], [0] * 4 + [1] * 4 + [2] * 4, problems)
    rl, sft, metrics = hpt_split(problems, r, 0.25, tok, True, 512)
    assert rl.group_ids.tolist() == [1] * 4 + [2] * 4
    assert metrics == {"hpt/sft_prompts": 1.0, "hpt/rl_prompts": 2.0}
    assert len(sft) == 1 and sft.texts == ["2"]
    ids = sft.completion_ids[0][sft.completion_mask[0] > 0].tolist()
    assert ids == tok("2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


HPT = ["model.name=tiny-random", "task.max_operand=20", "reward={type: numeric}", "rollout.num_prompts=4",
       "rollout.num_completions=4", "rollout.max_new_tokens=4", "trainer.eval_problems=4", "trainer.threads=1",
       "trainer.lr=1e-3", "trainer.steps=2"]


def test_every_prompt_gated_to_sft_trains_on_answers_alone(tmp_path):
    # the tiny random model never answers arithmetic right: every prompt goes to SFT, the RL part
    # is empty, and the SFT loss drives the update
    train_rl(load_config(None, HPT + ["algorithm.hpt_gate=0.5"]), output_dir=str(tmp_path / "run"), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["hpt/sft_prompts"] == 4 and r["hpt/rl_prompts"] == 0 and r["grad_norm"] > 0 for r in rows)
    assert rows[1]["loss/sft"] < rows[0]["loss/sft"]  # lr 1e-3 on the same kind of answers: the NLL falls


def test_mixed_steps_train_rl_and_sft_together(tmp_path):
    # "starts with a digit": the tiny model gets it ~10% of the time, so at gate 0 the prompts
    # with no hit go to SFT and the rest to RL, in the same step
    digit = [o for o in HPT if not o.startswith("reward=")] + ["reward={type: format, pattern: '^[0-9]', match: search}"]
    train_rl(load_config(None, digit + ["algorithm.hpt_gate=0.0", "trainer.steps=3"]),
             output_dir=str(tmp_path / "run"), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["hpt/sft_prompts"] + r["hpt/rl_prompts"] == 4 for r in rows)
    mixed = [r for r in rows if r["hpt/sft_prompts"] and r["hpt/rl_prompts"]]
    assert mixed and all("loss/sft" in r and "loss/policy" in r for r in mixed)


def test_hpt_needs_a_single_update_per_step():
    with pytest.raises(ConfigError, match="algorithm.hpt_gate needs trainer.ppo_epochs=1"):
        load_config(None, HPT + ["algorithm.hpt_gate=0.5", "trainer.ppo_epochs=2"])
