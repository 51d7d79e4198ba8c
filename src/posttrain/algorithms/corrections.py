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

``cfg.batch_normalize`` (verl's ``rollout_is_batch_normalize``, self-normalised IS) divides the
weights of the IS corrections by their mean over the batch *they are given*: the kept tokens for
token-level weights, the kept sequences (one weight each) for sequence-level ones, after the
truncation, as verl does. "The batch" is whatever rows the caller passes: the caller must pass the
whole step's batch (on every data-parallel rank the same) to get verl's global normalisation.
verl normalises over all valid tokens before its (separate) rejection mask; posttrain's masked
corrections (mis_*, icepop) weight and reject in one step, so they normalise over the tokens they
keep: the ones the loss sees.
"""

from __future__ import annotations

import math

import torch

from posttrain.algorithms.aggregation import masked, masked_mean, masked_sum
from posttrain.algorithms.base import (
    CORRECTIONS,
    SEQ_REJECT_MODES,
    CorrectionConfig,
    CorrectionInput,
    CorrectionOutput,
)
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


def _out(weights: torch.Tensor, keep: torch.Tensor, inp: CorrectionInput, cap: float | None = None,
         normalize: str | None = None) -> CorrectionOutput:
    """Mask, detach, and the metrics every correction logs; ``cap``: the truncation threshold,
    whose share of tokens reaching it is logged as ``correction/truncated_frac``; ``normalize``:
    "token" or "sequence" to rescale the weights to mean 1 (``batch_normalize``)."""
    mask = inp.mask * keep.to(inp.mask.dtype)
    weights = masked(weights, mask).detach()
    metrics = {}
    if cap is not None:  # before normalising, which moves weights off the cap
        metrics["correction/truncated_frac"] = masked_mean((weights >= cap).to(mask.dtype), mask)
    if normalize is not None:
        weights, metrics["correction/batch_norm_factor"] = batch_normalize(weights, mask, normalize)
    metrics["correction/weight_mean"] = masked_mean(weights, mask)
    metrics["correction/masked_frac"] = 1.0 - mask.sum() / inp.mask.sum().clamp_min(1.0)
    return CorrectionOutput(weights=weights, mask=mask.detach(), metrics=metrics)


def batch_normalize(weights: torch.Tensor, mask: torch.Tensor, level: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised IS weights: w / mean(w), and the mean divided by.

    level "token": mean over the kept tokens (mask > 0) of ``weights``; "sequence": ``weights``
    is constant along each row, the mean is over the rows with a kept token of that constant, so
    every sequence counts once whatever its length (verl's two cases). A mean <= 1e-8 (no kept
    token) leaves the weights as they are, factor 1 (verl's guard). ``weights`` must be 0 off the
    mask already (``_out`` does that), so the row sums below see no garbage.
    """
    if level == "token":
        mean = masked_mean(weights, mask)
    elif level == "sequence":
        count = mask.sum(-1)
        per_seq = weights.sum(-1) / count.clamp_min(1.0)
        has = (count > 0).to(weights.dtype)
        mean = (per_seq * has).sum() / has.sum().clamp_min(1.0)
    else:
        raise ValueError(f"batch_normalize level must be 'token' or 'sequence', got {level!r}")
    factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
    return weights / factor, factor


@CORRECTIONS.register("tis_token", paper=_TIS_PAPER)
def tis_token(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Token-level truncated IS: w_t = min(pi_old(o_t) / mu(o_t), C), C = threshold_high (2.0).

    Truncated importance weights as in IMPALA/V-trace (arXiv:1802.01561); applied to LLM RL
    by Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training" (blog, no arXiv), and the detached pi_old/mu factor of MiniRL
    (arXiv:2512.01374). verl's default cap is 2.0. No token is masked. With ``batch_normalize``
    (verl's ``rollout_is_batch_normalize``) w_t / mean of w over the batch's kept tokens.
    """
    w = torch.exp(token_log_ratio(inp)).clamp(max=cfg.threshold_high)
    return _out(w, torch.ones_like(inp.mask, dtype=torch.bool), inp, cap=cfg.threshold_high,
                normalize="token" if cfg.batch_normalize else None)


@CORRECTIONS.register("tis_sequence", paper=_TIS_PAPER)
def tis_sequence(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Sequence-level truncated IS: w_i = min(prod_t pi_old/mu, C) on every token of sample i.

    Same references as ``tis_token`` (arXiv:1802.01561); the sequence ratio is the exact
    correction for a sequence-level reward but has a much larger variance, hence the cap C.
    With ``batch_normalize``: w_i / mean_j w_j over the batch's sequences (each counted once).
    """
    w = torch.exp(sequence_log_ratio(inp)).clamp(max=cfg.threshold_high).expand_as(inp.mask)
    return _out(w, torch.ones_like(inp.mask, dtype=torch.bool), inp, cap=cfg.threshold_high,
                normalize="sequence" if cfg.batch_normalize else None)


def _mis_token(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    w = torch.exp(token_log_ratio(inp))
    keep = (w >= cfg.low) & (w <= cfg.threshold_high)
    return _out(w, keep, inp, normalize="token" if cfg.batch_normalize else None)


@CORRECTIONS.register("mis_token", paper=_ICEPOP_PAPER)
def mis_token(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Token-level masked IS: w_t = pi_old/mu if lo <= pi_old/mu <= hi, else the token is masked.

    IcePop's calibration M(k) = k on [alpha, beta], 0 outside ("Every Step Evolves", Ring-1T,
    arXiv:2510.18855); also TRL's ``token_mask`` mode. hi = threshold_high, lo = threshold_low
    (default 1 / hi). OpenRLHF's IcePop default window is [0.5, 5]. With ``batch_normalize``
    the kept weights are divided by their mean over the batch's kept tokens.
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
    ``sequence_mask`` mode. hi = threshold_high, lo = threshold_low (default 1 / hi). With
    ``batch_normalize`` the kept w_i are divided by their mean over the kept sequences.
    """
    w = torch.exp(sequence_log_ratio(inp))
    keep = ((w >= cfg.low) & (w <= cfg.threshold_high)).expand_as(inp.mask)
    return _out(w.expand_as(inp.mask), keep, inp, normalize="sequence" if cfg.batch_normalize else None)


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
    surrogate to be valid. The statistic of verl's ``seq_mean_k1`` with a window symmetric in
    log space: ``seq_mean_k1`` with rs_threshold_high = exp(kl_threshold) keeps the same sequences.
    Kept tokens get weight 1.
    """
    return _reject(inp, cfg, "k1")


@CORRECTIONS.register("reject_k2", paper=_STABILIZING_PAPER)
def reject_k2(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if mean_t k2_t > kl_threshold, k2_t = (log pi_old - log mu)^2 / 2 (arXiv:2512.01374).

    ``seq_mean_k2`` with rs_threshold_high = kl_threshold, under its older posttrain name.
    """
    return _reject(inp, cfg, "k2")


@CORRECTIONS.register("reject_k3", paper=_STABILIZING_PAPER)
def reject_k3(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if mean_t k3_t > kl_threshold, k3_t = w - 1 - log w, w = pi_old/mu (arXiv:2512.01374).

    ``seq_mean_k3`` with rs_threshold_high = kl_threshold, under its older posttrain name.
    """
    return _reject(inp, cfg, "k3")


# ---------------------------------------------------------------- verl's sequence-level rejection
def sequence_divergence(inp: CorrectionInput, mode: str) -> torch.Tensor:
    """The statistic of rejection mode ``mode`` ("seq_{sum,mean,max}_k{1,2,3}") per sequence, [N, 1].

    Per token, with delta_t = log pi_old(o_t) - log mu(o_t) clamped to [-20, 20] (``kl_estimate``
    with logp = behaviour, ref = old: the samples come from mu, so these estimate KL(mu || pi_old)):

        k1_t = -delta_t = log mu(o_t) - log pi_old(o_t)     (signed)
        k2_t = delta_t^2 / 2
        k3_t = exp(delta_t) - 1 - delta_t                    (>= 0)

    then the sum, the mean or the max over the sequence's tokens with mask > 0; a sequence with no
    such token gets 0 (verl's masked sum / mean / max give the same). The sum is not clamped.
    """
    agg, kind = mode.split("_")[1:]
    per_token = kl_estimate(inp.behaviour_logprobs, inp.old_logprobs, kind, mask=inp.mask).detach()
    valid = inp.mask > 0
    if agg == "sum":
        return masked_sum(per_token, inp.mask, dim=-1, keepdim=True)
    if agg == "mean":
        return masked_sum(per_token, inp.mask, dim=-1, keepdim=True) / inp.mask.sum(-1, keepdim=True).clamp_min(1.0)
    if agg == "max":
        # -inf off the mask, not 0: a rounding-negative k3 must not lose to a padded position
        top = torch.where(valid, per_token, torch.full_like(per_token, -float("inf"))).amax(-1, keepdim=True)
        return torch.where(valid.any(-1, keepdim=True), top, torch.zeros_like(top))
    raise ValueError(f"unknown sequence statistic {agg!r} in {mode!r}; modes: {', '.join(SEQ_REJECT_MODES)}")


def _seq_reject(inp: CorrectionInput, cfg: CorrectionConfig, mode: str) -> CorrectionOutput:
    """verl's ``rollout_rs=<mode>`` rejection sampling (verl/trainer/ppo/rollout_corr_helper.py).

    A sequence is kept (weight 1 on its tokens) iff its statistic S (``sequence_divergence``)
    lies in the window, else all its tokens get mask 0:

        k1 modes:     log L <= S <= log U,  i.e.  L <= exp(S) <= U
        k2, k3 modes: S <= U

    (L, U) = ``cfg.rs_bounds(mode)``: rs_threshold_low / rs_threshold_high, L = 1 / U unless set,
    U = SEQ_REJECT_DEFAULTS[mode] unless set. As in verl, the k1 window bounds exp(S), which for
    seq_sum_k1 is mu(o) / pi_old(o), the *inverse* of the IS ratio the tis_* / mis_* windows
    bound (and for seq_mean_k1 the geometric mean of the per-token mu / pi_old). posttrain keeps
    verl's direction so that a verl threshold gives the same rejections here; the defaults are
    symmetric (L = 1 / U), where the direction does not matter; to bound pi_old / mu to [a, b]
    instead, set low = 1 / b, high = 1 / a. The k2 / k3 modes take no lower bound (verl refuses
    one): they are >= 0 and 0 means no mismatch.

    verl combines its rejection mask with a separate IS weight (``rollout_is``) when both are set;
    a posttrain correction is one entry, so these modes weight kept tokens by 1 (mis_sequence is
    verl's seq-TIS + seq_sum_k1 with one symmetric threshold for both). Metrics:
    correction/seq_stat_mean and _max over the sequences with a token, correction/rejected_seq_frac
    among them.
    """
    low, high = cfg.rs_bounds(mode)
    stat = sequence_divergence(inp, mode)
    if mode.endswith("k1"):
        keep = (stat >= math.log(low)) & (stat <= math.log(high))
    else:
        keep = stat <= high
    out = _out(torch.ones_like(inp.mask), keep.expand_as(inp.mask), inp)
    has = inp.mask.sum(-1, keepdim=True) > 0
    n = has.sum().clamp_min(1).to(stat.dtype)
    out.metrics["correction/seq_stat_mean"] = torch.where(has, stat, torch.zeros_like(stat)).sum() / n
    top = torch.where(has, stat, torch.full_like(stat, -float("inf"))).max()  # -inf: no sequence has a token
    out.metrics["correction/seq_stat_max"] = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    out.metrics["correction/rejected_seq_frac"] = (has & ~keep).sum().to(stat.dtype) / n
    return out


@CORRECTIONS.register("seq_sum_k1", paper=_STABILIZING_PAPER)
def seq_sum_k1(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence unless L <= mu(o)/pi_old(o) <= U, i.e. log L <= sum_t k1_t <= log U (verl's seq_sum_k1).

    k1_t = log mu(o_t) - log pi_old(o_t); default window [0.5, 2] (verl's decoupled_seq_is_rs
    preset). Sequence-level rejection on the training-inference discrepancy, which "Stabilizing
    RL with LLMs" (arXiv:2512.01374) shows must be small for the token-level surrogate to hold;
    verl's docs cite Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy
    RL Training" (blog, no arXiv). Conventions and defaults: ``_seq_reject``.
    """
    return _seq_reject(inp, cfg, "seq_sum_k1")


@CORRECTIONS.register("seq_sum_k2", paper=_STABILIZING_PAPER)
def seq_sum_k2(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if sum_t k2_t > U, k2_t = (log pi_old(o_t) - log mu(o_t))^2 / 2 (verl's seq_sum_k2).

    Default U = ln 2 (posttrain's; verl requires a value). References and conventions as
    ``seq_sum_k1`` (arXiv:2512.01374).
    """
    return _seq_reject(inp, cfg, "seq_sum_k2")


@CORRECTIONS.register("seq_sum_k3", paper=_STABILIZING_PAPER)
def seq_sum_k3(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if sum_t k3_t > U, k3_t = w_t - 1 - log w_t, w_t = pi_old/mu (verl's seq_sum_k3).

    sum_t k3_t is a low-variance estimate of the sequence-level KL(mu || pi_old). Default U = ln 2
    (posttrain's; verl requires a value). References as ``seq_sum_k1`` (arXiv:2512.01374).
    """
    return _seq_reject(inp, cfg, "seq_sum_k3")


@CORRECTIONS.register("seq_mean_k1", paper=_STABILIZING_PAPER)
def seq_mean_k1(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence unless log L <= mean_t k1_t <= log U (verl's seq_mean_k1).

    k1_t = log mu(o_t) - log pi_old(o_t); exp(mean_t k1_t) is the geometric mean of the token
    ratios mu/pi_old, so the window does not scale with length as ``seq_sum_k1``'s does. Default
    window [0.999, 1.001] (verl's *_geo_rs presets). References and conventions as ``seq_sum_k1``
    (arXiv:2512.01374).
    """
    return _seq_reject(inp, cfg, "seq_mean_k1")


@CORRECTIONS.register("seq_mean_k2", paper=_STABILIZING_PAPER)
def seq_mean_k2(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if mean_t k2_t > U, k2_t = (log pi_old - log mu)^2 / 2 (verl's seq_mean_k2).

    Default U = 0.01 (verl's seq_mean_k3 preset value; k2 = k3 to second order). References as
    ``seq_sum_k1`` (arXiv:2512.01374).
    """
    return _seq_reject(inp, cfg, "seq_mean_k2")


@CORRECTIONS.register("seq_mean_k3", paper=_STABILIZING_PAPER)
def seq_mean_k3(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if mean_t k3_t > U, k3_t = w_t - 1 - log w_t, w_t = pi_old/mu (verl's seq_mean_k3).

    Default U = 0.01 (verl's *_k3_rs presets). References as ``seq_sum_k1`` (arXiv:2512.01374).
    """
    return _seq_reject(inp, cfg, "seq_mean_k3")


@CORRECTIONS.register("seq_max_k2", paper=_STABILIZING_PAPER)
def seq_max_k2(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if max_t k2_t > U: one token far off is enough (verl's seq_max_k2).

    k2_t = (log pi_old(o_t) - log mu(o_t))^2 / 2; default U = 2.5 (verl's multi-RS example),
    i.e. every token's |log pi_old/mu| <= sqrt(5). References as ``seq_sum_k1`` (arXiv:2512.01374).
    """
    return _seq_reject(inp, cfg, "seq_max_k2")


@CORRECTIONS.register("seq_max_k3", paper=_STABILIZING_PAPER)
def seq_max_k3(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput:
    """Reject a sequence if max_t k3_t > U, k3_t = w_t - 1 - log w_t, w_t = pi_old/mu (verl's seq_max_k3).

    Default U = 2.5 (as ``seq_max_k2``; verl has none). References as ``seq_sum_k1`` (arXiv:2512.01374).
    """
    return _seq_reject(inp, cfg, "seq_max_k3")


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
