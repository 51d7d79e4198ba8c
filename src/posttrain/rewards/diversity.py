"""DARLING: a group's quality reward multiplied by each completion's semantic distinctness.

"Jointly Reinforcing Diversity and Quality in Language Model Generations" (arXiv:2509.02534,
catalog 002-69). For a group of G completions y_1..y_G of one prompt with quality rewards q_i:

    d(i, j) = 1 if y_i and y_j fall in different equivalence classes, else 0
    Div_i   = 1/(G-1) * sum_{j != i} d(i, j)                     (in [0, 1]; G = 1: Div = 1)
    r_i     = q_i * Norm(Div)_i,   Norm(Div)_i = Div_i / max_j Div_j   (all Div = 0: Norm = 1)

The product (not a sum) is the paper's fusion: a completion is rewarded only when it is both
good and different, and a wrong completion gains nothing from being unusual. In YAML::

    reward: {type: darling, reward: {type: numeric}, diversity: answer}

**How this differs from the paper.** The paper's equivalence classes come from a learned
semantic-equivalence classifier (a fine-tuned model served at training time). posttrain has no
network or model hub at run time, so the classes here come from a deterministic stand-in,
chosen by ``diversity``:

* ``"answer"`` (default, for verifiable tasks): two completions are equivalent when their
  extracted final answers cluster together under the majority vote's canonicaliser
  (``posttrain.rewards.majority.majority_vote``: "1/2", "0.5" and "\\frac{1}{2}" agree). A
  completion without an answer is equivalent to no other. This sees *what* was answered, not
  *how* it was reasoned: two different derivations of the same answer count as equal, so all
  correct completions of a problem share one class and a correct one's Div is the fraction of
  the group that answered otherwise (a rarity weight on correctness, much coarser than the
  paper's classifier, which can tell correct solutions apart).
* ``"ngram"`` (for free text): equivalent when the Jaccard similarity of their sets of
  lower-cased word ``ngram_n``-grams is >= ``similarity_threshold`` (a text shorter than n words
  is one n-gram of all its words; two empty texts are equivalent). This is lexical, which is
  exactly the surface-level signal the paper's classifier was trained to see past.

The norm, too, is ours (the material available names Norm without fixing it): division by the
group's largest Div keeps the most distinct completion's full quality; a group of identical
completions (all Div = 0) keeps its plain quality rather than zero, since there is nothing to
tell apart. Quality must be >= 0 (a negative quality times a small diversity would reward
sameness); a clear error says so.

Components: the inner reward's components, ``quality`` (q_i), ``diversity`` (Div_i),
``diversity_norm`` (Norm(Div)_i) and ``classes`` (the group's number of equivalence classes,
broadcast; exact for ``answer``, for ``ngram`` the number of connected components of the
pairwise "equivalent" graph).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from posttrain.rewards.base import Reward, RewardOutput, problem_issue
from posttrain.rewards.extract import extract_answer
from posttrain.rewards.majority import majority_vote
from posttrain.rewards.math import _check_extractor
from posttrain.tasks.base import Problem

__all__ = ["DarlingReward", "answer_equivalence", "darling_rewards", "ngram_equivalence"]

DIVERSITY_MODES = ("answer", "ngram")


def answer_equivalence(answers: Sequence[Optional[str]], **vote_kwargs: Any) -> list[list[bool]]:
    """same[i][j]: answers i and j share a majority-vote cluster; a missing answer matches none."""
    cluster = majority_vote(answers, **vote_kwargs).cluster
    n = len(answers)
    return [[i == j or (cluster[i] is not None and cluster[i] == cluster[j]) for j in range(n)] for i in range(n)]


def _ngrams(text: str, n: int) -> frozenset:
    words = text.lower().split()
    if len(words) < n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[k:k + n]) for k in range(len(words) - n + 1))


def ngram_equivalence(texts: Sequence[str], n: int = 2, threshold: float = 0.5) -> list[list[bool]]:
    """same[i][j]: Jaccard(ngrams_i, ngrams_j) >= threshold (two empty texts: Jaccard 1)."""
    grams = [_ngrams(t, n) for t in texts]
    size = len(texts)
    same = [[True] * size for _ in range(size)]
    for i in range(size):
        for j in range(i + 1, size):
            union = grams[i] | grams[j]
            jac = 1.0 if not union else len(grams[i] & grams[j]) / len(union)
            same[i][j] = same[j][i] = jac >= threshold
    return same


def _count_classes(same: list[list[bool]]) -> int:
    seen: set[int] = set()
    classes = 0
    for start in range(len(same)):
        if start in seen:
            continue
        classes += 1
        stack = [start]
        seen.add(start)
        while stack:
            i = stack.pop()
            for j, eq in enumerate(same[i]):
                if eq and j not in seen:
                    seen.add(j)
                    stack.append(j)
    return classes


def darling_rewards(quality: Sequence[float], same: list[list[bool]]) -> tuple[list[float], list[float], list[float]]:
    """(r_i = q_i * Norm(Div)_i, Div_i, Norm(Div)_i) for one group; see the module docstring."""
    g = len(quality)
    if g == 1:
        div = [1.0]
    else:
        div = [sum(1.0 for j in range(g) if j != i and not same[i][j]) / (g - 1) for i in range(g)]
    top = max(div) if div else 0.0
    norm = [d / top for d in div] if top > 0 else [1.0] * g
    return [q * m for q, m in zip(quality, norm)], div, norm


class DarlingReward:
    """DARLING diversity x quality reward (see the module docstring). ``name="darling"``.

    ``reward``: the quality reward, a spec dict (built with ``build_reward``) or a Reward; its
    values must be >= 0. ``diversity``: ``"answer"`` (default) or ``"ngram"``. ``extractor``:
    how answers are extracted in ``answer`` mode (as for ``numeric``). ``ngram_n`` (default 2)
    and ``similarity_threshold`` (default 0.5) set the ``ngram`` mode.
    """

    name = "darling"

    def __init__(self, reward: Any, diversity: str = "answer", extractor: str = "auto", ngram_n: int = 2,
                 similarity_threshold: float = 0.5, tokenizer: Optional[Any] = None):
        if diversity not in DIVERSITY_MODES:
            raise ValueError(f"reward darling: diversity must be one of {list(DIVERSITY_MODES)} (equal canonical "
                             f"answers, or word n-gram overlap of the texts), got {diversity!r}")
        if isinstance(ngram_n, bool) or not isinstance(ngram_n, int) or ngram_n < 1:
            raise ValueError(f"reward darling: ngram_n must be an integer >= 1 (words per n-gram), got {ngram_n!r}")
        if (isinstance(similarity_threshold, bool) or not isinstance(similarity_threshold, (int, float))
                or not 0.0 < float(similarity_threshold) <= 1.0):
            raise ValueError("reward darling: similarity_threshold must be a number in (0, 1] (the Jaccard "
                             f"overlap at which two texts count as the same), got {similarity_threshold!r}")
        if isinstance(reward, dict):
            if reward.get("type") == "darling":
                raise ValueError("reward darling: the quality reward cannot itself be darling")
            from posttrain.rewards.registry import build_reward  # the registry imports this module

            reward = build_reward(reward, tokenizer=tokenizer)
        elif not callable(reward) or not hasattr(reward, "name"):
            raise ValueError(f"reward darling: 'reward' must be the quality reward's spec, such as {{type: numeric}}, "
                             f"got {reward!r}")
        self.inner: Reward = reward
        self.diversity = diversity
        self.extractor = _check_extractor(extractor)
        self.ngram_n = ngram_n
        self.similarity_threshold = float(similarity_threshold)

    def equivalence(self, completions: Sequence[str]) -> list[list[bool]]:
        if self.diversity == "answer":
            return answer_equivalence([extract_answer(c, self.extractor) for c in completions])
        return ngram_equivalence(completions, self.ngram_n, self.similarity_threshold)

    def check_problem(self, problem: Problem) -> Optional[str]:
        return problem_issue(self.inner, problem)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        out = self.inner(problem, completions)
        quality = [float(r) for r in out.rewards]
        for i, q in enumerate(quality):
            if not (math.isfinite(q) and q >= 0):
                raise ValueError(
                    f"reward darling: the quality reward {self.inner.name!r} gave {q} to completion {i} of problem "
                    f"{problem.id!r}; DARLING multiplies quality by diversity, so quality must be finite and >= 0 "
                    "(a negative one would be rewarded for being like the others). Use a 0/1 verifier or a "
                    "non-negative score")
        same = self.equivalence(completions)
        rewards, div, norm = darling_rewards(quality, same)
        n = len(completions)
        components = {k: list(v) for k, v in out.components.items()}
        components["quality"] = quality
        components["diversity"] = div
        components["diversity_norm"] = norm
        components["classes"] = [float(_count_classes(same))] * n
        return RewardOutput(rewards=rewards, components=components, info=out.info)
