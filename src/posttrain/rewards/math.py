"""Math answer checking: a fast exact-numeric path, then ``math_verify`` for everything else.

``compare_answers(pred, gold)`` decides in this order, stopping at the first decisive step:

1. no prediction -> not equivalent;
2. the normalized strings are equal -> equivalent;
3. the gold answer is a multiple-choice letter -> compare letters;
4. both sides are plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands
   commas, ``1e-3``) -> ``|pred - gold| <= tol`` with exact rational arithmetic (no sympy);
5. otherwise ``math_verify.parse`` + ``math_verify.verify`` (LaTeX, sets, intervals, symbolic
   expressions). Parsing and verification are guarded: an exception or a timeout gives
   "not equivalent" and an ``error`` entry, never an exception to the caller.

Timeouts: ``math_verify`` times out with ``signal.alarm``, which only works in the main
thread. Off the main thread it runs without a timeout (answers longer than
``MAX_ANSWER_CHARS`` are refused up front, which stops the usual blow-ups) and the result says
so in ``timeout_guard``.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Optional, Sequence

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.extract import EXTRACTORS, clean_answer, extract_answer
from posttrain.tasks.base import Problem

__all__ = [
    "MAX_ANSWER_CHARS",
    "Comparison",
    "MathReward",
    "NumericReward",
    "answers_equivalent",
    "canonical_answer",
    "compare_answers",
    "normalize_answer",
    "parse_number",
]

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # longer answers are refused (recorded as an error), not parsed
_MAX_EXPONENT = 400  # |exponent| allowed in 1e-3 style numbers before we refuse to expand

# ---------------------------------------------------------------------------- normalization

_SPACING = re.compile(r"\\[!,;: ]|\\quad|\\qquad|~")
_LEFTRIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_TRAILING_TEXT = re.compile(r"^(.*?\S)\s*\\(?:text|mbox|mathrm|textrm)\{\s*[A-Za-z][A-Za-z\s.]*\}$")
_ONLY_TEXT = re.compile(r"^\\(?:text|mbox|mathrm|textrm|textbf)\{(.*)\}$")
_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*(?!.*=)")
_CHOICE = re.compile(r"^\(?([A-J])\)?$")


def normalize_answer(ans: Optional[str]) -> Optional[str]:
    """Cheap string normalization shared by the numeric path and the clustering key.

    Strips delimiters and ``\\boxed``, LaTeX spacing, ``\\left``/``\\right``, degree signs, a
    trailing ``\\text{unit}``, a leading ``x =``; maps ``\\dfrac``/``\\tfrac`` to ``\\frac``
    and ``{,}`` to ``,``. ``None`` when nothing is left.
    """
    s = clean_answer(ans)
    if s is None:
        return None
    s = _SPACING.sub(" ", s)
    s = _LEFTRIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = s.replace("\u2212", "-")
    m = _TRAILING_TEXT.match(s)
    if m:
        s = m.group(1)
    m = _ONLY_TEXT.match(s.strip())
    if m:
        s = m.group(1)
    s = _ASSIGNMENT.sub("", s.strip())
    s = s.strip().rstrip(".").strip()
    return s or None


_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_NUM_RE = re.compile(rf"([-+]?)({_NUM})(?:[eE]([-+]?\d+))?")
_SLASH_RE = re.compile(rf"([-+]?(?:{_NUM}))/([-+]?(?:{_NUM}))")
_FRAC_RE = re.compile(r"([-+]?)\\frac(?:\{([^{}]*)\}|(\d))(?:\{([^{}]*)\}|(\d))")


def _plain_number(s: str) -> Optional[Fraction]:
    m = _NUM_RE.fullmatch(s)
    if not m:
        return None
    sign, num, exp = m.groups()
    if exp is not None and abs(int(exp)) > _MAX_EXPONENT:
        return None
    try:
        value = Fraction(Decimal(num.replace(",", "") + (f"e{exp}" if exp else "")))
    except (InvalidOperation, ValueError):
        return None
    return -value if sign == "-" else value


def parse_number(ans: Optional[str]) -> Optional[Fraction]:
    """Exact value of a plain number, or ``None`` when ``ans`` is not one.

    >>> parse_number(r"\\frac12"), parse_number("0.5"), parse_number("-1,234"), parse_number("x+1")
    (Fraction(1, 2), Fraction(1, 2), Fraction(-1234, 1), None)
    """
    s = normalize_answer(ans)
    if s is None or len(s) > MAX_ANSWER_CHARS:
        return None
    s = re.sub(r"\s+", "", s)
    if s.startswith("(") and s.endswith(")") and s.count("(") == 1:
        s = s[1:-1]
    value = _plain_number(s)
    if value is not None:
        return value
    m = _SLASH_RE.fullmatch(s)
    if m:
        a, b = _plain_number(m.group(1)), _plain_number(m.group(2))
        if a is not None and b is not None and b != 0:
            return a / b
        return None
    m = _FRAC_RE.fullmatch(s)
    if m:
        sign = m.group(1)
        a = _plain_number(m.group(2) if m.group(2) is not None else m.group(3))
        b = _plain_number(m.group(4) if m.group(4) is not None else m.group(5))
        if a is not None and b is not None and b != 0:
            return -(a / b) if sign == "-" else a / b
    return None


def _fraction_key(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def canonical_answer(text: Optional[str]) -> Optional[str]:
    """A normalized clustering key for an extracted answer; ``None`` for no answer.

    Numbers map to their exact reduced value, so ``\\frac12``, ``1/2``, ``0.5`` and
    ``\\dfrac{1}{2}`` all give ``"1/2"``; choice letters give ``"B"``; anything else gives the
    normalized LaTeX with whitespace removed (symbolic equivalence beyond that is left to
    ``answers_equivalent``).
    """
    s = normalize_answer(text)
    if s is None:
        return None
    m = _CHOICE.match(s)
    if m:
        return m.group(1)
    value = parse_number(s)
    if value is not None:
        return _fraction_key(value)
    return re.sub(r"\s+", "", s) or None


# ---------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    equivalent: bool
    method: str  # "none" | "string" | "choice" | "numeric" | "math_verify" | "refused"
    error: Optional[str] = None  # exception / timeout inside math_verify, or refused input
    parse_failed: Optional[str] = None  # "pred" | "gold" | "both": math_verify found no expression
    timeout_guard: bool = True  # False when math_verify ran without its signal-based timeout

    def record(self, info: Optional[dict]) -> None:
        if info is None:
            return
        info["method"] = self.method
        if self.error is not None:
            info["error"] = self.error
        if self.parse_failed is not None:
            info["parse_failed"] = self.parse_failed
        if not self.timeout_guard:
            info["timeout_guard"] = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=4096)
def _mv_parse(s: str, timeout_s: Optional[int]) -> tuple[tuple, Optional[str]]:
    """``math_verify.parse`` of ``$s$``: (parsed items, error repr or None)."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return tuple(parse(f"${s}$", parsing_timeout=timeout_s, raise_on_error=True)), None
    except (Exception, TimeoutException) as e:  # TimeoutException is a BaseException
        return (), f"math_verify.parse: {type(e).__name__}: {e}"[:300]


