"""Selectors from the literature, one class per paper (registry: ``SELECTORS``)."""

from __future__ import annotations

import torch

from posttrain.selection.base import SELECTORS, ScoredGroups, SelectionConfig, Selector
from posttrain.tasks.base import Problem


@SELECTORS.register("dynamic_sampling", paper="DAPO: An Open-Source LLM Reinforcement Learning System at Scale "
                                              "(arXiv:2503.14476)")
class DynamicSampling(Selector):
    """Drop groups whose rewards all agree, and refill the batch with new prompts.

    keep group g  iff  not (r_g1 = r_g2 = ... = r_gn)

    A group with equal rewards has zero group-normalised advantage, so it adds no gradient but
    dilutes the token-mean normaliser. The loop samples further prompts, up to
    ``selection.max_rounds`` extra rounds a step, until ``rollout.num_prompts`` groups pass.
    """

    refills = True

    def keep_groups(self, batch: ScoredGroups) -> torch.Tensor:
        return ~batch.constant_reward


@SELECTORS.register("online_difficulty", paper="Online Difficulty Filtering for Reasoning Oriented Reinforcement "
                                               "Learning (arXiv:2504.03380)")
class OnlineDifficulty(Selector):
    """Balanced online difficulty filtering: keep groups of intermediate pass rate, refill the rest.

    p_g = (1/n) sum_i correct_gi,   keep group g  iff  low <= p_g <= high

    The paper bounds the KL between the initial and optimal policy by the variance of the
    sampled accuracy, proportional to p (1 - p), which this band keeps away from zero.
    ``selection.low`` / ``selection.high`` (defaults 0.2 / 0.8, posttrain's choice) set the band;
    refilling works as in ``dynamic_sampling``.
    """

    refills = True

    def keep_groups(self, batch: ScoredGroups) -> torch.Tensor:
        p = batch.pass_rates
        return (p >= self.cfg.low) & (p <= self.cfg.high)


@SELECTORS.register("srpo_history", paper="SRPO: A Cross-Domain Implementation of Large-Scale Reinforcement "
                                          "Learning on LLM (arXiv:2504.14286)")
class SRPOHistory(Selector):
    """History resampling: a prompt whose rollouts were all correct is not sampled in later epochs.

    solved = { id(g) : p_g = 1 in some epoch e };   accept prompt x in epoch e'  iff  x not solved before e'

    Prompts that were all wrong stay (they may become informative). The state is the epoch in
    which each prompt was first solved. The loop stops with a clear error when every training
    prompt is solved.
    """

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.solved_in: dict[str, int] = {}  # prompt id -> the epoch it was first all correct
        self.skipped = 0

    def accept(self, problem: Problem, epoch: int) -> bool:
        first = self.solved_in.get(problem.id)
        ok = first is None or first >= epoch
        self.skipped += not ok
        return ok

    def observe(self, batch: ScoredGroups, epoch: int) -> None:
        for problem, p in zip(batch.problems, batch.pass_rates.tolist()):
            if p == 1.0:
                self.solved_in.setdefault(problem.id, epoch)

    def metrics(self) -> dict[str, float]:
        return {"selection/solved_prompts": float(len(self.solved_in)), "selection/skipped_prompts": float(self.skipped)}

    def state_dict(self) -> dict:
        return {"solved_in": dict(self.solved_in), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.solved_in, self.skipped = dict(state["solved_in"]), int(state["skipped"])


def max_variance_subset(rewards: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of the size-m subset of ``rewards`` with the largest variance (PODS).

    After a stable ascending sort, the optimum is the bottom m - i plus the top i for some i in
    0..m, so one scan finds it; ties go to the smallest i. Returned in ascending index order.
    """
    n = rewards.numel()
    if not 0 < m <= n:
        raise ValueError(f"cannot keep {m} of {n} rollouts")
    order = torch.sort(rewards.double(), stable=True).indices
    best, best_var = None, -1.0
    for i in range(m + 1):
        idx = torch.cat([order[: m - i], order[n - i:]]) if i else order[:m]
        var = float(rewards[idx].double().var(unbiased=False))
        if var > best_var + 1e-12:
            best, best_var = idx, var
    return torch.sort(best).values


@SELECTORS.register("pods", paper="Not All Rollouts are Useful: Down-Sampling Rollouts in LLM Reinforcement "
                                  "Learning (arXiv:2504.13818)")
class PODS(Selector):
    """Max-variance down-sampling: update on the m of a prompt's n rollouts whose rewards vary most.

    S_g = argmax_{S subset of group g, |S| = m} Var(r_S)   (bottom m - i and top i after sorting)

    Sampling n is cheap next to updating on n; with binary rewards this keeps as close to half
    correct, half wrong as the group allows. ``selection.keep_completions`` is m (default n / 2).
    """

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.m = cfg.completions_kept(num_completions)  # its range is checked with the config

    def keep_rows(self, batch: ScoredGroups) -> torch.Tensor:
        keep = torch.zeros(len(batch.rewards), dtype=torch.bool)
        for rows in batch.rows_of:
            keep[rows[max_variance_subset(batch.rewards[rows], min(self.m, len(rows)))]] = True
        return keep
