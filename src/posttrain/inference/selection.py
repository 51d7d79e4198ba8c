"""Test-time scaling: pick one answer out of N sampled completions.

Three selection rules over the N completions of one problem:

* **majority vote** (self-consistency, Wang et al. 2022, arXiv:2203.11171): the answer given
  most often wins. ``majority_vote(answers)``;
* **weighted majority vote**: each completion votes with a non-negative weight (e.g. its
  self-certainty or its mean token probability) and the answer with the largest total weight
  wins: ``argmax_a sum_i w_i [a_i = a]``. ``weighted_majority_vote(answers, weights)``;
* **best-of-N**: keep the completion with the highest score ``argmax_i s_i``.
  ``best_of_n_index(scores)`` / ``select_best_of_n(candidates, scores)``.

Scores come from :mod:`posttrain.inference.scorers` (self-certainty, mean log-prob, any
reward model).

Answer matching. With ``equivalence=True`` (default) answers are clustered the way the TTRL
majority-vote reward does it (:func:`posttrain.rewards.majority.majority_vote`): by canonical
key first (``1/2``, ``0.5`` and ``\\frac12`` share a key), then symbolic equivalence; the
returned answer is the first-seen member of the winning cluster. With ``equivalence=False``
answers must be equal as Python values (any hashable works), via
:func:`posttrain.evaluation.metrics.weighted_majority`.

Conventions (shared with :mod:`posttrain.evaluation.metrics`): ``None`` and blank strings are
abstentions and never win; with no vote at all the result is ``None``; ties go to the answer
(cluster) seen first.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, TypeVar

from posttrain.evaluation import metrics as _metrics
from posttrain.rewards import majority as _majority

__all__ = [
    "answer_clusters",
    "best_of_n_index",
    "majority_vote",
    "select_best_of_n",
    "weighted_majority_vote",
]

T = TypeVar("T")


def _as_text(a: Any) -> Optional[str]:
    if _metrics.is_abstention(a):
        return None
    return a if isinstance(a, str) else str(a)


def answer_clusters(answers: Sequence[Any]) -> list[Optional[int]]:
    """Cluster index of each answer (``None`` for an abstention), numbered in first-seen order.

    Equivalent answers share a cluster (canonical key, then symbolic equivalence; see
    :func:`posttrain.rewards.majority.majority_vote`).
    """
    return list(_majority.majority_vote([_as_text(a) for a in answers]).cluster)


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"{n} answers but {len(w)} weights")
    bad = [i for i, x in enumerate(w) if not math.isfinite(x) or x < 0]
    if bad:
        raise ValueError(
            f"vote weights must be finite and >= 0; got {[w[i] for i in bad[:5]]} at {bad[:5]} "
            "(map log-probabilities through exp, or use rank (Borda) weights)"
        )
    return w


def weighted_majority_vote(
    answers: Sequence[Any], weights: Optional[Sequence[float]] = None, *, equivalence: bool = True
) -> Optional[Any]:
    """The answer with the largest total weight ``sum_i w_i [a_i = a]``; ``None`` if every
    completion abstained.

    ``weights`` must be finite and non-negative (``None``: all 1, i.e. plain majority vote).
    Ties go to the answer seen first. See the module docstring for ``equivalence``.

    >>> weighted_majority_vote(["1", "2", "2"], [3.0, 1.0, 1.0])
    '1'
    >>> weighted_majority_vote(["0.5", "1/2", "3"], [1.0, 1.0, 1.5])
    '0.5'
    """
    w = _check_weights(weights if weights is not None else [1.0] * len(answers), len(answers))
    if not equivalence:
        return _metrics.weighted_majority(list(answers), w)
    cluster = answer_clusters(answers)
    winner = _metrics.weighted_majority(cluster, w)
    if winner is None:
        return None
    return answers[cluster.index(winner)]


def majority_vote(answers: Sequence[Any], *, equivalence: bool = True) -> Optional[Any]:
    """The most frequent answer (self-consistency); ``None`` if every completion abstained.
    Ties go to the answer seen first.

    >>> majority_vote(["3", None, "4", "4", "3", "4"])
    '4'
    """
    if not equivalence:
        return _metrics.majority_vote(list(answers))
    return weighted_majority_vote(answers, None, equivalence=True)


def best_of_n_index(scores: Sequence[float]) -> int:
    """Index of the highest score (best-of-N selection); the first one on ties.

    >>> best_of_n_index([0.1, 0.7, 0.7, 0.2])
    1
    """
    s = [float(x) for x in scores]
    if not s:
        raise ValueError("best-of-N needs at least one score")
    if any(math.isnan(x) for x in s):
        raise ValueError("best-of-N scores must not be NaN")
    best = 0
    for i, x in enumerate(s):
        if x > s[best]:
            best = i
    return best


def select_best_of_n(candidates: Sequence[T], scores: Sequence[float]) -> T:
    """The candidate with the highest score (the first one on ties)."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    return candidates[best_of_n_index(scores)]
