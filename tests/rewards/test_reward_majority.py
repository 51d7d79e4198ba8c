"""TTRL majority vote, computed by hand."""

import math

import pytest

from posttrain.rewards.majority import MajorityVoteReward, majority_vote
from posttrain.tasks.base import Problem


def _p(answer=None):
    return Problem(id="p", prompt="q", answer=answer)


def test_empty_answers_never_win():
    # TTRL's own extractor gives ['unclear', '\\frac{1}{2}', '', '0.5', ''] here and crowns ''.
    completions = ["the answer is unclear", r"\boxed{\frac{1}{2}}", "", "so 0.5", "hmm, no idea"]
    out = MajorityVoteReward()(_p("1/2"), completions)
    # no-answer completions: 3 of 5, but they do not vote; 1/2 and 0.5 pool into 2 votes
    assert out.rewards == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert out.info[0]["label"] == r"\frac{1}{2}"
    assert out.components["voted"] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert out.components["majority_ratio"] == [2 / 5] * 5
    assert out.components["label_correct"] == [1.0] * 5
    assert out.components["gt_reward"] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert out.components["reward_correct"] == [1.0] * 5


def test_equivalent_answers_pool_their_votes():
    # raw strings: '7' x2 beats each of the three spellings of 1/2 (x1 each) -- unless pooled
    completions = [r"\boxed{7}", r"\boxed{7}", r"\boxed{\frac12}", r"\boxed{0.5}", r"\boxed{1/2}"]
    out = MajorityVoteReward()(_p(), completions)
    assert out.rewards == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert out.info[0]["vote"]["counts"] == [2, 3]
    assert out.components["majority_ratio"] == [3 / 5] * 5


def test_symbolic_equivalence_merges_clusters():
    completions = [r"\boxed{\sqrt{2}/2}", r"\boxed{\frac{\sqrt{2}}{2}}", r"\boxed{1}", r"\boxed{1}"]
    vote = majority_vote([r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}", "1", "1"])
    assert vote.counts == [2, 2]
    assert vote.label == r"\sqrt{2}/2"  # tie: the cluster seen first wins
    out = MajorityVoteReward()(_p(), completions)
    assert out.rewards == [1.0, 1.0, 0.0, 0.0]


def test_no_parseable_answer_gives_no_label_and_zero_rewards():
    out = MajorityVoteReward()(_p("3"), ["", "I don't know", "no idea at all"])
    assert out.rewards == [0.0, 0.0, 0.0]
    assert out.info[0]["label"] is None
    assert out.components["majority_ratio"] == [0.0] * 3
    assert out.components["label_correct"] == [0.0] * 3
    assert out.components["reward_correct"] == [1.0] * 3  # all pseudo 0, all truly 0


def test_label_and_reward_accuracy_with_wrong_majority():
    # gold 4; majority says 5 (3 votes) -> label wrong; the two 4s get pseudo 0 but true 1
    completions = ["5", "5", "5", "4", "4", "x"]
    out = MajorityVoteReward(extractor="last_number")(_p("4"), completions)
    assert out.rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert out.components["label_correct"] == [0.0] * 6
    assert out.components["gt_reward"] == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert out.components["reward_correct"] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert sum(out.components["reward_correct"]) / 6 == pytest.approx(1 / 6)
    assert out.components["majority_ratio"] == [0.5] * 6


def test_without_ground_truth_metrics_are_nan_and_keys_stable():
    with_gt = MajorityVoteReward()(_p("1"), ["1", "2"])
    without = MajorityVoteReward()(_p(None), ["1", "2"])
    assert set(with_gt.components) == set(without.components)
    for k in ("label_correct", "gt_reward", "reward_correct"):
        assert all(math.isnan(v) for v in without.components[k])
    assert without.rewards == [1.0, 0.0]  # tie -> first seen


def test_ties_and_order():
    vote = majority_vote(["2", "3", "3", "2"])
    assert vote.label == "2" and vote.counts == [2, 2]
    vote = majority_vote([None, None, "9"])
    assert vote.label == "9" and vote.cluster == [None, None, 0]


def test_symbolic_pair_cap_is_reported():
    answers = [f"x^{i}" for i in range(6)]
    vote = majority_vote(answers, max_symbolic_pairs=3)
    assert any("stopped after 3" in n for n in vote.notes)
    assert len(vote.counts) == 6


def test_empty_group():
    out = MajorityVoteReward()(_p("1"), [])
    assert out.rewards == [] and out.components["majority_ratio"] == []
