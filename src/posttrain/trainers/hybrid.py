"""HPT: per prompt, RL on its rollouts when the policy already solves it often enough, SFT on its
reference answer when it does not.

    p_q = fraction of prompt q's rollouts that are correct
    L   = sum_{q: p_q > gamma} L_RL(rollouts of q)  +  sum_{q: p_q <= gamma} L_SFT(demonstration of q)

"Towards a Unified View of Large Language Model Post-Training" (HPT, arXiv:2509.04419): SFT and
RL are one policy-gradient estimator, and a gate on the rollout accuracy picks which signal a
question gets: (alpha, beta) = (1, 0) above gamma, (0, 1) at or below it. Here each part is a
token mean over its own tokens (the RL part with the configured aggregation), and the two
gradients add before one optimizer step. A gated prompt without an ``answer`` stays with RL.
The demonstration is rendered as posttrain sft renders one (trainers/sft_data.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from posttrain.evaluation.runner import correct_flags
from posttrain.rollout.batch import Rollouts
from posttrain.tasks.base import Problem
from posttrain.trainers.sft_data import Demonstration, collate, encode


def hpt_split(problems: list[Problem], rollouts: Rollouts, gate: float, tokenizer, chat_template: bool,
              max_length: int) -> tuple[Optional[Rollouts], Optional[Rollouts], dict[str, float]]:
    """(the RL rows, the SFT demonstrations as a batch, metrics); either part may be None."""
    flags, _ = correct_flags({k: v.tolist() for k, v in rollouts.reward_components.items()}, rollouts.rewards.tolist())
    flags = torch.tensor(flags, dtype=torch.float64)
    sft_groups = [g for g, p in enumerate(problems)
                  if p.answer is not None and float(flags[rollouts.group_ids == g].mean()) <= gate]
    rl_rows = torch.nonzero(~torch.isin(rollouts.group_ids, torch.tensor(sft_groups, dtype=torch.long))).squeeze(-1)
    demos = [Demonstration(problems[g], str(problems[g].answer), f"HPT demonstration of {problems[g].id}")
             for g in sft_groups]
    sft = collate(encode(tokenizer, demos, chat_template, max_length), demos,
                  pad_id=tokenizer.pad_token_id or 0) if demos else None
    rl = rollouts.select(rl_rows) if len(rl_rows) else None
    return rl, sft, {"hpt/sft_prompts": float(len(sft_groups)), "hpt/rl_prompts": float(len(problems) - len(sft_groups))}
