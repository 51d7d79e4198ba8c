"""Sampling-based evaluation metrics: pass@k, maj@k, best-of-N, diversity, cost, scaling curves.

Conventions used throughout this module:

* A *problem* has ``n`` sampled completions. Per problem we get a list of extracted answers
  (hashable values; ``None`` or a blank string means "no answer", an abstention) and/or a list
  of per-sample correctness flags.
* Every estimate is averaged over problems with equal weight per problem.
* Randomness only ever comes from ``numpy.random.default_rng(seed)``; no global RNG state is
  read or written, so a fixed seed always gives the same number.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

__all__ = [
    "pass_at_k",
    "pass_at_k_table",
    "is_abstention",
    "majority_vote",
    "weighted_majority",
    "correct_fn_from_flags",
    "maj_at_k",
    "mean_at_k",
    "best_of_n",
    "distinct_answers",
    "answer_entropy",
    "answer_diversity",
    "cost_of_pass",
    "accuracy_by_difficulty",
    "scaling_curve",
]

Truth = Callable[[int, Any], bool] | Sequence[Any]


# ---------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------


def _check_nck(n: int, c: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"pass@k needs n >= 1 samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"number of correct samples c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, n={n}]: pass@k cannot be estimated from fewer than k samples")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021).

    ``n`` samples were drawn for a problem, ``c`` of them are correct; the result is the
    probability that a uniformly random subset of ``k`` of the ``n`` samples holds at least one
    correct sample. It is evaluated as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms a
    huge binomial coefficient. Boundary cases are exact: ``c == 0`` gives 0.0, and
    ``n - c < k`` (every k-subset must contain a correct sample; includes ``k == n`` with
    ``c > 0``) gives 1.0.
    """
    n, c, k = int(n), int(c), int(k)
    _check_nck(n, c, k)
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def _pass_at_k_vector(ns: np.ndarray, cs: np.ndarray, k: int) -> np.ndarray:
    """pass@k for many problems at once via prefix sums of log(1 - k/i)."""
    out = np.empty(ns.shape, dtype=np.float64)
    zero = cs == 0
    one = (ns - cs < k) & ~zero
    mid = ~(zero | one)
    out[zero] = 0.0
    out[one] = 1.0
    if mid.any():
        n_max = int(ns[mid].max())
        # logs[i] = log(1 - k/i) for i in (k, n_max]; only indices > k are ever used because
        # in the "mid" case n - c >= k, so the product runs over i >= k + 1.
        i = np.arange(n_max + 1, dtype=np.float64)
        logs = np.zeros(n_max + 1)
        logs[k + 1 :] = np.log1p(-k / i[k + 1 :])
        prefix = np.cumsum(logs)
        log_prod = prefix[ns[mid]] - prefix[ns[mid] - cs[mid]]
        out[mid] = -np.expm1(log_prod)
    return out


def pass_at_k_table(ns: Sequence[int] | int, cs: Sequence[int], ks: Iterable[int]) -> dict[int, float]:
    """Mean unbiased pass@k over problems, for each ``k`` in ``ks``.

    ``ns`` (samples per problem; a single int means the same n for every problem) and ``cs``
    (correct samples per problem) are aligned per problem. Every problem must have ``n >= k``;
    otherwise a ``ValueError`` is raised rather than silently dropping problems.
    """
    cs_arr = np.asarray(cs, dtype=np.int64).reshape(-1)
    ns_arr = np.broadcast_to(np.asarray(ns, dtype=np.int64), cs_arr.shape).reshape(-1)
    if cs_arr.size == 0:
        raise ValueError("pass_at_k_table needs at least one problem")
    if (ns_arr < 1).any() or (cs_arr < 0).any() or (cs_arr > ns_arr).any():
        raise ValueError("every problem needs n >= 1 and 0 <= c <= n")
    table: dict[int, float] = {}
    for k in ks:
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if (ns_arr < k).any():
            bad = int(np.argmax(ns_arr < k))
            raise ValueError(f"problem {bad} has n={int(ns_arr[bad])} < k={k} samples")
        table[k] = float(_pass_at_k_vector(ns_arr, cs_arr, k).mean())
    return table


# ---------------------------------------------------------------------------------------------
# voting
# ---------------------------------------------------------------------------------------------


def is_abstention(answer: Any) -> bool:
    """``None``, NaN and blank strings are abstentions: they are never counted as a vote."""
    if answer is None:
        return True
    if isinstance(answer, str):
        return answer.strip() == ""
    if isinstance(answer, float) and math.isnan(answer):
        return True
    return False


