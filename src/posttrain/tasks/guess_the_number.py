"""Guess-the-number problems: the rules as the prompt and a seeded secret as the answer (the game
itself, which answers "higher"/"lower", is ``posttrain.environments.games.GuessTheNumber``)."""

from __future__ import annotations

import random

from posttrain.tasks.base import Problem, check_split


def _prompt(low: int, high: int, max_turns: int) -> str:
    return (f"I am thinking of an integer between {low} and {high}. Guess it: reply with one number. After each "
            f"guess I say \"higher\" or \"lower\". You have {max_turns} guesses.")


def guess_the_number_problems(count: int, low: int = 1, high: int = 100, max_turns: int = 7, seed: int = 0,
                              split: str = "train") -> list[Problem]:
    """``count`` problems with seeded secrets (``answer``) and the game's rules as the prompt."""
    rng = random.Random(f"{seed}:{split}")
    return [Problem(id=f"guess-{split}-{seed}-{i}", prompt=_prompt(low, high, max_turns),
                    answer=str(rng.randint(low, high)), category=f"range={low}-{high}", source="guess_the_number")
            for i in range(count)]


class GuessTheNumberTask:
    """A ``TaskSource`` of guess-the-number problems; train and test secrets come from different
    seeded streams (the model never sees a secret, so a shared value is no leak)."""

    name = "guess_the_number"

    def __init__(self, low: int = 1, high: int = 100, max_turns: int = 7, train_size: int = 1000,
                 test_size: int = 100, seed: int = 0):
        self.low, self.high, self.max_turns, self.seed = low, high, max_turns, seed
        self.sizes = {"train": train_size, "test": test_size}

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        return guess_the_number_problems(self.sizes[split], self.low, self.high, self.max_turns, self.seed, split)
