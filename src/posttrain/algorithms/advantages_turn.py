"""Per-turn credit for multi-turn episodes (``algorithm.turn_credit: true``).

By default an episode is one sample: every model token gets the advantage of the episode's
reward R_i, the sum of its step rewards. With per-turn credit each model turn is credited with
the rewards from its own step on, so a reward earned at turn 1 is not credited to turn 3.

Inputs. Episode i has K_i model turns and step rewards r_{i,1..K} (what the environment
returned after each model message; ``Rollouts.metadata[i]["step_rewards"]``). Turn k is the k-th
maximal run of 1s of the policy mask (model tokens; the environment's tokens between turns are
0, ``environments.episodes``). Anything the trainer added to R_i beyond the steps' sum (DAPO's
overlong penalty) is credited to the last turn:

    r~_{i,k} = r_{i,k} (k < K),   r~_{i,K} = R_i - sum_{k<K} r_{i,k}

``turn_step_rewards`` writes r~_{i,k} on the last token of turn k and NaN on every other
position: the step-reward layout ``pure`` reads (advantages_token.py).

How the estimators use it (``TURN_CREDIT_ESTIMATORS``):

* ``grpo`` / ``dr_grpo``, group-normalised per turn (``turn_grpo``): the discounted return-to-go
  per turn, normalised over the episodes of the same problem (group g) that have a turn k,

      G_{i,k} = sum_{j=k..K_i} gamma^(j-k) r~_{i,j}
      A_{i,k} = (G_{i,k} - mean_{g,k} G) / (std_{g,k} G + eps)

  and every token of turn k gets A_{i,k}. std is the unbiased one, 0 for a single episode (A = 0,
  as for GRPO's singleton group); ``dr_grpo`` or ``std_normalize: false`` do not divide. gamma is
  ``algorithm.advantage.gamma``, per turn. With one turn per episode this is GRPO exactly; with
  outcome-only rewards and gamma = 1 every turn's return is R_i, and turn k's baseline is the
  mean over the episodes that reached turn k. The turn-level idea is MT-GRPO's ("Reinforcing
  Multi-Turn Reasoning in LLM Agents via Turn-Level Credit Assignment", Zeng et al.,
  arXiv:2505.11821); that paper mixes two group-normalised reward types with a weight, for two
  turns; the return-to-go form for any number of turns is our generalisation.
* ``gae`` / ``reinforce_plus_plus``, token rewards: r~_{i,k} on the last token of turn k, 0
  elsewhere (added to the KL-in-reward penalty when there is one), and the outcome reward that
  those estimators put on the last token is set to 0 because the steps already carry it. Their
  token recursions (G_t = r_t + gamma G_{t+1}; GAE's deltas) then credit each turn with the
  rewards from its end on. The critic's return targets (``gae_returns``) use the same rewards.

Every other estimator gives one advantage per episode from its reward alone and cannot use the
option: ``AlgorithmConfig`` refuses the combination naming these four.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from posttrain.algorithms.advantages import group_index, group_stats, scale_by_std
from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput

__all__ = ["TURN_CREDIT_ESTIMATORS", "turn_credit", "turn_grpo", "turn_spans", "turn_step_rewards"]

# estimator -> how it takes per-turn credit: "group" (turn_grpo) or "token" (token rewards)
TURN_CREDIT_ESTIMATORS = {"grpo": "group", "dr_grpo": "group", "gae": "token", "reinforce_plus_plus": "token"}


def turn_spans(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of mask > 0 in a 1-D mask: the model turns of a row."""
    on = (mask_row > 0).tolist()
    spans, start = [], None
    for t, v in enumerate(on + [False]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            spans.append((start, t))
            start = None
    return spans


def turn_step_rewards(mask: torch.Tensor, step_rewards: Sequence[Optional[Sequence[float]]],
                      rewards: torch.Tensor) -> torch.Tensor:
    """[N, T] float64: r~_{i,k} on the last token of each model turn, NaN elsewhere (module docstring)."""
    if len(step_rewards) != mask.shape[0]:
        raise ValueError(f"per-turn credit got step rewards for {len(step_rewards)} rows, the batch has {mask.shape[0]}")
    out = torch.full(mask.shape, float("nan"), dtype=torch.float64)
    for i, steps in enumerate(step_rewards):
        if steps is None:
            raise ValueError(f"per-turn credit: row {i} has no step_rewards in its metadata; algorithm.turn_credit "
                             "needs rollouts from an environment (environments.run_episodes)")
        spans = turn_spans(mask[i])
        if len(spans) != len(steps):
            raise ValueError(f"per-turn credit: row {i} has {len(spans)} model turns in its policy mask but "
                             f"{len(steps)} step rewards; the rows must come from environments.run_episodes unchanged")
        if not spans:
            continue
        credited = [float(r) for r in steps[:-1]] + [float(rewards[i]) - sum(float(r) for r in steps[:-1])]
        for (_, end), r in zip(spans, credited):
            out[i, end - 1] = r
    return out.to(mask.device)


def turn_grpo(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """Per-turn group-normalised return-to-go: A_{i,k} = (G_{i,k} - mean_{g,k} G) / (std_{g,k} G + eps).

    G_{i,k} = sum_{j>=k} gamma^(j-k) r~_{i,j}, with ``inp.token_rewards`` holding r~_{i,k} on the
    last token of turn k and NaN elsewhere (``turn_step_rewards``); turn k is the model tokens
    after turn k-1's end up to and including turn k's. The statistics are over the episodes of
    one group that have a turn k (unbiased std, 0 for one episode: A = 0); ``cfg.std_normalize``
    False: A = G - mean. Tokens after a row's last turn end get 0. See the module docstring
    (MT-GRPO, arXiv:2505.11821, for the turn-level idea).
    """
    if inp.token_rewards is None:
        raise ValueError("turn_grpo needs AdvantageInput.token_rewards (step rewards on turn ends, NaN elsewhere)")
    tr = inp.token_rewards.detach().to(torch.float64)
    m = inp.mask > 0
    ends = m & torch.isfinite(tr)
    n = tr.shape[0]
    counts = ends.sum(-1)
    k_max = int(counts.max()) if n else 0
    if k_max == 0:
        return torch.zeros_like(inp.mask)
    r = torch.zeros((n, k_max), dtype=torch.float64, device=tr.device)
    valid = torch.arange(k_max, device=tr.device).expand(n, k_max) < counts.unsqueeze(-1)
    r[valid] = tr[ends]  # row-major order: each row's turn ends left to right
    g = torch.zeros_like(r)
    running = torch.zeros(n, dtype=torch.float64, device=tr.device)
    for k in reversed(range(k_max)):
        running = torch.where(valid[:, k], r[:, k] + cfg.gamma * running, running)
        g[:, k] = running
    group, _ = group_index(inp.group_ids)
    key = (group.unsqueeze(-1) * k_max + torch.arange(k_max, device=tr.device))[valid]
    mean, std, _ = group_stats(g[valid], key)
    adv_valid = g[valid] - mean
    if cfg.std_normalize:
        adv_valid = scale_by_std(adv_valid, std, cfg.eps)
    adv = torch.zeros_like(r)
    adv[valid] = adv_valid
    # turn index of each token: turn ends strictly before it; tokens past the last end get none
    turn = torch.cumsum(ends.long(), -1) - ends.long()
    in_turn = m & (turn < counts.unsqueeze(-1))
    out = adv.gather(1, turn.clamp(max=k_max - 1)) * in_turn
    return out.to(inp.mask.dtype)


def turn_credit(inp: AdvantageInput, step_rewards: Sequence[Optional[Sequence[float]]],
                estimator: str) -> tuple[AdvantageInput, Callable[[AdvantageInput, AdvantageConfig], torch.Tensor]]:
    """(the AdvantageInput, the estimator function) that give ``estimator`` per-turn credit.

    ``step_rewards[i]``: row i's step rewards (its metadata's ``step_rewards``). Group estimators
    get ``turn_grpo`` on turn-end rewards (``dr_grpo`` without the std division); token estimators
    their own function on token rewards, with the outcome reward moved into them (module docstring).
    """
    how = TURN_CREDIT_ESTIMATORS.get(estimator)
    if how is None:
        raise ValueError(f"algorithm.turn_credit cannot be used with advantage_estimator={estimator}, which gives "
                         f"one advantage per episode; use one of {list(TURN_CREDIT_ESTIMATORS)}")
    turns = turn_step_rewards(inp.mask, step_rewards, inp.rewards)
    if how == "group":
        if inp.token_rewards is not None:  # turn_grpo reads token_rewards as turn ends only
            raise ValueError(f"algorithm.turn_credit with {estimator} replaces the token rewards by the turns' step "
                             "rewards, and this batch already has token rewards (a step-level reward); use "
                             "gae or reinforce_plus_plus, which add the two")
        fn = turn_grpo
        if estimator == "dr_grpo":
            fn = lambda i, cfg: turn_grpo(i, dataclasses.replace(cfg, std_normalize=False))  # noqa: E731
        return dataclasses.replace(inp, token_rewards=turns.to(inp.mask.dtype)), fn
    token = torch.nan_to_num(turns, nan=0.0)
    if inp.token_rewards is not None:  # e.g. the KL-in-reward penalty
        token = token + torch.nan_to_num(inp.token_rewards.to(torch.float64), nan=0.0)
    zero = torch.zeros_like(inp.rewards)
    return dataclasses.replace(inp, rewards=zero, token_rewards=token.to(inp.mask.dtype)), ADVANTAGES.get(estimator)