def weighted_majority(answers: Sequence[Hashable], weights: Sequence[float] | None = None) -> Hashable | None:
    """The answer with the largest total weight; ``None`` if every sample abstained.

    Abstentions (see :func:`is_abstention`) carry no vote. Ties are broken deterministically:
    among the answers tied for the largest total, the one that occurs *first* in ``answers``
    wins. With ``weights=None`` this is plain majority voting.
    """
    if weights is None:
        weights = [1.0] * len(answers)
    if len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    totals: dict[Hashable, float] = {}
    for a, w in zip(answers, weights):
        if is_abstention(a):
            continue
        totals[a] = totals.get(a, 0.0) + float(w)  # dict keeps first-occurrence order
    if not totals:
        return None
    best, best_w = None, -math.inf
    for a, w in totals.items():
        if w > best_w:  # strict: the earlier answer keeps a tie
            best, best_w = a, w
    return best


def majority_vote(answers: Sequence[Hashable]) -> Hashable | None:
    """Unweighted majority vote with the tie rule of :func:`weighted_majority`."""
    return weighted_majority(answers, None)


def _make_judge(truth: Truth, num_problems: int) -> Callable[[int, Any], bool]:
    if callable(truth):
        fn = truth

        def judge(i: int, a: Any) -> bool:
            return (not is_abstention(a)) and bool(fn(i, a))

        return judge
    labels = list(truth)
    if len(labels) != num_problems:
        raise ValueError(f"{num_problems} problems but {len(labels)} labels")

    def judge_label(i: int, a: Any) -> bool:
        return (not is_abstention(a)) and a == labels[i]

    return judge_label


def correct_fn_from_flags(
    answers_per_problem: Sequence[Sequence[Hashable]], flags_per_problem: Sequence[Sequence[bool]]
) -> Callable[[int, Any], bool]:
    """Build a ``correct_fn(problem_index, answer)`` from per-sample correctness flags.

    Useful when a grader (not string equality) decided correctness: an answer counts as correct
    for problem ``i`` if any sample of problem ``i`` carrying that answer was graded correct.
    """
    table: list[set] = []
    for answers, flags in zip(answers_per_problem, flags_per_problem, strict=True):
        if len(answers) != len(flags):
            raise ValueError("answers and flags must have the same length per problem")
        table.append({a for a, f in zip(answers, flags) if f and not is_abstention(a)})
    return lambda i, a: a in table[i]


def _k_subsets(n: int, k: int, num_resamples: int, rng: np.random.Generator | None) -> np.ndarray:
    """Index subsets (rows, each sorted ascending) over which maj@k / best-of-k is averaged."""
    total = math.comb(n, k)
    if total <= num_resamples:
        import itertools

        return np.array(list(itertools.combinations(range(n), k)), dtype=np.int64).reshape(total, k)
    assert rng is not None
    perms = rng.permuted(np.tile(np.arange(n), (num_resamples, 1)), axis=1)
    return np.sort(perms[:, :k], axis=1)


