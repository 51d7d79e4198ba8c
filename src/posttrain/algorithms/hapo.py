"""HAPO's token-level pieces: token-level group-average advantages and entropy-driven asymmetric clipping.

Paper: "From Uniform to Heterogeneous: Tailoring Policy Optimization to Every Token's Nature"
(arXiv:2509.16591, catalog 002-86; code github.com/starriver030515/HAPO, a verl fork, read for
the definitions). Of its four components two are here: Token Level Group Average (advantage
estimator ``hapo``) and Asymmetric Adaptive Clipping (policy loss ``hapo``). Adaptive Temperature
Sampling (a sampler change) and Differential Advantage Redistribution are not implemented.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.advantages import broadcast, grpo, group_index
from posttrain.algorithms.base import (
    ADVANTAGES,
    POLICY_LOSSES,
    AdvantageConfig,
    AdvantageInput,
    PolicyLossConfig,
    PolicyLossInput,
    PolicyLossOutput,
    masked_mean,
)
from posttrain.algorithms.losses import clean, finish, log_ratio

HAPO_PAPER = "From Uniform to Heterogeneous: Tailoring Policy Optimization to Every Token's Nature (arXiv:2509.16591)"


@ADVANTAGES.register("hapo", paper=HAPO_PAPER)
def hapo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """HAPO Token Level Group Average: A_i = (r_i - mu_g) / (sigma_g + eps), statistics over the group's tokens.

    Paper: arXiv:2509.16591 (catalog 002-86). Every token of sample i carries r_i, so with L_i its
    completion length mu_g = sum_i L_i r_i / sum_i L_i and sigma_g^2 = sum_i L_i (r_i - mu_g)^2 /
    sum_i L_i (population variance over tokens, as HAPO's code: ``std(unbiased=False)`` of the
    group's masked token scores). Long samples weigh more in the baseline, matching a token-mean
    loss. ``cfg.std_normalize`` False drops the division (Dr.GRPO style); a group whose sigma is 0
    gets A = 0. As in HAPO's code, a group where some |A_i| >= ``cfg.hapo_fallback_z`` (5.0, the
    code's threshold; a very short outlier sample) falls back to the GRPO advantage. A is the same
    at every token of a sample, 0 on padding.
    """
    r = inp.rewards.to(torch.float64)
    lengths = inp.mask.to(torch.float64).sum(-1)
    inverse, k = group_index(inp.group_ids)
    zeros = torch.zeros(k, dtype=torch.float64, device=r.device)
    tokens = zeros.clone().index_add_(0, inverse, lengths)
    mean = (zeros.clone().index_add_(0, inverse, lengths * r) / tokens.clamp_min(1.0))[inverse]
    var = (zeros.clone().index_add_(0, inverse, lengths * (r - mean) ** 2) / tokens.clamp_min(1.0))[inverse]
    std = var.sqrt()
    std = torch.where(std > 1e-9 * (1.0 + mean.abs()), std, torch.zeros_like(std))  # rounding noise is 0
    centred = r - mean
    if cfg.std_normalize:
        adv = torch.where(std > 0, centred / (std + cfg.eps), torch.zeros_like(centred))
    else:
        adv = torch.where(std > 0, centred, torch.zeros_like(centred))
    outlier = zeros.clone().index_add_(0, inverse, (adv.abs() >= cfg.hapo_fallback_z).to(torch.float64))[inverse] > 0
    out = broadcast(adv, inp.mask)
    if bool(outlier.any()):
        out = torch.where(outlier[:, None], grpo(inp, cfg).to(out.dtype), out)
    return out


def entropy_score(entropy: torch.Tensor, mask: torch.Tensor, pivot: float) -> torch.Tensor:
    """h_hat in [-1, 1] per token: log-entropy minus its ``pivot``-quantile over the masked tokens,
    positive values divided by their maximum, negative ones by the magnitude of their minimum.

    HAPO's code also divides by the masked RMS of the centred log-entropy before this scaling; the
    max / min division cancels it, so it is left out. Its code divides the negative side by the
    (negative) minimum itself, which flips those scores to >= 0 and makes every token "high
    entropy"; here negative stays negative, as the paper describes (low-entropy tokens get the wider
    lower bound). Quantile interpolation "nearest", as the code's.
    """
    keep = mask > 0
    log_h = torch.log(entropy.detach().float().clamp_min(1e-8))
    if not bool(keep.any()):
        return torch.zeros_like(log_h)
    h = log_h - torch.quantile(log_h[keep], pivot, interpolation="nearest")
    pos_max = torch.where(keep & (h > 0), h, torch.zeros_like(h)).max().clamp_min(1e-8)
    neg_min = torch.where(keep & (h < 0), h, torch.zeros_like(h)).min().clamp_max(-1e-8)
    return torch.where(keep, torch.where(h > 0, h / pos_max, h / -neg_min), torch.zeros_like(h))


@POLICY_LOSSES.register("hapo", paper=HAPO_PAPER)
def hapo_clip(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """HAPO Asymmetric Adaptive Clipping: PPO clip with per-token bounds set by the token's entropy.

    Paper: arXiv:2509.16591 (catalog 002-86). l = -min(r A, clip(r, 1 - eps_low_t, 1 + eps_high_t) A) with
        eps_low_t  = clip_low  (1 - alpha h_t)  where h_t <= 0 (low entropy), else clip_low,
        eps_high_t = clip_high (1 + alpha h_t)  where h_t > 0 (high entropy), else clip_high,
    h_t = ``entropy_score`` in [-1, 1] (``hapo_entropy_pivot`` quantile 0.8 and ``hapo_clip_alpha``
    1.0, HAPO's recipes; clip_low / clip_high the base 0.2 / 0.2). Low-entropy tokens may lose
    probability faster, high-entropy ones gain it faster. ``dual_clip`` applies as in ppo_clip.
    The entropy is the learner's (``inp.entropy``, detached). The quantile and extremes are taken
    over the tokens the loss is given, a micro-batch, as HAPO's code does (verl computes the loss
    per micro-batch), so they depend on the micro-batch size.
    """
    if inp.entropy is None:
        raise ValueError("policy loss hapo needs PolicyLossInput.entropy (the learner's token entropies; the "
                         "trainer passes them for hapo)")
    inp = clean(inp)
    h = entropy_score(inp.entropy, inp.mask, cfg.hapo_entropy_pivot)
    alpha = cfg.hapo_clip_alpha
    eps_low = torch.where(h <= 0, cfg.clip_low * (1 - alpha * h), torch.full_like(h, cfg.clip_low))
    eps_high = torch.where(h > 0, cfg.clip_high * (1 + alpha * h), torch.full_like(h, cfg.clip_high))
    ratio = torch.exp(log_ratio(inp))
    adv = inp.advantages
    unclipped = -ratio * adv
    clipped = -torch.minimum(torch.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    metrics = {"clip_frac": masked_mean(is_clipped.float(), inp.mask),
               "clip_low_mean": masked_mean(eps_low, inp.mask), "clip_high_mean": masked_mean(eps_high, inp.mask)}
    if cfg.dual_clip is not None:
        dual = -cfg.dual_clip * adv
        loss = torch.where(adv < 0, torch.minimum(loss, dual), loss)
    return finish(loss, inp, metrics)
