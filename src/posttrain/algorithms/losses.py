"""Token-level policy losses. Each returns a per-token loss matrix [N, T]; aggregation happens
outside (``aggregation.aggregate``) and no loss overrides it.

Notation: logp = current log-prob (with grad), old = log-prob at rollout weights,
r = exp(logp - old) (log-ratio clamped to +-20), A = advantage, sg = stop-gradient.
Every loss multiplies its per-token loss by ``is_weights`` (mismatch correction) when given.
Sequence-level losses (GSPO, GSPO-token, LUSPO, GMPO) are in ``losses_sequence.py``.

Masked positions may hold anything (NaN, inf): every loss first passes its input through
``clean``, which selects 0 at masked positions with ``torch.where`` (so nothing non-finite
enters a ratio, a clip or a product, and no gradient reaches those positions), and returns a
loss that is exactly 0 there; metrics are means over the mask that select, never multiply.

Micro-batch invariance: every loss here is computed token by token, so splitting a mini-batch
and passing global counts to ``aggregate`` reproduces the full loss. KL-Cov and Clip-Cov also
need a selection of tokens by a covariance over the batch; the trainer makes it once per
mini-batch with ``select_cov_tokens`` (over the whole mini-batch, identical on every rank) and
passes each micro-batch its rows as ``PolicyLossInput.token_selection``, which keeps them
token-local. Called standalone (``token_selection`` None) they select among the tokens they are
given, which is per micro-batch if they are given one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


from posttrain.algorithms.aggregation import masked, masked_mean
from posttrain.algorithms.base import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput, PolicyLossOutput


_PER_TOKEN = ("logprobs", "old_logprobs", "advantages", "is_weights", "behaviour_logprobs", "entropy",
              "token_selection")


def clean(inp: PolicyLossInput) -> PolicyLossInput:
    """``inp`` with every per-token tensor set to 0 (False) where ``mask == 0`` (``torch.where``).

    Padded positions may hold NaN or inf (vLLM rollouts, environment tokens); after this they
    hold 0, so every loss computes finite values there and the gradient reaching them is exactly
    0. Idempotent (a loss that calls another cleans twice, harmlessly).
    """
    keep = inp.mask > 0
    changes = {}
    for name in _PER_TOKEN:
        value = getattr(inp, name)
        if value is not None:
            changes[name] = torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return dataclasses.replace(inp, **changes)


def log_ratio(inp: PolicyLossInput) -> torch.Tensor:
    """log(pi / pi_old), clamped to [-20, 20] so exp() cannot overflow."""
    return (inp.logprobs - inp.old_logprobs).clamp(-20.0, 20.0)


def finish(loss: torch.Tensor, inp: PolicyLossInput, metrics: dict[str, torch.Tensor]) -> PolicyLossOutput:
    """Apply the mismatch-correction weights, zero the masked positions (selected, so whatever
    they held is gone) and add the metrics every loss reports."""
    if inp.is_weights is not None:
        loss = loss * inp.is_weights
    loss = masked(loss, inp.mask)
    lr = log_ratio(inp).detach()
    metrics = {
        **metrics,
        "ratio_mean": masked_mean(torch.exp(lr), inp.mask),
        "approx_kl": masked_mean(0.5 * lr**2, inp.mask),
    }
    return PolicyLossOutput(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})


@POLICY_LOSSES.register("ppo_clip", paper="Proximal Policy Optimization Algorithms (arXiv:1707.06347)")
def ppo_clip(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """PPO clip: l = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A), r = exp(logp - logp_old).

    Paper: arXiv:1707.06347 (eps = 0.2). With ``dual_clip = c`` (Dual-clip PPO,
    arXiv:1912.09729, c = 3) tokens with A < 0 are further bounded: l = min(l, -c * A).
    DAPO's clip-higher ("DAPO", arXiv:2503.14476) is this loss with eps_high = 0.28.
    Gradient in the unclipped region: dl/dlogp = -r * A.
    """
    inp = clean(inp)
    lr = log_ratio(inp)
    ratio = torch.exp(lr)
    adv = inp.advantages
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    metrics = {
        "clip_frac": masked_mean(is_clipped.float(), inp.mask),
        "clip_frac_low": masked_mean((is_clipped & (adv < 0)).float(), inp.mask),
        "clip_frac_high": masked_mean((is_clipped & (adv > 0)).float(), inp.mask),
    }
    if cfg.dual_clip is not None:
        dual = -cfg.dual_clip * adv
        dual_hit = (adv < 0) & (loss > dual)
        loss = torch.where(adv < 0, torch.minimum(loss, dual), loss)
        metrics["dual_clip_frac"] = masked_mean(dual_hit.float(), inp.mask)
    return finish(loss, inp, metrics)


@POLICY_LOSSES.register(
    "gpg",
    paper="GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning (arXiv:2504.02546)",
)
def gpg(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """GPG / plain REINFORCE: l = -logp * A (no ratio, no clipping).

    Paper: arXiv:2504.02546 (pair with the ``gpg`` advantage). Valid only on-policy (one
    update per batch). Gradient: dl/dlogp = -A.
    """
    inp = clean(inp)
    return finish(-inp.logprobs * inp.advantages, inp, {})


@POLICY_LOSSES.register(
    "cispo",
    paper="MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention (arXiv:2506.13585)",
)
def cispo(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """CISPO: l = -sg(clip(r, lo, hi)) * A * logp, with hi = cispo_max_ratio, lo = cispo_min_ratio.

    Paper: MiniMax-M1 (arXiv:2506.13585). Clips the importance-sampling *weight* instead of the
    update, so every token keeps a gradient. The paper sets no lower bound and tunes only the
    upper one; TRL recommends an upper bound (its epsilon_high) of 5.0, our default.
    ``cispo_min_ratio`` gives verl's two-sided variant. Gradient: dl/dlogp = -clip(r) * A.
    """
    inp = clean(inp)
    ratio = torch.exp(log_ratio(inp)).detach()
    weight = ratio.clamp(max=cfg.cispo_max_ratio)
    if cfg.cispo_min_ratio is not None:
        weight = weight.clamp(min=cfg.cispo_min_ratio)
    loss = -weight * inp.advantages * inp.logprobs
    return finish(loss, inp, {"cispo_clip_frac": masked_mean((weight != ratio).float(), inp.mask)})


@POLICY_LOSSES.register("sapo", paper="Soft Adaptive Policy Optimization (arXiv:2511.20347)")
def sapo(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """SAPO: l = -f(r) * A with the soft gate f(r) = sigmoid(tau (r - 1)) * 4 / tau.

    Paper: arXiv:2511.20347. tau = tau_pos (1.0) when A > 0, tau_neg (1.05) otherwise. The gate
    replaces the hard clip: df/dr = 4 sigma (1 - sigma), which is 1 at r = 1 (so on-policy the
    gradient equals the policy gradient -A) and decays smoothly as r leaves 1.
    Gradient: dl/dlogp = -A * 4 sigma (1 - sigma) * r.
    """
    inp = clean(inp)
    ratio = torch.exp(log_ratio(inp))
    tau = torch.where(
        inp.advantages > 0,
        torch.full_like(ratio, cfg.sapo_tau_pos),
        torch.full_like(ratio, cfg.sapo_tau_neg),
    )
    gate = torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau
    return finish(-gate * inp.advantages, inp, {"gate_mean": masked_mean(gate.detach(), inp.mask)})


@POLICY_LOSSES.register(
    "dro",
    paper="Offline Regularised Reinforcement Learning for Large Language Models Alignment (arXiv:2405.19107)",
)
def dro(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """verl's (and Tinker's) "dro" loss: l = -(logp * A - beta/2 * (logp - old)^2), per token.

    This is NOT the objective of the DRO paper. "Offline Regularised Reinforcement Learning for
    Large Language Models Alignment" (Direct Reward Optimisation, arXiv:2405.19107) is offline:
    on a fixed data set of (x, y, r) it minimises, jointly over the policy and a learned value
    function V(x),
        L(pi, V) = 1/2 E[(r(x, y) - V(x) - tau log(pi(y|x) / pi_ref(y|x)))^2],
    with log pi(y|x) the whole sequence's log-probability. This loss is the per-token quadratic
    penalty form that verl and Tinker register under the name "dro", and it differs in three ways:
    - no value function: the advantage A comes from the estimator (e.g. GRPO's group baseline)
      where the paper learns V(x) and uses r - V(x);
    - anchored to pi_old (the rollout policy, moving every step), not to the fixed pi_ref, so
      the penalty is a trust region, not the paper's KL regularisation towards the reference;
    - per token and online: each token's log-prob has its own penalty on freshly sampled data,
      where the paper's residual is one per sequence on offline data.
    Its gradient has the shape of the paper's with those substitutions, -A + beta log(pi/pi_old)
    against the paper's -tau (r - V - tau log(pi/pi_ref)) (divided by tau), with beta = ``dro_beta``.
    Gradient: dl/dlogp = -A + beta (logp - old).
    """
    inp = clean(inp)
    delta = inp.logprobs - inp.old_logprobs
    loss = -(inp.logprobs * inp.advantages - 0.5 * cfg.dro_beta * delta**2)
    return finish(loss, inp, {})


@POLICY_LOSSES.register(
    "reinforce_is",
    paper="IMPALA: Scalable Distributed Deep-RL with Importance Weighted Actor-Learner Architectures "
    "(arXiv:1802.01561)",
)
def reinforce_is(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """Truncated-IS REINFORCE ("bypass" mode): l = -sg(min(pi / mu, C)) * A * logp.

    mu is the behaviour policy (``behaviour_logprobs``; ``old_logprobs`` if absent), so no
    separate old-policy forward pass is needed. Truncated IS weights as in IMPALA's V-trace
    (arXiv:1802.01561); this is verl's ``bypass_mode`` with ``loss_type=reinforce`` and the
    "PG + IS correction" that "Stabilizing RL with LLMs" (arXiv:2512.01374) finds most stable
    on-policy. C = ``is_cap`` (default 2.0, verl's). Do not also pass a TIS correction as
    ``is_weights``: it would correct twice. Gradient: dl/dlogp = -min(w, C) * A.
    """
    inp = clean(inp)
    base = inp.behaviour_logprobs if inp.behaviour_logprobs is not None else inp.old_logprobs
    raw = torch.exp((inp.logprobs.detach() - base).clamp(-20.0, 20.0))
    weight = raw.clamp(max=cfg.is_cap)
    loss = -weight * inp.advantages * inp.logprobs
    return finish(loss, inp, {"is_weight_mean": masked_mean(weight, inp.mask),
                              "is_clip_frac": masked_mean((raw > cfg.is_cap).float(), inp.mask)})


def _dppo(inp: PolicyLossInput, cfg: PolicyLossConfig, valid: torch.Tensor) -> PolicyLossOutput:
    ratio = torch.exp(log_ratio(inp)).detach()
    weight = ratio.clamp(max=cfg.dppo_ratio_cap)
    valid_f = valid.detach().to(inp.logprobs.dtype)
    loss = -inp.advantages * weight * inp.logprobs * valid_f
    metrics = {
        "trust_region_frac": masked_mean(1.0 - valid_f, inp.mask),
        "ratio_cap_frac": masked_mean((ratio > cfg.dppo_ratio_cap).float() * valid_f, inp.mask),
    }
    return finish(loss, inp, metrics)


@POLICY_LOSSES.register(
    "dppo_tv",
    paper="Rethinking the Trust Region in LLM Reinforcement Learning (arXiv:2602.04879)",
)
def dppo_tv(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """DPPO-Binary-TV: l = -A * sg(min(r, C)) * logp * valid.

    Paper: arXiv:2602.04879 (as in verl's ``dppo_tv``). The trust region is on the sampled
    token's probability p = exp(logp) instead of the ratio: a token is kept if
    p - p_old <= dppo_high when A > 0, or p - p_old >= -dppo_low when A <= 0 (moves in the
    "safe" direction are always allowed). C = ``dppo_ratio_cap``: the paper recommends a large
    truncation (20). Gradient on kept tokens: dl/dlogp = -A * min(r, C).
    """
    inp = clean(inp)
    p = torch.exp(inp.logprobs.detach())
    p_old = torch.exp(inp.old_logprobs)
    diff = p - p_old
    valid = torch.where(inp.advantages > 0, diff <= cfg.dppo_high, diff >= -cfg.dppo_low)
    return _dppo(inp, cfg, valid)


def binary_kl(p_old: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p_old) || Bern(p)) = p_old log(p_old/p) + (1 - p_old) log((1 - p_old)/(1 - p))."""
    tiny = 1e-12
    return p_old * (torch.log(p_old.clamp_min(tiny)) - torch.log(p.clamp_min(tiny))) + (1 - p_old) * (
        torch.log((1 - p_old).clamp_min(tiny)) - torch.log((1 - p).clamp_min(tiny))
    )


@POLICY_LOSSES.register(
    "dppo_kl",
    paper="Rethinking the Trust Region in LLM Reinforcement Learning (arXiv:2602.04879)",
)
def dppo_kl(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """DPPO-Binary-KL: as ``dppo_tv`` with the trust region KL(Bern(p_old) || Bern(p)) <= threshold.

    Paper: arXiv:2602.04879. A token with A > 0 is kept if the binary KL <= dppo_high or p <= p_old;
    with A <= 0 if the binary KL <= dppo_low or p >= p_old.
    Gradient on kept tokens: dl/dlogp = -A * min(r, C).
    """
    inp = clean(inp)
    p = torch.exp(inp.logprobs.detach())
    p_old = torch.exp(inp.old_logprobs)
    kl = binary_kl(p_old, p)
    valid = torch.where(inp.advantages > 0, (kl <= cfg.dppo_high) | (p <= p_old), (kl <= cfg.dppo_low) | (p >= p_old))
    return _dppo(inp, cfg, valid)


COV_SELECTING = ("kl_cov", "clip_cov")  # losses that take a batch-level ``token_selection``
# Losses whose rows are independent and whose per-token loss is A times a finite factor: a row with
# A = 0 on every token adds exactly nothing, loss or gradient, so the learner may skip its pass
# (RLUpdate). Not dro (its (logp - old)^2 term), kl_cov (|logp - old| on selected tokens) or hapo
# (batch statistics couple its rows); tests/algorithms/test_zero_advantage_rows.py checks every loss.
ZERO_AT_ZERO_ADVANTAGE = frozenset({"cispo", "clip_cov", "dppo_kl", "dppo_tv", "gmpo", "gpg", "gspo", "gspo_token",
                                    "luspo", "ppo_clip", "reinforce_is", "sapo", "sspo", "vespo"})


def covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """cov_t = (A_t - mean A)(logp_t - mean logp), means over the valid tokens; detached, 0 where
    ``mask == 0`` (whatever those positions held)."""
    m = mask > 0
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    adv = torch.where(m, advantages.detach(), zero)
    lp = torch.where(m, logprobs.detach(), zero)
    if not bool(m.any()):
        return torch.zeros_like(lp)
    return torch.where(m, (adv - adv[m].mean()) * (lp - lp[m].mean()), zero)


def token_covariance(inp: PolicyLossInput) -> torch.Tensor:
    """``covariance`` of the current log-probs and the advantages over ``inp``'s valid tokens."""
    return covariance(inp.logprobs, inp.advantages, inp.mask)


def _budget(ratio: float, n_valid: int) -> int:
    """k = max(1, floor(ratio * n_valid)): the paper's token budget (0 without valid tokens)."""
    return max(1, int(ratio * n_valid)) if n_valid > 0 else 0


def _top_k(cov: torch.Tensor, m: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, T] bool: the k valid tokens with the largest covariance."""
    selected = torch.zeros_like(m)
    k = _budget(ratio, int(m.sum()))
    if k:
        top = torch.topk(cov.masked_fill(~m, float("-inf")).flatten(), k).indices
        selected.view(-1)[top] = True
    return selected


def _random_k(candidates: torch.Tensor, m: torch.Tensor, ratio: float,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[N, T] bool: min(k, #candidates) candidates drawn uniformly without replacement, k counted
    on all valid tokens. ``generator`` None draws from torch's global RNG."""
    selected = torch.zeros_like(m)
    k = _budget(ratio, int(m.sum()))
    cand_idx = candidates.flatten().nonzero().squeeze(-1)
    if k and cand_idx.numel():
        if generator is None:
            perm = torch.randperm(cand_idx.numel(), device=cand_idx.device)
        else:  # drawn where the generator lives, so the draw is the same whatever the tensors' device
            perm = torch.randperm(cand_idx.numel(), generator=generator, device=generator.device).to(cand_idx.device)
        selected.view(-1)[cand_idx[perm[:k]]] = True
    return selected


def select_cov_tokens(name: str, logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      cfg: PolicyLossConfig, generator: torch.Generator) -> torch.Tensor:
    """[N, T] bool: the tokens KL-Cov penalises (``name="kl_cov"``) or Clip-Cov detaches
    (``"clip_cov"``), chosen over all of the given batch, as the paper defines them.

    The trainer calls it once per mini-batch, before the micro-batch passes, on the whole
    mini-batch (every data-parallel rank holds all of it and gets the same answer, so no
    collective is needed) and hands each micro-batch its rows as ``token_selection``. The
    fraction selected is then k / n with k = max(1, floor(ratio * n)), n the mini-batch's valid
    tokens, whatever the micro-batch size or the number of ranks.

    - kl_cov: the k tokens with the largest cov_t = (A_t - mean A)(logp_t - mean logp);
    - clip_cov: min(k, #candidates) tokens drawn uniformly from those with
      clip_cov_lb < cov_t < clip_cov_ub, with ``generator`` (seed it the same on every rank).

    Deviation from the paper: the selection is made before the update, so ``logprobs`` are the
    old ones (detached, no extra model pass); the paper's covariance is over the current
    log-probs, equal to the old ones on the first mini-batch of the first epoch of on-policy
    training and a step stale after that. For the same reason Clip-Cov's candidates do not
    exclude tokens PPO clips (verl excludes them, judged at the current ratio): at selection
    time the ratio is 1 and nothing is clipped; a selected token that PPO clips later has no
    gradient either way.
    """
    if name not in COV_SELECTING:
        raise ValueError(f"select_cov_tokens selects for {', '.join(COV_SELECTING)}, not {name!r}")
    m = mask > 0
    cov = covariance(logprobs, advantages, mask)
    if name == "kl_cov":
        return _top_k(cov, m, cfg.kl_cov_ratio)
    candidates = m & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    return _random_k(candidates, m, cfg.clip_cov_ratio, generator)


@POLICY_LOSSES.register(
    "kl_cov",
    paper="The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models (arXiv:2505.22617)",
)
def kl_cov(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """KL-Cov: l = -r * A on every token, plus kl_cov_coef * |logp - old| on the selected tokens.

    Paper: arXiv:2505.22617. Entropy collapse is driven by tokens with a large covariance
    between log-probability and advantage; KL-Cov adds a KL penalty on the
    k = max(1, floor(kl_cov_ratio * n_tokens)) valid tokens of the batch with the largest
    cov_t = (A_t - mean A)(logp_t - mean logp) (means over the batch's valid tokens), and does
    not clip. Defaults (paper): kl_cov_ratio = 2e-3, coefficient 1.0.
    The selection is ``inp.token_selection`` when given (the trainer's, made over the whole
    mini-batch by ``select_cov_tokens``); else it is made here over ``inp``'s tokens, with the
    current log-probs. Gradient: dl/dlogp = -r A, plus kl_cov_coef * sign(logp - old) if selected.
    """
    inp = clean(inp)
    ratio = torch.exp(log_ratio(inp))
    loss = -ratio * inp.advantages
    m = inp.mask > 0
    if inp.token_selection is not None:
        selected = inp.token_selection.bool() & m
    else:
        selected = _top_k(token_covariance(inp), m, cfg.kl_cov_ratio)
    penalty = cfg.kl_cov_coef * (inp.logprobs - inp.old_logprobs).abs()
    loss = torch.where(selected, loss + penalty, loss)
    return finish(loss, inp, {"kl_cov_frac": masked_mean(selected.float(), inp.mask)})


@POLICY_LOSSES.register(
    "clip_cov",
    paper="The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models (arXiv:2505.22617)",
)
def clip_cov(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """Clip-Cov: PPO-clip loss, with the gradient of a few high-covariance tokens detached.

    Paper: arXiv:2505.22617. Among the batch's valid tokens whose
    cov_t = (A_t - mean A)(logp_t - mean logp) lies in (clip_cov_lb, clip_cov_ub), choose
    k = max(1, floor(clip_cov_ratio * n_tokens)) at random and stop their gradient (their loss
    value is kept). Defaults (paper): ratio 2e-4, bounds (1, 5).
    The selection is ``inp.token_selection`` when given (the trainer's, made over the whole
    mini-batch with a seeded generator by ``select_cov_tokens``); else it is made here over
    ``inp``'s tokens with the current log-probs, among tokens PPO did not clip (as verl does),
    drawing from torch's global RNG.
    Gradient: PPO-clip's (-r A where unclipped), 0 on selected tokens.
    """
    inp = clean(inp)
    lr = log_ratio(inp)
    ratio = torch.exp(lr)
    unclipped = -ratio * inp.advantages
    clipped = -ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * inp.advantages
    loss = torch.maximum(unclipped, clipped)
    m = inp.mask > 0
    if inp.token_selection is not None:
        selected = inp.token_selection.bool() & m
    else:
        cov = token_covariance(inp)
        candidates = m & ~(clipped > unclipped) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
        selected = _random_k(candidates, m, cfg.clip_cov_ratio)
    loss = torch.where(selected, loss.detach(), loss)
    metrics = {
        "clip_frac": masked_mean((clipped > unclipped).float(), inp.mask),
        "clip_cov_frac": masked_mean(selected.float(), inp.mask),
    }
    return finish(loss, inp, metrics)
