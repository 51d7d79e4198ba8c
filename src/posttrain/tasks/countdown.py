"""Countdown: reach a target from a few numbers with + - * / (each number at most once).

Instances are solvable by construction: the generator combines all the drawn numbers into a
random expression (exact integer intermediate results, no zero or negative ones) and takes
its value as the target. ``problem.answer`` is the target; ``metadata["numbers"]`` the
numbers and ``metadata["solution"]`` one expression that reaches it. ``check_countdown``
verifies a proposed expression without ``eval``.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

from posttrain.tasks.base import Problem
from posttrain.tasks.splits import ProceduralTask, SplitConfig

COUNTDOWN_OPS = ("+", "-", "*", "/")
MAX_EXPRESSION_CHARS = 500

_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,  # Fractions: exact; ZeroDivisionError handled by the caller
}
_UNICODE_OPS = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "—": "-"}


class _Rejected(Exception):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left = _evaluate(node.left, used)
        right = _evaluate(node.right, used)
        return _BINOPS[type(node.op)](left, right)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        used.append(node.value)
        return Fraction(node.value)
    raise _Rejected(type(node).__name__)


def check_countdown(
    expression_text: str, numbers: Sequence[int], target: int | str, *, require_all: bool = False
) -> bool:
    """True iff ``expression_text`` reaches ``target`` using only the given ``numbers`` (each
    at most once, or exactly once with ``require_all``), ``+ - * /`` and parentheses.

    Integer literals only (no unary minus, no floats, no names, calls or other operators);
    division is exact (``7 / 2`` is 7/2, not 3). A trailing ``= <target>`` is allowed and must
    name the target. ``×``, ``÷`` and ``−`` are read as ``*``, ``/`` and ``-``. Never raises:
    anything it cannot parse or that does not hold is ``False``.
    """
    if not isinstance(expression_text, str):
        return False
    text = expression_text.strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        return False
    for uni, ascii_op in _UNICODE_OPS.items():
        text = text.replace(uni, ascii_op)
    try:
        goal = Fraction(int(str(target).strip()))
    except (TypeError, ValueError):
        return False
    if "=" in text:
        parts = text.split("=")
        if len(parts) != 2:
            return False
        text, claimed = parts[0].strip(), parts[1].strip()
        try:
            if Fraction(int(claimed)) != goal:
                return False
        except ValueError:
            return False
    try:
        tree = ast.parse(text, mode="eval")
        used: list[int] = []
        value = _evaluate(tree, used)
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, RecursionError, MemoryError, _Rejected):
        return False
    available = Counter(int(n) for n in numbers)
    counted = Counter(used)
    if require_all:
        if counted != available:
            return False
    elif any(counted[n] > available[n] for n in counted):
        return False
    return value == goal


@dataclass
class CountdownConfig(SplitConfig):
    min_numbers: int = 3
    max_numbers: int = 4
    min_number: int = 1
    max_number: int = 50
    min_target: int = 1
    max_target: int = 100
    ops: list[str] = field(default_factory=lambda: list(COUNTDOWN_OPS))
    template: str = (
        "Using the numbers {numbers}, write an arithmetic expression that equals {target}. "
        "You may use +, -, *, / and parentheses, and each number at most once. "
        "Give the expression inside <answer></answer> tags, for example <answer>(1 + 2) * 3</answer>."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [op for op in self.ops if op not in COUNTDOWN_OPS]
        if bad or not self.ops:
            raise ValueError(f"task.ops has {bad or 'no ops'}; allowed: {list(COUNTDOWN_OPS)}")
        if not 2 <= self.min_numbers <= self.max_numbers <= 6:
            raise ValueError("task.min_numbers and task.max_numbers must satisfy 2 <= min_numbers <= max_numbers <= 6")
        if not 1 <= self.min_number <= self.max_number:
            raise ValueError("task.min_number must be >= 1 and <= task.max_number")
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError("task.min_target must be >= 1 and <= task.max_target")
        for key in ("{numbers}", "{target}"):
            if key not in self.template:
                raise ValueError(f"task.template must contain {key}")


class CountdownTask(ProceduralTask):
    name = "countdown"
    config_cls = CountdownConfig

    _MAX_TRIES = 10_000

    def _combine(self, rng: random.Random, nums: list[int]) -> tuple[int, str] | None:
        ops = self.cfg.ops
        pool: list[tuple[int, str]] = [(n, str(n)) for n in nums]
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (a, ea), (b, eb) = pool[i], pool[j]
            if a < b:
                (a, ea), (b, eb) = (b, eb), (a, ea)
            valid = [op for op in ops if (op != "-" or a > b) and (op != "/" or (b > 1 and a % b == 0))]
            if not valid:
                return None
            op = rng.choice(valid)
            value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, f"({ea} {op} {eb})")]
        value, expr = pool[0]
        return value, expr[1:-1] if expr.startswith("(") else expr

    def sample(self, rng: random.Random) -> tuple[str, Any]:
        c = self.cfg
        for _ in range(self._MAX_TRIES):
            k = rng.randint(c.min_numbers, c.max_numbers)
            nums = [rng.randint(c.min_number, c.max_number) for _ in range(k)]
            made = self._combine(rng, nums)
            if made is None:
                continue
            target, expr = made
            if c.min_target <= target <= c.max_target and target not in nums:
                key = ",".join(map(str, sorted(nums))) + f"->{target}"
                return key, expr
        raise ValueError(
            f"task 'countdown': could not build an instance with a target in "
            f"[{c.min_target}, {c.max_target}] in {self._MAX_TRIES} tries: widen task.max_target or the ops"
        )

    def build(self, key: str, solution: str) -> Problem:
        nums_text, target_text = key.split("->")
        nums = [int(x) for x in nums_text.split(",")]
        shown = list(nums)
        random.Random(key).shuffle(shown)  # display order: fixed by the key, not sorted
        return Problem(
            id=f"countdown:{key}",
            prompt=self.cfg.template.format(numbers=", ".join(map(str, shown)), target=target_text),
            answer=target_text,
            difficulty=float(len(nums)),
            category=f"numbers={len(nums)}",
            metadata={"numbers": shown, "target": int(target_text), "solution": solution},
        )
