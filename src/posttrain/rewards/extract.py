"""Answer extraction from free-form completions.

Every extractor returns the answer as a cleaned string, or ``None`` when the text holds no
answer of that kind. ``None`` is the only "no answer" value: an empty string is never
returned, so callers (majority vote above all) can tell "no answer" from an answer.

>>> extract_answer(r"so the total is \\boxed{\\frac{1}{2}}.")
'\\\\frac{1}{2}'
>>> extract_answer("12 apples, then 3 more: 15")
'15'
>>> extract_answer("no digits here") is None
True
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Optional

__all__ = [
    "EXTRACTORS",
    "answer_phrase",
    "answer_tag",
    "boxed_arguments",
    "choice_letter",
    "clean_answer",
    "extract_answer",
    "last_boxed",
    "last_number",
]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _match_brace(text: str, open_pos: int) -> Optional[int]:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped ``\\{ \\}`` skipped)."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "{}":
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


def boxed_arguments(text: str, gap: str = " *") -> Iterator[str]:
    r"""The raw arguments of the complete ``\boxed`` / ``\fbox`` commands in ``text``, last first.

    An argument is ``{...}`` (nested braces allowed; one never closed, as in a truncated text,
    is passed over) or, after a space or tab, a bare token up to the next space or ``$``
    (``\boxed 5``). ``gap`` (a regex) is what may stand between the command and its argument:
    spaces by default, ``r"\s*"`` for any white space (it should match the empty string too).
    """
    gap_re = re.compile(gap)
    candidates = []
    for cmd in _BOX_COMMANDS:
        start = 0
        while True:
            k = text.find(cmd, start)
            if k < 0:
                break
            candidates.append((k, cmd))
            start = k + len(cmd)
    for k, cmd in sorted(candidates, reverse=True):
        j = k + len(cmd)
        if j < len(text) and text[j].isalpha():  # e.g. \boxedfoo: another command
            continue
        m = gap_re.match(text, j)
        skipped = m.group(0) if m else ""
        j += len(skipped)
        if j < len(text) and text[j] == "{":
            end = _match_brace(text, j)
            if end is not None:
                yield text[j + 1 : end]
        elif skipped.endswith((" ", "\t")):
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                yield m.group(0)


def last_boxed(text: str) -> Optional[str]:
    r"""Content of the last complete ``\boxed{...}`` (or ``\fbox{...}``), nested braces allowed.

    ``\boxed 5`` (argument without braces) is read up to the next space or ``$``. A final box
    that is never closed (a truncated completion) is skipped and the previous complete one is
    used; so is one that is empty once cleaned (:func:`clean_answer`).
    """
    if not text:
        return None
    for arg in boxed_arguments(text):
        got = clean_answer(arg)
        if got is not None:
            return got
    return None


_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def answer_tag(text: str) -> Optional[str]:
    """Content of the last ``<answer>...</answer>``; a ``\\boxed{}`` inside it wins."""
    if not text:
        return None
    found = _TAG_RE.findall(text)
    if not found:
        return None
    inner = found[-1]
    return last_boxed(inner) or clean_answer(inner)


_PHRASE_RE = re.compile(
    r"(?:final\s+answer\s*(?:is|:)|answer\s*(?:is|:)|answer\s*=)\s*(?:\*\*)?\s*", re.IGNORECASE
)


def answer_phrase(text: str) -> Optional[str]:
    """The rest of the line after the last ``Answer:`` / ``answer is`` / ``final answer is``."""
    if not text:
        return None
    matches = list(_PHRASE_RE.finditer(text))
    for m in reversed(matches):
        rest = text[m.end() :]
        boxed = last_boxed(rest.split("\n\n", 1)[0])
        if boxed is not None:
            return boxed
        got = clean_answer(_first_math_span(rest))
        if got is not None:
            return got
    return None


_SENTENCE_END = re.compile(r"\.\s|\s(?:because|since|which|as|so|and then)\b|;|,\s+(?=[A-Za-z]{3,})")


def _first_math_span(rest: str) -> str:
    """The answer right after an answer phrase: a ``$...$`` / ``\\(...\\)`` span if it starts
    with one, else the rest of the line up to the end of the sentence."""
    rest = rest.lstrip()
    for open_, close in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(open_):
            end = rest.find(close, len(open_))
            if end > 0:
                return rest[len(open_) : end]
    line = rest.split("\n", 1)[0]
    m = _SENTENCE_END.search(line)
    return line[: m.start()] if m else line


# A number: optional sign (not glued to a preceding word, ``)`` or ``]``, so ``x-3`` and
# ``(2)-1`` do not yield ``-3``/``-1``), thousands groups ``1,234,567``, decimals, a fraction
# ``3/4`` and an exponent ``1e-3``.
_NUMBER_RE = re.compile(
    r"(?<![\w)\].])"  # not inside a word/identifier or right after a closing bracket or dot
    r"(?P<sign>[-+\u2212])?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"(?P<exp>[eE][-+]?\d+)?"
    r"(?![\w.]\d)"
)
_NUMBER_RE_NOSIGN = re.compile(
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"
    r"(?P<exp>[eE][-+]?\d+)?"
)


def last_number(text: str) -> Optional[str]:
    """The last number in ``text``, normalized: thousands commas removed, unicode minus -> ``-``.

    Handles ``-3``, ``1,234``, ``3.75``, ``.5``, ``3/4``, ``1e-3``; a sign is kept only when it
    is not glued to a preceding word (``x-3`` gives ``3``).
    """
    if not text:
        return None
    last = None
    for m in _NUMBER_RE.finditer(text):
        last = m
    if last is None:
        # digits glued to letters ("x2"): fall back to the unsigned pattern
        for m in _NUMBER_RE_NOSIGN.finditer(text):
            last = m
        if last is None:
            return None
        sign = ""
    else:
        sign = last.group("sign") or ""
    sign = "-" if sign in ("-", "\u2212") else ""
    num = last.group("num").replace(",", "")
    if num.startswith("."):
        num = "0" + num
    out = sign + num
    if last.group("den"):
        out += "/" + last.group("den")
    if last.group("exp"):
        out += last.group("exp").lower()
    return out


_CHOICE_PATTERNS = [
    re.compile(r"(?i:answer)\s*(?:is|:)?\s*[:\s]*\**\s*\(?([A-J])\)?(?![A-Za-z])"),
    re.compile(r"\\boxed\{\s*\\?(?:text\{)?\s*\(?([A-J])\)?\s*\}?\s*\}"),
    re.compile(r"\(([A-J])\)"),
    re.compile(r"(?:^|\s)([A-J])[.)]?\s*$"),
]


def choice_letter(text: str, letters: str = "ABCDEFGHIJ") -> Optional[str]:
    """Multiple-choice letter: ``answer is (B)``, ``Answer: C``, ``\\boxed{D}``, a final ``(E)``.

    The first pattern family that matches decides; within it the last match wins. The letter
    is returned upper-case; letters outside ``letters`` are ignored.
    """
    if not text:
        return None
    allowed = set(letters.upper())
    for pat in _CHOICE_PATTERNS:
        hits = [m.group(1).upper() for m in pat.finditer(text.strip())]
        hits = [h for h in hits if h in allowed]
        if hits:
            return hits[-1]
    return None


_WRAPPERS = [
    (re.compile(r"^\$+(.*?)\$+$", re.DOTALL), 1),
    (re.compile(r"^\\\((.*)\\\)$", re.DOTALL), 1),
    (re.compile(r"^\\\[(.*)\\\]$", re.DOTALL), 1),
    (re.compile(r"^\*\*(.*)\*\*$", re.DOTALL), 1),
]


def clean_answer(ans: Optional[str]) -> Optional[str]:
    """Strip math delimiters (``$``, ``\\(``, ``\\[``), markdown bold, surrounding spaces and a
    trailing full stop; unwrap one ``\\boxed{}``. Empty results become ``None``."""
    if ans is None:
        return None
    s = ans.strip()
    for _ in range(3):
        before = s
        for rx, grp in _WRAPPERS:
            m = rx.match(s)
            if m:
                s = m.group(grp).strip()
        s = s.rstrip().rstrip(".").rstrip()
        if s.startswith("\\boxed{") and _match_brace(s, len("\\boxed")) == len(s) - 1:
            s = s[len("\\boxed{") : -1].strip()
        if s == before:
            break
    return s or None


def _looks_like_answer(s: str) -> bool:
    """Phrase answers must look mathematical: a digit, a LaTeX command or a math symbol, or a
    single choice letter. This keeps "the answer is unclear" from casting a vote for "unclear"."""
    if re.fullmatch(r"\(?[A-Ja-j]\)?", s.strip()):
        return True
    bare = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}", " ", s)
    words = [w for w in re.findall(r"(?<![\\A-Za-z])[A-Za-z]{3,}", bare) if w.lower() not in _MATH_WORDS]
    if words:
        return False
    return bool(re.search(r"[\d\\=<>^_{}()\[\]/+*|]", s))


_MATH_WORDS = {"sqrt", "sin", "cos", "tan", "log", "exp", "inf", "infty", "frac", "pi", "and", "or"}


def extract_answer(text: Optional[str], mode: str = "auto") -> Optional[str]:
    """Extract one answer from a completion.

    ``mode``:
      * ``"auto"``: last ``\\boxed{}``, else last ``<answer>`` tag, else an ``Answer:`` /
        ``answer is`` phrase that looks mathematical, else the last number;
      * ``"boxed"``, ``"answer_tag"``, ``"phrase"``, ``"last_number"``, ``"choice"``: that
        extractor alone.
    """
    if mode not in EXTRACTORS:
        raise ValueError(f"unknown extractor mode {mode!r}; allowed: {sorted(EXTRACTORS)}")
    if not text:
        return None
    return EXTRACTORS[mode](text)


def _auto(text: str) -> Optional[str]:
    got = last_boxed(text)
    if got is not None:
        return got
    got = answer_tag(text)
    if got is not None:
        return got
    got = answer_phrase(text)
    if got is not None and _looks_like_answer(got):
        return got
    return last_number(text)


EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {
    "auto": _auto,
    "boxed": last_boxed,
    "answer_tag": answer_tag,
    "phrase": answer_phrase,
    "last_number": last_number,
    "choice": choice_letter,
}
