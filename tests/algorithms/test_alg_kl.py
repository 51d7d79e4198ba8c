"""KL estimators: hand values, closed-form gradients, exact expectations on a small support."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import KL_ESTIMATORS, kl_estimate

L = math.log


def test_values_by_hand():
    # logp = ln .5, ref = ln .25 -> delta = ref - logp = ln .5 = -.693147, rho = .5
    lp = torch.tensor([L(0.5)])
    ref = torch.tensor([L(0.25)])
    d = L(0.5)
    expected = {
        "k1": -d,  # .693147
        "k2": 0.5 * d * d,  # .240227
        "k3": 0.5 - 1 - d,  # .193147
        "abs": -d,
        "low_var_kl": 0.5 - 1 - d,
        "fkl": 0.5 * d - 0.5 + 1,  # rho ln rho - rho + 1 = .153426
        "js": 0.5 * (0.5 * d - 1.5 * L(0.75)),  # .042475
        "k1+": -d,
        "k3+": 0.5 - 1 - d,
        "low_var_kl+": 0.5 - 1 - d,
    }
    assert set(expected) == set(KL_ESTIMATORS)
    for kind, value in expected.items():
        assert kl_estimate(lp, ref, kind).item() == pytest.approx(value, abs=1e-6), kind


def test_low_var_kl_is_clamped():
    # delta = 20 -> k3 = e^20 - 21, clamped at 10
    assert kl_estimate(torch.tensor([0.0]), torch.tensor([20.0]), "low_var_kl").item() == 10.0


def grad(kind, logp, ref):
    lp = torch.tensor([logp], dtype=torch.float64, requires_grad=True)
    kl_estimate(lp, torch.tensor([ref], dtype=torch.float64), kind).sum().backward()
    return lp.grad.item()


@pytest.mark.parametrize("logp, ref", [(-1.0, -1.5), (-2.0, -0.3)])
def test_gradients_closed_form(logp, ref):
    delta = ref - logp
    assert grad("k1", logp, ref) == pytest.approx(1.0)  # d(logp - ref)/dlogp
    assert grad("k2", logp, ref) == pytest.approx(logp - ref)  # d(.5 (ref - logp)^2)/dlogp
    assert grad("k3", logp, ref) == pytest.approx(1.0 - math.exp(delta))  # d(e^d - 1 - d)/dlogp
    assert grad("abs", logp, ref) == pytest.approx(math.copysign(1.0, logp - ref))
    # fkl: d(rho d - rho + 1)/dlogp with d rho/dlogp = -rho: -rho d - rho + rho = -rho d
    assert grad("fkl", logp, ref) == pytest.approx(-math.exp(delta) * delta)
    # straight-through: gradient of k2 whatever the forward value
    for kind in ("k1+", "k3+", "low_var_kl+"):
        assert grad(kind, logp, ref) == pytest.approx(logp - ref)


def test_exact_expectations_on_a_small_support():
    # pi and ref over 3 tokens; E_{x ~ pi}[estimator(x)] summed exactly
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    lp, lr = pi.log(), ref.log()

    def expect(kind):
        return (pi * kl_estimate(lp, lr, kind)).sum().item()

    reverse = (pi * (lp - lr)).sum().item()
    forward = (ref * (lr - lp)).sum().item()
    m = (pi + ref) / 2
    js = 0.5 * (pi * (pi / m).log()).sum().item() + 0.5 * (ref * (ref / m).log()).sum().item()
    assert expect("k1") == pytest.approx(reverse)
    assert expect("k3") == pytest.approx(reverse)
    assert expect("fkl") == pytest.approx(forward)
    assert expect("js") == pytest.approx(js)


def test_mass_covering_estimators_are_nonnegative_and_zero_at_equality():
    lp = torch.linspace(-5, 0, 11)
    for kind in ("k3", "fkl", "js", "k2", "abs"):
        assert (kl_estimate(lp, lp.flip(0), kind) >= -1e-7).all(), kind
        assert kl_estimate(lp, lp, kind).abs().max() < 1e-7, kind


def test_unknown_kind():
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k9")
