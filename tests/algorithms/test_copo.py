"""COPO (arXiv:2508.04138): GRPO blended with a batch-standardised prompt return by outcome entropy, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput
from posttrain.algorithms.advantages_copo import outcome_entropy

copo = ADVANTAGES.get("copo")


def _inp(rewards, groups):
    return AdvantageInput(rewards=torch.tensor(rewards), group_ids=torch.tensor(groups),
                          mask=torch.ones(len(rewards), 2))


def test_outcome_entropy_by_hand():
    h = outcome_entropy(torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 0, 1, 0]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]))
    p = 0.25
    expected = [0.0] * 4 + [-(p * math.log(p) + (1 - p) * math.log(1 - p))] * 4 + [math.log(2)] * 2
    torch.testing.assert_close(h, torch.tensor(expected, dtype=torch.float64))


def test_copo_by_hand():
    # prompts: all correct, one of four correct, all wrong
    inp = _inp([1.0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [0] * 4 + [1] * 4 + [2] * 4)
    adv = copo(inp, AdvantageConfig(eps=0.0))[:, 0]
    # global: returns (1, 0.25, 0), mean 5/12, unbiased std sqrt(0.2708333) = 0.5204165
    std = math.sqrt(((7 / 12) ** 2 + (1 / 6) ** 2 + (5 / 12) ** 2) / 2)
    g = [(7 / 12) / std, (-1 / 6) / std, (-5 / 12) / std]
    # local (GRPO) of prompt 1: mean 0.25, unbiased std 0.5 -> (1.5, -0.5, -0.5, -0.5)
    # gate of prompt 1: H(0.25) / ln 2 = 0.811278; prompts 0 and 2: 0 (global only)
    w = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    expected = [g[0]] * 4 + [w * 1.5 + (1 - w) * g[1]] + [w * -0.5 + (1 - w) * g[1]] * 3 + [g[2]] * 4
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)
    assert adv[0].item() == pytest.approx(1.120897, abs=1e-5) and adv[8].item() == pytest.approx(-0.800641, abs=1e-5)
    # GRPO gives the zero-variance prompts nothing; COPO does
    assert torch.all(ADVANTAGES.get("grpo")(inp, AdvantageConfig())[[0, 8], 0] == 0)


def test_balanced_group_is_pure_grpo_and_single_prompt_has_no_global_term():
    inp = _inp([1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0])
    torch.testing.assert_close(copo(inp, AdvantageConfig()), ADVANTAGES.get("grpo")(inp, AdvantageConfig()))
    # one prompt, all agree: nothing to compare with, A = 0 (no NaN)
    assert torch.all(copo(_inp([1.0, 1.0], [3, 3]), AdvantageConfig()) == 0)
