"""Per-completion scores for best-of-N selection and weighted voting.

Every scorer maps a :class:`~posttrain.rollout.batch.Rollouts` batch to one float per
completion (higher = more trusted):

``self_certainty``
    Mean KL divergence from the uniform distribution to the model's next-token distribution
    over the completion's tokens ("Scalable Best-of-N Selection for Large Language Models via
    Self-Certainty", Kang et al. 2025, arXiv:2502.18581)::

        SC(y | x) = 1/|y| * sum_{i=1..|y|} KL(U || p(. | x, y_<i))
                  = 1/|y| * sum_i ( -log V - 1/V * sum_v log p_v(. | x, y_<i) )
                  = 1/|y| * sum_i ( logsumexp(z_i) - mean_v(z_i) - log V )

    with ``V`` the vocabulary size and ``z_i`` the logits at step ``i``. It is >= 0, 0 for a
    uniform distribution, and large when the model is confident. It needs the full
    distribution at every position, so it takes one extra forward pass:
    :func:`completion_self_certainty` runs the decoder once per micro-batch and the output
    projection over chunks of ``chunk_tokens`` completion positions, so at most
    ``[chunk_tokens, V]`` logits exist at a time (never ``[N, T, V]``).

``mean_logprob``
    Mean log-probability of the sampled tokens, ``1/|y| * sum_i log p(y_i | x, y_<i)``, read
    from ``rollouts.behaviour_logprobs`` (free: recorded while sampling; it is the log-prob
    under the *sampling* distribution, i.e. after temperature scaling). ``exp`` of it is the
    geometric-mean token probability.

``reward_model``
    Any callable ``fn(problem, text) -> float`` (an outcome reward model, a verifier, a
    heuristic), called once per completion.

Vote weights (:func:`vote_weights`) must be non-negative: self-certainty is used as is,
mean log-prob through ``exp`` (the geometric-mean token probability), reward-model scores as
is (they must then be >= 0, e.g. probabilities).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from posttrain.rewards.self_certainty import token_self_certainty
from posttrain.rollout.batch import Rollouts
from posttrain.tasks.base import Problem

__all__ = [
    "SCORERS",
    "RewardModelFn",
    "completion_self_certainty",
    "mean_logprob",
    "reward_model_scores",
    "score_rollouts",
    "vote_weights",
]

SCORERS = ("mean_logprob", "self_certainty", "reward_model")

RewardModelFn = Callable[[Problem, str], float]


def mean_logprob(rollouts: Rollouts) -> torch.Tensor:
    """``[N]`` mean behaviour log-prob over each completion's tokens (0 for an empty one)."""
    mask = rollouts.completion_mask.float()
    lp = rollouts.behaviour_logprobs.float()
    return (lp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


@torch.no_grad()
def completion_self_certainty(
    model,
    rollouts: Rollouts,
    chunk_tokens: int = 1024,
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``[N]`` self-certainty of each completion under ``model`` (see the module docstring).

    The decoder runs over prompt + completion for ``batch_size`` samples at a time; the output
    head and ``KL(U || p)`` then run over at most ``chunk_tokens`` completion positions at a
    time (float32). ``temperature`` rescales the logits first (1.0: the model's own
    distribution, as in the paper). A completion without tokens scores 0.
    """
    if chunk_tokens < 1 or batch_size < 1:
        raise ValueError(f"chunk_tokens and batch_size must be >= 1, got {chunk_tokens} and {batch_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    n = len(rollouts)
    out = torch.zeros(n, dtype=torch.float32)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        p_ids, p_mask = rollouts.prompt_ids[sl], rollouts.prompt_mask[sl].long()
        c_ids, c_mask = rollouts.completion_ids[sl], rollouts.completion_mask[sl]
        # Drop left padding shared by every prompt of the micro-batch and right padding
        # shared by every completion.
        keep = p_mask.any(0).nonzero()
        p0 = int(keep[0]) if keep.numel() else p_mask.shape[1] - 1
        p_ids, p_mask = p_ids[:, p0:], p_mask[:, p0:]
        T = max(int(c_mask.sum(-1).max()) if c_mask.numel() else 0, 1)
        c_ids, c_mask = c_ids[:, :T], c_mask[:, :T]
        P = p_ids.shape[1]
        input_ids = torch.cat([p_ids, c_ids], 1).to(device)
        attention = torch.cat([p_mask, c_mask.long()], 1).to(device)
        position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
        hidden = decoder(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).last_hidden_state
        hidden = hidden[:, P - 1 : P + T - 1]  # the state before each completion token
        mask = c_mask.to(device).bool()
        flat = hidden[mask]  # [tokens, H]
        rows = torch.arange(mask.shape[0], device=device)[:, None].expand_as(mask)[mask]
        sc = torch.empty(flat.shape[0], dtype=torch.float32, device=device)
        for c in range(0, flat.shape[0], chunk_tokens):
            logits = head(flat[c : c + chunk_tokens]).float()
            if temperature != 1.0:
                logits = logits / temperature
            sc[c : c + chunk_tokens] = token_self_certainty(logits, chunk_size=chunk_tokens)
        sums = torch.zeros(mask.shape[0], dtype=torch.float32, device=device).index_add_(0, rows, sc)
        counts = mask.sum(-1).clamp_min(1).float()
        out[sl] = (sums / counts).cpu()
    return out


def reward_model_scores(rollouts: Rollouts, fn: RewardModelFn) -> torch.Tensor:
    """``[N]`` ``fn(problem, text)`` for every completion; non-finite scores are an error."""
    values = []
    for i, (problem, text) in enumerate(zip(rollouts.problems, rollouts.texts)):
        v = float(fn(problem, text))
        if not math.isfinite(v):
            raise ValueError(f"reward model returned a non-finite score {v} for sample {i} of problem {problem.id!r}")
        values.append(v)
    return torch.tensor(values, dtype=torch.float32)


def score_rollouts(
    rollouts: Rollouts,
    scorer: str,
    *,
    model: Any = None,
    reward_model: Optional[RewardModelFn] = None,
    chunk_tokens: int = 1024,
    batch_size: int = 16,
) -> torch.Tensor:
    """``[N]`` scores of ``rollouts`` by the scorer named ``scorer`` (one of :data:`SCORERS`)."""
    if scorer == "mean_logprob":
        return mean_logprob(rollouts)
    if scorer == "self_certainty":
        if model is None:
            raise ValueError("the self_certainty scorer needs the model")
        return completion_self_certainty(model, rollouts, chunk_tokens, batch_size=batch_size)
    if scorer == "reward_model":
        if reward_model is None:
            raise ValueError("the reward_model scorer needs a callable reward_model(problem, text) -> float")
        return reward_model_scores(rollouts, reward_model)
    raise ValueError(f"unknown scorer {scorer!r}; available: {', '.join(SCORERS)}")


def vote_weights(scorer: str, scores: Sequence[float]) -> list[float]:
    """Non-negative vote weights from a scorer's scores: ``exp`` for ``mean_logprob`` (the
    geometric-mean token probability), the scores themselves otherwise (self-certainty is a KL
    divergence, >= 0 up to rounding, which is clamped). Negative scores of any other scorer
    are an error: weighted voting needs non-negative weights."""
    if scorer == "mean_logprob":
        return [math.exp(float(s)) for s in scores]
    if scorer == "self_certainty":
        return [max(float(s), 0.0) for s in scores]
    out = [float(s) for s in scores]
    if any(s < 0 for s in out):
        raise ValueError(f"scorer {scorer!r} gave negative scores; weighted voting needs scores >= 0 (e.g. probabilities)")
    return out
