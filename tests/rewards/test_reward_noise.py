"""Reward-noise injection (003-22, arXiv:2505.22653): a binary reward flipped with probability p per sample."""

from __future__ import annotations

import hashlib
import random

import pytest

from posttrain.evaluation.runner import correct_flags
from posttrain.rewards import NoisyReward, build_reward
from posttrain.rewards.noise import flip_uniform
from posttrain.tasks.base import Problem

P = Problem(id="prob-1", prompt="2+2?", answer="4")
COMPLETIONS = ["4", "5", "4", "x", "4", "3", "4", "4"]
CLEAN = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]  # numeric against "4"; "x" has no answer


def _draw(seed, pid, i, text):
    # The documented generator, written out independently of the module.
    key = int.from_bytes(hashlib.sha256(f"{seed}\0{pid}\0{i}\0{text}".encode()).digest()[:8], "big")
    return random.Random(key).random()


def _noisy(p, seed=7, **kw):
    return build_reward({"type": "noisy", "flip_prob": p, "seed": seed, "reward": {"type": "numeric"}, **kw})


def test_flips_exactly_the_generator_draws_by_hand():
    # Draws for seed 7 (4 decimals): .3647 .4579 .3488 .2783 .9719 .5215 .8909 .7827, so with p = 0.4
    # samples 0, 2 and 3 flip: clean 1 0 1 0 1 0 1 1 -> noisy 0 0 0 1 1 0 1 1.
    draws = [_draw(7, "prob-1", i, c) for i, c in enumerate(COMPLETIONS)]
    assert [round(u, 4) for u in draws] == [0.3647, 0.4579, 0.3488, 0.2783, 0.9719, 0.5215, 0.8909, 0.7827]
    assert [flip_uniform(7, "prob-1", i, c) for i, c in enumerate(COMPLETIONS)] == draws
    out = _noisy(0.4)(P, COMPLETIONS)
    assert out.rewards == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert out.components["flipped"] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert out.components["clean"] == CLEAN
    # the verifier's own `correct` stays clean, so accuracy read from components is honest
    assert out.components["correct"] == CLEAN
    flags, rule = correct_flags(out.components, out.rewards)
    assert rule == "correct" and flags == [c > 0 for c in CLEAN]
    assert [i["flipped"] for i in out.info] == [True, False, True, True, False, False, False, False]
    assert out.info[0]["answer"] == "4" and out.info[0]["clean_reward"] == 1.0


def test_p0_is_identity_and_p1_flips_all():
    none = _noisy(0.0)(P, COMPLETIONS)
    assert none.rewards == CLEAN and none.components["flipped"] == [0.0] * 8
    every = _noisy(1.0)(P, COMPLETIONS)
    assert every.rewards == [1.0 - r for r in CLEAN] and every.components["flipped"] == [1.0] * 8


def test_same_sample_same_flip_across_calls_and_instances():
    a, b = _noisy(0.5), _noisy(0.5)
    first = a(P, COMPLETIONS).rewards
    assert a(P, COMPLETIONS).rewards == first and b(P, COMPLETIONS).rewards == first
    # one sample scored alone at the same position flips as it did inside the group
    assert a.flips(P, COMPLETIONS[:3]) == a.flips(P, COMPLETIONS)[:3]
    # another seed, problem or position is another draw
    assert _draw(8, "prob-1", 0, "4") != _draw(7, "prob-1", 0, "4")
    assert _draw(7, "prob-2", 0, "4") != _draw(7, "prob-1", 0, "4")
    assert _draw(7, "prob-1", 2, "4") != _draw(7, "prob-1", 0, "4")


def test_fraction_flipped_tracks_p():
    texts = [str(i) for i in range(2000)]
    frac = sum(_noisy(0.2).flips(P, texts)) / len(texts)
    assert 0.17 < frac < 0.23


def test_reward_without_correct_component_gets_a_clean_one():
    inner = build_reward({"type": "format", "pattern": "4", "value": 1.0})
    shifted = NoisyReward(inner, flip_prob=1.0, low=0.0, high=1.0)
    assert shifted(P, ["4", "5"]).rewards == [0.0, 1.0]
    # no `correct` of its own: the wrapper adds the clean one (clean == high)
    assert shifted(P, ["4", "5"]).components["correct"] == [1.0, 0.0]


def test_composite_part_is_prefixed_and_stays_honest():
    r = build_reward({"type": "composite", "parts": [
        {"type": "noisy", "flip_prob": 1.0, "reward": {"type": "numeric"}},
        {"type": "format", "pattern": "[0-9]", "weight": 0.1}]})
    out = r(P, ["4", "5"])
    assert out.rewards == pytest.approx([0.1, 1.1])
    assert out.components["noisy/flipped"] == [1.0, 1.0]
    flags, rule = correct_flags(out.components, out.rewards)
    assert rule == "noisy/correct" and flags == [True, False]


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.2", True, float("nan")])
def test_flip_prob_outside_unit_interval_is_a_config_error(p):
    with pytest.raises(ValueError, match=r"flip_prob must be a number in \[0, 1\]"):
        _noisy(p)


def test_other_config_errors():
    with pytest.raises(ValueError, match="not a binary reward"):
        build_reward({"type": "noisy", "flip_prob": 0.2, "reward": {"type": "composite", "parts": [{"type": "numeric"}]}})
    with pytest.raises(ValueError, match="low < high"):
        _noisy(0.2, low=1.0, high=0.0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        _noisy(0.2, seed=-1)
    with pytest.raises(ValueError, match="unknown reward type"):
        build_reward({"type": "noisy", "flip_prob": 0.2, "reward": {"type": "nope"}})
    with pytest.raises(ValueError, match="has no option"):
        build_reward({"type": "noisy", "p": 0.2, "reward": {"type": "numeric"}})
    with pytest.raises(TypeError, match="missing"):
        build_reward({"type": "noisy", "reward": {"type": "numeric"}})


def test_non_binary_inner_value_is_refused_at_scoring():
    r = NoisyReward(build_reward({"type": "format", "pattern": "4", "value": 0.5}), flip_prob=0.3)
    with pytest.raises(ValueError, match=r"gave 0.5 to completion 0 of problem 'prob-1'.*binary reward"):
        r(P, ["4"])
