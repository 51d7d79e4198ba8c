"""Policy losses. Each returns a per-token loss matrix [N, T]; aggregation happens outside."""

from __future__ import annotations

import torch

from posttrain.algorithms.base import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput, PolicyLossOutput, masked_mean


@POLICY_LOSSES.register("ppo_clip", paper="Proximal Policy Optimization Algorithms (arXiv:1707.06347)")
def ppo_clip(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """PPO clipped surrogate, per token:

        r = exp(logp - logp_old)
        l = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)

    With ``dual_clip = c`` (Dual-clip PPO, arXiv:1912.09729) tokens with A < 0 are further
    bounded: l = min(l, -c * A). ``is_weights`` (mismatch correction) multiply l.
    Defaults: eps_low = eps_high = 0.2 (PPO); DAPO's clip-higher uses eps_high = 0.28.
    """
    log_ratio = (inp.logprobs - inp.old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    adv = inp.advantages
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    clip_frac = (clipped > unclipped).float()
    if cfg.dual_clip is not None:
        dual = -cfg.dual_clip * adv
        loss = torch.where(adv < 0, torch.minimum(loss, dual), loss)
    if inp.is_weights is not None:
        loss = loss * inp.is_weights
    metrics = {
        "clip_frac": masked_mean(clip_frac, inp.mask).detach(),
        "ratio_mean": masked_mean(ratio, inp.mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio**2, inp.mask).detach(),
    }
    return PolicyLossOutput(loss=loss, metrics=metrics)
