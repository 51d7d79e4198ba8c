"""Outcome-reward advantage estimators built on group statistics.

Each maps an ``AdvantageInput`` to per-token advantages [N, T] (zero on padding). The
estimators that need token-level rewards or a critic (GAE, REINFORCE++, PURE) live in
``advantages_token.py``; those that reshape the GRPO signal with extra per-sample information
(W-REINFORCE, unlikeliness, SEED-GRPO, ACE) in ``advantages_shaped.py``.

Conventions shared by every estimator here:
- a group is the set of samples sharing a ``group_id`` (the completions of one prompt);
- ``std`` is the unbiased (Bessel-corrected) standard deviation, 0 for a singleton group;
- statistics are computed in float64 and the result is cast to the mask's dtype.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput


# ---------------------------------------------------------------- helpers
def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids to 0..K-1; returns (inverse [N], K)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    k = int(inverse.max()) + 1 if inverse.numel() else 0
    return inverse, k


def group_sum(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of ``values`` over the sample's group (float64)."""
    inverse, k = group_index(group_ids)
    values = values.to(torch.float64)
    return torch.zeros(k, dtype=torch.float64, device=values.device).index_add_(0, inverse, values)[inverse]


def _snap(std: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Set to 0 a std that is only rounding noise (values all equal up to float error)."""
    return torch.where(std > 1e-9 * (1.0 + mean.abs()), std, torch.zeros_like(std))


def group_stats(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group mean, unbiased group std (0 for singleton or constant groups) and group size."""
    inverse, k = group_index(group_ids)
    values = values.to(torch.float64)
    zeros = torch.zeros(k, dtype=torch.float64, device=values.device)
    count = zeros.clone().index_add_(0, inverse, torch.ones_like(values))
    total = zeros.clone().index_add_(0, inverse, values)
    mean = total / count
    sq = zeros.clone().index_add_(0, inverse, (values - mean[inverse]) ** 2)
    std = torch.where(count > 1, (sq / (count - 1).clamp_min(1)).sqrt(), torch.zeros_like(sq))
    return mean[inverse], _snap(std, mean)[inverse], count[inverse]


def scale_by_std(centred: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """centred / (std + eps), leaving entries with std == 0 (all values equal, centred == 0) at 0."""
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, T], zero on padding."""
    return per_sample.to(mask.dtype).unsqueeze(-1) * mask


def batch_std(values: torch.Tensor) -> torch.Tensor:
    """Unbiased std of a 1-D tensor (0 when it has fewer than two entries), float64."""
    values = values.to(torch.float64)
    if values.numel() < 2:
        return torch.zeros((), dtype=torch.float64, device=values.device)
    return _snap(values.std(correction=1), values.mean())


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked entries of the whole batch; 0 on padding.

    Mean and unbiased std are taken over tokens, so longer completions weigh more (this is the
    whitening REINFORCE++ and GAE use in verl and OpenRLHF).
    """
    m = mask.to(torch.float64)
    xd = x.to(torch.float64)
    n = m.sum()
    mean = (xd * m).sum() / n.clamp_min(1.0)
    var = (((xd - mean) ** 2) * m).sum() / (n - 1).clamp_min(1.0)
    return (scale_by_std(xd - mean, _snap(var.sqrt(), mean), eps) * m).to(mask.dtype)


def sequence_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Number of completion tokens per sample, float64 [N]."""
    return mask.to(torch.float64).sum(-1)


# ---------------------------------------------------------------- estimators
@ADVANTAGES.register(
    "grpo",
    paper="DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models (arXiv:2402.03300)",
)
def grpo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g(r)) / (std_g(r) + eps), the same for every token of sample i.

    Paper: "DeepSeekMath" (arXiv:2402.03300), which used 64 samples per prompt. std is the
    unbiased group std; a singleton group has std 0, so its advantage is 0. With
    ``cfg.std_normalize = False`` this is Dr.GRPO's A_i = r_i - mean_g(r) ("Understanding
    R1-Zero-Like Training", arXiv:2503.20783). Defaults: eps = 1e-6.
    """
    mean, std, _ = group_stats(inp.rewards, inp.group_ids)
    adv = inp.rewards.to(torch.float64) - mean
    if cfg.std_normalize:
        adv = scale_by_std(adv, std, cfg.eps)
    return broadcast(adv, inp.mask)


@ADVANTAGES.register(
    "dr_grpo",
    paper="Understanding R1-Zero-Like Training: A Critical Perspective (arXiv:2503.20783)",
)
def dr_grpo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """Dr.GRPO: A_i = r_i - mean_g(r) (GRPO without the std division, whatever std_normalize says).

    Paper: "Understanding R1-Zero-Like Training" (arXiv:2503.20783). The paper pairs it with a
    constant length normaliser: aggregation ``seq-mean-token-sum-norm``.
    """
    mean, _, _ = group_stats(inp.rewards, inp.group_ids)
    return broadcast(inp.rewards.to(torch.float64) - mean, inp.mask)


@ADVANTAGES.register(
    "minirl",
    paper="Stabilizing Reinforcement Learning with LLMs: Formulation and Practices (arXiv:2512.01374)",
)
def minirl(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """MiniRL: A_i = r_i - mean_g(r) (group-mean baseline, no std division).

    Paper: "Stabilizing Reinforcement Learning with LLMs: Formulation and Practices"
    (arXiv:2512.01374). The same numbers as ``dr_grpo``; MiniRL pairs them with the ``ppo_clip``
    loss (clip mask on pi/pi_old), the train-inference IS weight pi_old/mu as a detached factor
    (a ``tis_token`` correction) and no per-sequence length normalisation (aggregation
    ``seq-mean-token-sum``).
    """
    return dr_grpo(inp, cfg)


@ADVANTAGES.register(
    "rloo",
    paper="Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs "
    "(arXiv:2402.14740)",
)
def rloo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i, j in g} r_j = n/(n-1) * (r_i - mean_g(r)).

    Paper: "Back to Basics" (arXiv:2402.14740), leave-one-out baseline over k samples per
    prompt. A singleton group has no baseline sample and gets advantage 0.
    """
    mean, _, count = group_stats(inp.rewards, inp.group_ids)
    scale = torch.where(count > 1, count / (count - 1).clamp_min(1), torch.zeros_like(count))
    return broadcast((inp.rewards.to(torch.float64) - mean) * scale, inp.mask)


@ADVANTAGES.register("opo", paper="On-Policy RL with Optimal Reward Baseline (arXiv:2505.23585)")
def opo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """OPO: A_i = r_i - b_g with the length-weighted baseline b_g = sum_j |o_j| r_j / sum_j |o_j|.

    Paper: "On-Policy RL with Optimal Reward Baseline" (arXiv:2505.23585): under the assumption
    that gradient norms grow with length, this is the variance-optimal baseline; the paper
    trains strictly on-policy (one update per batch).
    """
    lengths = sequence_lengths(inp.mask)
    r = inp.rewards.to(torch.float64)
    baseline = group_sum(lengths * r, inp.group_ids) / group_sum(lengths, inp.group_ids).clamp_min(1e-12)
    return broadcast(r - baseline, inp.mask)


@ADVANTAGES.register(
    "remax",
    paper="ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language "
    "Models (arXiv:2310.10505)",
)
def remax(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """ReMax: A_i = r_i - b_i, with b_i the reward of the greedy completion of the same prompt.

    Paper: "ReMax" (arXiv:2310.10505). The trainer must generate the greedy rollout and pass its
    reward as ``baseline_rewards`` [N].
    """
    if inp.baseline_rewards is None:
        raise ValueError("remax needs AdvantageInput.baseline_rewards (the greedy rollout's reward)")
    return broadcast(inp.rewards.to(torch.float64) - inp.baseline_rewards.to(torch.float64), inp.mask)


@ADVANTAGES.register(
    "gpg",
    paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning (arXiv:2504.02546)",
)
def gpg(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """GPG: A_i = alpha * (r_i - mean_g(r)), alpha = B / (B - M).

    Paper: "GPG" (arXiv:2504.02546), "accurate gradient estimation": B is the number of samples
    in the batch and M the number of samples whose group has zero reward variance (all rewards
    equal, so their advantage and gradient are 0); alpha rescales the batch-mean gradient to a
    mean over the samples that carry signal. No std division (F_norm = 1). Pair with the ``gpg``
    loss (-A * log p). Note: verl counts non-zero *rewards* instead of valid groups; we follow
    the paper.
    """
    mean, std, _ = group_stats(inp.rewards, inp.group_ids)
    n = inp.rewards.numel()
    invalid = int((std == 0).sum())
    alpha = n / max(n - invalid, 1)
    return broadcast(alpha * (inp.rewards.to(torch.float64) - mean), inp.mask)


@ADVANTAGES.register(
    "grpo_passk",
    paper="Optimizing Language Models for Inference Time Objectives using Reinforcement Learning (arXiv:2503.19595)",
)
def grpo_passk(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """Pass@k-style advantage: only the best sample of each group gets A = r_max - r_second_max.

    Paper: arXiv:2503.19595, as implemented by verl's ``grpo_passk``: the top sample of the
    group gets (r_(1) - r_(2)), divided by (std_g(r) + eps) when ``cfg.std_normalize``; every
    other sample gets 0 (a tie at the top therefore gives 0 to the whole group).
    Needs at least 2 samples per group.
    """
    inverse, k = group_index(inp.group_ids)
    r = inp.rewards.to(torch.float64)
    _, std, _ = group_stats(inp.rewards, inp.group_ids)
    adv = torch.zeros_like(r)
    for g in range(k):
        idx = (inverse == g).nonzero().squeeze(-1)
        if idx.numel() < 2:
            raise ValueError(f"grpo_passk needs >= 2 samples per group; a group has {idx.numel()}")
        top = torch.topk(r[idx], 2)
        value = top.values[0] - top.values[1]
        if cfg.std_normalize:
            value = scale_by_std(value, std[idx[0]], cfg.eps)
        adv[idx[top.indices[0]]] = value
    return broadcast(adv, inp.mask)


@ADVANTAGES.register(
    "lite_ppo",
    paper="Part I: Tricks or Traps? A Deep Dive into RL for LLM Reasoning (arXiv:2508.08221)",
)
def lite_ppo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """Lite PPO: A_i = (r_i - mean_g(r)) / (std_batch(r) + eps).

    Paper: "Tricks or Traps?" (arXiv:2508.08221): group-level mean, batch-level std (of the raw
    rewards over every sample in the batch), paired with the plain PPO clip loss and
    ``token-mean`` aggregation. Same as TRL's ``scale_rewards="batch"``.
    """
    mean, _, _ = group_stats(inp.rewards, inp.group_ids)
    adv = scale_by_std(inp.rewards.to(torch.float64) - mean, batch_std(inp.rewards), cfg.eps)
    return broadcast(adv, inp.mask)


@ADVANTAGES.register(
    "reinforce_plus_plus_baseline",
    paper="REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models (arXiv:2501.03262)",
)
def reinforce_plus_plus_baseline(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """REINFORCE++-baseline: A = whiten_batch(r_i - mean_g(r)) over all completion tokens.

    Paper: "REINFORCE++" (arXiv:2501.03262). The group mean removes the prompt's difficulty,
    then the advantages are normalised by the mean and std over every token of the batch
    (``masked_whiten``), as verl and OpenRLHF (``reinforce_baseline``) do.
    """
    mean, _, _ = group_stats(inp.rewards, inp.group_ids)
    centred = broadcast(inp.rewards.to(torch.float64) - mean, inp.mask)
    return masked_whiten(centred, inp.mask, cfg.eps)


GDPO_NOT_PARTS = ("total", "reward_error")  # a composite's weighted sum; the scoring-failure flag


def gdpo_default_components(components: dict[str, torch.Tensor]) -> list[str]:
    """The reward parts GDPO normalises when ``gdpo_components`` is empty, sorted.

    Rule: only a composite reward (the one reward that writes ``total``) has separate weighted
    parts, and it writes each part's unweighted reward under the part's name, without a ``/``.
    So the parts are the names without ``/`` other than ``total`` and ``reward_error`` (set by
    the scorer when a reward raised); the trainer's DAPO ``overlong_penalty``, added to the
    reward, is such a part too. Excluded: ``total`` (the parts' sum again) and every
    ``part/component`` (a part's own diagnostics: ``math/correct`` repeats ``math``,
    ``overlong/length`` is the raw length, whose normalisation would reward length itself).
    Without ``total`` the components are one reward's diagnostics (``correct``, a majority
    vote's ``gt_reward``, ...), not parts: a ``ValueError`` lists them so that
    ``gdpo_components`` can name the ones meant.
    """
    have = sorted(components)
    if "total" not in components:
        raise ValueError(f"gdpo: algorithm.advantage.gdpo_components is empty and the reward is not a composite "
                         f"(no 'total' component), so which components are reward parts is unknown; set "
                         f"gdpo_components to the ones to normalise, from {have}, or use a composite reward")
    parts = [n for n in have if "/" not in n and n not in GDPO_NOT_PARTS]
    if not parts:
        raise ValueError(f"gdpo: the composite reward has no part components among {have}; set "
                         "algorithm.advantage.gdpo_components")
    return parts


@ADVANTAGES.register(
    "gdpo",
    paper="GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL Optimization "
    "(arXiv:2601.05242)",
)
def gdpo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """GDPO: normalise each reward component within its group, sum, then normalise over the batch.

    Paper: arXiv:2601.05242. For each component k of ``cfg.gdpo_components``
    z_k = (r_k - mean_g(r_k)) / (std_g(r_k) + eps); A = sum_k w_k z_k (``cfg.gdpo_weights``,
    default 1 each: a composite's own part weights are not applied again); then, if ``gdpo_batch_normalize``,
    A = (A - mean_batch(A)) / (std_batch(A) + eps) over samples. Summing *after* the per-component
    normalisation keeps distinct reward combinations from collapsing to the same advantage.

    Default components (``gdpo_components: []``): the weighted parts of a composite reward, i.e.
    the component names without ``/`` other than ``total`` and ``reward_error`` (details in
    ``gdpo_default_components``); never the aggregate ``total`` or a part's diagnostics such as
    ``overlong/length``. With a non-composite reward the empty default is an error naming the
    available components.
    """
    if not inp.reward_components:
        raise ValueError("gdpo needs AdvantageInput.reward_components (one [N] tensor per reward)")
    names = list(cfg.gdpo_components) or gdpo_default_components(inp.reward_components)
    missing = [n for n in names if n not in inp.reward_components]
    if missing:
        raise ValueError(f"gdpo: reward components {missing} are missing; have {sorted(inp.reward_components)}")
    weights = list(cfg.gdpo_weights) or [1.0] * len(names)
    total = torch.zeros(inp.rewards.shape[0], dtype=torch.float64, device=inp.rewards.device)
    for name, w in zip(names, weights):
        values = inp.reward_components[name]
        mean, std, _ = group_stats(values, inp.group_ids)
        total = total + w * scale_by_std(values.to(torch.float64) - mean, std, cfg.eps)
    if cfg.gdpo_batch_normalize:
        total = scale_by_std(total - total.mean(), batch_std(total), cfg.eps)
    return broadcast(total, inp.mask)
