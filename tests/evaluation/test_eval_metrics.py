"""pass@k, maj@k, best-of-N and friends against hand values and brute-force enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from posttrain.evaluation import (
    accuracy_by_difficulty,
    answer_diversity,
    answer_entropy,
    best_of_n,
    correct_fn_from_flags,
    cost_of_pass,
    distinct_answers,
    maj_at_k,
    majority_vote,
    mean_at_k,
    pass_at_k,
    pass_at_k_table,
    scaling_curve,
    weighted_majority,
)


# ---------------------------------------------------------------- pass@k


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10, abs=1e-12)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6, abs=1e-12)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(16, 4, 4) == pytest.approx(1 - math.comb(12, 4) / math.comb(16, 4), abs=1e-12)


def test_pass_at_k_boundaries_exact():
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0  # c == n
    assert pass_at_k(8, 1, 8) == 1.0  # k == n, c > 0
    assert pass_at_k(8, 3, 6) == 1.0  # n - c < k
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(1, 0, 1) == 0.0


@pytest.mark.parametrize("bad", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_rejects_invalid(bad):
    with pytest.raises(ValueError):
        pass_at_k(*bad)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            flags = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(flags[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    v = pass_at_k(1024, 1, 512)
    assert v == pytest.approx(0.5, abs=1e-12)
    assert 0.0 < pass_at_k(1000, 1, 1) < 0.0011


def test_pass_at_k_table_matches_scalar():
    rng = np.random.default_rng(0)
    ns = rng.integers(16, 40, size=50)
    cs = [int(rng.integers(0, n + 1)) for n in ns]
    table = pass_at_k_table(ns, cs, [1, 2, 8, 16])
    for k, v in table.items():
        assert v == pytest.approx(np.mean([pass_at_k(n, c, k) for n, c in zip(ns, cs)]), abs=1e-12)
    assert pass_at_k_table(4, [0, 4, 2], [4]) == {4: pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        pass_at_k_table([4, 2], [1, 1], [3])


# ---------------------------------------------------------------- voting


def test_majority_ties_and_abstentions():
    assert majority_vote(["a", "b", "b", "a"]) == "a"  # tie -> first occurrence
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, "", "  ", None, "x"]) == "x"  # abstentions never win
    assert majority_vote([None, ""]) is None
    assert majority_vote([]) is None
    assert weighted_majority(["a", "b", "b"], [3.0, 1.0, 1.0]) == "a"
    assert weighted_majority(["a", "b", "b"], [1.0, 1.0, 1.0]) == "b"
    assert weighted_majority([None, "b"], [10.0, 0.1]) == "b"


def _brute_maj(answers, label, k):
    subsets = list(itertools.combinations(range(len(answers)), k))
    return sum(majority_vote([answers[i] for i in s]) == label for s in subsets) / len(subsets)


def test_maj_at_k_exact_for_k_equals_n():
    answers = [["1", "2", "2", None], ["3", "3", "4", "4"], [None, None, "", None]]
    labels = ["2", "4", "5"]
    # problem 0: "2" wins -> 1; problem 1: tie "3"/"4" -> "3" (first) -> 0; problem 2: all abstain -> 0
    assert maj_at_k(answers, labels, 4) == pytest.approx(1 / 3)


def test_maj_at_k_matches_brute_force_small_n():
    rng = np.random.default_rng(1)
    vocab = ["a", "b", "c", None]
    answers = [[vocab[i] for i in rng.integers(0, 4, size=6)] for _ in range(20)]
    labels = [vocab[i] for i in rng.integers(0, 3, size=20)]
    for k in (1, 2, 3, 5, 6):
        brute = np.mean([_brute_maj(a, lab, k) for a, lab in zip(answers, labels)])
        # C(6, k) <= 20 subsets: enumerated exactly
        assert maj_at_k(answers, labels, k, num_resamples=20) == pytest.approx(brute, abs=1e-12), k


def test_maj_at_k_resampled_is_seeded_and_close():
    rng = np.random.default_rng(2)
    answers = [[str(v) for v in rng.integers(0, 3, size=12)] for _ in range(30)]
    labels = ["0"] * 30
    k = 5  # C(12, 5) = 792 > num_resamples -> random subsets
    a = maj_at_k(answers, labels, k, num_resamples=200, seed=3)
    b = maj_at_k(answers, labels, k, num_resamples=200, seed=3)
    assert a == b
    exact = np.mean([_brute_maj(x, "0", k) for x in answers])
    assert a == pytest.approx(exact, abs=0.03)


def test_maj_at_k_with_correct_fn_and_flags():
    answers = [["x", "y", "y"], ["p", "q", "q"]]
    fn = correct_fn_from_flags(answers, [[False, True, True], [True, False, False]])
    assert maj_at_k(answers, fn, 3) == pytest.approx(0.5)
    assert maj_at_k(answers, lambda i, a: a in ("y", "q"), 3) == 1.0


def test_mean_at_k():
    assert mean_at_k([[1, 0, 1, 1], [0, 0, 0, 1]]) == pytest.approx((0.75 + 0.25) / 2)
    assert mean_at_k([[1, 0, 1, 1], [0, 0, 0, 1]], k=2) == pytest.approx(0.25)


# ---------------------------------------------------------------- best-of-N


def _brute_best(scores, correct, k):
    # uniform random tie-breaking among the top score of each subset
    subsets = list(itertools.combinations(range(len(scores)), k))
    tot = 0.0
    for s in subsets:
        top = max(scores[i] for i in s)
        tied = [i for i in s if scores[i] == top]
        tot += np.mean([correct[i] for i in tied])
    return tot / len(subsets)


def test_best_of_n_matches_brute_force_with_ties():
    rng = np.random.default_rng(4)
    scores = [list(rng.integers(0, 4, size=7).astype(float)) for _ in range(15)]  # many ties
    correct = [list(rng.integers(0, 2, size=7)) for _ in range(15)]
    for k in (1, 2, 4, 7):
        brute = np.mean([_brute_best(s, c, k) for s, c in zip(scores, correct)])
        assert best_of_n(scores, correct, k) == pytest.approx(brute, abs=1e-12)


def test_best_of_n_simple_cases():
    assert best_of_n([[0.1, 0.9, 0.5]], [[0, 1, 0]], 3) == 1.0
    assert best_of_n([[0.1, 0.9, 0.5]], [[0, 1, 0]], 1) == pytest.approx(1 / 3)
    # pick the best of 2 out of 3: the 0.9 sample is in 2 of 3 pairs
    assert best_of_n([[0.1, 0.9, 0.5]], [[0, 1, 0]], 2) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- diversity, cost, buckets, scaling


def test_diversity():
    ans = ["a", "a", "b", None, ""]
    assert distinct_answers(ans) == 2
    p = np.array([2 / 3, 1 / 3])
    assert answer_entropy(ans) == pytest.approx(float(-(p * np.log(p)).sum()))
    assert answer_entropy(["a", "a"]) == 0.0
    d = answer_diversity([ans, ["z"] * 5])
    assert d["distinct_answers"] == 1.5 and d["abstain_frac"] == pytest.approx(0.2)


def test_cost_of_pass():
    assert cost_of_pass([100, 300], [1, 0]) == pytest.approx(200 / 0.5)
    assert cost_of_pass([100, 300], [0, 0]) == math.inf


def test_accuracy_by_difficulty():
    out = accuracy_by_difficulty([1, 0, 1, 1], ["easy", "hard", "easy", "hard"])
    assert out == {"easy": {"accuracy": 1.0, "n": 2}, "hard": {"accuracy": 0.5, "n": 2}}
    out = accuracy_by_difficulty([1, 0, 1, 0], [0.1, 0.4, 0.6, 1.0], bins=[0, 0.5, 1.0])
    assert out["[0, 0.5)"] == {"accuracy": 0.5, "n": 2}
    assert out["[0.5, 1]"] == {"accuracy": 0.5, "n": 2}


def test_scaling_curve():
    answers = [["1", "1", "2", "2"], ["3", "4", "4", "4"]]
    labels = ["2", "4"]
    scores = [[0.1, 0.2, 0.9, 0.3], [0.9, 0.1, 0.2, 0.3]]
    curve = scaling_curve(answers, labels, scores_per_problem=scores)
    assert sorted(curve) == ["best_of_n", "majority", "pass_at_k"]
    assert list(curve["majority"]) == [1, 2, 4]
    assert curve["majority"][4] == pytest.approx(0.5)  # problem 0 tie -> "1" wrong
    assert curve["best_of_n"][4] == pytest.approx(0.5)  # picks "2" (right), "3" (wrong)
    assert curve["pass_at_k"][1] == pytest.approx(0.625)
    assert all(curve["pass_at_k"][n] >= curve["majority"][n] - 1e-12 for n in (1, 2, 4))
