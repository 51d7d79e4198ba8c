"""Shared machinery for seeded, hash-split task sources.

Every candidate problem has a canonical key (a string that identifies it, e.g. the sorted
numbers and target of a countdown instance). Whether a key belongs to the test or the train
split is decided by ``split_of(key, test_fraction, salt)`` alone: the seed only decides which
keys are drawn and in what order. So

* the two splits of one source are disjoint by construction;
* a test problem of seed 0 is never a training problem of seed 1, and a problem shared by two
  difficulty settings of the same task falls in the same split under both;
* the test split does not depend on ``train_size``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from posttrain.tasks.base import Problem, check_split, split_of


@dataclass
class SplitConfig:
    """Split knobs shared by the procedural tasks (inherit from it; every field has a default)."""

    test_size: int = 200
    train_size: int = 10_000  # at most this many training problems
    seed: int = 0
    test_fraction: float = 0.1  # share of the key space that belongs to the test split

    def __post_init__(self) -> None:
        if self.test_size < 1 or self.train_size < 1:
            raise ValueError("task.test_size and task.train_size must be >= 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"task.test_fraction must be in (0, 1), got {self.test_fraction}")


def fill_splits(
    candidates: Iterable[tuple[str, Any]],
    build: Callable[[str, Any], Problem],
    *,
    task: str,
    salt: str,
    test_size: int,
    train_size: int,
    test_fraction: float,
    patience: int | None = None,
) -> tuple[list[Problem], list[Problem]]:
    """Draw ``(key, payload)`` candidates until both splits are full; returns ``(train, test)``.

    Repeated keys are skipped. The stream ends early when it runs out or after ``patience``
    repeats in a row (the key space is exhausted); a test split short of ``test_size`` or an
    empty train split then raises ``ValueError``. The train split may hold fewer than
    ``train_size`` problems (``train_size`` is a cap).
    """
    if patience is None:
        patience = max(2_000, 2 * (test_size + train_size))
    seen: set[str] = set()
    train: list[Problem] = []
    test: list[Problem] = []
    repeats = 0
    for key, payload in candidates:
        if len(test) >= test_size and len(train) >= train_size:
            break
        if key in seen:
            repeats += 1
            if repeats >= patience:
                break
            continue
        repeats = 0
        seen.add(key)
        if split_of(key, test_fraction, salt) == "test":
            if len(test) < test_size:
                test.append(build(key, payload))
        elif len(train) < train_size:
            train.append(build(key, payload))
    if len(test) < test_size:
        raise ValueError(
            f"task {task!r}: found only {len(test)} distinct test problems for test_size={test_size} "
            f"({len(seen)} distinct problems drawn): the problem space is too small; widen the "
            "difficulty knobs, lower task.test_size or raise task.test_fraction"
        )
    if not train:
        raise ValueError(
            f"task {task!r}: no training problems left after the test split ({len(seen)} distinct "
            "problems drawn): widen the difficulty knobs or lower task.test_fraction"
        )
    return train, test


class HashSplitTask:
    """Base for task sources split by :func:`fill_splits`: subclasses set ``name`` and ``cfg``
    (with ``test_size``, ``train_size`` and ``test_fraction``) and implement ``_stream()`` (the
    ``(key, payload)`` candidates in draw order) and ``build(key, payload) -> Problem``. The
    splits are drawn once, on the first ``problems()`` call, with the task name as the salt.
    """

    name: str = "hash_split"
    cfg: Any
    _cache: dict[str, list[Problem]] | None = None

    def _stream(self) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def build(self, key: str, payload: Any) -> Problem:
        raise NotImplementedError

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        if self._cache is None:
            c = self.cfg
            train, test = fill_splits(
                self._stream(),
                self.build,
                task=self.name,
                salt=self.name,
                test_size=c.test_size,
                train_size=c.train_size,
                test_fraction=c.test_fraction,
            )
            self._cache = {"train": train, "test": test}
        return list(self._cache[split])


class ProceduralTask(HashSplitTask):
    """Base for generators: subclasses set ``name`` and ``config_cls`` and implement
    ``sample(rng) -> (key, payload)`` and ``build(key, payload) -> Problem``.

    ``build`` must derive the prompt from the key alone (the payload may only add metadata),
    so distinct keys give distinct prompts and the splits are disjoint in prompt text too.
    """

    name: str = "procedural"
    config_cls: type = SplitConfig

    def __init__(self, cfg: Any = None, **kwargs: Any):
        if cfg is not None and kwargs:
            raise TypeError("pass either a config object or keyword options, not both")
        self.cfg = cfg if cfg is not None else self.config_cls(**kwargs)
        self._cache = None

    def sample(self, rng: random.Random) -> tuple[str, Any]:
        raise NotImplementedError

    def _stream(self) -> Iterator[tuple[str, Any]]:
        rng = random.Random(self.cfg.seed)
        while True:
            yield self.sample(rng)
