"""Advantage estimators. Each maps an ``AdvantageInput`` to per-token advantages [N, T]."""

from __future__ import annotations

import torch

from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, unbiased group std (0 for singleton groups) and group size."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    k = int(inverse.max()) + 1 if inverse.numel() else 0
    values = values.to(torch.float64)
    count = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, values)
    mean = total / count
    sq = torch.zeros(k, dtype=torch.float64).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(sq))
    return mean[inverse], std[inverse], count[inverse]


def broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, T], zero on padding."""
    return per_sample.to(mask.dtype).unsqueeze(-1) * mask


@ADVANTAGES.register(
    "grpo",
    paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models (arXiv:2402.03300)",
)
def grpo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g(r)) / (std_g(r) + eps), the same for every token of sample i.

    std is the unbiased (Bessel-corrected) group std. With ``cfg.std_normalize = False`` this
    is Dr.GRPO's A_i = r_i - mean_g(r) ("Understanding R1-Zero-Like Training", arXiv:2503.20783).
    """
    mean, std, _ = group_stats(inp.rewards, inp.group_ids)
    adv = inp.rewards.to(torch.float64) - mean
    if cfg.std_normalize:
        adv = adv / (std + cfg.eps)
    return broadcast(adv, inp.mask)
