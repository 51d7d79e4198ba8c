"""Overlong handling: DAPO's soft length punishment and overlong filtering (masking truncated
samples), from "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
(arXiv:2503.14476)."""

from __future__ import annotations

import torch


def dapo_overlong_penalty(
    lengths: torch.Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment (Eq. 13), added to the task reward. [N] float.

        R(L) = 0                                        if L <= L_max - L_cache
             = ((L_max - L_cache) - L) / L_cache * f    if L_max - L_cache < L <= L_max
             = -f                                       if L > L_max

    L = completion length, L_max = ``max_len``, L_cache = ``buffer_len``, f = ``penalty_factor``.
    Paper defaults: L_max = 20480, L_cache = 4096, f = 1.0 (so the penalty starts at 16384
    tokens). With a generation limit of exactly L_max tokens, L > L_max never happens and a
    truncated sample gets -f.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError("dapo_overlong_penalty: buffer_len must be in (0, max_len]")
    if penalty_factor < 0:
        raise ValueError("dapo_overlong_penalty: penalty_factor must be >= 0")
    length = lengths.to(torch.float64)
    start = max_len - buffer_len
    ramp = (start - length) / buffer_len * penalty_factor
    penalty = torch.where(length <= start, torch.zeros_like(length), ramp)
    return torch.where(length > max_len, torch.full_like(length, -penalty_factor), penalty)


def mask_truncated(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: zero the loss mask of samples that hit the length limit. [N, T].

    A truncated sample has no final answer, so its (usually low) reward is noise about the
    reasoning so far; DAPO drops it from the loss. Remember to count tokens and sequences with
    the returned mask when aggregating.
    """
    return mask * (~truncated.bool()).to(mask.dtype).unsqueeze(-1)
