"""Rollout replay: informative groups from earlier steps fill a batch the filter left short
(``replay``), or stand in for part of every fresh batch (``cures`` with ``replay_fraction``)."""

from __future__ import annotations

import dataclasses
import random
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
    """Up to ``capacity`` recent groups with unequal rewards, oldest evicted first (FIFO).

    take(k, step): the k groups of largest reward variance (ties: the most recent) among those
    sampled at most ``max_age`` steps before ``step``; they leave the buffer (``replay``).
    sample(k, step, rng): k of those groups uniformly without replacement, in the order drawn;
    they stay in the buffer, so a group may be replayed again while it is young enough (DOTS's
    rollout replay, used by ``cures``).
    Either way older groups are dropped first, so no replayed sample is more than ``max_age``
    policy versions stale. With ``one_per_prompt`` a prompt's new group replaces its older ones
    (also when the new one is not stored for having constant rewards): the latest evidence only.
    """

    def __init__(self, capacity: int, max_age: int, one_per_prompt: bool = False):
        self.capacity, self.max_age, self.one_per_prompt = capacity, max_age, one_per_prompt
        self.entries: list[dict[str, Any]] = []  # {"step", "variance", "problem", "rollouts"}, oldest first

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, problem: Problem, group: Rollouts, step: int) -> None:
        if self.one_per_prompt:
            self.entries = [e for e in self.entries if e["problem"]["id"] != problem.id]
        variance = float(group.rewards.double().var(unbiased=False))
        if variance <= 0.0:  # zero advantage: nothing to learn from it twice
            return
        self.entries.append({"step": step, "variance": variance, **_to_state(problem, group)})
        del self.entries[: max(0, len(self.entries) - self.capacity)]

    def _drop_old(self, step: int) -> None:
        self.entries = [e for e in self.entries if step - e["step"] <= self.max_age]

    def take(self, k: int, step: int) -> list[tuple[Problem, Rollouts]]:
        self._drop_old(step)
        ranked = sorted(range(len(self.entries)), key=lambda i: (-self.entries[i]["variance"], -self.entries[i]["step"]))
        chosen = set(ranked[:k])
        out = [_from_state(self.entries[i]) for i in ranked[:k]]
        self.entries = [e for i, e in enumerate(self.entries) if i not in chosen]
        return out

    def sample(self, k: int, step: int, rng: random.Random) -> list[tuple[Problem, Rollouts, int]]:
        """(problem, group, age = step - the step it was sampled at), for k groups drawn as above."""
        self._drop_old(step)
        if k <= 0 or not self.entries:  # no draw from rng: a step without replay leaves the stream alone
            return []
        drawn = rng.sample(range(len(self.entries)), min(k, len(self.entries)))
        return [(*_from_state(self.entries[i]), step - self.entries[i]["step"]) for i in drawn]


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

