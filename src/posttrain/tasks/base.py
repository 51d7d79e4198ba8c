"""Problems and task sources.

A ``TaskSource`` hands out ``Problem``s for a named split ("train" or "test"). Procedural
sources decide the split of every candidate problem from a hash of its canonical key, so the
two splits can never share a problem, whatever the seed or the sizes asked for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Problem:
    """One prompt with what a verifier needs to score its completions.

    ``prompt`` is either plain text (the chat template wraps it as one user turn) or a list of
    chat messages ``[{"role": ..., "content": ...}]``.
    """

    id: str
    prompt: Any
    answer: Optional[str] = None
    tests: Optional[str] = None  # code tasks: test code appended to the program
    difficulty: Optional[float] = None
    # What curricula group prompts by (posttrain.selection): ``category`` is a kind or difficulty
    # level the generator knows (e.g. "digits=3"), ``source`` the task a mixture drew it from.
    category: Optional[str] = None
    source: Optional[str] = None
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


@runtime_checkable
class TaskSource(Protocol):
    name: str

    def problems(self, split: str) -> Sequence[Problem]:
        """All problems of ``split`` ("train" or "test"), in a fixed seeded order."""
        ...


def split_of(key: str, test_fraction: float, salt: str = "") -> str:
    """Assign ``key`` to "test" or "train" from a hash: stable across runs and processes."""
    digest = hashlib.sha256((salt + "\x00" + key).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
