"""Majority vote, weighted majority vote and best-of-N selection, checked by hand."""

from __future__ import annotations

import math

import pytest

from posttrain.inference import (
    answer_clusters,
    best_of_n_index,
    majority_vote,
    select_best_of_n,
    vote_weights,
    weighted_majority_vote,
)


def test_majority_vote_by_hand():
    # "4" x3, "3" x2, one abstention
    assert majority_vote(["3", None, "4", "4", "3", "4"]) == "4"
    # tie 2-2: the answer seen first wins
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote(["a", "b", "b", "a"]) == "a"
    # abstentions never win, even when they are the most common "answer"
    assert majority_vote([None, None, "", "  ", "7"]) == "7"
    assert majority_vote([None, "", None]) is None
    assert majority_vote([]) is None


def test_majority_vote_pools_equivalent_answers():
    # "0.5" and "1/2" are one cluster (2 votes) against "2" (1 vote) ...
    assert majority_vote(["2", "0.5", "1/2"]) == "0.5"
    # ... but are different values under exact matching: a 1-1-1 tie, first seen wins
    assert majority_vote(["2", "0.5", "1/2"], equivalence=False) == "2"
    assert answer_clusters(["2", "0.5", None, "1/2", "2.0"]) == [0, 1, None, 1, 0]


def test_weighted_majority_by_hand():
    answers = ["7", "8", "8", "9"]
    # totals: 7 -> 0.9, 8 -> 0.3 + 0.4 = 0.7, 9 -> 0.5
    assert weighted_majority_vote(answers, [0.9, 0.3, 0.4, 0.5]) == "7"
    # totals: 7 -> 0.5, 8 -> 0.7, 9 -> 0.5
    assert weighted_majority_vote(answers, [0.5, 0.3, 0.4, 0.5]) == "8"
    # unit weights = plain majority
    assert weighted_majority_vote(answers, None) == majority_vote(answers) == "8"
    # tie on total weight: first seen wins
    assert weighted_majority_vote(["x", "y"], [1.0, 1.0]) == "x"
    assert weighted_majority_vote(["x", "y", "y"], [2.0, 1.0, 1.0]) == "x"
    # zero weight still lets an answer exist but not win against positive weight
    assert weighted_majority_vote(["x", "y"], [0.0, 0.1]) == "y"
    # abstentions carry no weight
    assert weighted_majority_vote([None, "y"], [10.0, 0.1]) == "y"
    assert weighted_majority_vote([None, None], [1.0, 1.0]) is None


def test_weighted_majority_equivalence_and_hashables():
    # 0.5 + 1/2 pool 0.4 + 0.4 = 0.8 > 0.7
    assert weighted_majority_vote(["3", "0.5", "1/2"], [0.7, 0.4, 0.4]) == "0.5"
    assert weighted_majority_vote(["3", "0.5", "1/2"], [0.7, 0.4, 0.4], equivalence=False) == "3"
    # exact matching works for any hashable value
    assert weighted_majority_vote([1, 2, 2], [0.5, 0.2, 0.2], equivalence=False) == 1
    assert weighted_majority_vote([(1, 2), (3,), (3,)], [0.1, 0.1, 0.1], equivalence=False) == (3,)


@pytest.mark.parametrize("weights", [[1.0, -0.1], [1.0, math.nan], [1.0, math.inf], [1.0]])
def test_weighted_majority_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        weighted_majority_vote(["a", "b"], weights)


def test_best_of_n_by_hand():
    assert best_of_n_index([0.1, 0.7, 0.7, 0.2]) == 1  # first of the tied maxima
    assert best_of_n_index([-3.0, -1.0, -2.0]) == 1
    assert best_of_n_index([5.0]) == 0
    assert select_best_of_n(["a", "b", "c"], [0.1, 0.5, 0.2]) == "b"
    assert select_best_of_n(["a", "b", "c"], [-math.inf, -1.0, -math.inf]) == "b"
    with pytest.raises(ValueError):
        best_of_n_index([])
    with pytest.raises(ValueError):
        best_of_n_index([0.1, math.nan])
    with pytest.raises(ValueError):
        select_best_of_n(["a"], [0.1, 0.2])


def test_vote_weights():
    assert vote_weights("mean_logprob", [0.0, math.log(0.25)]) == pytest.approx([1.0, 0.25])
    assert vote_weights("self_certainty", [0.3, -1e-9]) == [0.3, 0.0]  # KL >= 0 up to rounding
    assert vote_weights("reward_model", [0.2, 0.9]) == [0.2, 0.9]
    with pytest.raises(ValueError, match="negative"):
        vote_weights("reward_model", [0.2, -0.9])
    # mean-logprob weights in a vote: exp(-0.1) = 0.905 beats exp(-1) + exp(-2) = 0.503
    w = vote_weights("mean_logprob", [-0.1, -1.0, -2.0])
    assert weighted_majority_vote(["1", "2", "2"], w) == "1"
