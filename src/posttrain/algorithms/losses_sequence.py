"""Sequence-level policy losses: GSPO, GSPO-token, LUSPO, GMPO, VESPO and SSPO (segment level).

These losses are defined per sequence. To keep the uniform [N, T] contract, the sequence loss
L_i is written on every completion token of sample i, so that ``seq-mean-token-mean``
aggregation gives exactly mean_i L_i (the papers' objective); other aggregation modes weigh
sequences by their length, which is the user's explicit choice, never overridden here.
Each L_i depends only on sample i, so these losses are micro-batch invariant. As in
``losses.py``, inputs pass through ``clean`` and every per-sequence reduction selects with
``torch.where``, so NaN / inf at masked positions cannot reach a sequence's ratio or loss.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from posttrain.algorithms.aggregation import masked, masked_mean
from posttrain.algorithms.base import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput, PolicyLossOutput
from posttrain.algorithms.losses import clean, finish, log_ratio


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


# TRL's bound on the VESPO log-weight: log(1e-8) below (so W > 0 and log W finite), 20 above
_VESPO_LOG_W_MIN = math.log(1e-8)


@POLICY_LOSSES.register(
    "vespo",
    paper="VESPO: Variational Sequence-Level Soft Policy Optimization for Stable Off-Policy LLM Training "
    "(arXiv:2602.10693)",
)
def vespo(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """VESPO: l_{i,t} = -sg(phi(W_i)) * A_{i,t} * logp_{i,t},  phi(W) = W^k exp(lambda (1 - W)).

    Paper: arXiv:2602.10693 (as TRL's ``loss_type="vespo"`` implements it; read for the equation
    and defaults). W_i = pi_theta(o_i) / mu(o_i) is the sequence importance ratio, not
    length-normalised: log W_i = sum_t clamp(logp - old, -20, 20) + sum_t log w_t, where w_t are
    the mismatch-correction weights ``is_weights`` (pi_old / pi_behaviour, when a correction
    gives them), and log W_i is clamped to [log 1e-8, 20]. phi is a Gamma-shaped kernel with
    phi(1) = 1 that smoothly shrinks both very small and very large W (no hard clip, no length
    bias); it is detached, so it only scales the REINFORCE gradient: dl_{i,t}/dlogp_{i,t} =
    -phi(W_i) A_{i,t}. (k, lambda) follow the sign of A_{i,t}: ``vespo_k_pos`` = 2,
    ``vespo_lambda_pos`` = 3 for A >= 0; ``vespo_k_neg`` = 3, ``vespo_lambda_neg`` = 2 for A < 0
    (TRL's defaults, the paper's c1 / c2 of section 3.4). TRL aggregates with a global token mean:
    use ``token-mean``.

    Unlike the other losses, ``is_weights`` do not multiply the per-token loss: as in TRL they
    enter W (log space), because W is the ratio to the sampling policy mu, and the kernel then
    bounds their effect too (multiplying as well would count them twice).
    """
    inp = clean(inp)
    m = inp.mask
    keep = m > 0
    log_w = log_ratio(inp).detach()
    if inp.is_weights is not None:
        # masked positions hold 0 after clean(): select before the log so no -inf is ever made
        w_is = torch.where(keep, inp.is_weights.detach(), torch.ones((), dtype=log_w.dtype, device=log_w.device))
        log_w = log_w + torch.log(w_is).clamp(_VESPO_LOG_W_MIN, 20.0)
    log_w_seq = torch.where(keep, log_w, torch.zeros_like(log_w)).sum(-1, keepdim=True)
    log_w_seq = log_w_seq.clamp(_VESPO_LOG_W_MIN, 20.0)
    pos = inp.advantages >= 0
    k = torch.where(pos, cfg.vespo_k_pos, cfg.vespo_k_neg).to(log_w.dtype)
    lam = torch.where(pos, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).to(log_w.dtype)
    # log phi = lambda + k log W - lambda W, in log space so W^k cannot overflow; exp(20) * lambda
    # only drives log phi to -inf-like values, whose exp is 0, never NaN
    phi = torch.exp(lam + k * log_w_seq - lam * torch.exp(log_w_seq))
    loss = -phi * inp.advantages * inp.logprobs
    metrics = {
        "phi_mean": masked_mean(phi.expand_as(m), m),
        "seq_ratio_mean": masked_mean(torch.exp(log_w_seq).expand_as(m), m),
    }
    return finish(masked(loss, m), dataclasses.replace(inp, is_weights=None), metrics)


def _segment_mean(x: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of x over the kept tokens of each fixed window of ``window`` positions, broadcast back
    to the window's positions, [N, T]. A window with no kept token gives 0 (never read)."""
    n, t = x.shape
    pad = (-t) % window
    xs = masked(x, mask)
    xs = torch.nn.functional.pad(xs, (0, pad)).view(n, -1, window)
    ms = torch.nn.functional.pad(mask, (0, pad)).view(n, -1, window)
    mean = xs.sum(-1, keepdim=True) / ms.sum(-1, keepdim=True).clamp_min(1.0)
    return mean.expand(-1, -1, window).reshape(n, -1)[:, :t]


