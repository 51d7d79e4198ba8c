"""Train-inference mismatch corrections: behaviour (rollout engine) vs old (learner at the same
weights) log-probs. PPO's clip handles current vs old; these handle old vs behaviour.

Every correction returns ``weights`` [N, T] (multiply the per-token loss; pass them to the loss
as ``is_weights``) and ``mask`` [N, T] (the tokens kept; use it for the loss *and* for the
aggregation counts). Ratios are w = pi_old / mu = exp(old - behaviour), log-ratios clamped to
[-20, 20]. Weights and masks carry no gradient. ``mismatch_metrics`` gives the numbers to log
every step, whatever correction (if any) is active.

Masked positions may hold anything (NaN, inf): log-ratios, weights and per-sequence sums
select with ``torch.where(mask > 0, x, 0)`` rather than multiplying by the mask, so garbage at
a padded position changes no weight, no kept mask and no metric.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.aggregation import masked, masked_mean, masked_sum
from posttrain.algorithms.base import CORRECTIONS, CorrectionConfig, CorrectionInput, CorrectionOutput
from posttrain.algorithms.kl import kl_estimate

_TIS_PAPER = (
    "IMPALA: Scalable Distributed Deep-RL with Importance Weighted Actor-Learner Architectures (arXiv:1802.01561)"
)
_ICEPOP_PAPER = (
    "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking Model (arXiv:2510.18855)"
)
_STABILIZING_PAPER = "Stabilizing Reinforcement Learning with LLMs: Formulation and Practices (arXiv:2512.01374)"


def token_log_ratio(inp: CorrectionInput) -> torch.Tensor:
    """log(pi_old / mu) per token, clamped to [-20, 20], 0 on padding."""
    return masked((inp.old_logprobs - inp.behaviour_logprobs).clamp(-20.0, 20.0), inp.mask).detach()


def sequence_log_ratio(inp: CorrectionInput) -> torch.Tensor:
    """log(pi_old(o) / mu(o)) = sum_t of the token log-ratios, clamped to [-20, 20]; [N, 1]."""
    return token_log_ratio(inp).sum(-1, keepdim=True).clamp(-20.0, 20.0)


def _out(weights: torch.Tensor, keep: torch.Tensor, inp: CorrectionInput, cap: float | None = None) -> CorrectionOutput:
    """Mask, detach, and the metrics every correction logs; ``cap``: the truncation threshold,
    whose share of tokens reaching it is logged as ``correction/truncated_frac``."""
    mask = inp.mask * keep.to(inp.mask.dtype)
    weights = masked(weights, mask).detach()
    metrics = {
        "correction/weight_mean": masked_mean(weights, mask),
        "correction/masked_frac": 1.0 - mask.sum() / inp.mask.sum().clamp_min(1.0),
    }
    if cap is not None:
        metrics["correction/truncated_frac"] = masked_mean((weights >= cap).to(mask.dtype), mask)
    return CorrectionOutput(weights=weights, mask=mask.detach(), metrics=metrics)


@CORRECTIONS.register("tis_token", paper=_TIS_PAPER)
def tis_token(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Token-level truncated IS: w_t = min(pi_old(o_t) / mu(o_t), C), C = threshold_high (2.0).

    Truncated importance weights as in IMPALA/V-trace (arXiv:1802.01561); applied to LLM RL
    by Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training" (blog, no arXiv), and the detached pi_old/mu factor of MiniRL
    (arXiv:2512.01374). verl's default cap is 2.0. No token is masked.
    """
    w = torch.exp(token_log_ratio(inp)).clamp(max=cfg.threshold_high)
    return _out(w, torch.ones_like(inp.mask, dtype=torch.bool), inp, cap=cfg.threshold_high)


