"""KL and entropy regularisers: configs, controllers and the helpers the trainer calls.

KL (``algorithm.kl.``): either a loss term coef * aggregate(kl_estimate(logp, ref, estimator))
(GRPO style) or, with ``in_reward``, a per-token reward -coef * KL_t added to the token rewards
(PPO / REINFORCE++ style, see ``kl_in_reward``). With ``target`` set, the coefficient follows
the adaptive controller of "Fine-Tuning Language Models from Human Preferences"
(arXiv:1909.08593).

Entropy (``algorithm.entropy.``): a bonus -coef * H in the loss; with ``adaptive`` the
coefficient is steered toward a target entropy (Skywork-OR1, arXiv:2505.22312; TRL's
``use_adaptive_entropy``). ``top_entropy_mask`` keeps only the highest-entropy tokens
("Beyond the 80/20 Rule", arXiv:2506.01939; TRL's ``top_entropy_quantile``). With ``siren`` the
bonus is replaced by SIREN's selective, self-anchored regulariser coef * (H_peak - H_anchor)^2
("Rethinking Entropy Regularization in Large Reasoning Models", arXiv:2509.25133; see ``siren_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from posttrain.algorithms.aggregation import masked
from posttrain.algorithms.kl import BASE_KL_ESTIMATORS, KL_ESTIMATORS, kl_estimate


@dataclass
class KLConfig:
    coef: float = 0.0  # initial KL coefficient beta (DeepSeek-R1 / verl: 0.001; 0 disables)
    estimator: str = "k3"  # one of kl.KL_ESTIMATORS
    in_reward: bool = False  # True: -coef * KL_t in the token rewards; False: a loss term
    target: Optional[float] = None  # adaptive controller target KL per token; None = fixed coef
    horizon: int = 10000  # adaptive controller horizon (Ziegler et al.: 10000)

    def __post_init__(self) -> None:
        for name in ("coef", "target"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"algorithm.kl.{name} must be a finite number, got {value!r}")
        if self.coef < 0:
            raise ValueError("algorithm.kl.coef must be >= 0")
        base = self.estimator[:-1] if self.estimator.endswith("+") else self.estimator
        if base not in BASE_KL_ESTIMATORS:
            raise ValueError(
                f"algorithm.kl.estimator must be one of {', '.join(KL_ESTIMATORS)} (or any base kind + '+')"
            )
        if self.target is not None and self.target <= 0:
            raise ValueError("algorithm.kl.target must be > 0 (or null for a fixed coefficient)")
        if self.horizon <= 0:
            raise ValueError("algorithm.kl.horizon must be > 0")


class AdaptiveKLController:
    """Adaptive KL coefficient (arXiv:1909.08593).

        e = clip(KL / target - 1, -0.2, 0.2);   coef <- coef * (1 + e * n_steps / horizon)

    With ``target=None`` the coefficient stays fixed. Save/restore ``value`` in checkpoints.
    """

    def __init__(self, cfg: KLConfig):
        self.value = cfg.coef
        self.target = cfg.target
        self.horizon = cfg.horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_in_reward(
    token_rewards: Optional[torch.Tensor],
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """token_rewards - coef * KL_t (no grad), for ``AdvantageInput.token_rewards``. [N, T].

    PPO (InstructGPT) and REINFORCE++ put the per-token KL to the reference in the reward;
    the classic choice is k1 = log pi_old - log pi_ref. NaN step markers in ``token_rewards``
    (PURE) are preserved. Positions with ``mask == 0`` get no KL term, whatever the log-probs
    hold there (selected with ``torch.where``, not multiplied: 0 * inf would be NaN).
    """
    kl = masked(kl_estimate(logprobs.detach(), ref_logprobs.detach(), estimator, mask=mask), mask)
    base = torch.zeros_like(kl) if token_rewards is None else token_rewards
    return base - coef * kl


@dataclass
class EntropyConfig:
    coef: float = 0.0  # entropy bonus coefficient (loss -= coef * H); 0 disables
    adaptive: bool = False  # steer coef toward `target` (Skywork-OR1)
    target: float = 0.2  # target mean token entropy (Skywork-OR1 / TRL: 0.2)
    delta: float = 0.005  # coefficient step per update (Skywork-OR1 / TRL: 0.005)
    coef_min: float = 0.0
    coef_max: float = 1.0
    top_quantile: float = 1.0  # train only on tokens above this entropy quantile; 1.0 = all, 0.2 = 80/20
    siren: bool = False  # SIREN: coef * (H_peak - H_anchor)^2 instead of the bonus (official code: coef 0.005)
    siren_quantile: float = 0.8  # SIREN's peak-entropy mask: tokens above this quantile of their response (0.8)
    siren_anchor: Optional[float] = None  # SIREN's anchor H_anchor; None: the first step's H_peak (official code)
    siren_top_p: Optional[float] = 0.8  # SIREN's top-p mask: each token's nucleus entropy (paper: 0.8); None: full

    def __post_init__(self) -> None:
        for name in ("coef", "target", "delta", "coef_min", "coef_max", "top_quantile", "siren_quantile"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"algorithm.entropy.{name} must be a finite number, got {value!r}")
        if self.coef < 0:
            raise ValueError("algorithm.entropy.coef must be >= 0")
        if self.target < 0:
            raise ValueError("algorithm.entropy.target must be >= 0")
        if self.delta < 0:
            raise ValueError("algorithm.entropy.delta must be >= 0")
        if not 0 <= self.coef_min <= self.coef_max:
            raise ValueError("algorithm.entropy.coef_min must be in [0, coef_max]")
        if not 0.0 < self.top_quantile <= 1.0:
            raise ValueError("algorithm.entropy.top_quantile must be in (0, 1]")
        if not 0.0 <= self.siren_quantile < 1.0:
            raise ValueError("algorithm.entropy.siren_quantile must be in [0, 1) (SIREN keeps the tokens above this "
                             f"entropy quantile of their response; paper's code: 0.8), got {self.siren_quantile}")
        if self.siren_anchor is not None and not (math.isfinite(self.siren_anchor) and self.siren_anchor >= 0):
            raise ValueError("algorithm.entropy.siren_anchor must be a finite entropy >= 0 (nats), or null for the "
                             f"first step's, got {self.siren_anchor!r}")
        if self.siren_top_p is not None and not 0.0 < self.siren_top_p < 1.0:  # also refuses NaN
            raise ValueError("algorithm.entropy.siren_top_p must be in (0, 1) (the nucleus whose entropy SIREN "
                             f"regularises; paper: 0.8), or null for the full vocabulary, got {self.siren_top_p!r}")
        if self.siren and self.adaptive:
            raise ValueError("algorithm.entropy.siren and algorithm.entropy.adaptive both steer the entropy: SIREN "
                             "pulls it toward its anchor itself; turn one off")
        if self.siren and self.coef <= 0:
            raise ValueError("algorithm.entropy.siren needs algorithm.entropy.coef > 0 (the weight of its squared "
                             "deviation; the paper's code uses 0.005)")


class AdaptiveEntropyController:
    """Adaptive entropy coefficient ("Skywork Open Reasoner 1 Technical Report", arXiv:2505.22312).

        coef <- clip(coef + delta, min, max)  if H < target
        coef <- clip(coef - delta, min, max)  if H > target

    Only active when ``cfg.adaptive``; update once per optimizer step with the mini-batch's
    mean token entropy. Save/restore ``value`` in checkpoints.
    """

    def __init__(self, cfg: EntropyConfig):
        self.cfg = cfg
        self.value = cfg.coef

    def update(self, entropy: float) -> float:
        if self.cfg.adaptive:
            step = 0.0
            if entropy < self.cfg.target:
                step = self.cfg.delta
            elif entropy > self.cfg.target:
                step = -self.cfg.delta
            self.value = min(max(self.value + step, self.cfg.coef_min), self.cfg.coef_max)
        return self.value


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Keep the tokens whose entropy is in the top ``quantile`` fraction of the batch. [N, T].

    "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning
    for LLM Reasoning" (arXiv:2506.01939) trains only on the top 20% (quantile = 0.2) of
    "forking" tokens. quantile = 1.0 returns ``mask`` unchanged. Compute on the whole mini-batch.
    """
    if quantile >= 1.0:
        return mask
    values = entropy.detach()[mask > 0].to(torch.float64)
    if values.numel() == 0:
        return mask
    threshold = torch.quantile(values, 1.0 - quantile)
    return mask * (entropy.detach() >= threshold).to(mask.dtype)


