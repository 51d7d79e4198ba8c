"""Rollout- and token-level down-sampling: which parts of a scored batch enter the update."""

from __future__ import annotations

import math

import torch

from posttrain.selection.base import SELECTORS, ScoredGroups, SelectionConfig, Selector
from posttrain.selection.selectors import max_variance_subset


def top_k_tokens(score: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """[N, T] mask of the ceil(fraction x #loss tokens) loss tokens with the largest ``score``.

    A count, not a threshold: a batch where many tokens score 0 (groups with equal rewards have
    A = 0) must still keep only the fraction asked for. Ties go to the earlier token (stable sort).
    """
    flat_mask = mask.reshape(-1) > 0
    where = torch.nonzero(flat_mask).squeeze(-1)
    k = math.ceil(fraction * where.numel())
    order = torch.sort(score.detach().reshape(-1)[where].double(), descending=True, stable=True).indices
    keep = torch.zeros_like(flat_mask)
    keep[where[order[:k]]] = True
    return mask * keep.reshape(mask.shape).to(mask.dtype)


def token_fraction(start: float, step: int, anneal_steps: int) -> float:
    """The fraction of tokens kept at 0-based ``step``: ``start``, rising linearly to 1 over
    ``anneal_steps`` steps (0: constant)."""
    if anneal_steps <= 0:
        return start
    return start + (1.0 - start) * min(1.0, step / anneal_steps)


@SELECTORS.register("d3s", paper="Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for "
                                 "Efficient Policy Optimization (arXiv:2509.22115)")
class D3S(Selector):
    """Dual-level down-sampling: the max-variance rollouts, then the tokens of largest |A| x entropy.

    sample level:  S_g = argmax_{|S| = m} Var(A_S)      per group, m = ``selection.keep_completions``
    token level:   keep the ceil(rho_t K) of the batch's K loss tokens with the largest |A_it| H_it,
                   rho_t = rho_0 + (1 - rho_0) min(1, t / anneal_steps)

    Var(A) bounds the policy-gradient norm from above, and |A| H picks the tokens that carry both
    signal and uncertainty. A group-normalised advantage is affine in the reward within a group,
    so the sample level keeps the same rollouts as PODS (``max_variance_subset`` of the rewards);
    d3s adds the token level and its schedule, which starts aggressive and relaxes to all tokens
    (the paper's curriculum; its exact shape is not in the abstract, so the linear ramp, rho_0 =
    ``selection.token_fraction`` (default 0.5) and ``selection.anneal_steps`` (default 0: no
    ramp) are posttrain's choices). The token mask is computed on every learner rank from the
    whole batch's advantages and entropies (the learner's own where the engine records none).
    """

    selects_tokens = True

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.m = cfg.completions_kept(num_completions)

    def keep_rows(self, batch: ScoredGroups) -> torch.Tensor:
        keep = torch.zeros(len(batch.rewards), dtype=torch.bool)
        for rows in batch.rows_of:
            keep[rows[max_variance_subset(batch.rewards[rows], min(self.m, len(rows)))]] = True
        return keep

    def keep_tokens(self, advantages: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor,
                    step: int) -> torch.Tensor:
        rho = token_fraction(self.cfg.token_fraction, step, self.cfg.anneal_steps)
        return top_k_tokens(advantages.abs() * entropies, mask, rho)
