"""The reward contract.

A reward sees a whole group (all completions of one problem) at once, so group-aware rewards
such as majority vote fit the same contract as per-sample verifiers. It returns one scalar per
completion plus named components that are logged separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from posttrain.tasks.base import Problem


@dataclass
class RewardOutput:
    rewards: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)  # per completion, e.g. parsed answer

    def __post_init__(self) -> None:
        n = len(self.rewards)
        for name, values in self.components.items():
            if len(values) != n:
                raise ValueError(f"reward component {name!r} has {len(values)} values for {n} completions")
        if not self.info:
            self.info = [{} for _ in range(n)]


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput: ...


def problem_issue(reward: Reward, problem: Problem) -> Optional[str]:
    """Why ``reward`` cannot score ``problem`` at all (e.g. ``numeric`` with a non-numeric
    answer), or None. Rewards that need a kind of answer say so through an optional
    ``check_problem(problem)``; wrappers (composite, noisy, darling) ask their inner rewards. The
    trainers call this on every problem before any work starts, so a task/reward mismatch is a
    config error, not a failure at the first evaluation with a half-written run directory."""
    check = getattr(reward, "check_problem", None)
    return check(problem) if check is not None else None