def _has_expr(parsed: tuple) -> bool:
    return any(not isinstance(x, str) for x in parsed)


def _math_verify(pred: str, gold: str, tol: float, timeout_s: int) -> Comparison:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    guarded = _in_main_thread()
    t = timeout_s if guarded else None
    g, g_err = _mv_parse(gold, t)
    p, p_err = _mv_parse(pred, t)
    if g_err or p_err:
        return Comparison(False, "math_verify", error="; ".join(e for e in (g_err, p_err) if e), timeout_guard=guarded)
    failed = [side for side, parsed in (("pred", p), ("gold", g)) if not _has_expr(parsed)]
    parse_failed = {0: None, 1: failed[0] if failed else None, 2: "both"}[len(failed)]
    if not p or not g:
        return Comparison(False, "math_verify", parse_failed=parse_failed or "both", timeout_guard=guarded)
    rounding = max(0, min(15, round(-math.log10(tol)))) if tol > 0 else 15
    try:
        ok = verify(list(g), list(p), float_rounding=rounding, timeout_seconds=t, raise_on_error=True)
    except (Exception, TimeoutException) as e:
        err = f"math_verify.verify: {type(e).__name__}: {e}"[:300]
        logger.warning("answer check failed (pred=%r, gold=%r): %s", pred[:80], gold[:80], err)
        return Comparison(False, "math_verify", error=err, parse_failed=parse_failed, timeout_guard=guarded)
    return Comparison(bool(ok), "math_verify", parse_failed=parse_failed, timeout_guard=guarded)


