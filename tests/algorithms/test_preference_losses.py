"""Preference losses against hand-computed values and closed-form gradients.

Shared 3-pair example (beta = 0.1), pi = policy sequence log-prob, ref = reference:
    pair   pi_c   pi_r   ref_c  ref_r  |y_c| |y_r|   h = (pi_c - ref_c) - (pi_r - ref_r)
    0      -10    -14    -11    -12    4     7       1 - (-2) = 3
    1       -8     -8     -8     -8    2     2       0
    2      -20    -10    -15    -12    5     2       -5 - 2 = -7
so z = beta * h = (0.3, 0, -0.7). Below, sp(x) = -log sigma(x) = log(1 + e^-x):
sp(0.3) = log(1.740818) = 0.554355, sp(0) = 0.693147, sp(-0.7) = log(3.013753) = 1.103186,
sigma(-0.3) = 0.425557, sigma(0) = 0.5, sigma(0.7) = 0.668188.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.catalog import catalog
from posttrain.algorithms.preference import (
    PREFERENCE_LOSSES,
    PreferenceConfig,
    PreferenceInput,
    lipo_lambda_weights,
    sequence_logps,
)

D = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def pairs(pi_c=(-10.0, -8.0, -20.0), pi_r=(-14.0, -8.0, -10.0), ref_c=(-11.0, -8.0, -15.0),
          ref_r=(-12.0, -8.0, -12.0), len_c=(4, 2, 5), len_r=(7, 2, 2), **kw):
    """The shared example; returns the input and the leaf tensors (chosen, rejected) to differentiate."""
    c = t(pi_c).requires_grad_()
    r = t(pi_r).requires_grad_()
    refs = {} if ref_c is None else {"ref_chosen_logps": t(ref_c), "ref_rejected_logps": t(ref_r)}
    extra = {k: t(v) for k, v in kw.items()}
    inp = PreferenceInput.pairs(c, r, t(len_c), t(len_r), **refs, **extra)
    return inp, c, r


def run(name, inp, **cfg):
    out = PREFERENCE_LOSSES.get(name)(inp, PreferenceConfig(**cfg))
    assert out.loss.shape == inp.logps.shape[:1]
    out.loss.sum().backward()
    return out


def approx(x: torch.Tensor, expected, tol=1e-6):
    assert x.detach().flatten().tolist() == pytest.approx(list(expected), abs=tol)


# ---------------------------------------------------------------- sigmoid family
def test_dpo_values_gradient_and_metrics():
    inp, c, r = pairs()
    out = run("dpo", inp)
    # L = sp(z): (0.554355, 0.693147, 1.103186)
    approx(out.loss, [0.554355, 0.693147, 1.103186])
    # dL/dpi_c = -beta sigma(-z) = (-0.1 * 0.425557, -0.1 * 0.5, -0.1 * 0.668188); dL/dpi_r = -dL/dpi_c
    approx(c.grad, [-0.042556, -0.05, -0.066819])
    approx(r.grad, [0.042556, 0.05, 0.066819])
    m = out.metrics
    # rewards beta (pi - ref): chosen (0.1, 0, -0.5), rejected (-0.2, 0, 0.2)
    assert m["reward_chosen"].item() == pytest.approx((0.1 + 0 - 0.5) / 3)
    assert m["reward_rejected"].item() == pytest.approx((-0.2 + 0 + 0.2) / 3)
    assert m["reward_margin"].item() == pytest.approx((0.3 + 0 - 0.7) / 3)
    # only pair 0 has chosen reward > rejected (pair 1 ties, pair 2 is wrong)
    assert m["reward_accuracy"].item() == pytest.approx(1 / 3)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_dpo_margins_are_an_offset_on_the_logit():
    # m = (0.3, -1, 0): z = (0.3 - 0.3, 0 + 1, -0.7) = (0, 1, -0.7)
    # sp(0) = 0.693147, sp(1) = log(1 + e^-1) = 0.313262, sp(-0.7) = 1.103186
    inp, c, _ = pairs(margins=(0.3, -1.0, 0.0))
    out = run("dpo", inp)
    approx(out.loss, [0.693147, 0.313262, 1.103186])
    # dL/dpi_c = -0.1 sigma(-z): sigma(0) = 0.5, sigma(-1) = 0.268941, sigma(0.7) = 0.668188
    approx(c.grad, [-0.05, -0.026894, -0.066819])


def test_cdpo_values_and_gradient():
    # eps = 0.1: L = 0.9 sp(z) + 0.1 sp(-z) = sp(z) + eps z  (since sp(-z) = sp(z) + z)
    #   (0.554355 + 0.03, 0.693147, 1.103186 - 0.07) = (0.584355, 0.693147, 1.033186)
    inp, c, r = pairs()
    out = run("cdpo", inp, label_smoothing=0.1)
    approx(out.loss, [0.584355, 0.693147, 1.033186])
    # dL/dpi_c = beta (eps - sigma(-z)) = 0.1 * (0.1 - (0.425557, 0.5, 0.668188))
    approx(c.grad, [-0.032556, -0.04, -0.056819])
    approx(r.grad, [0.032556, 0.04, 0.056819])


def test_cdpo_with_zero_smoothing_is_dpo():
    a, _, _ = pairs()
    b, _, _ = pairs()
    approx(run("cdpo", a, label_smoothing=0.0).loss, run("dpo", b).loss.tolist(), tol=1e-12)


def test_rdpo_values_and_gradient():
    # eps = 0.1: L = [0.9 sp(z) - 0.1 sp(-z)] / 0.8 = sp(z) - eps z / (1 - 2 eps) = sp(z) - z / 8
    #   (0.554355 - 0.0375, 0.693147, 1.103186 + 0.0875) = (0.516855, 0.693147, 1.190686)
    inp, c, r = pairs()
    out = run("rdpo", inp, label_smoothing=0.1)
    approx(out.loss, [0.516855, 0.693147, 1.190686])
    # dL/dpi_c = -beta (sigma(-z) + 0.125) = -0.1 * (0.550557, 0.625, 0.793188)
    approx(c.grad, [-0.055056, -0.0625, -0.079319])
    approx(r.grad, [0.055056, 0.0625, 0.079319])


def test_rdpo_is_unbiased_under_label_flips():
    # The paper's property: (1 - eps) L_rdpo(z) + eps L_rdpo(-z) = sp(z) (the clean DPO loss),
    # where L_rdpo(-z) is the loss on the flipped pair (swap chosen and rejected).
    eps = 0.2
    inp, _, _ = pairs()
    flipped = PreferenceInput(logps=inp.logps.detach().flip(1), lengths=inp.lengths.flip(1),
                              ref_logps=inp.ref_logps.flip(1))
    cfg = PreferenceConfig(label_smoothing=eps)
    fn = PREFERENCE_LOSSES.get("rdpo")
    mix = (1 - eps) * fn(inp, cfg).loss + eps * fn(flipped, cfg).loss
    approx(mix, [0.554355, 0.693147, 1.103186])


# ---------------------------------------------------------------- IPO, hinge
def test_ipo_values_and_gradient_sum_logps():
    # tau = beta = 0.1, target 1/(2 tau) = 5; h = (3, 0, -7)
    # L = (h - 5)^2 = (4, 25, 144); dL/dpi_c = 2 (h - 5) = (-4, -10, -24) = -dL/dpi_r
    inp, c, r = pairs()
    out = run("ipo", inp)
    approx(out.loss, [4.0, 25.0, 144.0])
    approx(c.grad, [-4.0, -10.0, -24.0])
    approx(r.grad, [4.0, 10.0, 24.0])


def test_ipo_length_normalized():
    # h = (pi_c - ref_c)/|y_c| - (pi_r - ref_r)/|y_r|:
    #   pair 0: 1/4 - (-2)/7 = 0.25 + 0.285714 = 0.535714; pair 1: 0; pair 2: -5/5 - 2/2 = -2
    # L = (h - 5)^2 = (19.929847, 25, 49); dL/dpi_c = 2 (h - 5) / |y_c| = (-8.928571/4, -10/2, -14/5)
    inp, c, _ = pairs()
    out = run("ipo", inp, ipo_length_normalize=True)
    approx(out.loss, [19.929847, 25.0, 49.0])
    approx(c.grad, [-2.232143, -5.0, -2.8])


def test_hinge_values_and_gradient():
    # beta = 1: z = h = (3, 0, -7); L = max(0, 1 - z) = (0, 1, 8)
    # dL/dpi_c = -beta where active (pairs 1, 2), 0 where the margin is met (pair 0)
    inp, c, r = pairs()
    out = run("hinge", inp, beta=1.0)
    approx(out.loss, [0.0, 1.0, 8.0])
    approx(c.grad, [0.0, -1.0, -1.0])
    approx(r.grad, [0.0, 1.0, 1.0])
    # default beta = 0.1: z = (0.3, 0, -0.7) -> L = (0.7, 1, 1.7), all active, grad -0.1
    inp, c, _ = pairs()
    out = run("hinge", inp)
    approx(out.loss, [0.7, 1.0, 1.7])
    approx(c.grad, [-0.1, -0.1, -0.1])


# ---------------------------------------------------------------- reference-free losses
def test_simpo_values_and_gradient():
    # beta = 2, gamma = beta * 0.5 = 1; mean log-probs pi/|y|:
    #   pair 0: -10/4 = -2.5 vs -14/7 = -2 -> z = 2 (-0.5) - 1 = -2 -> sp(-2) = log(1 + e^2) = 2.126928
    #   pair 1: -4 vs -4                   -> z = -1               -> sp(-1) = 1.313262
    #   pair 2: -20/5 = -4 vs -10/2 = -5   -> z = 2 (1) - 1 = 1    -> sp(1) = 0.313262
    inp, c, r = pairs()
    out = run("simpo", inp)
    approx(out.loss, [2.126928, 1.313262, 0.313262])
    # dL/dpi_c = -sigma(-z) beta / |y_c|: sigma(2) = 0.880797 -> -0.880797 * 2/4 = -0.440399,
    #   sigma(1) = 0.731059 -> * 2/2; sigma(-1) = 0.268941 -> * 2/5 = -0.107577
    approx(c.grad, [-0.440399, -0.731059, -0.107577])
    # dL/dpi_r = sigma(-z) beta / |y_r|: 0.880797 * 2/7 = 0.251656, 0.731059, 0.268941 * 2/2
    approx(r.grad, [0.251656, 0.731059, 0.268941])
    # rewards are beta * mean log-prob: chosen (-5, -8, -8), rejected (-4, -8, -10) -> accuracy 1/3
    assert out.metrics["reward_accuracy"].item() == pytest.approx(1 / 3)
    # the reference model is not used
    no_ref, _, _ = pairs(ref_c=None)
    approx(run("simpo", no_ref).loss, out.loss.tolist(), tol=1e-12)


def test_orpo_values_and_gradient():
    # pair 0: mean token prob p_c = 0.5 over |y_c| = 2, p_r = 0.2 over |y_r| = 3
    #   odds_c = 1 (log 0), odds_r = 0.25 (log -1.386294); R = log 4 = 1.386294
    #   L_OR = sp(R) = log(1 + 1/4) = 0.223144; NLL = -log 0.5 = 0.693147
    #   L = 0.693147 + 0.1 * 0.223144 = 0.715462
    # pair 1: swapped probabilities (p_c = 0.2 over 2 tokens, p_r = 0.5 over 3): R = -log 4
    #   L_OR = log(1 + 4) = 1.609438; NLL = -log 0.2 = 1.609438; L = 1.609438 * 1.1 = 1.770382
    inp, c, r = pairs(pi_c=(2 * math.log(0.5), 2 * math.log(0.2)), pi_r=(3 * math.log(0.2), 3 * math.log(0.5)),
                      ref_c=None, len_c=(2, 2), len_r=(3, 3))
    out = run("orpo", inp)
    approx(out.loss, [0.715462, 1.770382])
    # sigma(-R): pair 0 = 1/(1 + 4) = 0.2, pair 1 = 0.8
    # dL/dpi_c = -(1 + lambda sigma(-R) / (1 - p_c)) / |y_c|:
    #   pair 0: -(1 + 0.1 * 0.2 / 0.5) / 2 = -0.52; pair 1: -(1 + 0.1 * 0.8 / 0.8) / 2 = -0.55
    approx(c.grad, [-0.52, -0.55])
    # dL/dpi_r = lambda sigma(-R) / ((1 - p_r) |y_r|): pair 0: 0.02 / (0.8 * 3) = 0.008333;
    #   pair 1: 0.08 / (0.5 * 3) = 0.053333
    approx(r.grad, [0.008333, 0.053333])
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(0.0, abs=1e-9)  # (log 4 - log 4) / 2
    assert out.metrics["reward_accuracy"].item() == pytest.approx(0.5)


def test_orpo_uses_given_chosen_nll():
    inp, _, _ = pairs(pi_c=(2 * math.log(0.5),), pi_r=(3 * math.log(0.2),), ref_c=None, len_c=(2,), len_r=(3,),
                      chosen_nll=(2.0,))
    # L = 2.0 + 0.1 * 0.223144
    approx(run("orpo", inp).loss, [2.0223144])


# ---------------------------------------------------------------- LiPO-lambda (listwise)
def test_lipo_lambda_k3_values_and_gradient():
    # One list of K = 3, beta = 1: s = pi - ref = (1, 3, -2), labels psi = (2, 1, 0).
    # Gains G = 2^psi - 1 = (3, 1, 0). Ranks by s: tau = (2, 1, 3);
    #   1/D(tau) = 1/log2(1 + tau) = (1/log2 3, 1, 1/2) = (0.630930, 1, 0.5)
    # Delta_01 = |3 - 1| |0.630930 - 1| = 0.738140, Delta_02 = 3 * 0.130930 = 0.392789,
    # Delta_12 = 1 * 0.5 = 0.5
    # L = 0.738140 sp(1 - 3) + 0.392789 sp(1 + 2) + 0.5 sp(3 + 2)
    #   = 0.738140 * 2.126928 + 0.392789 * 0.048587 + 0.5 * 0.006715
    #   = 1.569972 + 0.019085 + 0.003358 = 1.592414
    logps = t([[1.0, 3.0, -2.0]]).requires_grad_()
    inp = PreferenceInput(logps=logps, lengths=t([[3, 4, 5]]), ref_logps=torch.zeros(1, 3, dtype=D),
                          scores=t([[2.0, 1.0, 0.0]]))
    out = run("lipo", inp, beta=1.0)
    approx(out.loss, [1.592414])
    # dL/ds_i = -sum_{i beats j} Delta_ij sigma(s_j - s_i) + sum_{j beats i} Delta_ji sigma(s_i - s_j):
    #   w01 = 0.738140 * sigma(2) = 0.650155, w02 = 0.392789 * sigma(-3) = 0.018625,
    #   w12 = 0.5 * sigma(-5) = 0.003350
    #   ds_0 = -(w01 + w02) = -0.668780, ds_1 = w01 - w12 = 0.646806, ds_2 = w02 + w12 = 0.021975
    approx(logps.grad, [-0.668780, 0.646806, 0.021975])
    # pairs (0,1), (0,2), (1,2): s orders (0,2) and (1,2) correctly, (0,1) wrongly -> 2/3
    assert out.metrics["reward_accuracy"].item() == pytest.approx(2 / 3)


def test_lipo_default_labels_are_column_order_and_weights_have_no_grad():
    s = t([[1.0, 3.0, -2.0]]).requires_grad_()
    w = lipo_lambda_weights(t([[2.0, 1.0, 0.0]]), s)
    assert not w.requires_grad
    approx(w, [0, 0.738140, 0.392789, 0, 0, 0.5, 0, 0, 0])  # only i with psi_i > psi_j
    a = PREFERENCE_LOSSES.get("lipo")(PreferenceInput(logps=s.detach(), lengths=torch.ones(1, 3, dtype=D),
                                                      ref_logps=torch.zeros(1, 3, dtype=D)), PreferenceConfig(beta=1.0))
    approx(a.loss, [1.592414])  # scores None -> psi = (2, 1, 0), the list above


def test_lipo_on_pairs_is_scaled_dpo():
    # K = 2, labels (1, 0): Delta = |1 - 0| * |1/log2(2) - 1/log2(3)| = 1 - 0.630930 = 0.369070
    a, _, _ = pairs()
    b, _, _ = pairs()
    dpo = run("dpo", a).loss
    approx(run("lipo", b).loss, (0.369070 * dpo).tolist())


def test_lipo_equal_labels_contribute_nothing():
    inp = PreferenceInput(logps=t([[-1.0, -5.0, -3.0]]).requires_grad_(), lengths=torch.ones(1, 3, dtype=D),
                          ref_logps=torch.zeros(1, 3, dtype=D), scores=t([[1.0, 1.0, 1.0]]))
    approx(run("lipo", inp).loss, [0.0])


# ---------------------------------------------------------------- contract
def test_sequence_logps_ignores_padding_even_if_infinite():
    token_logps = t([[-1.0, -2.0, float("-inf")], [-0.5, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, lengths = sequence_logps(token_logps, mask)
    approx(total, [-3.0, -0.5])
    approx(lengths, [2.0, 1.0])
    assert lengths.dtype == D


def test_reference_free_equals_zero_reference():
    a, _, _ = pairs(ref_c=(0.0, 0.0, 0.0), ref_r=(0.0, 0.0, 0.0))
    b, _, _ = pairs(ref_c=None)
    approx(run("dpo", b, reference_free=True).loss, run("dpo", a).loss.tolist(), tol=1e-12)


@pytest.mark.parametrize("name", ["dpo", "cdpo", "rdpo", "ipo", "hinge", "lipo"])
def test_reference_based_losses_need_a_reference(name):
    inp, _, _ = pairs(ref_c=None)
    with pytest.raises(ValueError, match="needs ref_logps"):
        PREFERENCE_LOSSES.get(name)(inp, PreferenceConfig())


@pytest.mark.parametrize("name", ["dpo", "cdpo", "rdpo", "ipo", "hinge", "simpo", "orpo"])
def test_pairwise_losses_reject_lists(name):
    inp = PreferenceInput(logps=torch.zeros(2, 3, dtype=D) - 1, lengths=torch.ones(2, 3, dtype=D),
                          ref_logps=torch.zeros(2, 3, dtype=D))
    with pytest.raises(ValueError, match="is pairwise"):
        PREFERENCE_LOSSES.get(name)(inp, PreferenceConfig())


@pytest.mark.parametrize("name", ["ipo", "orpo", "lipo"])
def test_losses_without_margins_refuse_them(name):
    inp, _, _ = pairs(margins=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="does not use margins"):
        PREFERENCE_LOSSES.get(name)(inp, PreferenceConfig())


def test_input_validation():
    with pytest.raises(ValueError, match="K >= 2"):
        PreferenceInput(logps=torch.zeros(3, 1), lengths=torch.ones(3, 1))
    with pytest.raises(ValueError, match="ref_logps must have the shape"):
        PreferenceInput(logps=torch.zeros(3, 2), lengths=torch.ones(3, 2), ref_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="margins must be"):
        PreferenceInput(logps=torch.zeros(3, 2), lengths=torch.ones(3, 2), margins=torch.zeros(2))
    with pytest.raises(ValueError, match="lengths must be >= 1"):
        PreferenceInput(logps=torch.zeros(3, 2), lengths=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="chosen completion first"):
        PreferenceInput(logps=torch.zeros(1, 2), lengths=torch.ones(1, 2), scores=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="or neither"):
        PreferenceInput.pairs(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1),
                              ref_chosen_logps=torch.zeros(1))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"beta": 0.0}, "algorithm.preference.beta"),
        ({"label_smoothing": 0.5}, "algorithm.preference.label_smoothing"),
        ({"simpo_beta": -1.0}, "algorithm.preference.simpo_beta"),
        ({"simpo_gamma_beta_ratio": -0.1}, "algorithm.preference.simpo_gamma_beta_ratio"),
        ({"orpo_lambda": -1.0}, "algorithm.preference.orpo_lambda"),
    ],
)
def test_config_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        PreferenceConfig(**kwargs)


def test_config_defaults():
    cfg = PreferenceConfig()
    assert cfg.beta == 0.1  # DPO
    assert (cfg.simpo_beta, cfg.simpo_gamma_beta_ratio, cfg.simpo_gamma) == (2.0, 0.5, 1.0)  # SimPO
    assert cfg.orpo_lambda == 0.1  # ORPO
    assert cfg.ipo_length_normalize is False and cfg.reference_free is False


def test_registry_cites_papers_and_catalog_lists_preference_losses():
    assert set(PREFERENCE_LOSSES.names()) == {"dpo", "cdpo", "rdpo", "ipo", "hinge", "simpo", "orpo", "lipo"}
    for e in PREFERENCE_LOSSES.entries():
        doc = e.fn.__doc__ or ""
        assert e.paper and e.paper in doc and doc.strip().splitlines()[0], e.name
        if e.name != "cdpo":  # Mitchell's cDPO note has no arXiv id
            assert "arXiv:" in e.paper, e.name
    rows = {(r["kind"], r["name"]): r for r in catalog()}
    for name in PREFERENCE_LOSSES.names():
        row = rows[("preference_loss", name)]
        assert row["summary"] and row["paper"]
