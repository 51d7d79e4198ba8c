"""Shaping rewards: format, length, DAPO overlong buffer, and weighted composition.

Lengths are counted in characters by default, or in tokens when a ``tokenizer`` is given: any
callable ``text -> sequence`` (``len`` is taken), ``text -> int``, or an object with an
``encode`` method (a Hugging Face tokenizer; special tokens are not added).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

from posttrain.rewards.base import Reward, RewardOutput, problem_issue
from posttrain.tasks.base import Problem

__all__ = [
    "THINK_ANSWER_PATTERN",
    "CompositeReward",
    "FormatReward",
    "LengthReward",
    "OverlongReward",
    "ThinkFormatReward",
    "measure_length",
    "overlong_penalty",
]

Tokenizer = Any  # callable text -> sequence | int, or an object with .encode(text)


def measure_length(text: str, tokenizer: Optional[Tokenizer] = None) -> int:
    """Length of ``text`` in characters, or in tokens of ``tokenizer``."""
    if tokenizer is None:
        return len(text)
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(text)
        return len(ids)
    out = tokenizer(text)
    if isinstance(out, int):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        return len(out["input_ids"])
    return len(out)


# ---------------------------------------------------------------------------- format

THINK_ANSWER_PATTERN = r"^\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)+</answer>\s*$"


class FormatReward:
    """``value`` when the completion matches ``pattern`` (``re.DOTALL``), else 0.0.

    ``match="search"`` looks anywhere, ``"fullmatch"`` requires the whole completion (after
    stripping). Component ``format`` (1/0 match flag).
    """

    name = "format"

    def __init__(self, pattern: str, match: str = "search", value: float = 1.0, flags: int = re.DOTALL):
        if match not in ("search", "fullmatch"):
            raise ValueError(f"match must be 'search' or 'fullmatch', got {match!r}")
        self.pattern = pattern
        self.regex = re.compile(pattern, flags)
        self.match = match
        self.value = float(value)

    def _matches(self, text: str) -> bool:
        if self.match == "fullmatch":
            return self.regex.fullmatch(text.strip()) is not None
        return self.regex.search(text) is not None

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        flags = [1.0 if self._matches(c) else 0.0 for c in completions]
        return RewardOutput(rewards=[f * self.value for f in flags], components={"format": flags})


class ThinkFormatReward(FormatReward):
    """The R1 template: exactly one ``<think>…</think>`` followed by exactly one non-empty
    ``<answer>…</answer>``, nothing else around them but whitespace."""

    name = "think_format"

    def __init__(self, value: float = 1.0):
        super().__init__(THINK_ANSWER_PATTERN, match="search", value=value)


# ---------------------------------------------------------------------------- length


class LengthReward:
    """Length shaping, in ``[-scale, 0]``.

    * ``target=T``: ``-scale * min(1, |L - T| / T)`` (best at exactly ``T``);
    * ``budget=B``: 0 while ``L <= B``, then ``-scale * min(1, (L - B) / B)``.

    Exactly one of ``target`` / ``budget``. Component ``length`` holds the raw length ``L``.
    """

    name = "length"

    def __init__(
        self,
        target: Optional[int] = None,
        budget: Optional[int] = None,
        scale: float = 1.0,
        tokenizer: Optional[Tokenizer] = None,
    ):
        if (target is None) == (budget is None):
            raise ValueError("LengthReward needs exactly one of target= or budget=")
        for what, v in (("target", target), ("budget", budget)):
            if v is not None and v <= 0:
                raise ValueError(f"LengthReward {what} must be > 0, got {v}")
        self.target, self.budget, self.scale, self.tokenizer = target, budget, float(scale), tokenizer

    def value(self, length: int) -> float:
        if self.target is not None:
            return -self.scale * min(1.0, abs(length - self.target) / self.target)
        return -self.scale * min(1.0, max(0, length - self.budget) / self.budget)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        lengths = [measure_length(c, self.tokenizer) for c in completions]
        return RewardOutput(rewards=[self.value(n) for n in lengths], components={"length": [float(n) for n in lengths]})


def overlong_penalty(length: int, max_length: int, cache_length: int, factor: float = 1.0) -> float:
    """DAPO soft overlong punishment ("DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale", arXiv:2503.14476, eq. 13):

        R(L) = 0                                   if L <= Lmax - Lcache
             = ((Lmax - Lcache) - L) / Lcache * f  if Lmax - Lcache < L <= Lmax
             = -f                                  if L > Lmax

    The paper used Lmax = 20480 tokens, Lcache = 4096 and f = 1.
    """
    if cache_length <= 0 or cache_length > max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    start = max_length - cache_length
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / cache_length * factor
    return -float(factor)


class OverlongReward:
    """DAPO overlong buffer penalty (see ``overlong_penalty``). Component ``length``."""

    name = "overlong"

    def __init__(self, max_length: int = 20480, cache_length: int = 4096, factor: float = 1.0, tokenizer: Optional[Tokenizer] = None):
        overlong_penalty(0, max_length, cache_length, factor)  # validates
        self.max_length, self.cache_length, self.factor, self.tokenizer = max_length, cache_length, float(factor), tokenizer

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        lengths = [measure_length(c, self.tokenizer) for c in completions]
        rewards = [overlong_penalty(n, self.max_length, self.cache_length, self.factor) for n in lengths]
        return RewardOutput(rewards=rewards, components={"length": [float(n) for n in lengths]})


# ---------------------------------------------------------------------------- composite


class CompositeReward:
    """Weighted sum of rewards: ``total = sum_i w_i * r_i``.

    Components: each part's unweighted reward under its name (a repeated name gets ``_2``,
    ``_3``, ...), each part's own components as ``"{part}/{component}"``, and the weighted
    total under ``"total"``. Info per completion: each part's info under its name, and the
    first part's ``answer`` (if any) copied to the top level.
    """

    name = "composite"

    def __init__(self, parts: Sequence[tuple[Reward, float]], name: str = "composite"):
        if not parts:
            raise ValueError("CompositeReward needs at least one (reward, weight) part")
        self.name = name
        self.parts: list[tuple[str, Reward, float]] = []
        seen: dict[str, int] = {}
        for reward, weight in parts:
            if not callable(reward) or not hasattr(reward, "name"):
                raise TypeError(f"composite part {reward!r} is not a Reward (needs .name and __call__)")
            w = float(weight)
            if not math.isfinite(w):
                raise ValueError(f"weight of {reward.name!r} must be finite, got {weight}")
            seen[reward.name] = seen.get(reward.name, 0) + 1
            label = reward.name if seen[reward.name] == 1 else f"{reward.name}_{seen[reward.name]}"
            self.parts.append((label, reward, w))

    def check_problem(self, problem: Problem) -> Optional[str]:
        return next((issue for _, reward, _ in self.parts if (issue := problem_issue(reward, problem))), None)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        n = len(completions)
        total = [0.0] * n
        components: dict[str, list[float]] = {}
        infos: list[dict[str, Any]] = [{} for _ in range(n)]
        for label, reward, w in self.parts:
            out = reward(problem, completions)
            if len(out.rewards) != n:
                raise ValueError(f"reward {label!r} returned {len(out.rewards)} rewards for {n} completions")
            components[label] = [float(r) for r in out.rewards]
            for k, v in out.components.items():
                components[f"{label}/{k}"] = list(v)
            for i, r in enumerate(out.rewards):
                total[i] += w * float(r)
                infos[i][label] = out.info[i] if i < len(out.info) else {}
                if "answer" not in infos[i] and isinstance(infos[i][label], dict) and "answer" in infos[i][label]:
                    infos[i]["answer"] = infos[i][label]["answer"]
        components["total"] = list(total)
        return RewardOutput(rewards=total, components=components, info=infos)
