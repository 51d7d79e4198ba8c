"""Guess-the-number: a small multi-turn game, the example environment for multi-turn RL.

The environment holds a secret integer in [low, high]; each model message is a guess (the last
integer in the message), answered "higher" or "lower" as a user message. A correct guess ends
the episode with reward 1; running out of turns ends it with reward 0. A message with no
integer in it costs the turn and is answered with a reminder of the rules. Binary search needs
ceil(log2(high - low + 1)) guesses, 7 for 1..100.

The secret is the problem's ``answer`` when it has one (``guess_the_number_problems`` makes
such problems), else a stable hash of the problem id into [low, high].
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional

from posttrain.environments.base import Environment, EpisodeState, StepResult
from posttrain.tasks.base import Problem
from posttrain.tasks.guess_the_number import GuessTheNumberTask, guess_the_number_problems  # noqa: F401

__all__ = ["GuessTheNumber", "GuessTheNumberTask", "guess_the_number_problems", "last_integer"]

_INT = re.compile(r"-?\d+")


def last_integer(text: str) -> Optional[int]:
    found = _INT.findall(text)
    return int(found[-1]) if found else None


class GuessTheNumber(Environment):
    name = "guess_the_number"
    observation_role = "user"

    def __init__(self, low: int = 1, high: int = 100, max_turns: int = 7, max_tokens: Optional[int] = None):
        if low > high:
            raise ValueError(f"guess_the_number needs low <= high, got {low} > {high}")
        self.low, self.high = int(low), int(high)
        self.max_turns, self.max_tokens = int(max_turns), max_tokens

    def secret(self, problem: Problem) -> int:
        if problem.answer is not None:
            value = int(str(problem.answer).strip())
            if not self.low <= value <= self.high:
                raise ValueError(f"problem {problem.id!r}: secret {value} is outside [{self.low}, {self.high}]")
            return value
        digest = hashlib.sha256(problem.id.encode()).digest()
        return self.low + int.from_bytes(digest[:8], "big") % (self.high - self.low + 1)

    def reset(self, problem: Problem) -> EpisodeState:
        state = super().reset(problem)
        state.data["secret"] = self.secret(problem)
        return state

    def step(self, state: EpisodeState, message: str) -> StepResult:
        secret = state.data["secret"]
        guess = last_integer(message)
        info = {"guess": guess, "secret": secret}
        if guess == secret:
            return StepResult(None, 1.0, True, dict(info, won=True, feedback="correct"))
        if guess is None:
            feedback = f"Reply with one integer between {self.low} and {self.high}."
        else:
            feedback = "higher" if guess < secret else "lower"
        if state.last_turn:
            return StepResult(None, 0.0, True, dict(info, won=False, feedback=feedback))
        return StepResult(feedback, 0.0, False, dict(info, feedback=feedback))
