"""``mixture``: several tasks drawn as one, so curricula can pick among them (``Problem.source``).

    task:
      name: mixture
      seed: 0  # the order in which the parts' train problems are interleaved
      parts:
        - {name: multi_digit_arithmetic, digits: 2, label: add2, weight: 2.0}
        - {name: multi_digit_arithmetic, digits: 4, label: add4}

A part is any task config plus ``label`` (default: its task name, with ``-2``, ``-3``, ... for
repeats) and ``weight`` (> 0, default 1). A part's problems get ``source = label``, the id
``"<label>/<original id>"`` and keep their ``category`` (the label when they have none).

* train: part j gives its first n_j train problems, where the n_j are the largest counts with
  n_j <= len(train split of j) and n_j proportional to weight_j, rounded down; so part j's share
  is weight_j / sum(weights). Weights 2:1 over train splits of 10 and 10 give 10 and 5. The
  chosen problems are interleaved by a shuffle seeded with ``seed``.
* test: every part's whole test split, interleaved round-robin (part 1's first, part 2's first,
  ...; a part that runs out drops out), so the prefix ``trainer.eval_problems`` takes is balanced.
* Each part keeps its own splits apart, but two parts may share a prompt (overlapping knobs of
  one task, the same file twice), so a training prompt that is also a test prompt is an error.

Rewards: tasks declare no reward of their own; the run's ``reward:`` scores every part. Mix
parts that one verifier scores (e.g. arithmetic tasks with ``numeric``); nothing is checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from posttrain.tasks.base import Problem, check_split
from posttrain.tasks.registry import TASKS, build_task

_EXAMPLE = "[{name: multi_digit_arithmetic, digits: 2, weight: 2.0}, {name: countdown}]"


@dataclass
class MixtureConfig:
    parts: list = field(default_factory=list)
    seed: int = 0


def _plan(parts: Any) -> list[tuple[str, float, dict]]:
    """``(label, weight, task spec)`` per part; every input error is raised here, before any part is built."""
    if not isinstance(parts, list) or not parts:
        raise ValueError(f"task 'mixture' needs task.parts, a non-empty list of task configs, e.g. {_EXAMPLE}")
    available = ", ".join(sorted(n for n in TASKS if n != "mixture"))
    specs, labels = [], []
    for i, part in enumerate(parts):
        where = f"task.parts[{i}]"
        if not isinstance(part, dict):
            raise ValueError(f"{where} must be a task config such as {{name: countdown, weight: 1.0}}, got {part!r}")
        spec = dict(part)
        name, label, weight = spec.get("name"), spec.pop("label", None), spec.pop("weight", 1.0)
        if name is None:
            raise ValueError(f"{where} has no 'name': say which task it draws from ({available})")
        if name == "mixture":
            raise ValueError(f"{where} is itself a mixture: mixtures do not nest; list its parts in this one")
        if name not in TASKS:
            raise ValueError(f"{where}: unknown task {name!r}; available: {available}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{where} ({name}) has weight {weight!r}: a weight must be a number > 0 "
                             "(remove the part to leave it out)")
        if label is not None and (not isinstance(label, str) or not label):
            raise ValueError(f"{where} ({name}) has label {label!r}: a label must be a non-empty string")
        if label is not None and label in labels:
            raise ValueError(f"task.parts[{labels.index(label)}] and {where} both have label {label!r}: "
                             "labels name the sources and must differ; rename one")
        specs.append((float(weight), spec))
        labels.append(label)
    taken = {label for label in labels if label is not None}
    for i, (label, (_, spec)) in enumerate(zip(labels, specs)):
        if label is None:  # the first of a name keeps it bare, repeats count up from -2
            label, k = spec["name"], 1
            while label in taken:
                k += 1
                label = f"{spec['name']}-{k}"
            taken.add(label)
            labels[i] = label
    return [(label, w, spec) for label, (w, spec) in zip(labels, specs)]


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


class MixtureTask:
    name = "mixture"

    def __init__(self, cfg: MixtureConfig | None = None, **kwargs: Any):
        self.cfg = cfg or MixtureConfig(**kwargs)
        if isinstance(self.cfg.seed, bool) or not isinstance(self.cfg.seed, int):
            raise ValueError(f"task.seed must be an integer, got {self.cfg.seed!r}")
        plan = _plan(self.cfg.parts)
        self.labels = [label for label, _, _ in plan]
        self.weights = [w for _, w, _ in plan]
        self.parts = []
        for i, (label, _, spec) in enumerate(plan):
            try:
                self.parts.append(build_task(spec))
            except ValueError as exc:
                raise ValueError(f"task.parts[{i}] ({label}): {exc}") from exc
        self._cache: dict[str, list[Problem]] = {}

    def _tag(self, j: int, problems: list[Problem]) -> list[Problem]:
        label = self.labels[j]
        return [dataclasses.replace(p, id=f"{label}/{p.id}", source=label, category=p.category or label)
                for p in problems]

    def counts(self, pool_sizes: list[int]) -> list[int]:
        """Train problems taken from each part, given the sizes of their train splits."""
        # exact fractions: float rounding could take one problem too few from the binding part
        scale = min(Fraction(n) / Fraction(w) for n, w in zip(pool_sizes, self.weights))
        return [math.floor(scale * Fraction(w)) for w in self.weights]

    def _train(self) -> list[Problem]:
        pools = [part.problems("train") for part in self.parts]
        counts = self.counts([len(pool) for pool in pools])
        short = [f"{label} ({len(pool)} in its train split, {n} taken)"
                 for label, pool, n in zip(self.labels, pools, counts) if n == 0]
        if short:
            raise ValueError(f"task 'mixture': part(s) {', '.join(short)} would add no training problems: "
                             "give them a train split, raise their weight, or drop them")
        train = [p for j, (pool, n) in enumerate(zip(pools, counts)) for p in self._tag(j, pool[:n])]
        random.Random(self.cfg.seed).shuffle(train)
        test = self.problems("test")
        test_ids = {p.id for p in test}
        test_prompts = {_prompt_key(p.prompt): p.id for p in test}
        for p in train:
            clash = p.id if p.id in test_ids else test_prompts.get(_prompt_key(p.prompt))
            if clash is not None:
                raise ValueError(f"task 'mixture': training problem {p.id!r} is also test problem {clash!r} "
                                 "(same id or prompt), so the test split would not be held out: give the parts "
                                 "disjoint knobs (e.g. different digits) or drop one of them")
        return train

    def _test(self) -> list[Problem]:
        tests = [self._tag(j, list(part.problems("test"))) for j, part in enumerate(self.parts)]
        return [t[i] for i in range(max(map(len, tests), default=0)) for t in tests if i < len(t)]

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        if split not in self._cache:
            self._cache[split] = self._train() if split == "train" else self._test()
        return list(self._cache[split])