@CORRECTIONS.register("tis_sequence", paper=_TIS_PAPER)
def tis_sequence(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Sequence-level truncated IS: w_i = min(prod_t pi_old/mu, C) on every token of sample i.

    Same references as ``tis_token`` (arXiv:1802.01561); the sequence ratio is the exact
    correction for a sequence-level reward but has a much larger variance, hence the cap C.
    """
    w = torch.exp(sequence_log_ratio(inp)).clamp(max=cfg.threshold_high).expand_as(inp.mask)
    return _out(w, torch.ones_like(inp.mask, dtype=torch.bool), inp, cap=cfg.threshold_high)


def _mis_token(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    w = torch.exp(token_log_ratio(inp))
    keep = (w >= cfg.low) & (w <= cfg.threshold_high)
    return _out(w, keep, inp)


@CORRECTIONS.register("mis_token", paper=_ICEPOP_PAPER)
def mis_token(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Token-level masked IS: w_t = pi_old/mu if lo <= pi_old/mu <= hi, else the token is masked.

    IcePop's calibration M(k) = k on [alpha, beta], 0 outside ("Every Step Evolves", Ring-1T,
    arXiv:2510.18855); also TRL's ``token_mask`` mode. hi = threshold_high, lo = threshold_low
    (default 1 / hi). OpenRLHF's IcePop default window is [0.5, 5].
    """
    return _mis_token(inp, cfg)


@CORRECTIONS.register("icepop", paper=_ICEPOP_PAPER)
def icepop(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """IcePop (arXiv:2510.18855): the same computation as ``mis_token``, under the paper's name."""
    return _mis_token(inp, cfg)


@CORRECTIONS.register("mis_sequence", paper=_ICEPOP_PAPER)
def mis_sequence(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Sequence-level masked IS: w_i = prod_t pi_old/mu if lo <= w_i <= hi, else the sequence is dropped.

    The sequence analogue of IcePop's masking (arXiv:2510.18855); TRL's default
    ``sequence_mask`` mode. hi = threshold_high, lo = threshold_low (default 1 / hi).
    """
    w = torch.exp(sequence_log_ratio(inp))
    keep = ((w >= cfg.low) & (w <= cfg.threshold_high)).expand_as(inp.mask)
    return _out(w.expand_as(inp.mask), keep, inp)


def _reject(inp: CorrectionInput, cfg: CorrectionConfig, kind: str) -> CorrectionOutput:
    # samples come from mu, so KL(mu || pi_old) is estimated with logp = behaviour, ref = old
    per_token = kl_estimate(inp.behaviour_logprobs, inp.old_logprobs, kind, mask=inp.mask).detach()
    mean = masked_sum(per_token, inp.mask, dim=-1, keepdim=True) / inp.mask.sum(-1, keepdim=True).clamp_min(1.0)
    keep = (mean.abs() <= cfg.kl_threshold).expand_as(inp.mask)
    out = _out(torch.ones_like(inp.mask), keep, inp)
    out.metrics["correction/seq_kl_mean"] = mean.mean()
    return out


@CORRECTIONS.register("reject_k1", paper=_STABILIZING_PAPER)
def reject_k1(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if |mean_t k1_t| > kl_threshold, k1_t = log mu(o_t) - log pi_old(o_t).

    Sequence-level rejection sampling on the training-inference discrepancy, which
    "Stabilizing RL with LLMs" (arXiv:2512.01374) shows must stay small for the token-level
    surrogate to be valid (verl's ``rollout_rs=seq_mean_k1``). Kept tokens get weight 1.
    """
    return _reject(inp, cfg, "k1")


@CORRECTIONS.register("reject_k2", paper=_STABILIZING_PAPER)
def reject_k2(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if mean_t k2_t > kl_threshold, k2_t = (log pi_old - log mu)^2 / 2 (arXiv:2512.01374)."""
    return _reject(inp, cfg, "k2")


@CORRECTIONS.register("reject_k3", paper=_STABILIZING_PAPER)
def reject_k3(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if mean_t k3_t > kl_threshold, k3_t = w - 1 - log w, w = pi_old/mu (arXiv:2512.01374)."""
    return _reject(inp, cfg, "k3")


def mismatch_metrics(behaviour: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training-inference mismatch to log every step (scalars, no grad).

    mismatch/kl_k1, mismatch/kl_k3: token means of the k1 and k3 estimates of KL(mu || pi_old)
    (samples come from mu); mismatch/ratio_p05, _p50, _p95: quantiles of the token ratio
    pi_old/mu; mismatch/ratio_max. All 0 when the mask is empty.
    """
    with torch.no_grad():
        m = mask > 0
        k1 = kl_estimate(behaviour, old, "k1", mask=mask)
        k3 = kl_estimate(behaviour, old, "k3", mask=mask)
        ratio = torch.exp((old - behaviour).clamp(-20.0, 20.0))[m].to(torch.float64)
        out = {"mismatch/kl_k1": masked_mean(k1, mask), "mismatch/kl_k3": masked_mean(k3, mask)}
        if ratio.numel() == 0:
            zero = torch.zeros((), dtype=torch.float64, device=mask.device)
            out.update({"mismatch/ratio_p05": zero, "mismatch/ratio_p50": zero, "mismatch/ratio_p95": zero,
                        "mismatch/ratio_max": zero})
            return out
        q = torch.quantile(ratio, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64, device=ratio.device))
        out.update({"mismatch/ratio_p05": q[0], "mismatch/ratio_p50": q[1], "mismatch/ratio_p95": q[2],
                    "mismatch/ratio_max": ratio.max()})
        return out
