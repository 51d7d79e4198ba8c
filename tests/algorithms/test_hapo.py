"""HAPO (arXiv:2509.16591): token-level group-average advantages and entropy-driven asymmetric clipping, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, POLICY_LOSSES, AdvantageConfig, AdvantageInput, PolicyLossConfig, \
    PolicyLossInput
from posttrain.algorithms.hapo import entropy_score

hapo_adv = ADVANTAGES.get("hapo")
hapo_loss = POLICY_LOSSES.get("hapo")


def _mask(lengths, T):
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()


def test_token_level_group_average_by_hand():
    # group 0: r = (1, 0), lengths (3, 1): mu = 3/4, sigma^2 = (3 (1/4)^2 + (3/4)^2) / 4 = 3/16
    # group 1: r = (1, 1): sigma = 0 -> A = 0
    inp = AdvantageInput(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                         mask=_mask([3, 1, 2, 2], 3))
    adv = hapo_adv(inp, AdvantageConfig(eps=0.0))
    s = math.sqrt(3 / 16)
    expected = torch.tensor([[0.25 / s] * 3, [-0.75 / s, 0, 0], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(adv, expected.float(), rtol=0, atol=1e-6)
    # GRPO (sequence-level mean 1/2) would give +-0.7071: the token weighting moved the baseline to 3/4
    assert adv[0, 0].item() == pytest.approx(0.57735, abs=1e-5)
    # without std: A = r - mu
    adv = hapo_adv(inp, AdvantageConfig(std_normalize=False))
    torch.testing.assert_close(adv[:2, 0], torch.tensor([0.25, -0.75]), rtol=0, atol=1e-7)


def test_outlier_group_falls_back_to_grpo():
    # lengths (1, 100), r = (1, 0): mu = 1/101, sigma = sqrt(100)/101, A_0 = (100/101) / (10/101) = 10 >= 5
    inp = AdvantageInput(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                         mask=_mask([1, 100, 2, 2], 100))
    adv = hapo_adv(inp, AdvantageConfig(eps=0.0))
    # GRPO: mean 1/2, unbiased std sqrt(1/2): +-0.7071 for the outlier group
    assert adv[0, 0].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert adv[1, 99].item() == pytest.approx(-1 / math.sqrt(2), abs=1e-6)
    # group 1 (equal lengths, |A| = 1 < 5) keeps the token-level value: mu 1/2, sigma 1/2 -> +-1
    assert adv[2, 0].item() == pytest.approx(1.0, abs=1e-6)
    # with a threshold above 10 the outlier group keeps its token-level value
    adv = hapo_adv(inp, AdvantageConfig(eps=0.0, hapo_fallback_z=11.0))
    assert adv[0, 0].item() == pytest.approx(10.0, abs=1e-6)


def test_entropy_score_by_hand():
    # log-entropies (-1, 0, 2, padding): the 0.5 quantile (nearest) of (-1, 0, 2) is 0 -> (-1, 0, 1)
    ent = torch.tensor([[math.exp(-1), 1.0, math.exp(2), float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(entropy_score(torch.nan_to_num(ent), mask, 0.5), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    # pivot 0: the minimum scores 0, the rest scale to (0, 1]: (0, 1/3, 1)
    torch.testing.assert_close(entropy_score(torch.nan_to_num(ent), mask, 0.0), torch.tensor([[0.0, 1 / 3, 1.0, 0.0]]))


def test_asymmetric_adaptive_clip_by_hand():
    # scores h = (-1, 0, 1) (pivot 0.5), base clip 0.2 / 0.2, alpha 1:
    #   token 0 (low entropy):  bounds [1 - 0.4, 1.2]; r = 0.7, A = -1: not clipped (PPO: clipped at 0.8)
    #   token 1 (median):       bounds [0.8, 1.2];     r = 1.3, A = +1: clipped at 1.2
    #   token 2 (high entropy): bounds [0.8, 1 + 0.4]; r = 1.3, A = +1: not clipped (PPO: clipped at 1.2)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.7, 1.3, 1.3, 1.0]])).requires_grad_()
    inp = PolicyLossInput(logprobs=logp, old_logprobs=old, advantages=torch.tensor([[-1.0, 1.0, 1.0, float("nan")]]),
                          mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
                          entropy=torch.tensor([[math.exp(-1), 1.0, math.exp(2), float("inf")]]))
    cfg = PolicyLossConfig(hapo_entropy_pivot=0.5)
    out = hapo_loss(inp, cfg)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([[0.7, -1.2, -1.3, 0.0]]), rtol=0, atol=1e-6)
    out.loss.sum().backward()
    # d l / d logp = -r A where unclipped, 0 where clipped and at the masked position
    torch.testing.assert_close(logp.grad, torch.tensor([[0.7, 0.0, -1.3, 0.0]]), rtol=0, atol=1e-6)
    assert out.metrics["clip_frac"].item() == pytest.approx(1 / 3)
    assert out.metrics["clip_low_mean"].item() == pytest.approx((0.4 + 0.2 + 0.2) / 3)
    assert out.metrics["clip_high_mean"].item() == pytest.approx((0.2 + 0.2 + 0.4) / 3)
    # alpha 0 is PPO clip: token 0 and token 2 are clipped too
    out = hapo_loss(inp, PolicyLossConfig(hapo_entropy_pivot=0.5, hapo_clip_alpha=0.0))
    torch.testing.assert_close(out.loss.detach(), torch.tensor([[0.8, -1.2, -1.2, 0.0]]), rtol=0, atol=1e-6)


def test_hapo_loss_needs_entropy_and_config_is_checked():
    inp = PolicyLossInput(logprobs=torch.zeros(1, 2), old_logprobs=torch.zeros(1, 2), advantages=torch.ones(1, 2),
                          mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="entropy"):
        hapo_loss(inp, PolicyLossConfig())
    with pytest.raises(ValueError, match="hapo_entropy_pivot"):
        PolicyLossConfig(hapo_entropy_pivot=1.5)
    with pytest.raises(ValueError, match="hapo_clip_alpha"):
        PolicyLossConfig(hapo_clip_alpha=-1.0)
    with pytest.raises(ValueError, match="hapo_fallback_z"):
        AdvantageConfig(hapo_fallback_z=0.0)
