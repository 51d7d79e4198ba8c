"""Train-inference mismatch corrections (behaviour vs old) by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import CORRECTIONS, CorrectionConfig, CorrectionInput, mismatch_metrics

L = math.log


def make(ratios, mask=None) -> CorrectionInput:
    """Token ratios pi_old / mu given directly: behaviour = 0, old = log(ratio)."""
    old = torch.tensor([[L(r) for r in row] for row in ratios], dtype=torch.float64)
    m = torch.ones_like(old) if mask is None else torch.tensor(mask, dtype=torch.float64)
    return CorrectionInput(behaviour_logprobs=torch.zeros_like(old), old_logprobs=old, mask=m)


def run(name, x, **cfg):
    return CORRECTIONS.get(name)(x, CorrectionConfig(**cfg))


def flat(t):
    return t.flatten().tolist()


def test_tis_token():
    # w = min(ratio, C = 2): 0.5, 1.5, 2 (capped from 3); padding -> weight 0, mask 0
    out = run("tis_token", make([[0.5, 1.5], [3.0, 1.0]], mask=[[1, 1], [1, 0]]))
    assert flat(out.weights) == pytest.approx([0.5, 1.5, 2.0, 0.0])
    assert flat(out.mask) == [1.0, 1.0, 1.0, 0.0]
    assert out.metrics["correction/truncated_frac"].item() == pytest.approx(1 / 3)  # 3 capped of 3 real tokens


def test_tis_sequence():
    # seq 0: 0.5 * 1.5 = .75 ; seq 1: 3 * (padding ignored) = 3 -> capped at 2
    out = run("tis_sequence", make([[0.5, 1.5], [3.0, 7.0]], mask=[[1, 1], [1, 0]]))
    assert flat(out.weights) == pytest.approx([0.75, 0.75, 2.0, 0.0])
    # one of the three real tokens (seq 1's) sits at the cap
    assert out.metrics["correction/truncated_frac"].item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["mis_token", "icepop"])
def test_mis_token_masks_outside_window(name):
    # window [1/2, 2] by default: 0.4 masked, 0.5 kept, 1.5 kept, 2.5 masked ; kept weights = ratio
    out = run(name, make([[0.4, 0.5, 1.5, 2.5]]))
    assert flat(out.mask) == [0.0, 1.0, 1.0, 0.0]
    assert flat(out.weights) == pytest.approx([0.0, 0.5, 1.5, 0.0])
    assert out.metrics["correction/masked_frac"].item() == pytest.approx(0.5)
    # explicit window [0.3, 5]
    out = run(name, make([[0.4, 2.5]]), threshold_low=0.3, threshold_high=5.0)
    assert flat(out.mask) == [1.0, 1.0]


def test_mis_sequence():
    # seq 0: 1.2 * 1.5 = 1.8 in [.5, 2] -> kept with weight 1.8 ; seq 1: 1.5 * 1.5 = 2.25 -> dropped
    out = run("mis_sequence", make([[1.2, 1.5], [1.5, 1.5]]))
    assert flat(out.mask) == [1.0, 1.0, 0.0, 0.0]
    assert flat(out.weights) == pytest.approx([1.8, 1.8, 0.0, 0.0])


def test_reject_by_mean_kl():
    # delta = log(old / mu) per token. seq 0: ratios 1.1, 1/1.1 ; seq 1: 2, 2
    # k1_t = log mu - log old = -delta: seq 0 mean (-ln 1.1 + ln 1.1) / 2 = 0 ; seq 1 mean -ln 2 = -.693
    # k2_t = delta^2 / 2: seq 0 = (ln 1.1)^2 / 2 = .004542 ; seq 1 = (ln 2)^2 / 2 = .240227
    # k3_t = e^delta - 1 - delta: seq 0 = (.1 - ln 1.1 + 1/1.1 - 1 + ln 1.1) / 2 = .004545 ; seq 1 = 1 - ln 2 = .306853
    x = make([[1.1, 1 / 1.1], [2.0, 2.0]])
    for name in ("reject_k1", "reject_k2", "reject_k3"):
        out = run(name, x, kl_threshold=0.01)
        assert flat(out.mask) == [1.0, 1.0, 0.0, 0.0], name
        assert flat(out.weights) == [1.0, 1.0, 0.0, 0.0], name
    # k2 of seq 0 is .004542: a threshold of .004 rejects it, .005 keeps it
    assert flat(run("reject_k2", x, kl_threshold=0.004).mask)[:2] == [0.0, 0.0]
    assert flat(run("reject_k2", x, kl_threshold=0.005).mask)[:2] == [1.0, 1.0]
    # k3 seq 0 = .0045455 vs k2 .0045415: .004544 separates them
    assert flat(run("reject_k3", x, kl_threshold=0.004544).mask)[:2] == [0.0, 0.0]
    assert flat(run("reject_k2", x, kl_threshold=0.004544).mask)[:2] == [1.0, 1.0]


def test_corrections_carry_no_gradient():
    old = torch.zeros(2, 3, requires_grad=True)
    x = CorrectionInput(behaviour_logprobs=torch.full((2, 3), -0.1), old_logprobs=old, mask=torch.ones(2, 3))
    for name in CORRECTIONS.names():
        out = run(name, x)
        assert not out.weights.requires_grad and not out.mask.requires_grad, name
        assert out.weights.shape == (2, 3)


def test_mismatch_metrics_by_hand():
    # token ratios old/mu: 1, 2, 0.5, padding ; delta = ln r
    # k1 = -delta: 0, -.693147, .693147 -> mean 0 ; k3 = r - 1 - ln r: 0, .306853, .193147 -> mean .166667
    x = make([[1.0, 2.0], [0.5, 9.0]], mask=[[1, 1], [1, 0]])
    m = mismatch_metrics(x.behaviour_logprobs, x.old_logprobs, x.mask)
    assert m["mismatch/kl_k1"].item() == pytest.approx(0.0, abs=1e-9)
    assert m["mismatch/kl_k3"].item() == pytest.approx((0.306853 + 0.193147) / 3, abs=1e-6)
    # quantiles of {0.5, 1, 2} (linear interpolation): p05 = .5 + .1 * .5 = .55, p50 = 1, p95 = 1 + .9 * 1 = 1.9
    assert m["mismatch/ratio_p05"].item() == pytest.approx(0.55)
    assert m["mismatch/ratio_p50"].item() == pytest.approx(1.0)
    assert m["mismatch/ratio_p95"].item() == pytest.approx(1.9)
    assert m["mismatch/ratio_max"].item() == pytest.approx(2.0)
    empty = mismatch_metrics(x.behaviour_logprobs, x.old_logprobs, torch.zeros(2, 2))
    assert all(v.item() == 0.0 for v in empty.values())
