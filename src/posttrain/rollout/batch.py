"""The one batch type that flows through the RL pipeline.

A ``Rollouts`` holds N sampled completions (N = prompts x completions-per-prompt). Each stage
adds fields (rewards, advantages, old/ref log-probs) and never reshapes what an earlier stage
wrote. Token tensors are right-padded to T = longest completion in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch

from posttrain.tasks.base import Problem


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor  # [N, P] long, left-padded
    prompt_mask: torch.Tensor  # [N, P] long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T] long, right-padded
    completion_mask: torch.Tensor  # [N, T] float, 1 on generated tokens (EOS included)
    group_ids: torch.Tensor  # [N] long, samples of one prompt share an id
    behaviour_logprobs: torch.Tensor  # [N, T] log pi_rollout(token), recorded while sampling
    entropies: Optional[torch.Tensor]  # [N, T] sampling entropy per step (None: engine can't tell; learner fills it)
    truncated: torch.Tensor  # [N] bool, hit max_new_tokens without EOS or stop string
    texts: list[str]  # decoded completions (stop string removed)
    problems: list[Problem]  # the problem of each sample (shared within a group)
    rewards: Optional[torch.Tensor] = None  # [N]
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    advantages: Optional[torch.Tensor] = None  # [N, T]
    returns: Optional[torch.Tensor] = None  # [N, T] (value targets, GAE)
    values: Optional[torch.Tensor] = None  # [N, T] critic values
    old_logprobs: Optional[torch.Tensor] = None  # [N, T] learner at rollout weights
    ref_logprobs: Optional[torch.Tensor] = None  # [N, T] frozen reference model
    loss_mask: Optional[torch.Tensor] = None  # [N, T] tokens that get a loss (default: completion_mask)
    metadata: list[dict[str, Any]] = field(default_factory=list)  # per-sample extras
    policy_version: Optional[torch.Tensor] = None  # [N] long, the sampler's weights version per sample

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in range(len(self.texts))]

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def select(self, index: torch.Tensor | list[int]) -> "Rollouts":
        """Samples at ``index`` (every per-sample field indexed the same way)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[idx]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx.tolist()]
            elif isinstance(value, dict):
                out[f.name] = {k: v[idx] for k, v in value.items()}
            else:
                out[f.name] = value
        return replace(self, **out)
