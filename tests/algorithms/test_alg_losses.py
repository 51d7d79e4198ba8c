"""Policy losses against hand-computed values and closed-form gradients."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput, aggregate


def make(logp, old, adv, mask=None, **kw) -> tuple[PolicyLossInput, torch.Tensor]:
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    old_t = torch.tensor(old, dtype=torch.float64)
    adv_t = torch.tensor(adv, dtype=torch.float64)
    mask_t = torch.ones_like(old_t) if mask is None else torch.tensor(mask, dtype=torch.float64)
    extra = {k: torch.tensor(v, dtype=torch.float64) for k, v in kw.items()}
    return PolicyLossInput(logprobs=lp, old_logprobs=old_t, advantages=adv_t, mask=mask_t, **extra), lp


def loss_and_grad(name, x, lp, **cfg):
    """Per-token loss and d(sum of token losses)/dlogp."""
    out = POLICY_LOSSES.get(name)(x, PolicyLossConfig(**cfg))
    (out.loss * x.mask).sum().backward()
    return out.loss.detach(), lp.grad.clone(), out.metrics


L = math.log


def approx(t: torch.Tensor, expected, tol=1e-6):
    assert t.flatten().tolist() == pytest.approx(list(expected), abs=tol)


def test_ppo_clip_values_and_gradient():
    # tokens (r, A): (1.1, 1) unclipped  -> l = -1.1, dl/dlogp = -r A = -1.1
    #                (1.5, 1) clipped at 1.2 -> l = -1.2, grad 0
    #                (0.5, -1) clipped at 0.8 -> l = max(0.5, 0.8) = 0.8, grad 0
    #                (0.5, 1) unclipped -> l = -0.5, grad -0.5
    old = [0.0, 0.0, 0.0, 0.0]
    x, lp = make([[L(1.1), L(1.5), L(0.5), L(0.5)]], [old], [[1.0, 1.0, -1.0, 1.0]])
    loss, grad, m = loss_and_grad("ppo_clip", x, lp)
    approx(loss, [-1.1, -1.2, 0.8, -0.5])
    approx(grad, [-1.1, 0.0, 0.0, -0.5])
    assert m["clip_frac"].item() == pytest.approx(0.5)
    assert m["clip_frac_high"].item() == pytest.approx(0.25)
    assert m["clip_frac_low"].item() == pytest.approx(0.25)


def test_ppo_clip_token_mean_gradient_is_minus_r_a_over_n():
    # unclipped region, token-mean over N = 3 tokens: dL/dlogp = -r A / N
    x, lp = make([[L(1.05), L(0.9), L(1.0)]], [[0.0, 0.0, 0.0]], [[2.0, -1.0, 0.5]])
    out = POLICY_LOSSES.get("ppo_clip")(x, PolicyLossConfig())
    aggregate(out.loss, x.mask, "token-mean", num_tokens=3, num_seqs=1, norm_length=3).backward()
    approx(lp.grad, [-1.05 * 2 / 3, 0.9 * 1 / 3, -1.0 * 0.5 / 3])


def test_ppo_dual_clip():
    # r = 4, A = -1: PPO gives max(4, 0.8) = 4; dual clip c = 3 bounds it at -c A = 3 (constant, grad 0)
    x, lp = make([[L(4.0), L(1.1)]], [[0.0, 0.0]], [[-1.0, -1.0]])
    loss, grad, m = loss_and_grad("ppo_clip", x, lp, dual_clip=3.0)
    approx(loss, [3.0, 1.1])
    approx(grad, [0.0, 1.1])
    assert m["dual_clip_frac"].item() == pytest.approx(0.5)


def test_is_weights_multiply_the_loss():
    x, lp = make([[L(1.1)]], [[0.0]], [[1.0]], is_weights=[[0.5]])
    loss, grad, _ = loss_and_grad("ppo_clip", x, lp)
    approx(loss, [-0.55])
    approx(grad, [-0.55])


def test_gpg_gradient_is_minus_a():
    # l = -logp A: value -(-0.5 * 2) = 1, -(-1 * -1) = -1 ; grad = -A
    x, lp = make([[-0.5, -1.0]], [[-0.7, -0.2]], [[2.0, -1.0]])
    loss, grad, _ = loss_and_grad("gpg", x, lp)
    approx(loss, [1.0, -1.0])
    approx(grad, [-2.0, 1.0])


def test_cispo():
    # r = 6 -> weight min(6, 5) = 5: l = -5 * 1 * logp(=-1) = 5, grad -5 ; r = 2 -> weight 2, grad -2 * A(=-1) = 2
    x, lp = make([[-1.0, -2.0]], [[-1.0 - L(6.0), -2.0 - L(2.0)]], [[1.0, -1.0]])
    loss, grad, m = loss_and_grad("cispo", x, lp)
    approx(loss, [5.0, -4.0])
    approx(grad, [-5.0, 2.0])
    assert m["cispo_clip_frac"].item() == pytest.approx(0.5)
    # two-sided (verl): r = 0.5 with min ratio 0.8 -> weight 0.8
    x, lp = make([[-1.0]], [[-1.0 - L(0.5)]], [[1.0]])
    _, grad, _ = loss_and_grad("cispo", x, lp, cispo_min_ratio=0.8)
    approx(grad, [-0.8])


def test_sapo():
    # r = 1, A = 2, tau_pos = 1: gate = sigmoid(0) * 4 = 2 -> l = -4 ; grad = -A * 4 * .25 * 1 = -2
    # r = e^.5, A = -1, tau_neg = 1.05: s = sigmoid(1.05 (e^.5 - 1)); l = s * 4 / 1.05 ; grad = 4 s (1 - s) e^.5
    x, lp = make([[-1.0, -1.0]], [[-1.0, -1.5]], [[2.0, -1.0]])
    loss, grad, _ = loss_and_grad("sapo", x, lp)
    r = math.exp(0.5)
    s = 1 / (1 + math.exp(-1.05 * (r - 1)))
    approx(loss, [-4.0, s * 4 / 1.05])
    approx(grad, [-2.0, 4 * s * (1 - s) * r])


def test_dro():
    # logp = -1, old = -1.5, A = 2, beta = 1: l = -(-2 - .5 * .25) = 2.125 ; grad = -A + beta (logp - old) = -1.5
    x, lp = make([[-1.0]], [[-1.5]], [[2.0]])
    loss, grad, _ = loss_and_grad("dro", x, lp, dro_beta=1.0)
    approx(loss, [2.125])
    approx(grad, [-1.5])


def test_reinforce_is_truncates_pi_over_mu():
    # logp - mu = 1 -> w = min(e, 2) = 2, grad = -2 A ; logp - mu = -.5 -> w = e^-.5 = .606531, grad = -.606531 A
    x, lp = make([[-1.0, -1.0]], [[-9.0, -9.0]], [[1.0, 3.0]], behaviour_logprobs=[[-2.0, -0.5]])
    loss, grad, m = loss_and_grad("reinforce_is", x, lp)
    approx(grad, [-2.0, -3 * math.exp(-0.5)])
    approx(loss, [2.0, 3 * math.exp(-0.5)])  # -w A logp with logp = -1
    assert m["is_clip_frac"].item() == pytest.approx(0.5)
    # without behaviour log-probs the old ones are the behaviour policy
    x, lp = make([[-1.0]], [[-1.2]], [[1.0]])
    _, grad, _ = loss_and_grad("reinforce_is", x, lp)
    approx(grad, [-math.exp(0.2)])


def test_dppo_tv():
    # tok 0: p .5 vs .2, A > 0: p - p_old = .3 > .2 -> outside the trust region: loss 0, grad 0
    # tok 1: p .3 vs .2, A > 0: .1 <= .2 -> kept, r = 1.5: l = -1.5 ln .3, grad -1.5
    # tok 2: p .1 vs .5, A < 0: -.4 < -.2 -> dropped
    # tok 3: p .6 vs .5, A < 0: +.1 >= -.2 -> kept, r = 1.2: l = -(-1) 1.2 ln .6, grad 1.2
    x, lp = make([[L(0.5), L(0.3), L(0.1), L(0.6)]], [[L(0.2), L(0.2), L(0.5), L(0.5)]], [[1.0, 1.0, -1.0, -1.0]])
    loss, grad, m = loss_and_grad("dppo_tv", x, lp)
    approx(loss, [0.0, -1.5 * L(0.3), 0.0, 1.2 * L(0.6)])
    approx(grad, [0.0, -1.5, 0.0, 1.2])
    assert m["trust_region_frac"].item() == pytest.approx(0.5)
    # the stop-gradient ratio is truncated at dppo_ratio_cap
    x, lp = make([[L(0.3)]], [[L(0.2)]], [[1.0]])
    _, grad, _ = loss_and_grad("dppo_tv", x, lp, dppo_ratio_cap=1.2)
    approx(grad, [-1.2])


def test_dppo_kl():
    # p_old .5: p .8 -> KL = .5 ln(.5/.8) + .5 ln(.5/.2) = .223144 > .2 and p > p_old -> dropped for A > 0
    #           p .7 -> KL = .5 ln(.5/.7) + .5 ln(.5/.3) = .087177 <= .2 -> kept, r = 1.4, grad -1.4
    #           p .3 -> moves in the safe direction for A > 0 -> kept whatever the KL, r = .6, grad -.6
    x, lp = make([[L(0.8), L(0.7), L(0.3)]], [[L(0.5)] * 3], [[1.0, 1.0, 1.0]])
    loss, grad, _ = loss_and_grad("dppo_kl", x, lp)
    approx(grad, [0.0, -1.4, -0.6])
    from posttrain.algorithms.losses import binary_kl

    approx(binary_kl(torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.7])), [0.223144, 0.087177])


def _cov_tokens():
    # A = 1, .5, -1, -1 (mean -.125 -> centred 1.125, .625, -.875, -.875)
    # logp = -.4, -2, -.5, -2.1 (mean -1.25 -> centred .85, -.75, .75, -.85)
    # cov = .95625, -.46875, -.65625, .74375 ; every token has log-ratio .1 (r = e^.1)
    logp = [[-0.4, -2.0, -0.5, -2.1]]
    old = [[v - 0.1 for v in logp[0]]]
    return make(logp, old, [[1.0, 0.5, -1.0, -1.0]])


def test_kl_cov():
    # k = max(1, floor(.25 * 4)) = 1 -> token 0 (largest cov) gets + 1.0 * |.1|
    x, lp = _cov_tokens()
    loss, grad, m = loss_and_grad("kl_cov", x, lp, kl_cov_ratio=0.25)
    r = math.exp(0.1)
    approx(loss, [-r + 0.1, -0.5 * r, r, r])
    approx(grad, [-r + 1.0, -0.5 * r, r, r])  # d|logp - old|/dlogp = sign(.1) = 1
    assert m["kl_cov_frac"].item() == pytest.approx(0.25)


def test_clip_cov():
    # window (.9, 1.0) holds only token 0 (cov .95625); r = e^.1 < 1.2 so PPO clips nothing
    # token 0 is detached: loss value kept (-r), gradient 0 ; the others get the PPO gradient -r A
    x, lp = _cov_tokens()
    loss, grad, m = loss_and_grad("clip_cov", x, lp, clip_cov_ratio=0.25, clip_cov_lb=0.9, clip_cov_ub=1.0)
    r = math.exp(0.1)
    approx(loss, [-r, -0.5 * r, r, r])
    approx(grad, [0.0, -0.5 * r, r, r])
    assert m["clip_cov_frac"].item() == pytest.approx(0.25)


# ------------------------------------------------------------ sequence-level losses
def _two_seqs():
    # seq 0: log-ratios .2, 0 (2 tokens) -> log s = .1 ; seq 1: log-ratios -.3, pad -> log s = -.3
    logp = [[-1.0, -2.0], [-1.0, -5.0]]
    old = [[-1.2, -2.0], [-0.7, -5.0]]
    return make(logp, old, [[1.0, 1.0], [-1.0, -1.0]], mask=[[1.0, 1.0], [1.0, 0.0]])


def test_gspo_values_and_gradient():
    x, lp = _two_seqs()
    s0, s1 = math.exp(0.1), math.exp(-0.3)
    # wide clip: unclipped. L_0 = -s0 (A = 1), L_1 = +s1 (A = -1), written on every real token
    out = POLICY_LOSSES.get("gspo")(x, PolicyLossConfig(gspo_clip_low=0.5, gspo_clip_high=0.5))
    approx(out.loss, [-s0, -s0, s1, 0.0])
    # seq-mean-token-mean over 2 sequences = (L_0 + L_1) / 2 ; dL/dlogp_t = -s_i A_i / (|o_i| * 2)
    aggregate(out.loss, x.mask, "seq-mean-token-mean", num_tokens=3, num_seqs=2, norm_length=2).backward()
    approx(lp.grad, [-s0 / 4, -s0 / 4, s1 / 2, 0.0])
    # paper defaults (3e-4, 4e-4): s0 = 1.105 is clipped at 1.0004 (grad 0); s1 = .741 < .9997 with A < 0 -> clipped too
    x, lp = _two_seqs()
    loss, grad, m = loss_and_grad("gspo", x, lp)
    approx(loss, [-1.0004, -1.0004, 0.9997, 0.0])
    approx(grad, [0.0, 0.0, 0.0, 0.0])
    assert m["clip_frac"].item() == pytest.approx(1.0)


def test_gspo_token_matches_gspo_for_sequence_advantages():
    cfg = PolicyLossConfig(gspo_clip_low=0.5, gspo_clip_high=0.5)
    results = []
    for name in ("gspo", "gspo_token"):
        x, lp = _two_seqs()
        out = POLICY_LOSSES.get(name)(x, cfg)
        aggregate(out.loss, x.mask, "seq-mean-token-mean", num_tokens=3, num_seqs=2, norm_length=2).backward()
        results.append((out.loss.detach(), lp.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])


def test_gspo_token_gradient_with_token_advantages():
    # one sequence, log-ratios .2, 0 -> s = e^.1 ; token advantages 1, 3 (unclipped)
    # token t loss = -s A_t, gradient -s A_t ; seq-mean-token-mean divides by |o| = 2
    x, lp = make([[-1.0, -2.0]], [[-1.2, -2.0]], [[1.0, 3.0]])
    out = POLICY_LOSSES.get("gspo_token")(x, PolicyLossConfig(gspo_clip_low=0.5, gspo_clip_high=0.5))
    aggregate(out.loss, x.mask, "seq-mean-token-mean", num_tokens=2, num_seqs=1, norm_length=2).backward()
    s = math.exp(0.1)
    approx(lp.grad, [-s * 1 / 2, -s * 3 / 2])


def test_luspo_scales_by_length():
    x, lp = _two_seqs()
    s0, s1 = math.exp(0.1), math.exp(-0.3)
    loss, _, _ = loss_and_grad("luspo", x, lp, gspo_clip_low=0.5, gspo_clip_high=0.5)
    approx(loss, [-2 * s0, -2 * s0, 1 * s1, 0.0])  # |o_0| = 2, |o_1| = 1


def test_gmpo():
    # seq 0, A = +1, log-ratios .6, -.6, .1: clipped from above at .4 only -> .4, -.6, .1
    #   mean = -.1/3, ratio = e^(-1/30) = .967216, L = -.967216 ; grad on unclipped tokens -A ratio / 3
    # seq 1, A = -1, log-ratios -.6, .6: clipped from below at -.4 only -> -.4, .6 ; mean .1 ; L = +e^.1
    logp = [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]
    old = [[-1.6, -0.4, -1.1], [-0.4, -1.6, -1.0]]
    x, lp = make(logp, old, [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], mask=[[1, 1, 1], [1, 1, 0]])
    out = POLICY_LOSSES.get("gmpo")(x, PolicyLossConfig())
    r0, r1 = math.exp(-0.1 / 3), math.exp(0.1)
    approx(out.loss, [-r0, -r0, -r0, r1, r1, 0.0])
    aggregate(out.loss, x.mask, "seq-mean-token-mean", num_tokens=5, num_seqs=1, norm_length=3).backward()
    # seq-mean-token-mean with num_seqs = 1 sums L_0 + L_1
    approx(lp.grad, [0.0, -r0 / 3, -r0 / 3, 0.0, r1 / 2, 0.0])
    assert out.metrics["clip_frac"].item() == pytest.approx(2 / 5)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_every_loss_is_finite_and_differentiable(name):
    gen = torch.Generator().manual_seed(0)
    n, t = 4, 6
    mask = (torch.arange(t) < torch.tensor([[6], [3], [1], [5]])).double()
    lp = (-torch.rand(n, t, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    x = PolicyLossInput(
        logprobs=lp, old_logprobs=lp.detach() + 0.1 * torch.randn(n, t, generator=gen, dtype=torch.float64),
        advantages=torch.randn(n, 1, generator=gen, dtype=torch.float64).expand(n, t) * mask, mask=mask,
        behaviour_logprobs=lp.detach() + 0.05, is_weights=torch.ones(n, t, dtype=torch.float64),
        entropy=torch.rand(n, t, generator=gen, dtype=torch.float64) * 2,  # hapo reads the learner's entropy
    )
    out = POLICY_LOSSES.get(name)(x, PolicyLossConfig())
    assert out.loss.shape == (n, t) and torch.isfinite(out.loss).all()
    aggregate(out.loss, mask, "token-mean", num_tokens=float(mask.sum()), num_seqs=n, norm_length=t).backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad * (1 - mask)).abs().sum() == 0
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