def maj_at_k(
    answers_per_problem: Sequence[Sequence[Hashable]],
    truth: Truth,
    k: int,
    *,
    num_resamples: int = 256,
    seed: int = 0,
    weights_per_problem: Sequence[Sequence[float]] | None = None,
) -> float:
    """maj@k: accuracy of the majority-voted answer among ``k`` samples, averaged over problems.

    ``truth`` is either a sequence of gold labels (an answer is correct iff it equals the label)
    or a callable ``correct_fn(problem_index, answer) -> bool`` (see
    :func:`correct_fn_from_flags` for per-sample grader flags).

    Estimator: for each problem with ``n`` samples the expectation over uniformly random
    k-subsets is computed **exactly** by enumerating all ``C(n, k)`` subsets when that number is
    at most ``num_resamples`` (this always covers ``k == n``, where it is just the vote over all
    samples), and otherwise estimated by averaging over ``num_resamples`` random k-subsets drawn
    with ``numpy.random.default_rng(seed)``.

    Voting: abstentions (``None``/blank) never win; if every sample in a subset abstains the
    subset scores 0. Ties are broken deterministically in favour of the tied answer whose first
    occurrence has the smallest sample index (subsets keep the original sample order).

    Weighted majority@k: with ``weights_per_problem`` (one non-negative weight per sample) each
    sample votes with its weight (:func:`weighted_majority`); same subsets and tie rule.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(answers_per_problem) == 0:
        raise ValueError("maj_at_k needs at least one problem")
    if weights_per_problem is not None and len(weights_per_problem) != len(answers_per_problem):
        raise ValueError(f"{len(answers_per_problem)} problems but {len(weights_per_problem)} weight lists")
    judge = _make_judge(truth, len(answers_per_problem))
    rng = np.random.default_rng(seed)
    per_problem = []
    for i, answers in enumerate(answers_per_problem):
        answers = list(answers)
        weights = None if weights_per_problem is None else weights_per_problem[i]
        n = len(answers)
        if n < k:
            raise ValueError(f"problem {i} has n={n} < k={k} samples")
        verdict: dict[Any, bool] = {}
        hits = 0
        subsets = _k_subsets(n, k, num_resamples, rng)
        for row in subsets:
            picked = [answers[j] for j in row]
            winner = majority_vote(picked) if weights is None else weighted_majority(picked, [weights[j] for j in row])
            if winner is None:
                continue
            if winner not in verdict:
                verdict[winner] = judge(i, winner)
            hits += verdict[winner]
        per_problem.append(hits / len(subsets))
    return float(np.mean(per_problem))


def mean_at_k(correct_per_problem: Sequence[Sequence[bool | float]], k: int | None = None) -> float:
    """mean@k (a.k.a. avg@k): per-problem mean correctness of the first ``k`` samples
    (all samples when ``k`` is None), averaged over problems. Its expectation is pass@1."""
    vals = []
    for i, flags in enumerate(correct_per_problem):
        flags = np.asarray(flags, dtype=np.float64).reshape(-1)
        if k is not None:
            if flags.size < k:
                raise ValueError(f"problem {i} has {flags.size} < k={k} samples")
            flags = flags[:k]
        if flags.size == 0:
            raise ValueError(f"problem {i} has no samples")
        vals.append(flags.mean())
    if not vals:
        raise ValueError("mean_at_k needs at least one problem")
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------
# best-of-N
# ---------------------------------------------------------------------------------------------


def _ratio(a: int, b: int) -> float:
    return float(Fraction(a, b))


def _best_of_k_one(scores: np.ndarray, correct: np.ndarray, k: int) -> float:
    n = scores.size
    total = math.comb(n, k)
    order = np.argsort(scores, kind="stable")
    s, c = scores[order], correct[order]
    uniq, start, counts = np.unique(s, return_index=True, return_counts=True)
    acc = 0.0
    for g in range(uniq.size):
        below = int(start[g])  # samples with a strictly lower score
        n_g = int(counts[g])
        c_g = float(c[start[g] : start[g] + n_g].mean())
        if c_g == 0.0:
            continue
        # P(max-score group of a random k-subset is group g)
        p = _ratio(math.comb(below + n_g, k) - math.comb(below, k), total)
        acc += c_g * p
    return acc


def best_of_n(
    scores_per_problem: Sequence[Sequence[float]],
    correct_per_problem: Sequence[Sequence[bool | float]],
    k: int,
) -> float:
    """Expected accuracy of best-of-k selection: draw a uniformly random k-subset of a problem's
    ``n`` samples, keep the sample with the highest score (e.g. a reward-model score), and check
    it. Averaged over problems.

    The expectation is computed **exactly** (no sampling, hence no seed): grouping samples by
    distinct score, the max of a random k-subset falls in the group with score ``v`` with
    probability ``[C(L+m, k) - C(L, k)] / C(n, k)`` where ``L`` samples score below ``v`` and
    ``m`` score exactly ``v``. Ties for the maximum are broken uniformly at random, so a tied
    group contributes its mean correctness. NaN scores are not allowed.
    """
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vals = []
    for i, (sc, co) in enumerate(zip(scores_per_problem, correct_per_problem, strict=True)):
        sc = np.asarray(sc, dtype=np.float64).reshape(-1)
        co = np.asarray(co, dtype=np.float64).reshape(-1)
        if sc.size != co.size:
            raise ValueError(f"problem {i}: {sc.size} scores but {co.size} correctness flags")
        if np.isnan(sc).any():
            raise ValueError(f"problem {i}: NaN scores")
        if sc.size < k:
            raise ValueError(f"problem {i} has n={sc.size} < k={k} samples")
        vals.append(_best_of_k_one(sc, co, k))
    if not vals:
        raise ValueError("best_of_n needs at least one problem")
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------
# diversity and cost
# ---------------------------------------------------------------------------------------------


def distinct_answers(answers: Sequence[Hashable]) -> int:
    """Number of distinct non-abstaining answers."""
    return len({a for a in answers if not is_abstention(a)})


def answer_entropy(answers: Sequence[Hashable]) -> float:
    """Shannon entropy (nats) of the empirical distribution of non-abstaining answers
    (0.0 when there is at most one distinct answer or none at all)."""
    counts = np.array(list(Counter(a for a in answers if not is_abstention(a)).values()), dtype=np.float64)
    if counts.size <= 1:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def answer_diversity(answers_per_problem: Sequence[Sequence[Hashable]]) -> dict[str, float]:
    """Per-problem diversity averaged over problems: mean distinct answers, mean answer entropy
    (nats) and the fraction of samples that abstained."""
    if len(answers_per_problem) == 0:
        raise ValueError("answer_diversity needs at least one problem")
    distinct = [distinct_answers(a) for a in answers_per_problem]
    ent = [answer_entropy(a) for a in answers_per_problem]
    n_samples = sum(len(a) for a in answers_per_problem)
    n_abst = sum(is_abstention(x) for a in answers_per_problem for x in a)
    return {
        "distinct_answers": float(np.mean(distinct)),
        "answer_entropy": float(np.mean(ent)),
        "abstain_frac": n_abst / n_samples if n_samples else 0.0,
    }


def cost_of_pass(tokens: Sequence[float] | np.ndarray, correct: Sequence[bool | float] | np.ndarray) -> float:
    """Expected generated tokens per correct answer: ``mean(tokens) / mean(correct)`` over all
    samples (flattened). ``inf`` when nothing is correct."""
    t = np.asarray(tokens, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    if t.size == 0 or t.size != c.size:
        raise ValueError(f"need equally many (>0) token counts and correctness flags, got {t.size} and {c.size}")
    acc = c.mean()
    if acc <= 0:
        return math.inf
    return float(t.mean() / acc)


def accuracy_by_difficulty(
    correct: Sequence[float | bool],
    difficulty: Sequence[Any],
    bins: Sequence[float] | None = None,
) -> dict[str, dict[str, float]]:
    """Accuracy per difficulty bucket.

    ``correct`` holds one number per problem (a 0/1 flag or a per-problem accuracy). With
    ``bins=None``, ``difficulty`` values are used as categorical bucket labels (sorted); with
    ``bins`` (increasing edges) numeric difficulties are bucketed into ``[b_i, b_{i+1})`` (the
    last bucket is closed) and values outside the edges are dropped. Returns
    ``{label: {"accuracy": ..., "n": ...}}``.
    """
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    if len(difficulty) != c.size:
        raise ValueError(f"{c.size} correctness values but {len(difficulty)} difficulties")
    out: dict[str, dict[str, float]] = {}
    if bins is None:
        groups: dict[Any, list[float]] = {}
        for d, v in zip(difficulty, c):
            groups.setdefault(d, []).append(v)
        try:
            keys = sorted(groups)
        except TypeError:
            keys = sorted(groups, key=str)
        for d in keys:
            out[str(d)] = {"accuracy": float(np.mean(groups[d])), "n": len(groups[d])}
        return out
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or (np.diff(edges) <= 0).any():
        raise ValueError("bins must be at least two strictly increasing edges")
    d = np.asarray(difficulty, dtype=np.float64)
    for b in range(edges.size - 1):
        lo, hi = edges[b], edges[b + 1]
        last = b == edges.size - 2
        m = (d >= lo) & ((d <= hi) if last else (d < hi))
        label = f"[{lo:g}, {hi:g}{']' if last else ')'}"
        out[label] = {"accuracy": float(c[m].mean()) if m.any() else math.nan, "n": int(m.sum())}
    return out


# ---------------------------------------------------------------------------------------------
# test-time scaling
# ---------------------------------------------------------------------------------------------


def scaling_curve(
    answers_per_problem: Sequence[Sequence[Hashable]],
    truth: Truth,
    *,
    scores_per_problem: Sequence[Sequence[float]] | None = None,
    ns: Sequence[int] | None = None,
    num_resamples: int = 256,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Accuracy as a function of the number of samples N.

    Returns ``{"majority": {N: maj@N}, "pass_at_k": {N: pass@N}}`` and, when
    ``scores_per_problem`` is given, ``"best_of_n": {N: best-of-N accuracy}``. pass@N is the
    oracle (any-correct) upper bound of every selection rule. ``ns`` defaults to the powers of
    two up to the smallest per-problem sample count (plus that count itself).
    """
    if len(answers_per_problem) == 0:
        raise ValueError("need at least one problem")
    n_min = min(len(a) for a in answers_per_problem)
    if n_min < 1:
        raise ValueError("every problem needs at least one sample")
    if ns is None:
        grid = [1 << e for e in range(int(math.log2(n_min)) + 1)]
        if grid[-1] != n_min:
            grid.append(n_min)
        ns = grid
    ns = [int(x) for x in ns]
    judge = _make_judge(truth, len(answers_per_problem))
    flags = [[judge(i, a) for a in answers] for i, answers in enumerate(answers_per_problem)]
    curve: dict[str, dict[int, float]] = {
        "majority": {N: maj_at_k(answers_per_problem, judge, N, num_resamples=num_resamples, seed=seed) for N in ns},
        "pass_at_k": pass_at_k_table([len(f) for f in flags], [sum(f) for f in flags], ns),
    }
    if scores_per_problem is not None:
        curve["best_of_n"] = {N: best_of_n(scores_per_problem, flags, N) for N in ns}
    return curve
