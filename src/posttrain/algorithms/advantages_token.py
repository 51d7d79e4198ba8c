"""Token-level advantage estimators: a critic (GAE), discounted returns (REINFORCE++) and
process rewards (PURE), plus the PPO value loss.

Token rewards: the outcome reward ``rewards[i]`` is placed on the last completion token of
sample i and ``token_rewards`` (e.g. a per-token KL penalty, see
``regularizers.kl_in_reward``) is added on top; NaN entries of ``token_rewards`` count as 0.
Positions with mask 0 inside a completion (tool outputs in multi-turn rollouts) carry the
running value/return through unchanged, as verl does.
"""

from __future__ import annotations

from typing import Optional

import torch

from posttrain.algorithms.advantages import group_stats, masked_whiten
from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput, PolicyLossOutput, masked_mean


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last completion token of each row, -1 for an empty row. [N] long."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(-1).values


def token_level_rewards(inp: AdvantageInput) -> torch.Tensor:
    """[N, T] float64: outcome reward on each row's last token + ``token_rewards``, 0 on padding."""
    m = inp.mask.to(torch.float64)
    out = torch.zeros_like(m)
    last = last_token_index(inp.mask)
    rows = (last >= 0).nonzero().squeeze(-1)
    out[rows, last[rows]] = inp.rewards.to(torch.float64)[rows]
    if inp.token_rewards is not None:
        out = out + torch.nan_to_num(inp.token_rewards.to(torch.float64), nan=0.0)
    return out * m


