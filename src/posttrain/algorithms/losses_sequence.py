"""Sequence-level policy losses: GSPO, GSPO-token, LUSPO and GMPO.

These losses are defined per sequence. To keep the uniform [N, T] contract, the sequence loss
L_i is written on every completion token of sample i, so that ``seq-mean-token-mean``
aggregation gives exactly mean_i L_i (the papers' objective); other aggregation modes weigh
sequences by their length, which is the user's explicit choice, never overridden here.
Each L_i depends only on sample i, so these losses are micro-batch invariant. As in
``losses.py``, inputs pass through ``clean`` and every per-sequence reduction selects with
``torch.where``, so NaN / inf at masked positions cannot reach a sequence's ratio or loss.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.aggregation import masked, masked_mean
from posttrain.algorithms.base import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput, PolicyLossOutput
from posttrain.algorithms.losses import clean, finish


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over completion tokens, [N, 1]."""
    return masked_mean(x, mask, dim=-1, keepdim=True)


def sequence_log_ratio(inp: PolicyLossInput) -> torch.Tensor:
    """log s_i = (1/|o_i|) sum_t (logp - old), [N, 1] (with grad)."""
    return _seq_mean(inp.logprobs - inp.old_logprobs, inp.mask)


def _gspo_terms(inp: PolicyLossInput, cfg: PolicyLossConfig, log_s: torch.Tensor) -> PolicyLossOutput:
    s = torch.exp(log_s.clamp(max=10.0))
    adv = inp.advantages
    unclipped = -s * adv
    clipped = -s.clamp(1.0 - cfg.gspo_clip_low, 1.0 + cfg.gspo_clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    metrics = {
        "clip_frac": masked_mean((clipped > unclipped).float(), inp.mask),
        "seq_ratio_mean": masked_mean(s.detach().expand_as(inp.mask), inp.mask),
    }
    return finish(masked(loss, inp.mask), inp, metrics)


@POLICY_LOSSES.register("gspo", paper="Group Sequence Policy Optimization (arXiv:2507.18071)")
def gspo(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """GSPO: s_i = exp(mean_t(logp - old));  L_i = -min(s_i A_i, clip(s_i, 1 - eps_l, 1 + eps_h) A_i).

    Paper: arXiv:2507.18071. The importance ratio is the length-normalised sequence likelihood
    ratio, and the clip acts on whole sequences. Defaults (paper): eps_l = 3e-4 and
    eps_h = 4e-4 (``gspo_clip_low/high``), aggregation ``seq-mean-token-mean``. L_i is written on
    every token (with A_{i,t}); the gradient flows through s_i into every token of the sequence:
    unclipped, dL_i/dlogp_t = -s_i A_i / |o_i|.
    """
    inp = clean(inp)
    return _gspo_terms(inp, cfg, sequence_log_ratio(inp))


@POLICY_LOSSES.register("gspo_token", paper="Group Sequence Policy Optimization (arXiv:2507.18071)")
def gspo_token(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """GSPO-token: s_{i,t} = sg(s_i) * pi(o_t) / sg(pi(o_t)), then the GSPO clip per token.

    Paper: arXiv:2507.18071, section "GSPO-token", for token-level advantages A_{i,t}. The value
    of s_{i,t} equals s_i; the gradient of token t is -s_i A_{i,t} (unclipped), so with a
    sequence-constant advantage and ``seq-mean-token-mean`` it equals GSPO's gradient.
    """
    inp = clean(inp)
    log_s = sequence_log_ratio(inp).detach() + inp.logprobs - inp.logprobs.detach()
    return _gspo_terms(inp, cfg, log_s)


@POLICY_LOSSES.register(
    "luspo",
    paper="Length-Unbiased Sequence Policy Optimization: Revealing and Controlling Response Length Variation "
    "in RLVR (arXiv:2602.05261)",
)
def luspo(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """LUSPO: the GSPO loss of each sequence multiplied by its length, L_i = |o_i| * L_i^GSPO.

    Paper: arXiv:2602.05261. GSPO's length-normalised ratio gives each sequence the same weight
    whatever its length, which biases training toward short answers; scaling each sequence's
    loss by |o_i| removes the bias. Same clip and defaults as ``gspo``; aggregate with
    ``seq-mean-token-mean`` to get mean_i |o_i| L_i^GSPO (TRL's ``luspo``).
    """
    inp = clean(inp)
    out = gspo(inp, cfg)
    lengths = inp.mask.sum(-1, keepdim=True)
    return PolicyLossOutput(loss=out.loss * lengths, metrics=out.metrics)


@POLICY_LOSSES.register("gmpo", paper="Geometric-Mean Policy Optimization (arXiv:2507.20673)")
def gmpo(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """GMPO: L_i = -A_i * exp(mean_t clip_sgn(logp_t - old_t)), the geometric mean of token ratios.

    Paper: arXiv:2507.20673. Optimises the geometric instead of the arithmetic mean of the token
    ratios, which is less sensitive to outlier ratios. The token log-ratio is clipped in log
    space, sign-aware like PPO: for A_i > 0 only from above (at eps_h), for A_i < 0 only from
    below (at -eps_l); ``gmpo_clip_low/high`` default to the paper's 0.4 (ratio range
    [e^-0.4, e^0.4]). A_i is the sequence's mean advantage over its tokens. L_i is written on every
    token. Unclipped gradient: dL_i/dlogp_t = -A_i * ratio_i / |o_i|.
    """
    inp = clean(inp)
    m = inp.mask
    lr = inp.logprobs - inp.old_logprobs
    adv_seq = _seq_mean(inp.advantages, m)
    sign = torch.sign(adv_seq)
    clamped = lr.clamp(-cfg.gmpo_clip_low, cfg.gmpo_clip_high)
    lr_clip = sign * torch.minimum(sign * lr, sign * clamped)
    ratio = torch.exp(_seq_mean(lr_clip, m))
    loss = masked((-adv_seq * ratio).expand_as(lr), m)
    clipped = (lr_clip != lr) & (sign != 0)
    metrics = {
        "clip_frac": masked_mean(clipped.float(), m),
        "seq_ratio_mean": masked_mean(ratio.detach().expand_as(m), m),
    }
    return finish(loss, inp, metrics)
