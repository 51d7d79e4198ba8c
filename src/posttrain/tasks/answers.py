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

from posttrain.rewards.extract import boxed_arguments

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


def boxed_answer(text: str) -> Optional[str]:
    r"""Content of the last complete ``\boxed{...}`` / ``\fbox{...}`` (``\boxed 5`` too).

    The scan is :func:`posttrain.rewards.extract.boxed_arguments` (the one behind the reward's
    ``last_boxed``), with three differences kept for reference answers: any white space (a
    line break too) may stand between the command and a ``{`` argument; the content is only
    stripped, not cleaned (``\boxed{5.}`` gives ``"5."``); and an empty last box gives ``None``
    (no going back to an earlier box).
    """
    last = next(boxed_arguments(text, gap=r"\s*"), None)
    return (last or "").strip() or None


ANSWER_FORMATS: dict[str, Callable[[str], Optional[str]]] = {
    "gsm8k": gsm8k_answer,
    "math": boxed_answer,
}
