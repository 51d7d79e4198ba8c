"""Advantage estimators against values computed by hand on tiny batches."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput, gae_returns, value_loss
from posttrain.algorithms.advantages import masked_whiten

NAN = float("nan")


def inp(rewards, groups, lengths=None, t=3, **kw) -> AdvantageInput:
    rewards = torch.tensor(rewards, dtype=torch.float32)
    n = rewards.shape[0]
    lengths = lengths or [t] * n
    mask = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lengths])
    return AdvantageInput(rewards=rewards, group_ids=torch.tensor(groups), mask=mask, **kw)


def per_sample(adv: torch.Tensor) -> list[float]:
    return adv[:, 0].tolist()


def run(name, x, **cfg):
    return ADVANTAGES.get(name)(x, AdvantageConfig(**cfg))


def approx(values, expected, tol=1e-5):
    assert len(values) == len(expected)
    for v, e in zip(values, expected):
        assert v == pytest.approx(e, abs=tol)


# ------------------------------------------------------------ group estimators
def test_grpo_by_hand():
    # group 0: r = 1,0,0,1 -> mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735
    # A = +-0.5 / 0.57735 = +-0.866025; group 1: r = 1,1 -> std 0 -> A = 0
    a = run("grpo", inp([1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]), eps=0.0)
    approx(per_sample(a), [0.866025, -0.866025, -0.866025, 0.866025, 0.0, 0.0])
    # Dr.GRPO via the flag: A = r - mean
    a = run("grpo", inp([1, 0, 0, 1], [0, 0, 0, 0]), std_normalize=False)
    approx(per_sample(a), [0.5, -0.5, -0.5, 0.5])


def test_padding_is_zero():
    a = run("grpo", inp([1, 0], [0, 0], lengths=[3, 1]))
    assert a[1, 1:].abs().sum() == 0 and a[0].abs().min() > 0


def test_dr_grpo_and_minirl_ignore_std():
    x = inp([1, 0, 0, 1], [0, 0, 0, 0])
    # A = r - 0.5 whatever std_normalize says
    approx(per_sample(run("dr_grpo", x, std_normalize=True)), [0.5, -0.5, -0.5, 0.5])
    approx(per_sample(run("minirl", x)), [0.5, -0.5, -0.5, 0.5])


def test_rloo_by_hand():
    # group 0: r = 1,0,0 -> A_0 = 1 - (0+0)/2 = 1; A_1 = 0 - (1+0)/2 = -0.5; A_2 = -0.5
    # group 1 is a singleton: no leave-one-out baseline -> 0
    a = run("rloo", inp([1, 0, 0, 0.7], [0, 0, 0, 1]))
    approx(per_sample(a), [1.0, -0.5, -0.5, 0.0])


def test_opo_by_hand():
    # lengths 1 and 3, r = 1, 0: b = (1*1 + 3*0) / (1 + 3) = 0.25 -> A = 0.75, -0.25
    a = run("opo", inp([1, 0], [0, 0], lengths=[1, 3]))
    approx(per_sample(a), [0.75, -0.25])


def test_remax_by_hand():
    x = inp([1, 0.5], [0, 1], baseline_rewards=torch.tensor([0.5, 0.5]))
    approx(per_sample(run("remax", x)), [0.5, 0.0])  # r - b
    with pytest.raises(ValueError, match="baseline_rewards"):
        run("remax", inp([1, 0.5], [0, 1]))


def test_gpg_by_hand():
    # group 0: r = 1,0 (valid); group 1: r = 1,1 (zero variance, M = 2 samples); B = 4
    # alpha = B / (B - M) = 2; A = 2 * (r - mean_g) = 1, -1, 0, 0
    approx(per_sample(run("gpg", inp([1, 0, 1, 1], [0, 0, 1, 1]))), [1.0, -1.0, 0.0, 0.0])


def test_grpo_passk_by_hand():
    # r = 0.2, 0.9, 0.5: best is sample 1, A = 0.9 - 0.5 = 0.4; others 0
    x = inp([0.2, 0.9, 0.5], [0, 0, 0])
    approx(per_sample(run("grpo_passk", x, std_normalize=False)), [0.0, 0.4, 0.0])
    # normalised: mean 0.53333, squares of deviations 0.111111 + 0.134444 + 0.001111 = 0.246667,
    # var = 0.246667 / 2 = 0.123333, std = 0.351188 -> A = 0.4 / 0.351188 = 1.138990
    approx(per_sample(run("grpo_passk", x, eps=0.0)), [0.0, 1.138990, 0.0])
    # a tie at the top: r_max - r_2nd = 0 for the whole group
    approx(per_sample(run("grpo_passk", inp([1, 1, 0], [0, 0, 0]))), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=">= 2"):
        run("grpo_passk", inp([1, 0, 1], [0, 0, 1]))


def test_lite_ppo_by_hand():
    # group means 0.5 and 1 -> centred 0.5, -0.5, 0, 0
    # batch std of r = 1,0,1,1: mean 0.75, squares .0625+.5625+.0625+.0625 = .75, var .25, std .5
    a = run("lite_ppo", inp([1, 0, 1, 1], [0, 0, 1, 1]), eps=0.0)
    approx(per_sample(a), [1.0, -1.0, 0.0, 0.0])


def test_reinforce_plus_plus_baseline_by_hand():
    # centred per sample: 0.5, -0.5, 0, 0 ; lengths 2, 1, 1, 2 -> token values
    # [0.5, 0.5, -0.5, 0, 0, 0]: mean 1/12 = 0.083333
    # deviations .416667 x2, -.583333, -.083333 x3; squares sum .708333; var /5 = .141667
    x = inp([1, 0, 1, 1], [0, 0, 1, 1], lengths=[2, 1, 1, 2])
    a = run("reinforce_plus_plus_baseline", x, eps=0.0)
    std = math.sqrt(0.708333333 / 5)
    assert a[0, 0].item() == pytest.approx(0.416667 / std, abs=1e-4)
    assert a[0, 1].item() == pytest.approx(0.416667 / std, abs=1e-4)
    assert a[1, 0].item() == pytest.approx(-0.583333 / std, abs=1e-4)
    assert a[3, 1].item() == pytest.approx(-0.083333 / std, abs=1e-4)
    assert a[1, 1].item() == 0.0  # padding


def test_gdpo_by_hand():
    # group 0: a = 1,0 b = 1,1 ; group 1: a = 0,0 b = 1,0
    # z_a = +-0.5 / 0.707107 = +-0.707107 in group 0, 0 in group 1; z_b = 0 in group 0, +-0.707107 in group 1
    # sum = .707107, -.707107, .707107, -.707107; batch z-score: mean 0, unbiased std
    # sqrt(4 * 0.5 / 3) = 0.816497 -> +-0.866025
    # a composite reward's components: the default takes its parts a, b (not total)
    comps = {"a": torch.tensor([1.0, 0, 0, 0]), "b": torch.tensor([1.0, 1, 1, 0]), "total": torch.tensor([2.0, 1, 1, 0])}
    x = inp([2, 1, 1, 0], [0, 0, 1, 1], reward_components=comps)
    approx(per_sample(run("gdpo", x, eps=0.0)), [0.866025, -0.866025, 0.866025, -0.866025])
    # without batch normalisation, with weights (a: 2, b: 1): 1.414214, -1.414214, .707107, -.707107
    a = run("gdpo", x, eps=0.0, gdpo_batch_normalize=False, gdpo_components=["a", "b"], gdpo_weights=[2.0, 1.0])
    approx(per_sample(a), [1.414214, -1.414214, 0.707107, -0.707107])
    with pytest.raises(ValueError, match="reward_components"):
        run("gdpo", inp([1, 0], [0, 0]))
    with pytest.raises(ValueError, match="missing"):
        run("gdpo", x, gdpo_components=["c"])


# ------------------------------------------------------------ token-level estimators
def test_reinforce_plus_plus_by_hand():
    # sample 0: mask 1,1,1, r = 1, gamma 0.5 -> G = 0.25, 0.5, 1 ; sample 1: mask 1,1,0, r = 0 -> G = 0, 0
    # tokens 0.25, 0.5, 1, 0, 0: mean 0.35, deviations -.1 .15 .65 -.35 -.35, squares sum .7, var .175
    x = inp([1, 0], [0, 1], lengths=[3, 2])
    a = run("reinforce_plus_plus", x, gamma=0.5, eps=0.0)
    std = math.sqrt(0.175)
    approx(a[0].tolist(), [-0.1 / std, 0.15 / std, 0.65 / std])
    approx(a[1].tolist(), [-0.35 / std, -0.35 / std, 0.0])


def test_gae_by_hand():
    # V = .5 .2 .1, reward 1 on the last token, gamma 1, lambda .5
    # t=2: delta = 1 + 0 - .1 = .9, A = .9 ; t=1: delta = 0 + .1 - .2 = -.1, A = -.1 + .5 * .9 = .35
    # t=0: delta = 0 + .2 - .5 = -.3, A = -.3 + .5 * .35 = -.125 ; returns = A + V = .375 .55 1.0
    x = inp([1.0], [0], values=torch.tensor([[0.5, 0.2, 0.1]]))
    cfg = AdvantageConfig(gamma=1.0, lam=0.5, gae_whiten=False)
    approx(ADVANTAGES.get("gae")(x, cfg)[0].tolist(), [-0.125, 0.35, 0.9])
    approx(gae_returns(x, cfg)[0].tolist(), [0.375, 0.55, 1.0])
    # lambda = 1: Monte-Carlo advantage R - V_t = .5 .8 .9
    approx(run("gae", x, gamma=1.0, lam=1.0, gae_whiten=False)[0].tolist(), [0.5, 0.8, 0.9])


def test_gae_carries_through_masked_gap_and_whitens():
    # mask 1,0,1: the masked middle token is skipped: t=2: A = .9 ; t=0: delta = 0 + .1 - .5 = -.4,
    # A = -.4 + .5 * .9 = .05
    x = AdvantageInput(
        rewards=torch.tensor([1.0]), group_ids=torch.tensor([0]), mask=torch.tensor([[1.0, 0.0, 1.0]]),
        values=torch.tensor([[0.5, 9.0, 0.1]]),
    )
    a = run("gae", x, gamma=1.0, lam=0.5, gae_whiten=False)
    approx(a[0].tolist(), [0.05, 0.0, 0.9])
    raw = a
    white = run("gae", x, gamma=1.0, lam=0.5, gae_whiten=True)
    assert torch.allclose(white, masked_whiten(raw, x.mask, 1e-6))
    with pytest.raises(ValueError, match="values"):
        run("gae", inp([1.0], [0]))


def test_value_loss_by_hand_and_gradient():
    # token 0: V = 1, V_old = .5, R = 2: unclipped (1-2)^2 = 1; clipped V = .7 -> (.7-2)^2 = 1.69
    #   loss = .5 * 1.69 = .845 and the gradient is 0 (the clipped branch is constant in V)
    # token 1: V = .6, V_old = .5, R = 0: both branches .36 -> loss .18, dL/dV = V - R = .6
    v = torch.tensor([[1.0, 0.6]], requires_grad=True)
    out = value_loss(v, torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), clip_range=0.2)
    approx(out.loss[0].tolist(), [0.845, 0.18])
    out.loss.sum().backward()
    approx(v.grad[0].tolist(), [0.0, 0.6])
    assert out.metrics["vf_clip_frac"].item() == pytest.approx(0.5)


def test_pure_by_hand():
    # sample 0: step rewards .2 at t=1, .9 at t=3 -> V = min of future steps = .2 .2 .9 .9 ; trajectory .2
    # sample 1: steps .5 at t=0, .7 at t=2, t=3 padding -> V = .5 .7 .7 (pad 0) ; trajectory .5
    # RLOO baseline: b_0 = .5, b_1 = .2 -> A_0 = -.3 -.3 .4 .4 ; A_1 = .3 .5 .5 0
    tr = torch.tensor([[NAN, 0.2, NAN, 0.9], [0.5, NAN, 0.7, NAN]])
    x = inp([0, 0], [0, 0], lengths=[4, 3], t=4, token_rewards=tr)
    a = run("pure", x)
    approx(a[0].tolist(), [-0.3, -0.3, 0.4, 0.4])
    approx(a[1].tolist(), [0.3, 0.5, 0.5, 0.0])
    a = run("pure", x, pure_rloo_baseline=False)
    approx(a[0].tolist(), [0.2, 0.2, 0.9, 0.9])
    # tokens after the last step get 0: sample with a single step at t=1
    x = inp([0], [0], t=3, token_rewards=torch.tensor([[NAN, 0.4, NAN]]))
    approx(run("pure", x)[0].tolist(), [0.4, 0.4, 0.0])
    with pytest.raises(ValueError, match="token_rewards"):
        run("pure", inp([0], [0]))


# ------------------------------------------------------------ shaped estimators
def test_w_reinforce_by_hand():
    # correct -> lambda = 0.1, wrong (0 or -1) -> -1
    approx(per_sample(run("w_reinforce", inp([1, 0, -1], [0, 0, 0]))), [0.1, -1.0, -1.0])
    approx(per_sample(run("w_reinforce", inp([1, 0], [0, 0]), psr_weight=0.5)), [0.5, -1.0])


def test_unlikeliness_by_hand():
    # G = 4, r = 1,1,0,1, sequence log-likelihoods -1, -5, -2, -3 (logprobs on a single token)
    # correct samples ranked least likely first: s1 (-5) u=0, s3 (-3) u=1, s0 (-1) u=2
    # factors 1 - .25 u / 4: s0 .875, s1 1, s3 .9375 -> r' = .875, 1, 0, .9375, mean .703125
    # Dr-style (no std): A = .171875, .296875, -.703125, .234375
    lp = torch.tensor([[-1.0], [-5.0], [-2.0], [-3.0]])
    x = inp([1, 1, 0, 1], [0, 0, 0, 0], t=1, logprobs=lp)
    approx(per_sample(run("unlikeliness", x, std_normalize=False)), [0.171875, 0.296875, -0.703125, 0.234375])
    with pytest.raises(ValueError, match="logprobs"):
        run("unlikeliness", inp([1, 0], [0, 0]))


def test_seed_grpo_by_hand():
    # group 0 answers 2,2,3,None: clusters of size 2,1,1 -> p = .5 .25 .25
    # H = -(.5 ln .5 + 2 * .25 ln .25) = 1.039721 ; H_max = ln 4 = 1.386294 ; H / H_max = .75
    # alpha 1 -> scale .25 ; base (no std) +-.5 -> +-.125
    # group 1: all answers agree -> H = 0, scale 1 -> +-.5
    answers = ["2", "2", "3", None, "7", "7"]
    x = inp([1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1], answers=answers)
    approx(per_sample(run("seed_grpo", x, std_normalize=False)), [0.125, 0.125, -0.125, -0.125, 0.5, -0.5])
    with pytest.raises(ValueError, match="answers"):
        run("seed_grpo", inp([1, 0], [0, 0]))


def test_ace_by_hand():
    # r = 1, 0 -> base (no std) .5, -.5 ; confidence shift of sample 1: (.3 - 0) + (.2 - 0) = .5
    # softplus(.5) = ln(1 + e^.5) = .974077 -> A_1 = -.5 * (1 + .974077) = -.987039 ; A_0 unchanged
    lp = torch.tensor([[0.9, 0.9], [0.3, 0.2]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    x = inp([1, 0], [0, 0], t=2, logprobs=lp, ref_logprobs=ref)
    approx(per_sample(run("ace", x, std_normalize=False)), [0.5, -0.987039])
    with pytest.raises(ValueError, match="ref_logprobs"):
        run("ace", inp([1, 0], [0, 0]))


# ------------------------------------------------------------ invariance for every estimator
def _rich_input(n_groups=3, g=4, t=5, seed=0) -> AdvantageInput:
    gen = torch.Generator().manual_seed(seed)
    n = n_groups * g
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    tr = torch.rand(n, t, generator=gen)
    tr = torch.where(torch.rand(n, t, generator=gen) < 0.5, tr, torch.full_like(tr, NAN))
    return AdvantageInput(
        rewards=torch.randint(0, 2, (n,), generator=gen).float(),
        group_ids=torch.arange(n_groups).repeat_interleave(g) * 7 + 3,
        mask=mask,
        reward_components={
            "acc": torch.randint(0, 2, (n,), generator=gen).float(),
            "fmt": torch.rand(n, generator=gen),
            "total": torch.rand(n, generator=gen),  # a composite's: gdpo's default takes acc, fmt
        },
        token_rewards=tr,
        values=torch.randn(n, t, generator=gen),
        logprobs=-torch.rand(n, t, generator=gen),
        ref_logprobs=-torch.rand(n, t, generator=gen),
        baseline_rewards=torch.rand(n, generator=gen),
        answers=[str(int(x)) for x in torch.randint(0, 3, (n,), generator=gen)],
        sum_pi2=torch.rand(n, t, generator=gen),  # optimal_token_baseline's sum_v pi_v^2
        entropies=torch.rand(n, t, generator=gen) * 3,  # pear's, with its thinking (1) / answer (2) phases
        phases=torch.randint(0, 3, (n, t), generator=gen) * mask.long(),
    )


def _permute(x: AdvantageInput, perm: torch.Tensor) -> AdvantageInput:
    return AdvantageInput(
        rewards=x.rewards[perm], group_ids=x.group_ids[perm], mask=x.mask[perm],
        reward_components={k: v[perm] for k, v in x.reward_components.items()},
        token_rewards=x.token_rewards[perm], values=x.values[perm], logprobs=x.logprobs[perm],
        ref_logprobs=x.ref_logprobs[perm], baseline_rewards=x.baseline_rewards[perm],
        answers=[x.answers[i] for i in perm.tolist()], sum_pi2=x.sum_pi2[perm], entropies=x.entropies[perm],
        phases=x.phases[perm],
    )


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_estimator_is_permutation_equivariant_and_finite(name):
    x = _rich_input()
    perm = torch.randperm(x.rewards.shape[0], generator=torch.Generator().manual_seed(1))
    a = run(name, x)
    b = run(name, _permute(x, perm))
    assert a.shape == x.mask.shape and torch.isfinite(a).all()
    assert torch.allclose(a[perm], b, atol=1e-5)
    assert (a * (1 - x.mask)).abs().sum() == 0  # zero on padding


# ------------------------------------------------------------ properties (hypothesis)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_rewards = st.lists(st.integers(-3, 3), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(_rewards, st.integers(1, 4), st.floats(0.5, 4.0), st.floats(-2.0, 2.0))
def test_group_baselines_sum_to_zero_and_grpo_is_affine_invariant(rewards, n_groups, scale, shift):
    groups = [i % n_groups for i in range(len(rewards))]
    x = inp([float(r) for r in rewards], groups, t=1)
    for name in ("grpo", "dr_grpo", "rloo", "gpg", "lite_ppo"):
        a = run(name, x)[:, 0].double()
        sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, torch.tensor(groups), a)
        assert sums.abs().max() < 1e-4, name
    y = inp([scale * r + shift for r in rewards], groups, t=1)
    assert torch.allclose(run("grpo", x, eps=0.0), run("grpo", y, eps=0.0), atol=1e-4)
