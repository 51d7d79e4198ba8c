"""Procedural generators: sorting, list operations, logic (boolean formulas, knights and
knaves), and ``multi_digit_arithmetic`` (the arithmetic task with a ``digits`` knob).

Lists are answered as numbers joined by ``", "`` (``LIST_SEPARATOR``);
``normalize_list_answer`` maps a free-form list ("[3,1 ,2]") to that form.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from posttrain.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from posttrain.tasks.base import Problem
from posttrain.tasks.splits import ProceduralTask, SplitConfig

LIST_SEPARATOR = ", "


def format_list(values: list[int]) -> str:
    return LIST_SEPARATOR.join(str(v) for v in values)


def normalize_list_answer(text: str) -> Optional[str]:
    """``"[3,1 , 2]"`` -> ``"3, 1, 2"``; None when the text holds anything but integers."""
    body = text.strip().strip("[](){}").strip()
    if not body:
        return None
    items = [t for t in re.split(r"[,\s]+", body) if t]
    if not all(re.fullmatch(r"[+-]?\d+", t) for t in items):
        return None
    return format_list([int(t) for t in items])


def _check_list_knobs(c: Any) -> None:
    if not 1 <= c.min_length <= c.max_length:
        raise ValueError("task.min_length must be >= 1 and <= task.max_length")
    if c.min_value > c.max_value:
        raise ValueError("task.min_value must be <= task.max_value")


def _draw_list(rng: random.Random, c: Any) -> list[int]:
    n = rng.randint(c.min_length, c.max_length)
    return [rng.randint(c.min_value, c.max_value) for _ in range(n)]


# ----------------------------------------------------------------------------- sorting

SORT_ORDERS = ("ascending", "descending", "mixed")


@dataclass
class SortingConfig(SplitConfig):
    min_length: int = 3
    max_length: int = 8
    min_value: int = 0
    max_value: int = 99
    order: str = "ascending"  # "ascending", "descending", or "mixed" (each problem picks one)
    template: str = (
        "Sort these numbers in {order} order: {numbers}. "
        "Answer with just the sorted numbers, separated by commas."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_list_knobs(self)
        if self.order not in SORT_ORDERS:
            raise ValueError(f"task.order is {self.order!r}; allowed: {list(SORT_ORDERS)}")
        for key in ("{order}", "{numbers}"):
            if key not in self.template:
                raise ValueError(f"task.template must contain {key}")


class SortingTask(ProceduralTask):
    """Sort a list of integers; ``difficulty`` is the list length (``category`` "length=N")."""

    name = "sorting"
    config_cls = SortingConfig

    def sample(self, rng: random.Random) -> tuple[str, Any]:
        c = self.cfg
        order = c.order if c.order != "mixed" else rng.choice(("ascending", "descending"))
        values = _draw_list(rng, c)
        return f"{order}:{format_list(values)}", None

    def build(self, key: str, payload: Any) -> Problem:
        order, numbers = key.split(":", 1)
        values = [int(x) for x in numbers.split(",")]
        answer = sorted(values, reverse=order == "descending")
        return Problem(
            id=f"sorting:{key}",
            prompt=self.cfg.template.format(order=order, numbers=numbers),
            answer=format_list(answer),
            difficulty=float(len(values)),
            category=f"length={len(values)}",
            metadata={"numbers": values, "order": order},
        )


# ----------------------------------------------------------------------------- list ops

LIST_OPS: dict[str, tuple[str, Callable[[list[int]], Any]]] = {
    "reverse": (
        "Reverse this list of numbers: {numbers}. Answer with just the numbers in reversed order, separated by commas.",
        lambda xs: format_list(xs[::-1]),
    ),
    "max": ("What is the largest number in this list: {numbers}? Answer with just the number.", max),
    "min": ("What is the smallest number in this list: {numbers}? Answer with just the number.", min),
    "sum": ("What is the sum of these numbers: {numbers}? Answer with just the number.", sum),
    "length": ("How many numbers are in this list: {numbers}? Answer with just the number.", len),
}


@dataclass
class ListOpsConfig(SplitConfig):
    ops: list[str] = field(default_factory=lambda: ["reverse", "max", "min", "sum"])
    min_length: int = 3
    max_length: int = 8
    min_value: int = 0
    max_value: int = 99

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [op for op in self.ops if op not in LIST_OPS]
        if bad or not self.ops:
            raise ValueError(f"task.ops has {bad or 'no ops'}; allowed: {sorted(LIST_OPS)}")
        _check_list_knobs(self)


class ListOpsTask(ProceduralTask):
    """One operation (reverse / max / min / sum / length) on a list; ``difficulty`` = length
    (``category`` "length=N")."""

    name = "list_ops"
    config_cls = ListOpsConfig

    def sample(self, rng: random.Random) -> tuple[str, Any]:
        op = rng.choice(self.cfg.ops)
        return f"{op}:{format_list(_draw_list(rng, self.cfg))}", None

    def build(self, key: str, payload: Any) -> Problem:
        op, numbers = key.split(":", 1)
        values = [int(x) for x in numbers.split(",")]
        template, fn = LIST_OPS[op]
        return Problem(
            id=f"list_ops:{key}",
            prompt=template.format(numbers=numbers),
            answer=str(fn(values)),
            difficulty=float(len(values)),
            category=f"length={len(values)}",
            metadata={"numbers": values, "op": op},
        )


# ----------------------------------------------------------------------------- logic

LOGIC_KINDS = ("boolean", "knights")
NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy",
    "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Wendy",
)  # fmt: skip
VARIABLES = "ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O


@dataclass
class LogicConfig(SplitConfig):
    kind: str = "boolean"  # "boolean": evaluate a formula; "knights": who are the knights
    depth: int = 3  # boolean: nesting depth of the formula (the difficulty)
    num_vars: int = 3  # boolean: variables A, B, C, ...
    num_people: int = 3  # knights: inhabitants (the difficulty)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in LOGIC_KINDS:
            raise ValueError(f"task.kind is {self.kind!r}; allowed: {list(LOGIC_KINDS)}")
        if not 1 <= self.depth <= 8:
            raise ValueError("task.depth must be in [1, 8]")
        if not 1 <= self.num_vars <= len(VARIABLES):
            raise ValueError(f"task.num_vars must be in [1, {len(VARIABLES)}]")
        if not 2 <= self.num_people <= 6:
            raise ValueError("task.num_people must be in [2, 6]")


def _formula(rng: random.Random, depth: int, names: str) -> str:
    """A formula whose syntax tree has exactly ``depth`` operator levels (Python syntax)."""
    if depth == 0:
        return rng.choice(names)
    op = rng.choice(("and", "or", "and", "or", "not"))
    if op == "not":
        inner = _formula(rng, depth - 1, names)
        if inner.startswith("not "):  # no double negation: use a binary operator instead
            op = rng.choice(("and", "or"))
        else:
            return f"not {inner}" if depth == 1 else f"not ({inner})"
    deep = _formula(rng, depth - 1, names)
    for _ in range(10):  # avoid "A and A"-style twins where the variables allow
        shallow = _formula(rng, rng.randint(0, depth - 1), names)
        if shallow != deep:
            break
    left, right = (deep, shallow) if rng.random() < 0.5 else (shallow, deep)
    wrap = lambda s: f"({s})" if (" and " in s or " or " in s) else s  # noqa: E731
    return f"{wrap(left)} {op} {wrap(right)}"


def _eval_formula(formula: str, env: dict[str, bool]) -> bool:
    return bool(eval(formula, {"__builtins__": {}}, dict(env)))  # our own grammar only


# Knights and knaves: a statement is ("claim", a, t) | ("and"/"or", a, ta, b, tb) |
# ("same"/"diff", a, b) over person indices; t is True for "knight".
def knights_statement_value(stmt: list, knights: tuple[bool, ...]) -> bool:
    kind = stmt[0]
    if kind == "claim":
        return knights[stmt[1]] == stmt[2]
    if kind == "and":
        return knights[stmt[1]] == stmt[2] and knights[stmt[3]] == stmt[4]
    if kind == "or":
        return knights[stmt[1]] == stmt[2] or knights[stmt[3]] == stmt[4]
    if kind == "same":
        return knights[stmt[1]] == knights[stmt[2]]
    if kind == "diff":
        return knights[stmt[1]] != knights[stmt[2]]
    raise ValueError(f"unknown statement kind {kind!r}")


def knights_solutions(statements: list[list]) -> list[tuple[bool, ...]]:
    """Every assignment in which each speaker's statement is true iff the speaker is a knight."""
    n = len(statements)
    return [
        assignment
        for assignment in itertools.product((True, False), repeat=n)
        if all(knights_statement_value(s, assignment) == assignment[i] for i, s in enumerate(statements))
    ]