def _gae_raw(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    if inp.values is None:
        raise ValueError("gae needs AdvantageInput.values (critic values [N, T])")
    r = token_level_rewards(inp)
    v = inp.values.detach().to(torch.float64)
    m = inp.mask.to(torch.float64)
    n, t_len = m.shape
    adv = torch.zeros_like(m)
    next_v = torch.zeros(n, dtype=torch.float64, device=m.device)
    next_a = torch.zeros_like(next_v)
    for t in reversed(range(t_len)):
        valid = m[:, t] > 0
        delta = r[:, t] + cfg.gamma * next_v - v[:, t]
        a = delta + cfg.gamma * cfg.lam * next_a
        adv[:, t] = torch.where(valid, a, torch.zeros_like(a))
        next_v = torch.where(valid, v[:, t], next_v)
        next_a = torch.where(valid, a, next_a)
    return adv


@ADVANTAGES.register(
    "gae",
    paper="High-Dimensional Continuous Control Using Generalized Advantage Estimation (arXiv:1506.02438)",
)
def gae(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """GAE: delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1}.

    Paper: arXiv:1506.02438 (with PPO, arXiv:1707.06347, for LLMs). V after the last token is 0;
    r_t is the outcome reward on the last token plus ``token_rewards``. Needs ``values`` [N, T].
    With ``cfg.gae_whiten`` the advantages are whitened over the batch's tokens.
    Defaults: gamma = 1.0, lam = 0.95 (TRL's PPO; verl uses lam = 1.0). Value targets come
    from ``gae_returns``; the critic is trained with ``value_loss``.
    """
    adv = _gae_raw(inp, cfg)
    if cfg.gae_whiten:
        return masked_whiten(adv, inp.mask, cfg.eps)
    return adv.to(inp.mask.dtype)


def gae_returns(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """Value targets R_t = A_t + V_t with the *un-whitened* GAE advantages; 0 on padding."""
    adv = _gae_raw(inp, cfg)
    assert inp.values is not None
    return ((adv + inp.values.detach().to(torch.float64)) * inp.mask.to(torch.float64)).to(inp.mask.dtype)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: Optional[float] = 0.2,
) -> PolicyLossOutput:
    """PPO clipped value loss per token: 1/2 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    "Proximal Policy Optimization Algorithms" (arXiv:1707.06347) as implemented in the OpenAI
    baselines and TRL/verl (``cliprange_value`` = 0.2). ``clip_range=None`` gives the plain
    1/2 (V - R)^2. Aggregate the [N, T] loss with ``aggregate`` like a policy loss.
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        loss = 0.5 * unclipped
        clip_frac = torch.zeros_like(unclipped)
    else:
        clipped_v = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_v - returns) ** 2
        loss = 0.5 * torch.maximum(unclipped, clipped)
        clip_frac = (clipped > unclipped).to(mask.dtype)
    metrics = {
        "vf_clip_frac": masked_mean(clip_frac, mask).detach(),
        "vf_mse": masked_mean(unclipped, mask).detach(),
    }
    return PolicyLossOutput(loss=loss, metrics=metrics)


@ADVANTAGES.register(
    "reinforce_plus_plus",
    paper="REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models (arXiv:2501.03262)",
)
def reinforce_plus_plus(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """REINFORCE++: G_t = r_t + gamma G_{t+1};  A = whiten_batch(G) over every completion token.

    Paper: arXiv:2501.03262. r_t is the outcome reward on the last token plus ``token_rewards``
    (put the per-token KL penalty -beta * KL_t there to get the paper's KL-in-reward form; see
    ``regularizers.kl_in_reward``). No critic, no group baseline: the global (batch) whitening
    is the baseline. Default gamma = 1.0.
    """
    r = token_level_rewards(inp)
    m = inp.mask.to(torch.float64)
    n, t_len = m.shape
    returns = torch.zeros_like(m)
    running = torch.zeros(n, dtype=torch.float64, device=m.device)
    for t in reversed(range(t_len)):
        valid = m[:, t] > 0
        running = torch.where(valid, r[:, t] + cfg.gamma * running, running)
        returns[:, t] = running * m[:, t]
    return masked_whiten(returns, inp.mask, cfg.eps)


@ADVANTAGES.register(
    "pure",
    paper="Stop Summation: Min-Form Credit Assignment Is All Process Reward Model Needs for Reasoning "
    "(arXiv:2504.15275)",
)
def pure(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """PURE min-form credit assignment: V_{i,t} = min_{k >= t, k a step end} r_{i,k};  A = V - b.

    Paper: "Stop Summation" (arXiv:2504.15275): the value is the minimum of the future process
    rewards instead of their (discounted) sum, which bounds it and stops the policy from
    farming high-reward steps. ``token_rewards`` holds the PRM score on the last token of each
    step and NaN on every other position (if it holds no NaN, every completion token is a
    step). Add a verifiable outcome reward as a step reward on the final token upstream (the
    paper mixes in 10% verifiable rewards). With ``cfg.pure_rloo_baseline`` the baseline b_i is
    the leave-one-out mean over the group of the trajectory values min_k r_{j,k} (RLOO);
    otherwise b = 0. Tokens after the last step get 0.
    """
    if inp.token_rewards is None:
        raise ValueError("pure needs AdvantageInput.token_rewards (step rewards, NaN off step ends)")
    tr = inp.token_rewards.detach().to(torch.float64)
    m = inp.mask > 0
    step = m & torch.isfinite(tr)
    n, t_len = tr.shape
    inf = torch.full((n,), float("inf"), dtype=torch.float64, device=tr.device)
    running = inf.clone()
    values = torch.zeros_like(tr)
    has_future = torch.zeros_like(m)
    for t in reversed(range(t_len)):
        running = torch.where(step[:, t], torch.minimum(running, torch.nan_to_num(tr[:, t])), running)
        values[:, t] = running
        has_future[:, t] = torch.isfinite(running)
    trajectory = torch.where(torch.isfinite(running), running, torch.zeros_like(running))
    baseline = torch.zeros_like(trajectory)
    if cfg.pure_rloo_baseline:
        mean, _, count = group_stats(trajectory, inp.group_ids)
        baseline = torch.where(count > 1, (mean * count - trajectory) / (count - 1).clamp_min(1), baseline)
    adv = torch.where(has_future & m, values - baseline.unsqueeze(-1), torch.zeros_like(values))
    return adv.to(inp.mask.dtype)
