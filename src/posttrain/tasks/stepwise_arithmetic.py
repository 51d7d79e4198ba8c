"""Multi-step arithmetic whose step labels the generator knows: a chain of operations written
one per line, for process rewards (``rewards.process.step_verifier``).

A problem starts from a number and applies k operations in order::

    prompt:   Start with 12. Add 7, then multiply by 3, then subtract 5. Write one step per line
              as "a op b = c"; the last result is the answer.
    solution: 12 + 7 = 19
              19 * 3 = 57
              57 - 5 = 52
    answer:   52

``metadata["values"]`` holds the intermediate results [19, 57, 52] (step k is right iff it
computes values[k]), ``metadata["steps"]`` the solution's lines and ``metadata["solution"]``
their text joined by newlines. Splits are hash splits of the chain (``tasks.splits``): the same
chain is never in both. Values stay small: operands come from [min_operand, max_operand] and a
multiplication is only drawn while the running value is at most ``max_multiplicand``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from posttrain.tasks.base import Problem
from posttrain.tasks.splits import ProceduralTask, SplitConfig

__all__ = ["StepwiseArithmeticConfig", "StepwiseArithmeticTask"]

_WORDS = {"+": "add {x}", "-": "subtract {x}", "*": "multiply by {x}"}


@dataclass
class StepwiseArithmeticConfig(SplitConfig):
    min_steps: int = 2
    max_steps: int = 3
    min_operand: int = 1
    max_operand: int = 20
    ops: list[str] = field(default_factory=lambda: ["+", "-", "*"])
    max_multiplicand: int = 50  # no "* x" while the running value exceeds this (keeps numbers short)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError("task.min_steps must be >= 1 and <= task.max_steps")
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError("task.min_operand must be >= 0 and <= task.max_operand")
        bad = [op for op in self.ops if op not in _WORDS]
        if bad or not self.ops:
            raise ValueError(f"task.ops has {bad or 'no ops'}; allowed: {sorted(_WORDS)}")
        if self.max_multiplicand < 0:
            raise ValueError("task.max_multiplicand must be >= 0")


def solve(start: int, chain: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    """The solution's lines and intermediate values of ``start`` followed by ``chain``.

    >>> solve(12, [("+", 7), ("*", 3)])
    (['12 + 7 = 19', '19 * 3 = 57'], [19, 57])
    """
    lines, values, value = [], [], start
    for op, x in chain:
        new = value + x if op == "+" else value - x if op == "-" else value * x
        lines.append(f"{value} {op} {x} = {new}")
        values.append(new)
        value = new
    return lines, values


class StepwiseArithmeticTask(ProceduralTask):
    """See the module docstring; the key is the chain ``"12|+7|*3|-5"``, from which ``build``
    derives the whole problem."""

    name = "stepwise_arithmetic"
    config_cls = StepwiseArithmeticConfig

    def sample(self, rng: random.Random) -> tuple[str, Any]:
        c = self.cfg
        value = rng.randint(c.min_operand, c.max_operand)
        parts = [str(value)]
        for _ in range(rng.randint(c.min_steps, c.max_steps)):
            ops = [op for op in c.ops if op != "*" or abs(value) <= c.max_multiplicand] or ["+"]
            op, x = rng.choice(ops), rng.randint(c.min_operand, c.max_operand)
            value = value + x if op == "+" else value - x if op == "-" else value * x
            parts.append(f"{op}{x}")
        return "|".join(parts), None

    def build(self, key: str, payload: Any) -> Problem:
        head, *rest = key.split("|")
        start, chain = int(head), [(p[0], int(p[1:])) for p in rest]
        lines, values = solve(start, chain)
        words = ", then ".join(_WORDS[op].format(x=x) for op, x in chain)
        prompt = (f"Start with {start}. {words[0].upper() + words[1:]}. Write one step per line as "
                  f"\"a op b = c\"; the last result is the answer.")
        return Problem(id=f"stepwise:{key}", prompt=prompt, answer=str(values[-1]), difficulty=float(len(chain)),
                       category=f"steps={len(chain)}",
                       metadata={"values": values, "steps": lines, "solution": "\n".join(lines)})
