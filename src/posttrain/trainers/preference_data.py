"""Preference pairs for reward-model (and preference) training: JSONL files and synthetic pairs.

JSONL, one object per line with ``prompt`` (text, or a list of chat messages), ``chosen`` and
``rejected`` (text), optional ``margin`` (number). Errors name the file and the line.
``synthetic:arithmetic`` builds pairs from the arithmetic task instead (chosen = the right
answer, rejected = a nearby wrong one).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


class PreferenceDataError(ValueError):
    """A preference file is missing or a line of it is malformed (the message names both)."""


@dataclass
class PreferencePair:
    prompt: Any  # text or a list of {"role", "content"} messages
    chosen: str
    rejected: str
    margin: Optional[float] = None
    source: str = ""  # "file:line", for messages


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return
    raise PreferenceDataError(
        f"{where}: 'prompt' must be a string or a non-empty list of {{'role': str, 'content': str}} messages, "
        f"got {type(prompt).__name__}"
    )


def read_text_lines(path: Path, error: type[Exception], what: str, hint: str = "") -> list[str]:
    """The lines of a UTF-8 data file; a missing or non-UTF-8 file is ``error`` naming it (SFT and
    preference data share this, each with its own error type)."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist{hint}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSONL") from None


def load_preferences(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL preference file; blank lines are skipped, anything malformed raises
    ``PreferenceDataError`` naming ``file:line``."""
    path = Path(path)
    lines = read_text_lines(path, PreferenceDataError, "preference data file")
    pairs: list[PreferencePair] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise PreferenceDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise PreferenceDataError(f"{where}: missing key(s) {missing}; each line needs prompt, chosen, rejected")
        _check_prompt(row["prompt"], where)
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], str):
                raise PreferenceDataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
        margin = row.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin)):
            raise PreferenceDataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
        pairs.append(PreferencePair(row["prompt"], row["chosen"], row["rejected"],
                                    None if margin is None else float(margin), where))
    if not pairs:
        raise PreferenceDataError(f"preference data file {path} holds no pairs")
    return pairs


def synthetic_arithmetic_pairs(n: int = 512, seed: int = 0, problems=None) -> list[PreferencePair]:
    """Pairs from the arithmetic task's train split (``problems``: that of a configured arithmetic
    task; default: the default task's): chosen = the answer, rejected = the answer off by 1..3
    (one pair per problem, at most ``n``)."""
    from posttrain.tasks.arithmetic import ArithmeticTask

    rng = random.Random(seed)
    problems = list(ArithmeticTask().problems("train") if problems is None else problems)[:n]
    pairs = []
    for p in problems:
        wrong = int(p.answer) + rng.choice([-3, -2, -1, 1, 2, 3])
        pairs.append(PreferencePair(p.prompt, p.answer, str(wrong), None, f"synthetic:{p.id}"))
    return pairs


SYNTHETIC = {"synthetic:arithmetic": synthetic_arithmetic_pairs}