def compare_answers(pred: Optional[str], gold: Optional[str], tol: float = 1e-6, timeout_s: int = 5) -> Comparison:
    """Decide whether ``pred`` and ``gold`` denote the same answer (see the module docstring).

    Never raises on malformed input; failures show up in ``Comparison.error``.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p is None:
        return Comparison(False, "none")
    if g is None:
        return Comparison(False, "none", error="empty gold answer")
    if len(p) > MAX_ANSWER_CHARS or len(g) > MAX_ANSWER_CHARS:
        return Comparison(False, "refused", error=f"answer longer than {MAX_ANSWER_CHARS} characters")
    if re.sub(r"\s+", "", p) == re.sub(r"\s+", "", g):
        return Comparison(True, "string")
    gm = _CHOICE.match(g)
    if gm:
        pm = _CHOICE.match(p)
        return Comparison(bool(pm) and pm.group(1) == gm.group(1), "choice")
    a, b = parse_number(p), parse_number(g)
    if a is not None and b is not None:
        return Comparison(abs(a - b) <= Fraction(tol), "numeric")
    try:
        return _math_verify(p, g, tol, max(1, int(math.ceil(timeout_s))))
    except Exception as e:  # import problems or anything unforeseen: visible, never raised
        err = f"{type(e).__name__}: {e}"[:300]
        logger.warning("answer check failed (pred=%r, gold=%r): %s", p[:80], g[:80], err)
        return Comparison(False, "math_verify", error=err)


def answers_equivalent(
    pred: Optional[str], gold: Optional[str], tol: float = 1e-6, info: Optional[dict] = None, timeout_s: int = 5
) -> bool:
    """``True`` iff ``pred`` and ``gold`` are the same answer (numeric within ``tol``, or
    symbolically equal by ``math_verify``). Never raises: failures return ``False`` and, when
    ``info`` is given, put an ``error`` entry (and ``parse_failed``/``method``) into it.

    >>> answers_equivalent(r"\\frac{1}{2}", "0.5"), answers_equivalent(r"\\frac{1}{", "0.5")
    (True, False)
    """
    cmp = compare_answers(pred, gold, tol=tol, timeout_s=timeout_s)
    cmp.record(info)
    return cmp.equivalent


# ---------------------------------------------------------------------------- rewards


def _check_extractor(mode: str) -> str:
    if mode not in EXTRACTORS:
        raise ValueError(f"unknown extractor {mode!r}; allowed: {sorted(EXTRACTORS)}")
    return mode


class MathReward:
    """1.0 when the extracted answer is equivalent to ``problem.answer``, else 0.0.

    Component ``correct`` (same as the reward); info per completion: ``answer`` (extracted,
    ``None`` when there was none), ``method`` and, on trouble, ``error`` / ``parse_failed``.
    Identical extracted answers in a group are checked once.
    """

    name = "math"

    def __init__(self, extractor: str = "auto", tol: float = 1e-6, timeout_s: int = 5):
        self.extractor = _check_extractor(extractor)
        self.tol = float(tol)
        self.timeout_s = int(timeout_s)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        if problem.answer is None:
            raise ValueError(f"MathReward needs problem.answer; problem {problem.id!r} has none")
        cache: dict[Optional[str], Comparison] = {}
        rewards, infos = [], []
        for text in completions:
            ans = extract_answer(text, self.extractor)
            if ans not in cache:
                cache[ans] = compare_answers(ans, problem.answer, tol=self.tol, timeout_s=self.timeout_s)
            info: dict[str, Any] = {"answer": ans}
            cache[ans].record(info)
            rewards.append(1.0 if cache[ans].equivalent else 0.0)
            infos.append(info)
        return RewardOutput(rewards=rewards, components={"correct": list(rewards)}, info=infos)


class NumericReward:
    """Fast exact check for arithmetic-like tasks: the extracted number (by default the last
    number in the completion) must equal ``problem.answer`` exactly (as rationals, so ``12``,
    ``12.0`` and ``1,2``-free ``12`` agree). No sympy. Component ``correct``."""

    name = "numeric"

    def __init__(self, extractor: str = "last_number"):
        self.extractor = _check_extractor(extractor)

    def check_problem(self, problem: Problem) -> Optional[str]:
        if parse_number(problem.answer) is None:
            return (f"reward 'numeric' needs a numeric answer, and problem {problem.id!r} has {problem.answer!r}; "
                    "use reward.type=math (symbolic or text answers) or give the task numeric answers")
        return None

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        gold = parse_number(problem.answer)
        if gold is None:
            raise ValueError(f"NumericReward needs a numeric problem.answer; problem {problem.id!r} has {problem.answer!r}")
        rewards, infos = [], []
        for text in completions:
            ans = extract_answer(text, self.extractor)
            value = parse_number(ans) if ans is not None else None
            rewards.append(1.0 if value is not None and value == gold else 0.0)
            infos.append({"answer": ans})
        return RewardOutput(rewards=rewards, components={"correct": list(rewards)}, info=infos)
