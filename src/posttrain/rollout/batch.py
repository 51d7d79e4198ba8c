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
    is_weights: Optional[torch.Tensor] = None  # [N, T] train-inference correction weights, set once per batch
    token_selection: Optional[torch.Tensor] = None  # [N, T] bool, kl_cov / clip_cov tokens of the mini-batch
    metadata: list[dict[str, Any]] = field(default_factory=list)  # per-sample extras
    policy_version: Optional[torch.Tensor] = None  # [N] long, the sampler's weights version per sample
    # [N, T] 1 on tokens the policy sampled, 0 on tokens an environment inserted (tool results,
    # observations: attended to, never trained on); None: every completion token was sampled
    action_mask: Optional[torch.Tensor] = None
    # [N, T] process rewards from a step-level reward (rewards/process.py): each step's score on the
    # token that ends it, NaN elsewhere; read by pure, gae and reinforce_plus_plus. None: outcome only
    token_rewards: Optional[torch.Tensor] = None
    # Mixture-of-Experts (models/moe.py; hf engine): the experts the sampler sent each token to, as
    # int16 ids [N, P | T, L, k] (-1 where it routed none: the last completion token, padding), and its
    # router probabilities of those experts [N, T, L, k]; replayed by the learner under R3. None:
    # a dense model, or an engine that does not report routing
    prompt_routing: Optional[torch.Tensor] = None
    completion_routing: Optional[torch.Tensor] = None
    completion_router_probs: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in range(len(self.texts))]

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def policy_mask(self) -> torch.Tensor:
        """[N, T] the completion tokens the policy produced: what advantages, losses and
        train-inference metrics are about."""
        return self.completion_mask if self.action_mask is None else self.completion_mask * self.action_mask

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def unique_prompt_tokens(self) -> int:
        """Prompt tokens the learner runs when each group's prompt runs once (trainer.share_prompt_pass)."""
        per_group = torch.zeros(int(self.group_ids.max()) + 1, dtype=torch.long)
        per_group[self.group_ids] = self.prompt_mask.sum(-1).long()  # rows of a group share their prompt
        return int(per_group.sum())

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

    @staticmethod
    def concat(parts: list["Rollouts"]) -> "Rollouts":
        """One batch from several (e.g. from several rollout workers), in order.

        Prompts are re-left-padded and completions re-right-padded to the widest part (pad id 0
        under mask 0, never read); group ids are offset so groups stay distinct and contiguous.
        Fields set on only some parts are dropped: a stage fills them on the whole batch.
        """
        if not parts:
            raise ValueError("Rollouts.concat needs at least one part")
        P = max(p.prompt_ids.shape[1] for p in parts)
        T = max(p.completion_ids.shape[1] for p in parts)

        def pad(t: Optional[torch.Tensor], width: int, left: bool, value: float = 0) -> Optional[torch.Tensor]:
            if t is None or t.dim() < 2 or t.shape[1] == width:
                return t
            fill = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype)
            return torch.cat([fill, t] if left else [t, fill], dim=1)

        out: dict[str, Any] = {}
        offset, groups = 0, []
        for p in parts:
            groups.append(p.group_ids + offset)
            offset += int(p.group_ids.max()) + 1 if len(p) else 0
        out["group_ids"] = torch.cat(groups)
        for f in fields(Rollouts):
            if f.name == "group_ids":
                continue
            values = [getattr(p, f.name) for p in parts]
            if isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            elif isinstance(values[0], dict):
                keys = set.intersection(*(set(v) for v in values))
                out[f.name] = {k: torch.cat([v[k] for v in values]) for k in sorted(keys)}
            elif any(v is None for v in values):
                out[f.name] = None
            else:
                width, left = (P, True) if f.name.startswith("prompt_") else (T, False)
                value = -1 if "rout" in f.name else 0  # MoE routing: -1 = not routed
                out[f.name] = torch.cat([pad(v, width, left, value) for v in values])
        return Rollouts(**out)
