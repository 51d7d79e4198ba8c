"""Error policies (score_group) and the reward registry."""

import logging

import pytest

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.errors import RewardError, score_group
from posttrain.rewards.math import MathReward, NumericReward
from posttrain.rewards.registry import REWARDS, build_reward, register_reward
from posttrain.rewards.shaping import CompositeReward, FormatReward, OverlongReward
from posttrain.tasks.base import Problem

P = Problem(id="prob-1", prompt="q", answer="4")


class Flaky:
    """Raises on any completion containing 'boom'."""

    name = "flaky"

    def __call__(self, problem, completions):
        for c in completions:
            if "boom" in c:
                raise RuntimeError(f"cannot score {c!r}")
        return RewardOutput(rewards=[1.0] * len(completions))


class GroupLevelFailure:
    name = "groupfail"

    def __call__(self, problem, completions):
        if len(completions) > 1:
            raise KeyError("needs a single completion")
        return RewardOutput(rewards=[0.5])


class Malformed:
    name = "malformed"

    def __call__(self, problem, completions):
        return RewardOutput(rewards=[float("nan")] * len(completions))


def test_success_passes_through_with_reward_error_zero():
    out, errors = score_group(NumericReward(), P, ["4", "5"])
    assert out.rewards == [1.0, 0.0] and errors == []
    assert out.components["reward_error"] == [0.0, 0.0]


def test_zero_policy_zeroes_the_group_and_names_the_sample(caplog):
    with caplog.at_level(logging.WARNING):
        out, errors = score_group(Flaky(), P, ["fine", "boom here", "also fine"], on_error="zero")
    assert out.rewards == [0.0, 0.0, 0.0]
    assert out.components["reward_error"] == [1.0, 1.0, 1.0]
    assert len(errors) == 1
    rec = errors[0]
    assert rec["problem_id"] == "prob-1" and rec["completion"] == "boom here" and rec["index"] == 1
    assert "RuntimeError" in rec["error"] and "Traceback" in rec["traceback"]
    assert "RuntimeError" in out.info[0]["error"]
    assert any("flaky" in r.message for r in caplog.records)  # logged, not silent


def test_zero_policy_group_level_failure_has_no_single_culprit():
    out, errors = score_group(GroupLevelFailure(), P, ["a", "b"])
    assert out.rewards == [0.0, 0.0]
    assert len(errors) == 1 and errors[0]["completion"] is None and "KeyError" in errors[0]["error"]


def test_malformed_output_counts_as_error():
    out, errors = score_group(Malformed(), P, ["a"])
    assert out.rewards == [0.0] and "non-finite" in errors[0]["error"]


def test_abort_policy_raises_with_sample_attached():
    with pytest.raises(RewardError) as ei:
        score_group(Flaky(), P, ["ok", "boom"], on_error="abort")
    err = ei.value
    assert err.problem_id == "prob-1" and err.completions == ["ok", "boom"] and err.reward_name == "flaky"
    assert isinstance(err.__cause__, RuntimeError)
    with pytest.raises(ValueError):
        score_group(Flaky(), P, ["x"], on_error="ignore")


def test_missing_answer_is_an_error_not_a_zero():
    out, errors = score_group(MathReward(), Problem(id="noans", prompt="q"), ["1"])
    assert out.rewards == [0.0] and "ValueError" in errors[0]["error"]


def test_build_every_type():
    specs = {
        "numeric": {},
        "math": {"extractor": "boxed"},
        "format": {"pattern": "x"},
        "think_format": {},
        "length": {"budget": 100},
        "overlong": {"max_length": 100, "cache_length": 10},
        "code": {"mode": "fraction", "timeout_s": 2},
        "majority_vote": {},
    }
    for kind, opts in specs.items():
        r = build_reward({"type": kind, **opts})
        assert r.name == kind
    r = build_reward(
        {
            "type": "composite",
            "parts": [{"type": "numeric", "weight": 1.0}, {"type": "format", "pattern": r"^\d+$", "weight": 0.1}],
        }
    )
    assert isinstance(r, CompositeReward)
    assert [(label, w) for label, _, w in r.parts] == [("numeric", 1.0), ("format", 0.1)]
    assert r(P, ["4"]).rewards == [pytest.approx(1.1)]


def test_registry_errors_name_the_allowed_values():
    with pytest.raises(ValueError, match="allowed types.*majority_vote"):
        build_reward({"type": "nope"})
    with pytest.raises(ValueError, match="allowed"):
        build_reward({"type": "numeric", "bogus": 1})
    with pytest.raises(ValueError, match="no 'type'"):
        build_reward({})
    with pytest.raises(ValueError, match="weight"):
        build_reward({"type": "numeric", "weight": 2})
    with pytest.raises(ValueError, match="parts"):
        build_reward({"type": "composite"})


def test_tokenizer_is_injected_and_custom_types_register():
    r = build_reward({"type": "overlong", "max_length": 4, "cache_length": 2}, tokenizer=lambda s: s.split())
    assert isinstance(r, OverlongReward) and r.tokenizer is not None

    @register_reward("always_one_test")
    class AlwaysOne:
        name = "always_one_test"

        def __call__(self, problem, completions):
            return RewardOutput(rewards=[1.0] * len(completions))

    try:
        assert build_reward({"type": "always_one_test"})(P, ["a"]).rewards == [1.0]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("always_one_test")(FormatReward)
    finally:
        REWARDS.pop("always_one_test", None)
