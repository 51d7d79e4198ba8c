"""Seeded procedural arithmetic: ``a op b [op c ...]`` with an integer answer."""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from typing import Sequence

from posttrain.tasks.base import Problem, check_split

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_ENUMERATE_LIMIT = 200_000  # below this many distinct problems we enumerate them all


@dataclass
class ArithmeticConfig:
    ops: list[str] = field(default_factory=lambda: ["+", "-", "*"])
    min_operand: int = 0
    max_operand: int = 9
    num_operands: int = 2
    test_size: int = 200
    train_size: int = 10_000  # at most this many training problems
    seed: int = 0
    template: str = "What is {expr}? Answer with just the number."

    def __post_init__(self) -> None:
        bad = [op for op in self.ops if op not in _OPS]
        if bad or not self.ops:
            raise ValueError(f"task.ops has {bad or 'no ops'}; allowed: {sorted(_OPS)}")
        if self.min_operand > self.max_operand:
            raise ValueError("task.min_operand must be <= task.max_operand")
        if self.num_operands < 2:
            raise ValueError("task.num_operands must be >= 2")
        if self.test_size < 1 or self.train_size < 1:
            raise ValueError("task.test_size and task.train_size must be >= 1")
        if "{expr}" not in self.template:
            raise ValueError("task.template must contain {expr}")


def _hash(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big")


class ArithmeticTask:
    """Integer arithmetic with Python precedence (``*`` before ``+``/``-``).

    Splits are disjoint under commutation: expressions that are the same problem up to the order
    of commuting operands ("3 + 4" and "4 + 3") share a symmetry key and always land in the same
    split, so no test item is the commuted twin of a train item (issue 21 found 32 of 200 in the
    old split). The key is the operator and the sorted operands for ``+`` and ``*`` with two
    operands; with more operands, the sorted operands and sorted operators (coarser than true
    equivalence, which only ever moves more problems together, never splits a class). In small
    spaces, whole key classes are taken in hash order into the test split while they fit in
    ``test_size`` (so the test split has exactly ``test_size`` problems), the rest is train; in
    large spaces a problem is a test problem iff its key's hash falls in the lowest 10% of the
    hash range.
    """

    name = "arithmetic"

    def __init__(self, cfg: ArithmeticConfig | None = None, **kwargs):
        self.cfg = cfg or ArithmeticConfig(**kwargs)
        self._cache: dict[str, list[Problem]] = {}
        space = self.space_size()
        if space < self.cfg.test_size + 1:
            raise ValueError(
                f"task has only {space} distinct problems, too few for test_size={self.cfg.test_size} "
                "plus a train split: widen the operand range or lower task.test_size"
            )

    def space_size(self) -> int:
        c = self.cfg
        return (c.max_operand - c.min_operand + 1) ** c.num_operands * len(c.ops) ** (c.num_operands - 1)

    def _problem(self, operands: Sequence[int], ops: Sequence[str]) -> Problem:
        parts = [str(operands[0])]
        for op, x in zip(ops, operands[1:]):
            parts += [op, f"({x})" if x < 0 else str(x)]
        expr = " ".join(parts)
        value = eval(expr, {"__builtins__": {}})  # our own digits and operators only
        return Problem(
            id=f"arith:{expr}",
            prompt=self.cfg.template.format(expr=expr),
            answer=str(value),
            difficulty=float(len(str(abs(value)))),
            # the widest operand: a range of widths in one task gives one category per width
            category=f"digits={max(len(str(abs(x))) for x in operands)}",
            metadata={"expr": expr, "operands": list(operands), "ops": list(ops)},
        )

    @staticmethod
    def symmetry_key(operands: Sequence[int], ops: Sequence[str]) -> str:
        """One key per class of expressions equal up to commuting operands (see the class doc)."""
        if len(operands) == 2 and ops[0] in ("+", "*"):
            return f"{ops[0]}:{sorted(operands)}"
        if len(operands) == 2:
            return f"{ops[0]}:{list(operands)}"
        return f"{sorted(operands)}:{sorted(ops)}"

    def _key(self, p: Problem) -> str:
        return self.symmetry_key(p.metadata["operands"], p.metadata["ops"])

    def _enumerate(self) -> list[Problem]:
        c = self.cfg
        values = range(c.min_operand, c.max_operand + 1)
        out = []
        for operands in itertools.product(values, repeat=c.num_operands):
            for ops in itertools.product(c.ops, repeat=c.num_operands - 1):
                out.append(self._problem(operands, ops))
        return out

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        if split in self._cache:
            return self._cache[split]
        c = self.cfg
        if self.space_size() <= _ENUMERATE_LIMIT:
            classes: dict[str, list[Problem]] = {}
            for p in self._enumerate():
                classes.setdefault(self._key(p), []).append(p)
            test, train = [], []
            for key in sorted(classes, key=lambda k: _hash(k, c.seed)):
                members = classes[key]
                (test if len(test) + len(members) <= c.test_size else train).extend(members)
            random.Random(c.seed).shuffle(train)
            train = train[: c.train_size]
        else:
            threshold = 0.1 * 2**64
            rng = random.Random(c.seed)
            seen: set[str] = set()
            test, train = [], []
            while len(test) < c.test_size or len(train) < c.train_size:
                p = self._problem(
                    [rng.randint(c.min_operand, c.max_operand) for _ in range(c.num_operands)],
                    [rng.choice(c.ops) for _ in range(c.num_operands - 1)],
                )
                if p.id in seen:
                    continue
                seen.add(p.id)
                is_test = _hash(self._key(p), c.seed) < threshold
                bucket, limit = (test, c.test_size) if is_test else (train, c.train_size)
                if len(bucket) < limit:
                    bucket.append(p)
        self._cache = {"train": train, "test": test}
        return self._cache[split]
