"""Rewards say up front which problems they cannot score; wrappers ask their inner rewards."""

from posttrain.rewards.base import problem_issue
from posttrain.rewards.registry import build_reward
from posttrain.tasks.base import Problem


def _problem(answer):
    return Problem(id="p1", prompt="q", answer=answer)


def test_numeric_needs_a_number_and_wrappers_pass_it_on():
    numeric = {"type": "numeric"}
    specs = [numeric,
             {"type": "composite", "parts": [{"type": "length", "target": 10}, numeric]},
             {"type": "noisy", "flip_prob": 0.1, "reward": numeric},
             {"type": "darling", "reward": numeric}]
    for spec in specs:
        reward = build_reward(spec)
        assert problem_issue(reward, _problem("12")) is None, spec
        assert problem_issue(reward, _problem("3/4")) is None, spec
        issue = problem_issue(reward, _problem("True"))
        assert issue is not None and "'p1'" in issue and "reward.type=math" in issue, (spec, issue)


def test_rewards_without_a_check_accept_anything():
    for spec in ({"type": "math"}, {"type": "majority_vote"}, {"type": "think_format"}):
        assert problem_issue(build_reward(spec), _problem("True")) is None, spec
