"""COPO: consistency-aware advantages, so zero-variance groups still carry a signal."""

from __future__ import annotations

import math

import torch

from posttrain.algorithms.advantages import batch_std, broadcast, group_index, group_stats, scale_by_std
from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput


def outcome_entropy(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy (nats, float64) of the empirical distribution of the reward values in its group.

    0 when every sample of the group got the same reward (the zero-variance groups GRPO cannot
    learn from); ln 2 for a binary reward split half and half.
    """
    inverse, k = group_index(group_ids)
    r = rewards.to(torch.float64)
    out = torch.zeros_like(r)
    for g in range(k):
        idx = (inverse == g).nonzero().squeeze(-1)
        _, counts = torch.unique(r[idx], return_counts=True)
        p = counts.to(torch.float64) / idx.numel()
        out[idx] = float(-(p * p.log()).sum())
    return out


@ADVANTAGES.register("copo", paper="COPO: Consistency-Aware Policy Optimization (arXiv:2508.04138)")
def copo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """COPO: A_i = w_g A_i^local + (1 - w_g) A_g^global, blended by the group's outcome entropy.

    Paper: arXiv:2508.04138 (catalog 002-82). The abstract gives no formulas, and the code
    (github.com/hijih/copo-code) could not be read here; this is our reading of the abstract and of
    its ICLR 2026 review ("compute prompt returns, standardize across the mini-batch, and mix with a
    simple entropy gate"):
      - local:  A_i^local = GRPO's (r_i - mean_g) / (std_g + eps) (``cfg.std_normalize``, ``eps``);
      - global: the prompt's return R_g = mean_g r (its consistency: the fraction of agreeing correct
        answers for a binary reward), standardised over the batch's prompts, each prompt counted
        once: A_g^global = (R_g - mean_q R_q) / (std_q R_q + eps) (unbiased std; 0 when the batch
        has one prompt or all prompts agree), the same for every sample of prompt g;
      - gate:   w_g = min(1, H_g / ln 2), H_g = ``outcome_entropy`` of the group's reward values.
    A zero-variance group (H_g = 0) learns from the global term only: all-correct prompts are pushed
    up relative to the batch, all-wrong ones down, instead of contributing no gradient. A group split
    half and half is pure GRPO. The paper's global term is a loss of its own; here it enters through
    the advantage, so any policy loss (ppo_clip by default) applies it, which is the same gradient
    for a sequence-level -A log pi objective. Same value at every token, 0 on padding.
    """
    r = inp.rewards.to(torch.float64)
    mean, std, _ = group_stats(r, inp.group_ids)
    local = scale_by_std(r - mean, std, cfg.eps) if cfg.std_normalize else r - mean
    inverse, k = group_index(inp.group_ids)
    # [K] one return per prompt (every sample of a group holds the same mean)
    prompt_return = torch.zeros(k, dtype=torch.float64, device=r.device).scatter(0, inverse, mean)
    glob = scale_by_std(prompt_return - prompt_return.mean(), batch_std(prompt_return), cfg.eps)
    w = (outcome_entropy(r, inp.group_ids) / math.log(2.0)).clamp(max=1.0)
    return broadcast(w * local + (1.0 - w) * glob[inverse], inp.mask)
