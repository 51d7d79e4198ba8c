"""VESPO and SSPO (losses_sequence.py) against values and gradients worked out by hand.

Masked positions hold NaN / inf in every example: they must change nothing (the registry-wide
property test is tests/reliability/test_masked_garbage.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput

NAN, INF = float("nan"), float("inf")


def make(logp, old, adv, mask, **kw) -> tuple[PolicyLossInput, torch.Tensor]:
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    extra = {k: torch.tensor(v, dtype=torch.float64) for k, v in kw.items()}
    inp = PolicyLossInput(logprobs=lp, old_logprobs=torch.tensor(old, dtype=torch.float64),
                          advantages=torch.tensor(adv, dtype=torch.float64),
                          mask=torch.tensor(mask, dtype=torch.float64), **extra)
    return inp, lp


def run(name, inp, lp, **cfg):
    """Per-token loss, d(sum of kept token losses)/dlogp, metrics."""
    out = POLICY_LOSSES.get(name)(inp, PolicyLossConfig(**cfg))
    out.loss.sum().backward()  # masked positions must already be exactly 0
    return out.loss.detach(), lp.grad.clone(), out.metrics


def approx(t: torch.Tensor, expected, tol=1e-9):
    assert t.flatten().tolist() == pytest.approx(list(expected), abs=tol)


# ------------------------------------------------------------------ VESPO
def _vespo_batch(**kw):
    # seq 0: log-ratios .1, -.1, .2 -> log W = .2, A = +1 (k = 2, lambda = 3)
    # seq 1: log-ratios 0, -.3 (third token masked, holds NaN / inf) -> log W = -.3, A = -.5 (k = 3, lambda = 2)
    # seq 2: one token, log-ratio 0 -> W = 1, phi = 1, A = 2
    logp = [[-1.0, -2.0, -0.5], [-0.5, -1.5, NAN], [-2.0, INF, NAN]]
    old = [[-1.1, -1.9, -0.7], [-0.5, -1.2, -INF], [-2.0, NAN, 0.0]]
    adv = [[1.0, 1.0, 1.0], [-0.5, -0.5, NAN], [2.0, INF, 0.0]]
    mask = [[1, 1, 1], [1, 1, 0], [1, 0, 0]]
    return make(logp, old, adv, mask, **kw)


def test_vespo_values_and_gradient():
    inp, lp = _vespo_batch()
    loss, grad, m = run("vespo", inp, lp)
    phi0 = math.exp(3 + 2 * 0.2 - 3 * math.exp(0.2))  # = exp(-0.26421) = 0.76781
    phi1 = math.exp(2 + 3 * -0.3 - 2 * math.exp(-0.3))  # = exp(-0.38164) = 0.68274
    # l = -phi A logp ; d l / d logp = -phi A (phi is detached)
    approx(loss, [-phi0 * 1 * -1.0, -phi0 * 1 * -2.0, -phi0 * 1 * -0.5,
                  -phi1 * -0.5 * -0.5, -phi1 * -0.5 * -1.5, 0.0,
                  -1.0 * 2.0 * -2.0, 0.0, 0.0])
    approx(grad, [-phi0, -phi0, -phi0, 0.5 * phi1, 0.5 * phi1, 0.0, -2.0, 0.0, 0.0])
    assert phi0 == pytest.approx(0.76781, abs=1e-5) and phi1 == pytest.approx(0.68274, abs=1e-5)
    assert m["phi_mean"].item() == pytest.approx((3 * phi0 + 2 * phi1 + 1.0) / 6)


def test_vespo_folds_is_weights_into_w_and_does_not_multiply_the_loss():
    # is weight 2 on seq 0's first token: log W_0 = .2 + ln 2 ; the others 1 (masked ones hold garbage)
    w = [[2.0, 1.0, 1.0], [1.0, 1.0, NAN], [1.0, 0.0, INF]]
    inp, lp = _vespo_batch(is_weights=w)
    loss, grad, _ = run("vespo", inp, lp)
    big_w = math.exp(0.2) * 2.0
    phi0 = math.exp(3 + 2 * math.log(big_w) - 3 * big_w)
    approx(grad[0], [-phi0] * 3)
    approx(loss[0], [phi0, 2.0 * phi0, 0.5 * phi0])  # not multiplied by w_t = 2
    approx(grad[2], [-2.0, 0.0, 0.0])


def test_vespo_huge_ratio_gives_zero_weight_not_nan():
    # log W = 50 -> clamped to 20 ; log phi = 3 + 40 - 3 e^20 -> phi = 0
    inp, lp = make([[0.0, 0.0]], [[-25.0, -25.0]], [[1.0, 1.0]], [[1, 1]])
    loss, grad, _ = run("vespo", inp, lp)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    approx(grad, [0.0, 0.0])


def test_vespo_parameters():
    # k = 0, lambda tiny: phi -> e^(lambda (1 - W)) ~ 1, plain REINFORCE  -A logp
    inp, lp = _vespo_batch()
    _, grad, _ = run("vespo", inp, lp, vespo_k_pos=0.0, vespo_k_neg=0.0, vespo_lambda_pos=1e-12,
                     vespo_lambda_neg=1e-12)
    approx(grad, [-1.0, -1.0, -1.0, 0.5, 0.5, 0.0, -2.0, 0.0, 0.0], tol=1e-9)


# ------------------------------------------------------------------ SSPO
def _sspo_batch(entropy=True):
    # window 2. seq 0 (A = +1): log-ratios .1 .3 | .2 .1 ; entropy 3 3 | 1 1, sequence mean 2
    #   segment 0: s = e^.2 = 1.2214, c = 3/2 = 1.5 -> upper bound 1 + .2 * 1.5 = 1.3: unclipped
    #   segment 1: s = e^.15 = 1.1618, c = 1/2 -> upper bound 1.1: clipped (loss -1.1, no gradient)
    # seq 1 (A = -1): log-ratios .5 -.5 | .4 (4th token masked, garbage) ; entropy 2 everywhere, c = 1
    #   segment 0: s = e^0 = 1 (inside [.8, 1.2]) ; segment 1: s = e^.4 = 1.4918, A < 0: not clipped from above
    logp = [[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, NAN]]
    old = [[-1.1, -1.3, -1.2, -1.1], [-1.5, -0.5, -1.4, INF]]
    adv = [[1.0] * 4, [-1.0, -1.0, -1.0, NAN]]
    mask = [[1, 1, 1, 1], [1, 1, 1, 0]]
    kw = {"entropy": [[3.0, 3.0, 1.0, 1.0], [2.0, 2.0, 2.0, -INF]]} if entropy else {}
    return make(logp, old, adv, mask, **kw)


def test_sspo_segment_ratios_and_entropy_adaptive_clip():
    inp, lp = _sspo_batch()
    loss, grad, m = run("sspo", inp, lp, sspo_window=2)
    a, b, c = math.exp(0.2), math.exp(0.15), math.exp(0.4)
    approx(loss, [-a, -a, -1.1, -1.1, 1.0, 1.0, c, 0.0])
    # sum of a segment's token losses = -n_k s_k A ; d s_k / d logp_t = s_k / n_k -> gradient -s_k A per token
    approx(grad, [-a, -a, 0.0, 0.0, 1.0, 1.0, c, 0.0])
    assert m["clip_frac"].item() == pytest.approx(2 / 7)
    assert m["clip_scale_mean"].item() == pytest.approx((1.5 * 2 + 0.5 * 2 + 3 * 1.0) / 7)


def test_sspo_without_entropy_adaptation_clips_the_other_segment():
    # c = 1 everywhere: bounds [.8, 1.2]: e^.2 = 1.2214 is clipped at 1.2, e^.15 = 1.1618 is not
    inp, lp = _sspo_batch()
    loss, grad, _ = run("sspo", inp, lp, sspo_window=2, sspo_entropy_scale_min=1.0, sspo_entropy_scale_max=1.0)
    b = math.exp(0.15)
    approx(loss[0], [-1.2, -1.2, -b, -b])
    approx(grad[0], [0.0, 0.0, -b, -b])


def test_sspo_without_entropy_uses_the_sampled_token_surprisal():
    # entropy = -old: seq 0 gets 3 3 | 1 1 again (old = -3 -3 -1 -1), same log-ratios as above
    lr = [0.1, 0.3, 0.2, 0.1]
    old = [[-3.0, -3.0, -1.0, -1.0]]
    inp, lp = make([[o + r for o, r in zip(old[0], lr)]], old, [[1.0] * 4], [[1, 1, 1, 1]])
    loss, grad, _ = run("sspo", inp, lp, sspo_window=2)
    a = math.exp(0.2)
    approx(loss, [-a, -a, -1.1, -1.1])
    approx(grad, [-a, -a, 0.0, 0.0])


def test_sspo_with_one_window_per_sequence_is_gspo_with_the_same_clip():
    inp, _ = _sspo_batch()
    clip = {"sspo_window": 8, "sspo_clip_low": 0.2, "sspo_clip_high": 0.2}
    sspo = POLICY_LOSSES.get("sspo")(inp, PolicyLossConfig(**clip, sspo_entropy_scale_min=1.0,
                                                            sspo_entropy_scale_max=1.0))
    gspo = POLICY_LOSSES.get("gspo")(inp, PolicyLossConfig(gspo_clip_low=0.2, gspo_clip_high=0.2))
    assert torch.allclose(sspo.loss, gspo.loss)
    # seq 0: s = e^(.7/4) = 1.1912 < 1.2 unclipped ; seq 1: s = e^(.4/3), A < 0, unclipped
    approx(sspo.loss.detach()[0], [-math.exp(0.175)] * 4)


@pytest.mark.parametrize("bad", [
    {"vespo_k_pos": -1.0}, {"vespo_lambda_neg": 0.0}, {"vespo_lambda_pos": INF}, {"sspo_window": 0},
    {"sspo_window": 2.5}, {"sspo_entropy_scale_min": 1.5}, {"sspo_entropy_scale_max": 0.5},
    {"sspo_clip_low": 0.6}, {"sspo_clip_high": -0.1},
])
def test_bad_vespo_sspo_config_is_refused_naming_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key.rsplit("_", 1)[0]):
        PolicyLossConfig(**bad)


def test_sspo_surprisal_fallback_ignores_garbage_at_masked_positions():
    # no entropy: -old is read, and seq 1's masked old holds +inf; the same batch with 0 there must match
    dirty, lp_d = _sspo_batch(entropy=False)
    clean_old = torch.where(dirty.mask > 0, dirty.old_logprobs, 0.0)
    clean_lp = torch.where(dirty.mask > 0, lp_d.detach(), 0.0).requires_grad_(True)
    zeroed = PolicyLossInput(logprobs=clean_lp, old_logprobs=clean_old, advantages=torch.nan_to_num(dirty.advantages),
                             mask=dirty.mask)
    l1, g1, _ = run("sspo", dirty, lp_d, sspo_window=2)
    l0, g0, _ = run("sspo", zeroed, clean_lp, sspo_window=2)
    assert torch.isfinite(l1).all() and torch.equal(l0, l1) and torch.equal(g0, g1)
    assert g1[1, 3] == 0