@POLICY_LOSSES.register("sspo", paper="SSPO: Subsentence-level Policy Optimization (arXiv:2511.04256)")
def sspo(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput:
    """SSPO: l_t = -min(s_k A_t, clip(s_k, 1 - eps_l c_k, 1 + eps_h c_k) A_t) for t in segment k.

    Paper: arXiv:2511.04256 (catalog 003-62). What the abstract defines: one importance ratio per
    (sub)sentence, shared by its tokens, between GRPO's token ratio and GSPO's response ratio, so
    a clip drops one segment rather than a whole response; and PPO-CLIP bounds adjusted by the
    segment's entropy, wider for high-entropy text, narrower for low-entropy text. The abstract
    gives no formula for either; this is our reading, with our defaults:

    - s_k = exp(mean_{t in k} clamp(logp_t - old_t, -20, 20)), the geometric mean of the token
      ratios of segment k (GSPO's length-normalised ratio, applied to a segment).
    - c_k = clamp(H_k / H_i, ``sspo_entropy_scale_min`` = 0.5, ``sspo_entropy_scale_max`` = 2),
      H_k the mean token entropy of segment k, H_i that of the whole response (c_k = 1 where
      H_i = 0); eps_l = ``sspo_clip_low`` = 0.2, eps_h = ``sspo_clip_high`` = 0.2 (PPO-CLIP's).
      Normalising by the response's own entropy keeps the loss per-sequence, so it is
      micro-batch invariant. The entropy is ``inp.entropy`` (the learner's, detached) when given;
      otherwise the sampled token's surprisal -old_t, whose expectation under the sampling policy
      is the token entropy (the trainer always passes the learner's entropies to sspo).
    - APPROXIMATION: segments are NOT sentences. Sentence boundaries need the tokenizer and the
      loss contract carries only tensors, with no per-token segment id, so a segment is a fixed
      window of ``sspo_window`` = 16 consecutive token positions (positions t // 16), masked
      tokens excluded from its means.

    The clip is sign-aware as in PPO. Unclipped, the gradient of sum_t l_t with respect to
    logp_t (t in k) is -s_k * mean_{j in k} A_j; use ``token-mean`` aggregation.
    """
    inp = clean(inp)
    m = inp.mask
    w = cfg.sspo_window
    log_s = _segment_mean(log_ratio(inp), m, w)
    s = torch.exp(log_s)
    ent = inp.entropy if inp.entropy is not None else -inp.old_logprobs
    ent = ent.detach()
    h_seg = _segment_mean(ent, m, w)
    h_seq = _seq_mean(ent, m)
    ok = h_seq > 0
    scale = torch.where(ok, h_seg / torch.where(ok, h_seq, torch.ones_like(h_seq)), torch.ones_like(h_seg))
    scale = scale.clamp(cfg.sspo_entropy_scale_min, cfg.sspo_entropy_scale_max)
    low, high = 1.0 - cfg.sspo_clip_low * scale, 1.0 + cfg.sspo_clip_high * scale
    adv = inp.advantages
    unclipped = -s * adv
    clipped = -torch.minimum(torch.maximum(s, low), high) * adv
    loss = torch.maximum(unclipped, clipped)
    metrics = {
        "clip_frac": masked_mean((clipped > unclipped).float(), m),
        "seg_ratio_mean": masked_mean(s.detach(), m),
        "clip_scale_mean": masked_mean(scale, m),
    }
    return finish(masked(loss, m), inp, metrics)
