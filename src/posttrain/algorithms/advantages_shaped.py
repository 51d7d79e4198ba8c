"""Advantage estimators that reshape the group-relative signal with per-sample information:
correctness (W-REINFORCE and its positive-only half PSR), likelihood rank (unlikeliness reward), answer agreement
(SEED-GRPO) and confidence shift against the reference (ACE).

"Correct" means ``reward > 0`` throughout (rewards in {0, 1} or {-1, +1}).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from posttrain.algorithms.advantages import broadcast, group_index, group_stats, scale_by_std
from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput


def _group_normalise(rewards: torch.Tensor, group_ids: torch.Tensor, cfg: AdvantageConfig) -> torch.Tensor:
    """GRPO's per-sample advantage (float64 [N]); divides by the std only if cfg.std_normalize."""
    mean, std, _ = group_stats(rewards, group_ids)
    adv = rewards.to(torch.float64) - mean
    return scale_by_std(adv, std, cfg.eps) if cfg.std_normalize else adv


def sequence_logprob(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(o_i | x) = sum_t m_t log pi(o_t | ...), float64 [N]."""
    return (logprobs.detach().to(torch.float64) * mask.to(torch.float64)).sum(-1)


@ADVANTAGES.register(
    "w_reinforce",
    paper="The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning (arXiv:2506.01347)",
)
def w_reinforce(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """W-REINFORCE: A_i = lambda if r_i > 0 (correct) else -1; no baseline.

    Paper: arXiv:2506.01347. The RLVR objective splits into positive-sample reinforcement
    (PSR, push up correct samples) and negative-sample reinforcement (NSR, push down wrong
    ones); W-REINFORCE minimises L = lambda * L_PSR + L_NSR with rewards in {+1, -1}, i.e. a
    REINFORCE gradient with weight lambda on correct and -1 on wrong samples.
    Default lambda = ``cfg.psr_weight`` = 0.1 (paper). Pair with the ``gpg`` loss
    (-A * log p) or ``ppo_clip``.
    """
    correct = inp.rewards > 0
    adv = torch.where(correct, torch.full_like(inp.rewards, cfg.psr_weight, dtype=torch.float64), -1.0)
    return broadcast(adv.to(torch.float64), inp.mask)


@ADVANTAGES.register(
    "psr",
    paper="The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning (arXiv:2506.01347)",
)
def psr(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """PSR (positive sample reinforcement): A_i = 1 if r_i > 0 (correct) else 0; no baseline.

    Paper: The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning
    (arXiv:2506.01347). The paper splits the RLVR objective into L_PSR (push up correct samples)
    and L_NSR (push down wrong ones) and trains each alone: PSR raises pass@1 but narrows
    pass@k at large k, NSR keeps the whole pass@k curve. PSR is the positive-only arm of that
    contrast, the counterpart of NSR (``w_reinforce`` with ``psr_weight=0``: A = -1 on wrong
    samples, 0 on right ones). "Correct" is read as in ``w_reinforce``: ``r > 0``, so a reward
    in {0, 1} or {-1, +1} works, and a shaped reward (e.g. a format bonus on wrong answers)
    would count as correct. Pair with the ``gpg`` loss (-A * log p) or ``ppo_clip``, as
    ``w_reinforce``. A group with no correct sample contributes no gradient.
    """
    adv = (inp.rewards > 0).to(torch.float64)
    return broadcast(adv, inp.mask)


@ADVANTAGES.register(
    "unlikeliness",
    paper="Rewarding the Unlikely: Lifting GRPO Beyond Distribution Sharpening (arXiv:2506.02355)",
)
def unlikeliness(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """Unlikeliness reward: r'_i = r_i * (1 - beta * u_i / G) for correct samples, then GRPO.

    Paper: arXiv:2506.02355. GRPO has a rank bias: it reinforces correct samples the policy
    already finds likely. Within each group (size G), the correct samples (r > 0) are ranked by
    their sequence log-likelihood sum_t log pi(o_t) under ``logprobs`` (old policy): u_i = 0 for
    the least likely correct sample, 1 for the next, and so on, so the most likely correct
    samples lose the most reward. Wrong samples keep their reward. The shaped rewards are then
    group-normalised like GRPO (honouring ``cfg.std_normalize``).
    Default beta = ``cfg.unlikeliness_beta`` = 0.25 (the paper's beta_rank).
    """
    if inp.logprobs is None:
        raise ValueError("unlikeliness needs AdvantageInput.logprobs to rank samples by likelihood")
    seq_lp = sequence_logprob(inp.logprobs, inp.mask)
    inverse, k = group_index(inp.group_ids)
    r = inp.rewards.to(torch.float64)
    shaped = r.clone()
    for g in range(k):
        idx = (inverse == g).nonzero().squeeze(-1)
        size = idx.numel()
        correct = idx[r[idx] > 0]
        if correct.numel() == 0:
            continue
        order = torch.argsort(seq_lp[correct], stable=True)  # ascending: least likely first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        shaped[correct] = r[correct] * (1.0 - cfg.unlikeliness_beta * rank.to(torch.float64) / size)
    return broadcast(_group_normalise(shaped, inp.group_ids, cfg), inp.mask)


def semantic_entropy(answers: Sequence[Optional[str]], group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (entropy of the group's answer clusters, log(group size)), float64 [N] each.

    ``answers`` are canonical answer keys (the caller canonicalises: this layer cannot import the
    rewards' canonicaliser, see ``seed_grpo``). Clusters are the groups of equal keys after
    ``strip()``; ``None`` or a blank key is a cluster of its own, since two samples without an
    answer do not agree on anything. p_k = |C_k| / G and H = -sum_k p_k log p_k (the frequency
    estimate of semantic entropy). Anything other than ``str`` or ``None`` is a ``TypeError``
    (a number means the caller skipped canonicalisation; it used to pass as a missing answer).
    The caller must not ``str()`` a missing answer: ``"None"`` strings would agree.
    """
    for i, a in enumerate(answers):
        if a is not None and not isinstance(a, str):
            raise TypeError(f"seed_grpo: answers[{i}] is {type(a).__name__} {a!r}; pass each sample's canonical "
                            "answer string, or None when it has no answer")
    inverse, k = group_index(group_ids)
    entropy = torch.zeros(len(answers), dtype=torch.float64, device=group_ids.device)
    h_max = torch.zeros_like(entropy)
    for g in range(k):
        idx = (inverse == g).nonzero().squeeze(-1).tolist()
        counts: dict[object, int] = {}
        for i in idx:
            a = answers[i]
            key: object = a.strip() if a is not None and a.strip() else ("__missing__", i)
            counts[key] = counts.get(key, 0) + 1
        size = len(idx)
        h = -sum((c / size) * math.log(c / size) for c in counts.values())
        for i in idx:
            entropy[i] = h
            h_max[i] = math.log(size) if size > 1 else 0.0
    return entropy, h_max


@ADVANTAGES.register(
    "seed_grpo",
    paper="SEED-GRPO: Semantic Entropy Enhanced GRPO for Uncertainty-Aware Policy Optimization (arXiv:2505.12346)",
)
def seed_grpo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """SEED-GRPO: A_i = A_i^GRPO * max(0, 1 - alpha * H_sem(g) / log G).

    Paper: arXiv:2505.12346. H_sem is the semantic entropy of the group's final answers
    (``answers``, clustered by equality of the canonical answer, see ``semantic_entropy``); log G
    is its maximum. The trainer passes the key the majority vote and maj@k cluster by
    (``posttrain.evaluation.runner.sample_answer``: ``canonical_answer`` of the extracted answer,
    so "1/2", "0.5" and "\\frac{1}{2}" agree), and ``None`` for a sample without an answer, which
    then agrees with no other sample. Confident prompts (all answers agree) keep the
    full GRPO signal; uncertain ones get smaller updates. The paper's linear modulation
    f(x) = 1 - x with x = alpha * H / H_max is used; ``cfg.seed_alpha`` (default 1.0, our
    choice) sets the sensitivity. Singleton groups keep A unchanged (H_max = 0).
    """
    if inp.answers is None or len(inp.answers) != inp.rewards.shape[0]:
        raise ValueError("seed_grpo needs AdvantageInput.answers (one canonical answer string, or None, per "
                         "sample)")
    entropy, h_max = semantic_entropy(inp.answers, inp.group_ids)
    ratio = torch.where(h_max > 0, entropy / h_max.clamp_min(1e-12), torch.zeros_like(entropy))
    scale = (1.0 - cfg.seed_alpha * ratio).clamp_min(0.0)
    return broadcast(_group_normalise(inp.rewards, inp.group_ids, cfg) * scale, inp.mask)


@ADVANTAGES.register(
    "ace",
    paper="Overconfident Errors Need Stronger Correction: Asymmetric Confidence Penalties for Reinforcement "
    "Learning (arXiv:2602.21420)",
)
def ace(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """ACE: for A_i < 0, A_i <- A_i * (1 + alpha * softplus(c_i)), c_i = log pi(o_i)/pi_ref(o_i).

    Paper: arXiv:2602.21420 (Asymmetric Confidence-aware Error penalty). c_i is the per-rollout
    confidence shift sum_t m_t (logprobs - ref_logprobs); wrong samples the policy has become
    overconfident about (c_i >> 0) are pushed down harder, while exploratory errors
    (c_i << 0, softplus ~ 0) keep the plain GRPO penalty; positive advantages are unchanged.
    The base advantage is GRPO's. The material available gives the softplus modulation of
    negative advantages but not the paper's alpha; ``cfg.ace_alpha`` defaults to 1.0 (our choice).
    Needs ``logprobs`` and ``ref_logprobs``.
    """
    if inp.logprobs is None or inp.ref_logprobs is None:
        raise ValueError("ace needs AdvantageInput.logprobs and ref_logprobs (confidence shift)")
    base = _group_normalise(inp.rewards, inp.group_ids, cfg)
    shift = (
        (inp.logprobs.detach().to(torch.float64) - inp.ref_logprobs.detach().to(torch.float64))
        * inp.mask.to(torch.float64)
    ).sum(-1)
    factor = 1.0 + cfg.ace_alpha * torch.nn.functional.softplus(shift)
    return broadcast(torch.where(base < 0, base * factor, base), inp.mask)


@ADVANTAGES.register(
    "drpo",
    paper="DRPO: Efficient Reasoning via Decoupled Reward Policy Optimization (arXiv:2510.04474)",
)
def drpo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """DRPO decoupled length reward: length shapes only the correct samples, normalised among them.

    Paper: arXiv:2510.04474 (catalog 002-78). With a length penalty inside the reward, GRPO's
    group mean mixes correct and wrong samples, so a correct but long answer can get a negative
    advantage. DRPO tilts the *positive* distribution by a length reward under a KL constraint,
    pi*(o) ∝ pi_old(o) exp(r_l(o) / lambda), whose closed form is estimated on the group's own
    correct samples P (r > 0) by self-normalised importance weights, and contrasts it with the
    wrong samples N (a discriminative objective, sum_P w_i s_i - mean_N s_j). Per group:

        L_i   = sum_t m_t                                  (completion length in tokens)
        r_l_i = -L_i / max_{j in group} L_j                 (in [-1, 0); scale-free)
        w_i   = exp(r_l_i / lambda) / sum_{j in P} exp(r_l_j / lambda)      for i in P
        A_i   = |P| * w_i  (i in P, always > 0, mean 1)      A_i = -1  (i in N)

    So the shortest correct answer gets the largest push up, yet every correct answer is pushed
    up; equal-length correct answers all get A = +1, and a group without correct answers pushes
    all its samples down by 1. lambda = ``cfg.drpo_lambda`` (default 0.2, our choice: the
    material available does not fix it, nor the exact form of r_l, which is ours as above).
    What differs from the paper: its discriminative score function and constrained optimisation
    (DisCO) are not reproduced; here the weights become per-sample advantages for the trainer's
    policy loss (pair with ``gpg`` or ``ppo_clip``), and the DisCO 1/|P| and 1/|N| averages are
    replaced by per-sample units (|P| w_i, -1) so the trainer's sample aggregation weights every
    sample equally. Rewards are read as correct/wrong only (``r > 0``); put no length penalty in
    the reward, DRPO adds its own.
    """
    inverse, k = group_index(inp.group_ids)
    lengths = inp.mask.to(torch.float64).sum(-1)
    correct = inp.rewards > 0
    adv = torch.full_like(lengths, -1.0)
    for g in range(k):
        idx = (inverse == g).nonzero().squeeze(-1)
        pos = idx[correct[idx]]
        if pos.numel() == 0:
            continue
        longest = lengths[idx].max().clamp_min(1.0)  # an all-empty group: r_l = 0, equal weights
        r_l = -lengths[pos] / longest
        w = torch.softmax(r_l / cfg.drpo_lambda, dim=0)  # exp(r_l/lambda) / sum_P exp(r_l/lambda)
        adv[pos] = pos.numel() * w
    return broadcast(adv, inp.mask)
