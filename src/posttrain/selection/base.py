"""The selection contract: which prompts to sample, which groups and rollouts to learn from.

A selector is a class registered in ``SELECTORS`` and built from ``SelectionConfig``. The RL
loop (trainers/selected_batch.py) calls, per step:

    selector.accept(problem, epoch) -> bool          # before sampling: skip this prompt?
    selector.observe(batch, epoch)                   # after scoring: update statistics
    selector.keep_groups(batch) -> Tensor[G] bool    # groups that enter the update (refilled if short)
    selector.keep_rows(batch) -> Tensor[N] bool      # rollouts within the kept groups that enter it
    selector.replay(k, step) / remember(groups, step) # a buffer that fills a short batch (replay.py)
    selector.keep_tokens(adv, entropy, mask, step)   # on every learner rank: the loss mask (d3s)
    selector.metrics() -> dict                       # its state, logged as selection/...
    selector.state_dict() / load_state_dict(state)   # checkpointed; resume is exact

A selector with ``chooses = True`` picks the prompts itself (curricula.py): the loop calls
``bind(train_problems, seed)`` once, before its first draw, and then ``choose(k) -> k prompts``
instead of walking the epoch sampler with ``accept``. Its randomness comes from a
``random.Random(seed)`` it owns and checkpoints, and ``load_state_dict`` may come before ``bind``
(a resume), so the state it restores must not be reset by ``bind``. A choosing selector with
rollout replay (cures with ``replay_fraction`` > 0) returns k - m fresh prompts and sets m earlier
groups aside; the loop's ``replay(m, step)`` in the same step hands them over, so the batch still
has k groups and only k - m are generated.

Every hook sees a ``ScoredGroups``: the scored rollouts with per-sample correctness and the
group structure already worked out (group g is ``problems[g]``, its rows ``rows_of[g]``). The
base class accepts and keeps everything, so a selector overrides only the hooks it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

import torch

from posttrain.algorithms.base import Registry
from posttrain.tasks.base import Problem


@dataclass
class SelectionConfig:
    """``selection:`` in the RL config. Which fields a selector reads is in its docstring."""

    name: Optional[str] = None  # a registered selector; null: every prompt, every rollout
    max_rounds: int = 3  # refill: extra generation rounds per step when groups are filtered out
    low: float = 0.2  # online_difficulty: keep groups with pass rate in [low, high]
    high: float = 0.8
    keep_completions: int = 0  # pods: rollouts kept per prompt (0: half of rollout.num_completions)
    alpha: float = 0.5  # sec: TD(0) step size of the arm values
    temperature: float = 1.0  # sec, dump: softmax temperature over the arms
    window: int = 300  # dump: recent per-sample |advantages| kept per arm
    ucb_c: float = 1.0  # dump: weight of the UCB exploration bonus
    token_fraction: float = 0.5  # d3s: fraction of tokens kept by |A| x entropy (at step 0 when annealed)
    anneal_steps: int = 0  # d3s: steps over which the kept fraction rises to 1 (0: constant)
    replay_size: int = 64  # replay, cures: groups the buffer holds
    max_replay_age: int = 4  # replay, cures: a group is replayed at most this many steps after it was sampled
    replay_fraction: float = 0.0  # cures: fraction of each batch's groups taken from the buffer (0: none)

    def completions_kept(self, num_completions: int) -> int:
        """Rollouts per prompt that enter the update: ``keep_completions`` (default n // 2) under
        pods and d3s, all n otherwise."""
        if self.name in ("pods", "d3s"):
            return self.keep_completions or max(1, num_completions // 2)
        return num_completions

    def replayed_groups(self, num_prompts: int) -> int:
        """Groups a step asks cures' buffer for: floor(replay_fraction x num_prompts) (DOTS's
        int((1 - sigma) B)); the 1e-9 keeps e.g. 0.29 x 100 = 28.999... at 29."""
        return math.floor(self.replay_fraction * num_prompts + 1e-9)


@dataclass
class ScoredGroups:
    """One scored batch seen group by group (groups in ``problems`` order)."""

    problems: list[Problem]
    group_ids: torch.Tensor  # [N] 0..G-1
    rewards: torch.Tensor  # [N] float
    correct: torch.Tensor  # [N] bool (the reward's `correct` component, else reward > 0)
    rows_of: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.rows_of = [torch.nonzero(self.group_ids == g).squeeze(-1) for g in range(len(self.problems))]

    @cached_property
    def pass_rates(self) -> torch.Tensor:
        """[G] fraction of each group's samples that are correct."""
        return torch.stack([self.correct[r].double().mean() for r in self.rows_of])

    @cached_property
    def constant_reward(self) -> torch.Tensor:
        """[G] True where every sample of the group got the same reward (zero GRPO advantage)."""
        return torch.tensor([bool((self.rewards[r] == self.rewards[r][0]).all()) for r in self.rows_of])


class Selector:
    """Samples every prompt it is handed and keeps every rollout (no selection)."""

    name = "none"
    refills = False  # keep_groups may reject groups, and the loop samples more prompts to replace them
    chooses = False  # choose() picks the prompts (after bind()); accept() is then not asked
    selects_tokens = False  # keep_tokens() narrows the loss mask (built again on every learner rank)

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        self.cfg, self.num_completions = cfg, num_completions

    def bind(self, problems: list[Problem], seed: int) -> None:
        """The train split to choose from and the run's seed (called once, only when ``chooses``)."""

    def choose(self, k: int) -> list[Problem]:
        """The next ``k`` prompts to sample (only when ``chooses``)."""
        raise NotImplementedError(f"selector {self.name!r} does not choose prompts")

    def accept(self, problem: Problem, epoch: int) -> bool:
        return True

    def observe(self, batch: ScoredGroups, epoch: int) -> None:
        pass

    def keep_groups(self, batch: ScoredGroups) -> torch.Tensor:
        return torch.ones(len(batch.problems), dtype=torch.bool)

    def keep_rows(self, batch: ScoredGroups) -> torch.Tensor:
        return torch.ones(len(batch.rewards), dtype=torch.bool)

    def replay(self, k: int, step: int) -> list[tuple[Problem, Any]]:
        """Up to ``k`` earlier (problem, single-group Rollouts) to fill a short batch at ``step``."""
        return []

    def remember(self, groups: list[tuple[Problem, Any]], step: int) -> None:
        """The fresh groups that entered this step's batch (``replay``'s buffer)."""

    def keep_tokens(self, advantages: torch.Tensor, entropies: torch.Tensor, mask: torch.Tensor,
                    step: int) -> torch.Tensor:
        """[N, T] loss mask within ``mask`` (only when ``selects_tokens``; must be stateless)."""
        return mask

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


SELECTORS: Registry[type[Selector]] = Registry("selector")


def build_selector(cfg: SelectionConfig, num_completions: int) -> Selector:
    if cfg.name is None:
        return Selector(cfg, num_completions)
    return SELECTORS.get(cfg.name)(cfg, num_completions)
