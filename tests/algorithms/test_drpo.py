"""DRPO decoupled length reward (catalog 002-78, arXiv:2510.04474), checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput


def _input(rewards, groups, lengths, t=4) -> AdvantageInput:
    mask = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lengths])
    return AdvantageInput(rewards=torch.tensor(rewards, dtype=torch.float32), group_ids=torch.tensor(groups), mask=mask)


def test_drpo_by_hand_two_groups():
    # Group 0: correct samples of lengths 2, 4, 1 and one wrong (length 3); longest = 4, so
    # r_l = -0.5, -1, -0.25 and with lambda 0.5: exp(-1), exp(-2), exp(-0.5) / their sum.
    #   sum = 0.36787944 + 0.13533528 + 0.60653066 = 1.10974538
    #   A = 3 * [0.33149896, 0.12195165, 0.54654939] = [0.99449688, 0.36585495, 1.63964818]; wrong: -1.
    # Group 1: no correct sample, so both are pushed down by 1.
    x = _input([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [0, 0, 0, 0, 1, 1], lengths=[2, 4, 3, 1, 3, 2])
    a = ADVANTAGES.get("drpo")(x, AdvantageConfig(drpo_lambda=0.5))
    seq = [a[i, 0].item() for i in range(6)]
    assert seq == pytest.approx([0.99449688, 0.36585495, -1.0, 1.63964818, -1.0, -1.0], abs=1e-7)
    # broadcast over the completion tokens, padding stays 0
    assert a[1].tolist() == pytest.approx([0.36585495] * 4, abs=1e-7)
    assert a[3, 1:].tolist() == [0.0, 0.0, 0.0]


def test_correct_but_long_is_never_negative_unlike_grpo_with_a_length_penalty():
    # The paper's motivating failure: GRPO on r = correct - L / L_max gives the long correct sample
    # a negative advantage (shaped rewards 0.875, 0.75, 0 | -0.125 x 3, mean 0.208 > 0); DRPO keeps
    # it positive and only orders the correct samples by length.
    rewards, lengths = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1, 2, 8, 1, 1, 1]
    shaped = torch.tensor([r - n / 8 for r, n in zip(rewards, lengths)], dtype=torch.float64)
    grpo = (shaped - shaped.mean()) / shaped.std()
    assert grpo[2] < 0  # the long correct answer is pushed down
    a = ADVANTAGES.get("drpo")(_input(rewards, [0] * 6, lengths, t=8), AdvantageConfig())[:, 0]
    assert (a[:3] > 0).all() and a[0] > a[1] > a[2]
    assert (a[3:] == -1).all()
    assert a[:3].mean().item() == pytest.approx(1.0)  # |P| w_i averages to 1 over the correct samples


def test_equal_length_correct_samples_get_plus_one_and_lambda_sharpens():
    x = _input([1.0, 1.0, 0.0], [0, 0, 0], lengths=[3, 3, 2])
    assert ADVANTAGES.get("drpo")(x, AdvantageConfig())[:, 0].tolist() == [1.0, 1.0, -1.0]
    y = _input([1.0, 1.0], [0, 0], lengths=[1, 4])
    soft = ADVANTAGES.get("drpo")(y, AdvantageConfig(drpo_lambda=10.0))[:, 0]
    sharp = ADVANTAGES.get("drpo")(y, AdvantageConfig(drpo_lambda=0.05))[:, 0]
    # lambda 0.05: w_short = 1 / (1 + exp(-(1 - 0.25) / 0.05)) = 1 / (1 + exp(-15))
    assert sharp[0].item() == pytest.approx(2 / (1 + math.exp(-15)), rel=1e-6)
    assert soft[0] - soft[1] < sharp[0] - sharp[1]


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_lambda_is_a_config_error_naming_the_key(bad):
    with pytest.raises(ValueError, match="algorithm.advantage.drpo_lambda"):
        AdvantageConfig(drpo_lambda=bad)
