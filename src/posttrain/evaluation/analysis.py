"""Training-dynamics diagnostics.

* Output-format share tracking, the key diagnostic of "Echo Chamber: RL Post-training Amplifies
  Behaviors Learned in Pretraining": RL tends to collapse onto one output format inherited from
  pretraining, visible as one format's share going to ~1 over training steps.
* The accuracy-convergence law of multi-round self-correction (arXiv:2508.16456),
  ``Acc_t = Upp - alpha^t (Upp - Acc_0)``, fitted from a single round of transitions.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Pattern, Sequence

import numpy as np

__all__ = [
    "classify_format",
    "format_shares",
    "FormatShareTracker",
    "SelfCorrectionFit",
    "fit_self_correction",
    "fit_self_correction_from_counts",
]


# ---------------------------------------------------------------------------------------------
# format shares
# ---------------------------------------------------------------------------------------------


def _compile(classifiers: Mapping[str, str | Pattern[str]]) -> dict[str, Pattern[str]]:
    out = {}
    for name, rx in classifiers.items():
        out[name] = rx if isinstance(rx, re.Pattern) else re.compile(rx, re.MULTILINE)
    return out


def classify_format(text: str, classifiers: Mapping[str, str | Pattern[str]], other: str = "other") -> str:
    """Name of the first classifier (in mapping order) whose regex ``search``-matches ``text``,
    else ``other``. String patterns are compiled with ``re.MULTILINE``."""
    for name, rx in _compile(classifiers).items():
        if rx.search(text):
            return name
    return other


def format_shares(
    texts: Sequence[str],
    classifiers: Mapping[str, str | Pattern[str]],
    *,
    other: str = "other",
) -> dict[str, float]:
    """Share of ``texts`` in each output format.

    Each text is assigned to exactly one format: the first classifier in mapping order whose
    regex matches (so put more specific patterns first); texts matching none go to ``other``.
    The shares (classifiers in order, then ``other``) sum to 1. With no texts every share is NaN.
    """
    if other in classifiers:
        raise ValueError(f"classifier name {other!r} collides with the catch-all bucket name")
    compiled = _compile(classifiers)
    counts = {name: 0 for name in compiled}
    counts[other] = 0
    for text in texts:
        for name, rx in compiled.items():
            if rx.search(text):
                counts[name] += 1
                break
        else:
            counts[other] += 1
    n = len(texts)
    return {name: (c / n if n else math.nan) for name, c in counts.items()}


@dataclass
class FormatShareTracker:
    """Tracks :func:`format_shares` over training steps.

    >>> tr = FormatShareTracker({"code": r"```python", "boxed": r"boxed"})
    >>> tr.update(0, ["```python print(1)```", "the answer is boxed"])["code"]
    0.5
    """

    classifiers: Mapping[str, str | Pattern[str]]
    other: str = "other"
    steps: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    def update(self, step: int, texts: Sequence[str]) -> dict[str, float]:
        shares = format_shares(texts, self.classifiers, other=self.other)
        self.steps.append(int(step))
        self.history.append(shares)
        return shares

    @property
    def names(self) -> list[str]:
        return [*self.classifiers, self.other]

    def as_arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(steps, {format: shares over steps})``."""
        return np.asarray(self.steps), {n: np.array([h[n] for h in self.history]) for n in self.names}

    def dominant(self) -> tuple[str, float] | None:
        """The format with the largest share at the latest step, and that share."""
        if not self.history:
            return None
        last = self.history[-1]
        name = max(self.names, key=lambda n: (-math.inf if math.isnan(last[n]) else last[n]))
        return name, last[name]

    def metrics(self, prefix: str = "format") -> dict[str, float]:
        """Latest shares as flat ``{"format/<name>": share}`` for a metrics logger."""
        if not self.history:
            return {}
        return {f"{prefix}/{n}": v for n, v in self.history[-1].items()}


# ---------------------------------------------------------------------------------------------
# self-correction accuracy-convergence law
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCorrectionFit:
    """Two-state Markov model of repeated self-correction fitted from one round.

    ``p_cc = P(correct -> correct)``, ``p_wc = P(wrong -> correct)``, ``alpha = p_cc - p_wc``
    and the fixed point ``upp = p_wc / (1 - p_cc + p_wc)``. Then
    ``Acc_t = upp - alpha**t (upp - acc0)``, so ``predict(1)`` reproduces the observed
    accuracy after the fitted round. Probabilities that cannot be estimated (no correct, or no
    wrong, problem before the round) are NaN. When ``p_cc == 1`` and ``p_wc == 0`` nothing ever
    changes: ``upp`` is set to ``acc0`` (and ``alpha == 1``).
    """

    p_cc: float
    p_wc: float
    acc0: float
    acc1: float
    n: int

    @property
    def alpha(self) -> float:
        return self.p_cc - self.p_wc

    @property
    def upp(self) -> float:
        denom = 1.0 - self.p_cc + self.p_wc
        if math.isnan(denom):
            return math.nan
        if denom == 0.0:
            return self.acc0
        return self.p_wc / denom

    def predict(self, t):
        """Predicted accuracy after ``t`` rounds (scalar or array of non-negative ints)."""
        t_arr = np.asarray(t, dtype=np.float64)
        out = self.upp - np.power(self.alpha, t_arr) * (self.upp - self.acc0)
        out = np.where(t_arr == 0, self.acc0, out)  # Acc_0 is observed, even if alpha is NaN
        return float(out) if out.ndim == 0 else out

    def as_dict(self) -> dict[str, float]:
        return {
            "p_cc": self.p_cc,
            "p_wc": self.p_wc,
            "alpha": self.alpha,
            "upp": self.upp,
            "acc0": self.acc0,
            "acc1": self.acc1,
            "n": self.n,
        }


def fit_self_correction_from_counts(n_cc: int, n_cw: int, n_wc: int, n_ww: int) -> SelfCorrectionFit:
    """Fit from transition counts of one round: ``n_cc`` correct->correct, ``n_cw``
    correct->wrong, ``n_wc`` wrong->correct, ``n_ww`` wrong->wrong."""
    counts = (n_cc, n_cw, n_wc, n_ww)
    if any(c < 0 for c in counts):
        raise ValueError(f"transition counts must be non-negative, got {counts}")
    n = sum(counts)
    if n == 0:
        raise ValueError("no problems")
    n_c, n_w = n_cc + n_cw, n_wc + n_ww
    p_cc = n_cc / n_c if n_c else math.nan
    p_wc = n_wc / n_w if n_w else math.nan
    return SelfCorrectionFit(p_cc=p_cc, p_wc=p_wc, acc0=n_c / n, acc1=(n_cc + n_wc) / n, n=n)


def fit_self_correction(correct_before: Sequence[bool], correct_after: Sequence[bool]) -> SelfCorrectionFit:
    """Fit from per-problem correctness before and after one round of self-correction."""
    b = np.asarray(correct_before, dtype=bool).reshape(-1)
    a = np.asarray(correct_after, dtype=bool).reshape(-1)
    if b.size != a.size:
        raise ValueError(f"{b.size} 'before' flags but {a.size} 'after' flags")
    return fit_self_correction_from_counts(
        int((b & a).sum()), int((b & ~a).sum()), int((~b & a).sum()), int((~b & ~a).sum())
    )
