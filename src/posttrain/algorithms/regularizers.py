"""KL and entropy regularisers: configs, controllers and the helpers the trainer calls.

KL (``algorithm.kl.``): either a loss term coef * aggregate(kl_estimate(logp, ref, estimator))
(GRPO style) or, with ``in_reward``, a per-token reward -coef * KL_t added to the token rewards
(PPO / REINFORCE++ style, see ``kl_in_reward``). With ``target`` set, the coefficient follows
the adaptive controller of "Fine-Tuning Language Models from Human Preferences"
(arXiv:1909.08593).

Entropy (``algorithm.entropy.``): a bonus -coef * H in the loss; with ``adaptive`` the
coefficient is steered toward a target entropy (Skywork-OR1, arXiv:2505.22312; TRL's
``use_adaptive_entropy``). ``top_entropy_mask`` keeps only the highest-entropy tokens
("Beyond the 80/20 Rule", arXiv:2506.01939; TRL's ``top_entropy_quantile``).
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

    def __post_init__(self) -> None:
        for name in ("coef", "target", "delta", "coef_min", "coef_max", "top_quantile"):
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
