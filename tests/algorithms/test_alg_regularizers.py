"""Overlong shaping, KL / entropy controllers and masks."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import (
    AdaptiveEntropyController,
    AdaptiveKLController,
    EntropyConfig,
    KLConfig,
    dapo_overlong_penalty,
    kl_in_reward,
    mask_truncated,
    top_entropy_mask,
)


def test_dapo_overlong_penalty_by_hand():
    # L_max = 20, L_cache = 4, f = 1: no penalty up to 16; (16 - L) / 4 in (16, 20]; -1 beyond 20
    got = dapo_overlong_penalty(torch.tensor([10, 16, 17, 18, 20, 25]), max_len=20, buffer_len=4)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    got = dapo_overlong_penalty(torch.tensor([18]), max_len=20, buffer_len=4, penalty_factor=0.5)
    assert got.tolist() == pytest.approx([-0.25])
    with pytest.raises(ValueError):
        dapo_overlong_penalty(torch.tensor([1]), max_len=4, buffer_len=8)


def test_mask_truncated():
    mask = torch.ones(3, 2)
    out = mask_truncated(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]


def test_adaptive_kl_controller_by_hand():
    # target .1, KL .2 -> error clip(2 - 1, +-.2) = .2 ; coef .01 * (1 + .2 * 100 / 1000) = .0102
    ctl = AdaptiveKLController(KLConfig(coef=0.01, target=0.1, horizon=1000))
    assert ctl.update(0.2, 100) == pytest.approx(0.0102)
    # KL .09 -> error -.1 ; .0102 * (1 - .1 * 100 / 1000) = .010098
    assert ctl.update(0.09, 100) == pytest.approx(0.010098)
    fixed = AdaptiveKLController(KLConfig(coef=0.01))
    assert fixed.update(5.0, 100) == 0.01


def test_kl_config_validation():
    with pytest.raises(ValueError, match="algorithm.kl.estimator"):
        KLConfig(estimator="k7")
    KLConfig(estimator="fkl+")  # any base kind + '+' is straight-through
    with pytest.raises(ValueError, match="algorithm.kl.target"):
        KLConfig(target=0.0)


def test_kl_in_reward():
    # k1 = logp - ref = .5 on the real token, coef .1 -> -.05 ; padding untouched
    tr = kl_in_reward(None, torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.5, -3.0]]), torch.tensor([[1.0, 0.0]]), 0.1)
    assert tr.flatten().tolist() == pytest.approx([-0.05, 0.0])
    tr = kl_in_reward(torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.5, -1.0]]),
                      torch.ones(1, 2), 0.1)
    assert tr.flatten().tolist() == pytest.approx([0.95, 2.0])


def test_adaptive_entropy_controller():
    ctl = AdaptiveEntropyController(EntropyConfig(coef=0.01, adaptive=True, target=0.2, delta=0.005))
    assert ctl.update(0.1) == pytest.approx(0.015)  # below target -> +delta
    assert ctl.update(0.5) == pytest.approx(0.010)  # above target -> -delta
    assert ctl.update(0.5) == pytest.approx(0.005)
    assert ctl.update(0.5) == pytest.approx(0.0)
    assert ctl.update(0.5) == pytest.approx(0.0)  # clipped at coef_min
    off = AdaptiveEntropyController(EntropyConfig(coef=0.01))
    assert off.update(0.0) == 0.01
    with pytest.raises(ValueError, match="algorithm.entropy.top_quantile"):
        EntropyConfig(top_quantile=0.0)


def test_top_entropy_mask():
    # entropies of 5 real tokens .1 .5 .9 .3 .7 (+ one padding token); top 40% -> quantile .6 of the
    # real tokens = .58 (linear interpolation between .5 and .7) -> keep .9 and .7
    ent = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = top_entropy_mask(ent, mask, 0.4)
    assert out.tolist() == [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert torch.equal(top_entropy_mask(ent, mask, 1.0), mask)
