"""Self-certainty: how far each next-token distribution is from uniform.

"Learning to Reason without External Rewards" (Intuitor, arXiv:2505.19590), eq. 3:

    SC(y | x) = 1/|y| * sum_i KL(U || p(. | x, y_<i))
              = 1/|y| * sum_i ( -log V - 1/V * sum_v log p_v )

with ``V`` the vocabulary size and ``U`` uniform over it. Higher means more confident. It is
computed from logits as ``logsumexp(z) - mean(z) - log V`` per position, so log-probabilities
over the vocabulary are never materialized; positions are processed in chunks, in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["masked_self_certainty", "self_certainty", "token_self_certainty"]


def token_self_certainty(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """``KL(U || softmax(logits))`` per position: ``[..., V] -> [...]`` (float32)."""
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_size):
        z = flat[start : start + chunk_size].float()
        out[start : start + chunk_size] = torch.logsumexp(z, dim=-1) - z.mean(dim=-1) - math.log(vocab)
    return out.reshape(logits.shape[:-1])


def self_certainty(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Sequence self-certainty: mean over positions of ``token_self_certainty``.

    ``logits`` is ``[..., T, V]``; returns ``[...]`` (for ``[B, T, V]``: one value per sequence).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., T, V], got shape {tuple(logits.shape)}")
    return token_self_certainty(logits, chunk_size).mean(dim=-1)


def masked_self_certainty(logits: torch.Tensor, mask: Optional[torch.Tensor], chunk_size: int = 1024) -> torch.Tensor:
    """``self_certainty`` over the positions where ``mask`` ([..., T], 1 = completion token) is
    set. A row with an empty mask gets 0."""
    if mask is None:
        return self_certainty(logits, chunk_size)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape[:-1])}")
    sc = token_self_certainty(logits, chunk_size)
    m = mask.to(sc.dtype)
    return (sc * m).sum(dim=-1) / m.sum(dim=-1).clamp_min(1.0)
