"""verl's optimal token baseline (OTB): a per-token, per-group baseline weighted by realized energy.

It needs, per completion token, sum over the vocabulary of pi^2 (``AdvantageInput.sum_pi2``),
which the learner computes in its fused log-prob pass (``models.logprobs.TokenLogProbs`` with
``with_sum_pi2``; the trainer runs that pass for the estimators in ``NEEDS_SUM_PI2``).
"""

from __future__ import annotations

import torch

from posttrain.algorithms.advantages import group_index
from posttrain.algorithms.advantages_token import token_level_rewards
from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput

# the estimators that read AdvantageInput.sum_pi2 (the trainer computes it for these only)
NEEDS_SUM_PI2 = ("optimal_token_baseline",)
OTB_EPS = 1e-8  # verl's epsilon in the baseline's denominator


def realized_energy(logprobs: torch.Tensor, sum_pi2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """W_t = sum_{j <= t} m_j (1 - 2 pi_j + sum_v pi_{j,v}^2), float64 [N, T].

    1 - 2 pi_j + sum_v pi_v^2 = ||e_{y_j} - pi_j||^2 is exactly the squared norm of the gradient of
    log pi(y_j) with respect to the logits at position j (the paper's Logit-Gradient Proxy).
    Positions with mask 0 (padding, tool output) add nothing and carry W through.
    """
    pi = logprobs.detach().to(torch.float64).exp()
    w = 1.0 - 2.0 * pi + sum_pi2.detach().to(torch.float64)
    return (w * mask.to(torch.float64)).cumsum(-1)


@ADVANTAGES.register(
    "optimal_token_baseline",
    paper="The Optimal Token Baseline: Variance Reduction for Long-Horizon LLM-RL (arXiv:2602.07078)",
)
def optimal_token_baseline(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """OTB: A_t^i = G_t^i - B_t with B_t = sum_i G_t^i W_t^i m_t^i / (sum_i W_t^i m_t^i + 1e-8) over the group.

    Paper: arXiv:2602.07078 (verl's ``optimal_token_baseline``, docs/algo/otb.md). G_t is the
    undiscounted reward-to-go of the token-level rewards (the outcome reward on the last token plus
    ``token_rewards``, e.g. a KL-in-reward penalty; ``cfg.gamma`` is not applied, as in verl),
    W_t = sum_{j<=t} (1 - 2 pi_j + sum_v pi_{j,v}^2) the realized energy (``realized_energy``),
    pi_j = exp(``logprobs``) the old policy's probability of the sampled token and sum_v pi^2 the
    learner's ``sum_pi2`` from the same pass. B_t is shared by the group's samples; a singleton
    group gets no baseline (A = G). A is 0 on padding.

    Where posttrain differs from verl: (1) verl rescales w_t by the rollout IS weights squared when
    a rollout correction is on; here corrections are computed after the advantages (they reweight
    the loss), so W is never rescaled. (2) verl's optional ``handle_zero_tail`` (zero baseline past
    the second-longest sample) and the multi-turn ``tir_optimal_token_baseline`` are not offered;
    positions with mask 0 inside a completion carry W and G through, which covers tool outputs.
    """
    if inp.logprobs is None or inp.sum_pi2 is None:
        missing = [k for k, v in (("logprobs", inp.logprobs), ("sum_pi2", inp.sum_pi2)) if v is None]
        raise ValueError(f"optimal_token_baseline needs AdvantageInput.{' and '.join(missing)} (the old policy's "
                         "log-probs and sum_v pi_v^2 per token, from the learner's fused pass)")
    if inp.sum_pi2.shape != inp.mask.shape or inp.logprobs.shape != inp.mask.shape:
        raise ValueError(f"optimal_token_baseline: logprobs {tuple(inp.logprobs.shape)} and sum_pi2 "
                         f"{tuple(inp.sum_pi2.shape)} must have the mask's shape {tuple(inp.mask.shape)}")
    m = inp.mask.to(torch.float64)
    returns = token_level_rewards(inp).flip(-1).cumsum(-1).flip(-1)  # G_t = sum_{j >= t} r_j
    energy = realized_energy(inp.logprobs, inp.sum_pi2, inp.mask) * m
    inverse, k = group_index(inp.group_ids)
    T = m.shape[1]
    zeros = torch.zeros((k, T), dtype=torch.float64, device=m.device)
    num = zeros.clone().index_add_(0, inverse, returns * energy)
    den = zeros.clone().index_add_(0, inverse, energy)
    size = torch.zeros(k, dtype=torch.float64, device=m.device).index_add_(0, inverse, torch.ones_like(m[:, 0]))
    baseline = (num / (den + OTB_EPS))[inverse] * (size[inverse] > 1)[:, None]
    return ((returns - baseline) * m).to(inp.mask.dtype)
