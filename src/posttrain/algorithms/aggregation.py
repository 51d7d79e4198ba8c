"""Turning a per-token loss matrix into a scalar.

Every mode divides by counts of the *whole* mini-batch (passed in), never of the micro-batch,
so splitting a mini-batch into micro-batches and summing their losses gives the same loss and
gradient as one pass (gradient accumulation invariance).
"""

from __future__ import annotations

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
    """
    masked = loss * mask
    if mode == "token-mean":
        return masked.sum() / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return masked.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (max(num_seqs, 1.0) * norm_length)
    if mode == "token-sum":
        return masked.sum()
    raise ValueError(f"unknown aggregation {mode!r}; use one of {', '.join(AGGREGATIONS)}")
