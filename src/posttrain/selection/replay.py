"""Rollout replay: informative groups from earlier steps fill a batch the filter left short."""

from __future__ import annotations

import dataclasses
from typing import Any


from posttrain.rollout.batch import Rollouts
from posttrain.selection.base import SELECTORS, SelectionConfig
from posttrain.selection.selectors import DynamicSampling
from posttrain.tasks.base import Problem


def _to_state(problem: Problem, group: Rollouts) -> dict[str, Any]:
    """A group as tensors and plain values (checkpoints load with ``weights_only=True``)."""
    out = {}
    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        out[f.name] = [dataclasses.asdict(p) for p in value] if f.name == "problems" else value
    return {"problem": dataclasses.asdict(problem), "rollouts": out}


def _from_state(entry: dict[str, Any]) -> tuple[Problem, Rollouts]:
    fields = dict(entry["rollouts"])
    fields["problems"] = [Problem(**p) for p in fields["problems"]]
    return Problem(**entry["problem"]), Rollouts(**fields)


class ReplayBuffer:
    """Up to ``capacity`` recent groups with unequal rewards, each replayed at most once.

    take(k, step): the k groups of largest reward variance (ties: the most recent) among those
    sampled at most ``max_age`` steps before ``step``; they leave the buffer. Older groups are
    dropped, so no replayed sample is more than ``max_age`` policy versions stale.
    """

    def __init__(self, capacity: int, max_age: int):
        self.capacity, self.max_age = capacity, max_age
        self.entries: list[dict[str, Any]] = []  # {"step", "variance", "problem", "rollouts"}, oldest first

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, problem: Problem, group: Rollouts, step: int) -> None:
        variance = float(group.rewards.double().var(unbiased=False))
        if variance <= 0.0:  # zero advantage: nothing to learn from it twice
            return
        self.entries.append({"step": step, "variance": variance, **_to_state(problem, group)})
        del self.entries[: max(0, len(self.entries) - self.capacity)]

    def take(self, k: int, step: int) -> list[tuple[Problem, Rollouts]]:
        self.entries = [e for e in self.entries if step - e["step"] <= self.max_age]
        ranked = sorted(range(len(self.entries)), key=lambda i: (-self.entries[i]["variance"], -self.entries[i]["step"]))
        chosen = set(ranked[:k])
        out = [_from_state(self.entries[i]) for i in ranked[:k]]
        self.entries = [e for i, e in enumerate(self.entries) if i not in chosen]
        return out


@SELECTORS.register("replay", paper="Improving RL Exploration for LLM Reasoning through Retrospective Replay "
                                    "(arXiv:2504.14363; the buffer pattern, as TRL's replay-buffer GRPO)")
class Replay(DynamicSampling):
    """DAPO's filter, with a buffer of earlier informative groups that fills what refilling could not.

    keep group g iff its rewards differ (as dynamic_sampling); after ``selection.max_rounds``
    extra rounds (0 allowed: replay only), the missing groups come from the buffer, highest
    reward variance first, sampled at most ``selection.max_replay_age`` steps ago (default 4), then
    from rejected groups. Kept fresh groups enter the buffer (``selection.replay_size`` groups,
    default 64). A replayed sample keeps its ``policy_version``, so ``staleness/mean`` and
    ``staleness/max`` count it, and it is off-policy: the configured train-inference correction
    (``algorithm.correction``, e.g. tis_token) reweights it by pi_theta / pi_behaviour, which the config
    requires (with old log-probs that are not the behaviour ones, or the ratio would be 1).

    The buffer follows the catalog's retrospective-replay card (001-19: re-roll from stored
    promising states) only in spirit: it stores whole groups and replays them as they are.
    """

    def __init__(self, cfg: SelectionConfig, num_completions: int):
        super().__init__(cfg, num_completions)
        self.buffer = ReplayBuffer(cfg.replay_size, cfg.max_replay_age)
        self.replayed = 0

    def replay(self, k: int, step: int) -> list[tuple[Problem, Rollouts]]:
        out = self.buffer.take(k, step)
        self.replayed = len(out)
        return out

    def remember(self, groups: list[tuple[Problem, Rollouts]], step: int) -> None:
        for problem, group in groups:
            self.buffer.add(problem, group, step)

    def metrics(self) -> dict[str, float]:
        return {"selection/replayed_groups": float(self.replayed), "selection/buffer_groups": float(len(self.buffer))}

    def state_dict(self) -> dict:
        return {"entries": list(self.buffer.entries), "replayed": self.replayed}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.entries, self.replayed = list(state["entries"]), int(state["replayed"])

