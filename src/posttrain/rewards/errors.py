"""Scoring a group with an explicit error policy: failures are counted and returned, never
swallowed.

``score_group(reward, problem, completions, on_error)`` calls the reward once for the group
and checks what it returned (one finite reward per completion). If the call raises, or the
output is malformed:

* ``on_error="zero"``: every completion of the group gets reward 0, the output carries a
  ``reward_error`` component of 1.0 and an ``error`` info entry, and one error record per
  failure is returned. With ``isolate=True`` (default) each completion is then re-scored alone
  to find the ones that reproduce the failure; each gets its own record (``completion`` set).
  If none does, the failure belongs to the group and a single record has ``completion=None``.
  Isolation only diagnoses: the group's rewards stay 0 either way.
* ``on_error="abort"``: raise ``RewardError`` with the problem id, the completions and the
  original exception chained.

Successful groups carry ``reward_error`` = 0.0, so the component is present in every batch.
Every failure is also logged at WARNING level.
"""

from __future__ import annotations

import logging
import math
import traceback
from typing import Any, Optional, Sequence

from posttrain.rewards.base import Reward, RewardOutput
from posttrain.tasks.base import Problem

__all__ = ["ON_ERROR", "RewardError", "score_group", "score_rollouts"]

logger = logging.getLogger(__name__)

ON_ERROR = ("zero", "abort")


class RewardError(RuntimeError):
    """A reward failed under ``on_error="abort"``; the failing sample is attached."""

    def __init__(self, message: str, *, problem_id: str, reward_name: str, completions: Sequence[str], cause: BaseException):
        super().__init__(message)
        self.problem_id = problem_id
        self.reward_name = reward_name
        self.completions = list(completions)
        self.cause = cause


def _validate(out: Any, n: int, name: str) -> RewardOutput:
    if not isinstance(out, RewardOutput):
        raise TypeError(f"reward {name!r} returned {type(out).__name__}, not RewardOutput")
    if len(out.rewards) != n:
        raise ValueError(f"reward {name!r} returned {len(out.rewards)} rewards for {n} completions")
    bad = [i for i, r in enumerate(out.rewards) if not isinstance(r, (int, float)) or not math.isfinite(r)]
    if bad:
        raise ValueError(f"reward {name!r} returned non-finite rewards at {bad[:5]}: {[out.rewards[i] for i in bad[:5]]}")
    return out


def _call(reward: Reward, problem: Problem, completions: Sequence[str]) -> RewardOutput:
    return _validate(reward(problem, completions), len(completions), getattr(reward, "name", type(reward).__name__))


def _record(problem: Problem, reward_name: str, completion: Optional[str], index: Optional[int], exc: BaseException) -> dict:
    return {
        "problem_id": problem.id,
        "reward": reward_name,
        "completion": completion,
        "index": index,
        "error": repr(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:],
    }


def score_group(
    reward: Reward,
    problem: Problem,
    completions: Sequence[str],
    on_error: str = "zero",
    isolate: bool = True,
) -> tuple[RewardOutput, list[dict]]:
    """Score one group under an error policy; returns ``(output, error_records)``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    name = getattr(reward, "name", type(reward).__name__)
    n = len(completions)
    try:
        out = _call(reward, problem, completions)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded and returned or re-raised
        logger.warning("reward %r failed on problem %r (%d completions): %r", name, problem.id, n, exc)
        if on_error == "abort":
            raise RewardError(
                f"reward {name!r} failed on problem {problem.id!r}: {exc!r}",
                problem_id=problem.id,
                reward_name=name,
                completions=completions,
                cause=exc,
            ) from exc
        records = []
        if isolate and n > 1:
            for i, c in enumerate(completions):
                try:
                    _call(reward, problem, [c])
                except Exception as single_exc:  # noqa: BLE001
                    records.append(_record(problem, name, c, i, single_exc))
        if not records:
            records.append(_record(problem, name, None, None, exc))
        info = [{"error": repr(exc), "reward": name} for _ in range(n)]
        return RewardOutput(rewards=[0.0] * n, components={"reward_error": [1.0] * n}, info=info), records
    out.components.setdefault("reward_error", [0.0] * n)
    return out, []


def score_rollouts(rollouts, reward: Reward, on_error: str = "zero") -> list[dict]:
    """Fill ``rollouts.rewards`` [N], ``reward_components`` and per-sample info, one
    ``score_group`` call per group; returns the error records. ``rollouts`` is a
    ``posttrain.rollout.batch.Rollouts`` (read by attribute: texts, problems, group_ids, metadata)."""
    import torch

    n = len(rollouts.texts)
    rewards = torch.zeros(n)
    components: dict[str, torch.Tensor] = {}
    errors: list[dict] = []
    for gid in torch.unique(rollouts.group_ids).tolist():
        idx = (rollouts.group_ids == gid).nonzero().squeeze(-1).tolist()
        out, errs = score_group(reward, rollouts.problems[idx[0]], [rollouts.texts[i] for i in idx], on_error=on_error)
        errors += errs
        rewards[idx] = torch.tensor(out.rewards, dtype=torch.float32)
        for name, values in out.components.items():
            components.setdefault(name, torch.zeros(n))[idx] = torch.tensor(values, dtype=torch.float32)
        for i, info in zip(idx, out.info):
            rollouts.metadata[i].update(info)
    rollouts.rewards, rollouts.reward_components = rewards, components
    return errors