def peak_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """SIREN's peak-entropy mask, [N, T] bool: per response, its tokens whose entropy is strictly
    above the ``quantile`` quantile (linear interpolation) of that response's entropies under
    ``mask``. Per response, as the official code's ``mask_by_quantile`` (a quantile along each row),
    so micro-batching cannot change it. A response whose tokens all tie keeps none."""
    values = entropy.detach().to(torch.float64).masked_fill(mask <= 0, float("nan"))
    valid = (mask > 0).any(-1, keepdim=True)
    # nanquantile of an all-NaN row is NaN, and NaN compares False: padding-only rows keep nothing
    threshold = torch.nanquantile(values.masked_fill(~valid, 0.0), quantile, dim=-1, keepdim=True)
    return (values > threshold) & (mask > 0) & valid


def siren_selected_entropy(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """[N]: each response's mean entropy over its peak tokens (0 for a response with none). The mean
    of these over a batch is SIREN's H_peak (the official code's "seq-mean-token-mean", where a
    response without peak tokens counts as 0). Differentiable through ``entropy``, not the mask."""
    keep = peak_entropy_mask(entropy, mask, quantile).to(entropy.dtype)
    return (entropy * keep).sum(-1) / keep.sum(-1).clamp_min(1.0)


def siren_loss(selected: torch.Tensor, deviation: float, coef: float, num_seqs: float) -> torch.Tensor:
    """One micro-batch's share of SIREN's self-anchored regulariser coef * (H_peak - H_anchor)^2.

    Paper: "Rethinking Entropy Regularization in Large Reasoning Models" (SIREN; arXiv:2509.25133),
    catalog 003-46. A plain entropy bonus over the whole vocabulary and every token makes the
    entropy explode in long reasoning traces; SIREN regularises only a subset and in a form that
    cannot run away:
      1. top-p mask: the entropy of each token's nucleus (top-p, renormalised; code: p = 0.8),
         ``siren_top_p``: the learner's fused log-prob pass computes it and its exact gradient
         (``models/logprobs.TokenLogProbs``, whose docstring gives the nucleus: the crossing
         token left out, as in the official code);
      2. peak-entropy mask: per response, only its tokens above the 0.8 entropy quantile;
      3. self-anchored: the loss is coef * (H_peak - H_anchor)^2, where H_peak is the mean over
         responses of their peak tokens' mean entropy, and H_anchor is H_peak of the first
         step's batch (the official code, github.com/Linn3a/siren: ``mask_by_quantile``, the
         ``siren`` branch of its actor, the anchor set at global step 1; coef 0.005).
    So the entropy of the selected tokens is pulled back toward where training started, from
    above as from below, rather than pushed up without limit.

    What differs, and why:
    - ``siren_top_p: null`` drops step 1: the full-vocabulary entropy, the paper's ablation
      without the top-p mask (the official code's ``abla_wo_topp``).
    - With the top-p mask the nucleus entropies at the rollout weights (anchor, deviation) come
      from a no-grad learner pass of their own: engines record the full-vocabulary entropy.
    - The official code squares each micro-batch's own H_peak, so its gradient depends on the
      micro-batching. Here the deviation d = H_peak - H_anchor is taken once per mini-batch, on
      the entropies at the rollout weights (``deviation``), and each micro-batch contributes
      coef * (d^2 * n/N + 2 d * sum_i (s_i - stopgrad s_i) / N): summed over the micro-batches
      (and ranks) the value is coef * d^2 and the gradient is exactly that of coef * (H_peak -
      H_anchor)^2 at d, whatever the split. After the first mini-batch of a step d is the rollout
      weights' value, not the current one (at most one step of updates old).
    - The peak mask is taken over the tokens that get a loss (``loss_mask``), so it composes with
      the 80/20 mask and the rejection of a mismatch correction.

    ``selected``: [n] ``siren_selected_entropy`` of this micro-batch's rows at the current weights;
    ``num_seqs``: N, the number of responses in the mini-batch.
    """
    share = selected.numel() / num_seqs
    linear = (selected - selected.detach()).sum() / num_seqs
    return coef * (deviation * deviation * share + 2.0 * deviation * linear)
