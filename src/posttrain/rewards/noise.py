"""Reward-noise injection: a binary reward flipped with probability p per sample.

"The Climb Carves Wisdom Deeper Than the Summit: On the Noisy Rewards in Learning to Reason"
(arXiv:2505.22653, catalog 003-22) trains with a fraction p of the binary rewards flipped
(correct <-> incorrect) and finds that RL still improves (40% flipped: Qwen-2.5-7B goes from 5%
to 72% on math vs 75% with clean rewards). In YAML::

    reward: {type: noisy, flip_prob: 0.2, reward: {type: numeric}}

For each completion i of a group for problem x, with clean reward r_i in {low, high}:

    u_i  = Random(key(seed, x.id, i, completion_i)).random()       # a generator of its own
    r'_i = (low + high - r_i)  if u_i < p  else r_i                 # flipped: low <-> high

``key`` is the first 8 bytes of the SHA-256 of ``"{seed}\\0{problem id}\\0{i}\\0{completion}"``
(``flip_uniform``). The draw is a pure function of the sample: no global RNG is touched, the
same sample always gets the same draw, and a resumed run, which regenerates the same
completions from the same seeds, flips exactly the same samples. Why the completion is in the
key: a reward sees one group at a time and not the trainer's step, so the text is what tells
the visits of one problem at different steps apart (they are fresh draws as soon as the
completion differs). Two identical completions at the same position of the same problem get
the same draw; across a group their advantages still differ from sample to sample.

Components: the inner reward's own components (so a verifier's ``correct`` stays the clean
correctness and held-out accuracy stays honest even when the noisy reward also evaluates),
``clean`` (the inner reward), ``flipped`` (1.0 where flipped: its batch mean is the fraction
flipped, logged as ``reward_component/flipped``), and ``correct`` = (clean == high) when the
inner reward has no ``correct`` component of its own. The paper flips a binary verifier; any
other inner value is an error, so put the noise on the verifier inside a composite, not on a
weighted sum.
"""

from __future__ import annotations

import hashlib
import math
import random
from numbers import Real
from typing import Any, Optional, Sequence

from posttrain.rewards.base import Reward, RewardOutput, problem_issue
from posttrain.tasks.base import Problem

__all__ = ["NoisyReward", "flip_uniform"]

# Inner reward types whose values are not two levels: noise on them would not be a flip.
_NOT_BINARY = {"composite": "a weighted sum of parts", "length": "a continuous length penalty",
               "overlong": "a continuous length penalty", "reward_model": "a learned continuous score"}


def flip_uniform(seed: int, problem_id: str, index: int, completion: str) -> float:
    """The uniform draw in [0, 1) that decides whether sample ``index`` of ``problem_id`` flips."""
    digest = hashlib.sha256(f"{seed}\0{problem_id}\0{index}\0{completion}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).random()


class NoisyReward:
    """A binary reward flipped with probability ``flip_prob`` per sample (see the module docstring).

    ``reward`` is the inner reward: a spec dict (built with ``build_reward``) or a Reward.
    ``low`` / ``high`` are its two values (default 0 and 1; -1 and 1 for a signed verifier).
    ``seed`` is the noise seed (the draws depend on it and on the sample, not on the trainer).
    """

    name = "noisy"

    def __init__(self, reward: Any, flip_prob: float, seed: int = 0, low: float = 0.0, high: float = 1.0,
                 tokenizer: Optional[Any] = None):
        if isinstance(flip_prob, bool) or not isinstance(flip_prob, Real) or not 0.0 <= float(flip_prob) <= 1.0:
            raise ValueError(f"reward noisy: flip_prob must be a number in [0, 1] (the probability that each "
                             f"binary reward is flipped), got {flip_prob!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"reward noisy: seed must be an integer >= 0, got {seed!r}")
        for what, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
                raise ValueError(f"reward noisy: {what} must be a finite number, got {v!r}")
        if not float(low) < float(high):
            raise ValueError(f"reward noisy: need low < high (the inner reward's wrong and right values), "
                             f"got low={low}, high={high}")
        if isinstance(reward, dict):
            kind = reward.get("type")
            if kind in _NOT_BINARY:
                raise ValueError(
                    f"reward noisy: the inner reward {kind!r} is {_NOT_BINARY[kind]}, not a binary reward; noise "
                    "flips a verifier's correct/incorrect. Put the noise on the verifier instead, e.g. "
                    "{type: composite, parts: [{type: noisy, flip_prob: 0.2, reward: {type: numeric}}, {type: format, "
                    "...}]}")
            from posttrain.rewards.registry import build_reward  # the registry imports this module

            reward = build_reward(reward, tokenizer=tokenizer)
        elif not callable(reward) or not hasattr(reward, "name"):
            raise ValueError(f"reward noisy: 'reward' must be a reward spec such as {{type: numeric}}, "
                             f"got {reward!r}")
        self.inner: Reward = reward
        self.flip_prob, self.seed, self.low, self.high = float(flip_prob), seed, float(low), float(high)

    def flips(self, problem: Problem, completions: Sequence[str]) -> list[bool]:
        """Which samples of this group flip: u_i < flip_prob (so p = 0 flips none, p = 1 all)."""
        return [flip_uniform(self.seed, problem.id, i, c) < self.flip_prob for i, c in enumerate(completions)]

    def check_problem(self, problem: Problem) -> Optional[str]:
        return problem_issue(self.inner, problem)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        out = self.inner(problem, completions)
        clean = [float(r) for r in out.rewards]
        for i, r in enumerate(clean):
            if r not in (self.low, self.high):
                raise ValueError(
                    f"reward noisy: the inner reward {self.inner.name!r} gave {r} to completion {i} of problem "
                    f"{problem.id!r}, but noise flips a binary reward between low={self.low} and high={self.high}; "
                    "use a binary verifier (e.g. numeric or math, no format bonus) or set low/high to its two values")
        flipped = self.flips(problem, completions)
        noisy = [self.low + self.high - r if f else r for r, f in zip(clean, flipped)]
        components = {k: list(v) for k, v in out.components.items()}
        if "correct" not in components:  # accuracy (evaluation.runner.correct_flags) reads the clean verdict
            components["correct"] = [1.0 if r == self.high else 0.0 for r in clean]
        components["clean"] = clean
        components["flipped"] = [1.0 if f else 0.0 for f in flipped]
        info = [dict(d, clean_reward=r, flipped=f) for d, r, f in zip(out.info, clean, flipped)]
        return RewardOutput(rewards=noisy, components=components, info=info)
