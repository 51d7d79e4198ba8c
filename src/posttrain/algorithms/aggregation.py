"""Turning a per-token loss matrix into a scalar.

Every mode divides by counts of the *whole* mini-batch (passed in), never of the micro-batch,
so splitting a mini-batch into micro-batches and summing their losses gives the same loss and
gradient as one pass (gradient accumulation invariance).

Masked positions may hold anything (NaN, inf: padding of a vLLM rollout, environment tokens):
every reduction here *selects* with ``torch.where(mask > 0, x * mask, 0)`` instead of
multiplying by the mask (0 * inf = NaN), so a masked value changes neither the result nor the
gradient of any unmasked position, and the gradient reaching a masked position is exactly 0.
"""

from __future__ import annotations

from typing import Optional

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")

# mode -> (one-line summary, paper that uses it); "" = no single paper
AGGREGATION_INFO: dict[str, tuple[str, str]] = {
    "token-mean": (
        "Sum of token losses / global token count: every token weighs the same (DAPO, Lite PPO).",
        "DAPO: An Open-Source LLM Reinforcement Learning System at Scale (arXiv:2503.14476)",
    ),
    "seq-mean-token-mean": (
        "Mean over sequences of each sequence's token mean: every sequence weighs the same (GRPO, GSPO).",
        "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models (arXiv:2402.03300)",
    ),
    "seq-mean-token-sum": (
        "Sum of token losses / global sequence count: no length normalisation (MiniRL).",
        "Stabilizing Reinforcement Learning with LLMs: Formulation and Practices (arXiv:2512.01374)",
    ),
    "seq-mean-token-sum-norm": (
        "Sum of token losses / (sequence count x constant length): Dr.GRPO's unbiased normaliser.",
        "Understanding R1-Zero-Like Training: A Critical Perspective (arXiv:2503.20783)",
    ),
    "token-sum": ("Plain sum of token losses (the caller scales it).", ""),
}


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` where ``mask > 0`` and exactly 0 elsewhere, whatever ``x`` holds there.

    ``torch.where`` routes no gradient to the unselected branch, so the gradient reaching ``x``
    at a masked position is 0, not ``0 * NaN``. Pass values computed from garbage through this
    *before* any op whose derivative could be non-finite there (see ``losses.clean``).
    """
    return torch.where(mask > 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None, keepdim: bool = False) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask > 0`` (weighted by the mask)."""
    kept = masked(x, mask)
    return kept.sum() if dim is None else kept.sum(dim, keepdim=keepdim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None, keepdim: bool = False) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask > 0``; 0 when there are none.

    The same value as ``base.masked_mean`` for finite inputs, but masked positions may hold NaN
    or inf.
    """
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp_min(1.0)
    return masked_sum(x, mask, dim, keepdim) / mask.sum(dim, keepdim=keepdim).clamp_min(1.0)


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_seqs: float,
    norm_length: float,
) -> torch.Tensor:
    """Aggregate ``loss`` [n, T] over a micro-batch that is part of a mini-batch.

    token-mean:               sum_{i,t} m l / num_tokens (global token count)
    seq-mean-token-mean:      sum_i (sum_t m l / |o_i|) / num_seqs
    seq-mean-token-sum:       sum_i sum_t m l / num_seqs
    seq-mean-token-sum-norm:  sum_{i,t} m l / (num_seqs * norm_length)   (Dr.GRPO constant,
                              "Understanding R1-Zero-Like Training", arXiv:2503.20783)
    token-sum:                sum_{i,t} m l

    m l is ``masked(loss, mask)``: a masked position contributes exactly 0 whatever it holds.
    """
    kept = masked(loss, mask)
    if mode == "token-mean":
        return kept.sum() / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = kept.sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return kept.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return kept.sum() / (max(num_seqs, 1.0) * norm_length)
    if mode == "token-sum":
        return kept.sum()
    raise ValueError(f"unknown aggregation {mode!r}; use one of {', '.join(AGGREGATIONS)}")
