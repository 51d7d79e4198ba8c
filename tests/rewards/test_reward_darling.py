"""DARLING diversity x quality reward (catalog 002-69, arXiv:2509.02534), checked by hand."""

from __future__ import annotations

import pytest

from posttrain.rewards import build_reward
from posttrain.rewards.diversity import DarlingReward, darling_rewards, ngram_equivalence
from posttrain.tasks.base import Problem

P = Problem(id="p", prompt="2+2?", answer="4")


def test_answer_mode_by_hand():
    # numeric quality against "4": [1, 1, 0, 0]. Classes by canonical answer: {"4", "4.0"}, {"5"},
    # {no answer}: a missing answer matches nothing. Div (G-1 = 3 others):
    #   "4": 2/3, "4.0": 2/3, "5": 3/3, "x": 3/3; max 1 -> Norm = Div; r = q * Norm = [2/3, 2/3, 0, 0].
    r = build_reward({"type": "darling", "reward": {"type": "numeric"}})
    out = r(P, ["4", "4.0", "5", "x"])
    assert out.rewards == pytest.approx([2 / 3, 2 / 3, 0.0, 0.0])
    assert out.components["quality"] == [1.0, 1.0, 0.0, 0.0]
    assert out.components["diversity"] == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert out.components["classes"] == [3.0] * 4
    assert out.components["correct"] == [1.0, 1.0, 0.0, 0.0]  # the verifier's own component passes through


def test_ngram_mode_by_hand():
    # bigrams: "a b c" -> {ab, bc} (twice), "a b d" -> {ab, bd}, "x y z" -> {xy, yz}.
    # Jaccard("a b c", "a b d") = 1/3 < 0.5: different. Classes {0, 1}, {2}, {3}.
    # Div = [2/3, 2/3, 1, 1]; quality = has an "a": [1, 1, 1, 0]; r = [2/3, 2/3, 1, 0].
    r = DarlingReward({"type": "format", "pattern": "a"}, diversity="ngram", ngram_n=2, similarity_threshold=0.5)
    out = r(P, ["a b c", "a b c", "a b d", "x y z"])
    assert out.rewards == pytest.approx([2 / 3, 2 / 3, 1.0, 0.0])
    assert out.components["diversity_norm"] == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
    assert out.components["classes"] == [3.0] * 4
    # threshold 1/3 makes "a b c" and "a b d" the same: Div = [1/3, 1/3, 1/3, 1] -> Norm = Div
    same = ngram_equivalence(["a b c", "a b c", "a b d", "x y z"], n=2, threshold=1 / 3)
    rewards, div, norm = darling_rewards([1.0, 1.0, 1.0, 0.0], same)
    assert div == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert rewards == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def test_norm_divides_by_the_largest_diversity_and_degenerate_groups_keep_quality():
    # two classes of two: each sample differs from the 2 of the other pair out of 3 others, Div = 2/3 for
    # all, so Norm = 1 everywhere and the reward is the quality
    same = [[True, True, False, False], [True, True, False, False], [False, False, True, True],
            [False, False, True, True]]
    rewards, div, norm = darling_rewards([1.0, 0.5, 1.0, 0.0], same)
    assert div == pytest.approx([2 / 3] * 4) and norm == pytest.approx([1.0] * 4)
    assert rewards == pytest.approx([1.0, 0.5, 1.0, 0.0])
    # all identical: every Div is 0, Norm falls back to 1 (nothing to tell apart), reward = quality
    r = build_reward({"type": "darling", "reward": {"type": "numeric"}})
    assert r(P, ["4", "4", "4"]).rewards == [1.0, 1.0, 1.0]
    assert r(P, ["4"]).components["diversity"] == [1.0]


@pytest.mark.parametrize("spec, match", [
    ({"diversity": "semantic"}, "diversity must be one of"),
    ({"diversity": "ngram", "ngram_n": 0}, "ngram_n must be an integer >= 1"),
    ({"diversity": "ngram", "similarity_threshold": 0.0}, r"similarity_threshold must be a number in \(0, 1\]"),
    ({"diversity": "ngram", "similarity_threshold": 1.5}, r"similarity_threshold must be a number in \(0, 1\]"),
    ({"extractor": "nope"}, "unknown extractor"),
    ({"colour": "red"}, r"has no option\(s\) \['colour'\]"),
])
def test_bad_options_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_reward({"type": "darling", "reward": {"type": "numeric"}, **spec})


def test_bad_quality_rewards_are_refused():
    with pytest.raises(ValueError, match="cannot itself be darling"):
        build_reward({"type": "darling", "reward": {"type": "darling", "reward": {"type": "numeric"}}})
    with pytest.raises(ValueError, match="'reward' must be the quality reward's spec"):
        DarlingReward("numeric")
    # a length penalty is <= 0: multiplied by diversity it would reward sameness
    r = build_reward({"type": "darling", "reward": {"type": "length", "budget": 1}})
    with pytest.raises(ValueError, match="quality must be finite and >= 0"):
        r(P, ["long text", "x"])