def _say(names: list[str], speaker: int, stmt: list) -> str:
    def kind(t: bool) -> str:
        return "a knight" if t else "a knave"

    def who_is(p: int, t: bool) -> str:
        return f"I am {kind(t)}" if p == speaker else f"{names[p]} is {kind(t)}"

    k = stmt[0]
    if k == "claim":
        text = who_is(stmt[1], stmt[2])
    elif k in ("and", "or"):
        text = f"{who_is(stmt[1], stmt[2])} {k} {who_is(stmt[3], stmt[4])}"
    else:
        a, b = stmt[1], stmt[2]
        if b == speaker:
            a, b = b, a
        pair = f"{names[b]} and I are" if a == speaker else f"{names[a]} and {names[b]} are"
        text = f"{pair} {'of the same kind' if k == 'same' else 'of different kinds'}"
    return text[0].upper() + text[1:] + "."


class LogicTask(ProceduralTask):
    """``kind="boolean"``: evaluate a formula over given truth values, answer ``True``/``False``
    (balanced 50/50). ``kind="knights"``: a knights-and-knaves puzzle with exactly one
    solution, answer the knights' names in order of introduction joined by ``", "`` or
    ``none``."""

    name = "logic"
    config_cls = LogicConfig

    _MAX_TRIES = 10_000

    def sample(self, rng: random.Random) -> tuple[str, Any]:
        if self.cfg.kind == "boolean":
            return self._sample_boolean(rng)
        return self._sample_knights(rng)

    def build(self, key: str, payload: Any) -> Problem:
        if self.cfg.kind == "boolean":
            return self._build_boolean(key, payload)
        return self._build_knights(key, payload)

    # boolean
    def _sample_boolean(self, rng: random.Random) -> tuple[str, Any]:
        c = self.cfg
        names = VARIABLES[: c.num_vars]
        want = rng.random() < 0.5
        for _ in range(self._MAX_TRIES):
            formula = _formula(rng, c.depth, names)
            used = sorted(set(re.findall(r"\b[A-Z]\b", formula)))
            env = {v: rng.random() < 0.5 for v in used}
            if _eval_formula(formula, env) == want:
                assignment = ", ".join(f"{v} = {env[v]}" for v in used)
                return f"{assignment} | {formula}", None
        raise ValueError("task 'logic': could not draw a formula with the wanted value")  # pragma: no cover

    def _build_boolean(self, key: str, payload: Any) -> Problem:
        assignment, formula = key.split(" | ")
        env = {part.split(" = ")[0]: part.split(" = ")[1] == "True" for part in assignment.split(", ")}
        return Problem(
            id=f"logic:{key}",
            prompt=(
                f"Let {assignment}. What is the value of the expression `{formula}`? "
                "Answer with just True or False."
            ),
            answer=str(_eval_formula(formula, env)),
            difficulty=float(self.cfg.depth),
            category=f"depth={self.cfg.depth}",
            metadata={"kind": "boolean", "formula": formula, "assignment": env},
        )

    # knights and knaves
    def _statement(self, rng: random.Random, speaker: int, n: int) -> list:
        others = [p for p in range(n) if p != speaker]
        k = rng.choice(("claim", "and", "or", "same", "diff"))
        if k == "claim":
            return [k, rng.choice(others), rng.random() < 0.5]
        a = rng.choice(others)
        b = rng.choice([p for p in range(n) if p != a])
        if k in ("and", "or"):
            return [k, a, rng.random() < 0.5, b, rng.random() < 0.5]
        return [k, a, b]

    def _sample_knights(self, rng: random.Random) -> tuple[str, Any]:
        n = self.cfg.num_people
        for _ in range(self._MAX_TRIES):
            names = sorted(rng.sample(NAMES, n))
            statements = [self._statement(rng, i, n) for i in range(n)]
            if len(knights_solutions(statements)) == 1:
                key = repr((names, statements))
                return key, (names, statements)
        raise ValueError("task 'logic': could not draw a knights puzzle with a unique solution")  # pragma: no cover

    def _build_knights(self, key: str, payload: tuple[list[str], list[list]]) -> Problem:
        names, statements = payload
        (solution,) = knights_solutions(statements)
        knights = [name for name, is_knight in zip(names, solution) if is_knight]
        listed = ", ".join(names[:-1]) + f" and {names[-1]}"
        lines = [f'{names[i]} says: "{_say(names, i, s)}"' for i, s in enumerate(statements)]
        prompt = (
            "On an island every inhabitant is either a knight, who always tells the truth, or a knave, "
            f"who always lies. You meet {len(names)} inhabitants: {listed}.\n"
            + "\n".join(lines)
            + "\nWho are the knights? Answer with their names in the order they were introduced, "
            'separated by commas, or "none" if there are no knights.'
        )
        return Problem(
            id=f"logic:knights:{key}",
            prompt=prompt,
            answer=", ".join(knights) if knights else "none",
            difficulty=float(len(names)),
            category=f"num_people={len(names)}",
            metadata={"kind": "knights", "names": names, "statements": statements, "knights": knights},
        )


# ----------------------------------------------------------------------------- arithmetic alias


@dataclass
class MultiDigitArithmeticConfig:
    """``arithmetic`` with operands of exactly ``digits`` digits."""

    digits: int = 3
    ops: list[str] = field(default_factory=lambda: ["+", "-", "*"])
    num_operands: int = 2
    test_size: int = 200
    train_size: int = 10_000
    seed: int = 0
    template: str = "What is {expr}? Answer with just the number."

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 18:
            raise ValueError("task.digits must be in [1, 18]")

    def to_arithmetic(self) -> ArithmeticConfig:
        return ArithmeticConfig(
            ops=list(self.ops),
            min_operand=0 if self.digits == 1 else 10 ** (self.digits - 1),
            max_operand=10**self.digits - 1,
            num_operands=self.num_operands,
            test_size=self.test_size,
            train_size=self.train_size,
            seed=self.seed,
            template=self.template,
        )


def multi_digit_arithmetic(cfg: MultiDigitArithmeticConfig | None = None, **kwargs: Any) -> ArithmeticTask:
    cfg = cfg or MultiDigitArithmeticConfig(**kwargs)
    task = ArithmeticTask(cfg.to_arithmetic())
    task.name = "multi_digit_arithmetic"
    return task
