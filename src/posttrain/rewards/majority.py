"""Test-time RL majority-vote reward (TTRL, "TTRL: Test-Time Reinforcement Learning",
arXiv:2504.16084).

For one group of completions of a problem:

1. extract an answer from each completion; completions without an answer do not vote;
2. cluster the answers: first by ``canonical_answer`` key (so ``\\frac12``, ``1/2``, ``0.5``
   share a key), then merge clusters whose representatives ``answers_equivalent`` says are
   equal (symbolic forms such as ``\\sqrt2/2`` and ``\\frac{\\sqrt{2}}{2}``);
3. the pseudo-label is the largest cluster (ties: the cluster seen first). With no answer in
   the whole group there is no label and every reward is 0;
4. reward 1 to each completion in the label's cluster, 0 to the others.

This fixes two pitfalls of the reference implementation: an empty answer can never win the
vote, and equivalent answers pool their votes instead of splitting them.

Metrics (components, one value per completion, same keys for every group so batches stack):
``majority_ratio`` (label votes / group size, broadcast), ``voted`` (1 if the completion had an
answer); with a ground truth (``problem.answer``): ``label_correct`` (label equivalent to the
gold answer, broadcast), ``gt_reward`` (the completion's true 0/1 reward) and
``reward_correct`` (1 if the pseudo-reward equals the true reward). Without ground truth
these three are NaN: average them with a NaN-aware mean. The ground truth is never used in
the reward itself.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.extract import extract_answer
from posttrain.rewards.math import _check_extractor, answers_equivalent, canonical_answer, parse_number
from posttrain.tasks.base import Problem

__all__ = ["MajorityVoteReward", "VoteResult", "majority_vote"]

NAN = float("nan")


class VoteResult:
    """Outcome of one vote: ``label`` (an answer string or None), ``label_key``, ``cluster`` (the
    cluster index of each answer, None for no answer), ``counts`` per cluster, ``winner``."""

    def __init__(self, label, label_key, cluster, counts, winner, keys, notes):
        self.label: Optional[str] = label
        self.label_key: Optional[str] = label_key
        self.cluster: list[Optional[int]] = cluster
        self.counts: list[int] = counts
        self.winner: Optional[int] = winner
        self.keys: list[Optional[str]] = keys
        self.notes: list[str] = notes

    @property
    def majority_count(self) -> int:
        return 0 if self.winner is None else self.counts[self.winner]


def majority_vote(
    answers: Sequence[Optional[str]], tol: float = 1e-6, max_symbolic_pairs: int = 256, timeout_s: int = 5
) -> VoteResult:
    """Cluster extracted ``answers`` (``None`` = no answer) and pick the majority cluster.

    Pairwise symbolic merging is capped at ``max_symbolic_pairs`` ``answers_equivalent`` calls
    per group (numeric keys are merged exactly, without sympy); when the cap is hit, the
    remaining clusters are kept apart and a note says so.
    """
    keys = [canonical_answer(a) if a is not None else None for a in answers]
    distinct: list[str] = []
    rep: dict[str, str] = {}
    for a, k in zip(answers, keys):
        if k is not None and k not in rep:
            rep[k] = a
            distinct.append(k)

    parent = list(range(len(distinct)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    notes: list[str] = []
    numeric = [parse_number(k) for k in distinct]
    pairs = 0
    for j in range(len(distinct)):
        for i in range(j):
            if find(i) == find(j):
                continue
            if numeric[i] is not None and numeric[j] is not None:
                same = abs(numeric[i] - numeric[j]) <= tol
            else:
                if pairs >= max_symbolic_pairs:
                    if not notes:
                        notes.append(f"symbolic merging stopped after {max_symbolic_pairs} comparisons")
                    continue
                pairs += 1
                info: dict[str, Any] = {}
                same = answers_equivalent(rep[distinct[j]], rep[distinct[i]], tol=tol, info=info, timeout_s=timeout_s)
                if "error" in info:
                    notes.append(f"compare {rep[distinct[j]]!r} vs {rep[distinct[i]]!r}: {info['error']}")
            if same:
                parent[find(j)] = find(i)  # the earlier cluster stays the root

    root_of = {k: find(i) for i, k in enumerate(distinct)}
    roots = sorted(set(root_of.values()))  # first-seen order
    index = {r: n for n, r in enumerate(roots)}
    cluster = [index[root_of[k]] if k is not None else None for k in keys]
    counts = [0] * len(roots)
    for c in cluster:
        if c is not None:
            counts[c] += 1
    if not counts:
        return VoteResult(None, None, cluster, counts, None, keys, notes)
    winner = max(range(len(counts)), key=lambda c: (counts[c], -c))  # ties -> first seen
    label_key = distinct[roots[winner]]
    return VoteResult(rep[label_key], label_key, cluster, counts, winner, keys, notes)


class MajorityVoteReward:
    """TTRL majority-vote pseudo-reward (see the module docstring). ``name="majority_vote"``.

    Info per completion: ``answer``, ``key`` (its canonical key), ``label``; the first
    completion's info also carries the group summary ``vote`` (cluster counts, notes).
    """

    name = "majority_vote"

    def __init__(self, extractor: str = "auto", tol: float = 1e-6, max_symbolic_pairs: int = 256, timeout_s: int = 5):
        self.extractor = _check_extractor(extractor)
        self.tol = float(tol)
        self.max_symbolic_pairs = int(max_symbolic_pairs)
        self.timeout_s = int(timeout_s)

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        n = len(completions)
        answers = [extract_answer(c, self.extractor) for c in completions]
        vote = majority_vote(answers, tol=self.tol, max_symbolic_pairs=self.max_symbolic_pairs, timeout_s=self.timeout_s)
        rewards = [1.0 if (vote.winner is not None and c == vote.winner) else 0.0 for c in vote.cluster]
        ratio = vote.majority_count / n if n else 0.0
        components: dict[str, list[float]] = {
            "majority_ratio": [ratio] * n,
            "voted": [0.0 if a is None else 1.0 for a in answers],
        }
        infos: list[dict[str, Any]] = [
            {"answer": a, "key": k, "label": vote.label} for a, k in zip(answers, vote.keys)
        ]
        if problem.answer is not None:
            gold = problem.answer
            truth: dict[Optional[str], float] = {None: 0.0}  # per canonical key: one check each

            def true_reward(answer: Optional[str], key: Optional[str]) -> float:
                if key not in truth:
                    truth[key] = 1.0 if answers_equivalent(answer, gold, tol=self.tol, timeout_s=self.timeout_s) else 0.0
                return truth[key]

            gt = [true_reward(a, k) for a, k in zip(answers, vote.keys)]
            label_ok = true_reward(vote.label, vote.label_key) if vote.winner is not None else 0.0
            components["label_correct"] = [label_ok] * n
            components["gt_reward"] = gt
            components["reward_correct"] = [1.0 if r == t else 0.0 for r, t in zip(rewards, gt)]
        else:
            for k in ("label_correct", "gt_reward", "reward_correct"):
                components[k] = [NAN] * n
        if n:
            infos[0]["vote"] = {
                "counts": vote.counts,
                "label_key": vote.label_key,
                "majority_count": vote.majority_count,
                "notes": vote.notes,
            }
        return RewardOutput(rewards=rewards, components=components, info=infos)

