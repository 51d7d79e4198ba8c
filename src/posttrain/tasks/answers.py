r"""Reference-answer extraction for dataset loaders.

* GSM8K solutions end with ``#### 42``: ``gsm8k_answer`` takes the number after the last
  ``####`` and drops thousands commas (``#### 1,234`` -> ``1234``).
* MATH solutions mark the result with ``\boxed{...}``: ``boxed_answer`` takes the content of
  the last complete ``\boxed{}`` (or ``\fbox{}``), nested braces included.

Both return ``None`` when the text holds no such answer.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def gsm8k_answer(text: str) -> Optional[str]:
    """``"... #### 1,234"`` -> ``"1234"``; ``"#### $18.50."`` -> ``"18.50"``."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip()
    match = _NUMBER.search(tail)
    if match is None:
        tail = tail.strip().rstrip(".").strip()
        return tail or None
    number = match.group(0).replace(",", "")
    return number[1:] if number.startswith("+") else number


def _closing_brace(text: str, open_pos: int) -> Optional[int]:
    depth = 0
    i = open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def boxed_answer(text: str) -> Optional[str]:
    r"""Content of the last complete ``\boxed{...}`` / ``\fbox{...}`` (``\boxed 5`` too)."""
    found: Optional[str] = None
    for match in re.finditer(r"\\(?:boxed|fbox)\b\s*", text):
        start = match.end()
        if start < len(text) and text[start] == "{":
            end = _closing_brace(text, start)
            if end is not None:
                found = text[start + 1 : end].strip()
        else:  # "\boxed 5": up to the next space or "$"
            token = re.match(r"[^\s$]+", text[start:])
            if token and match.group(0).endswith((" ", "\t")):
                found = token.group(0)
    return found or None


ANSWER_FORMATS: dict[str, Callable[[str], Optional[str]]] = {
    "gsm8k": gsm8k_answer,
    "math": boxed_answer,
}
