"""Masks select, never multiply: NaN / inf at masked positions change no loss, weight, metric or
gradient at an unmasked position (issue 22, item 5).

Each property compares a "clean" batch, whose masked positions hold 0, with the same batch whose
masked positions hold garbage (NaN, +-inf, +-1e30). Both must give bit-identical values and
gradients at unmasked positions; the gradient reaching a masked position must be exactly 0 (a
NaN there would flow back into the model's weights).
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms import (
    AGGREGATIONS,
    CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    CorrectionConfig,
    CorrectionInput,
    PolicyLossConfig,
    PolicyLossInput,
    aggregate,
    kl_estimate,
    kl_in_reward,
    mismatch_metrics,
    top_entropy_mask,
)
from posttrain.algorithms.aggregation import masked_mean

GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30)
COUNTS = dict(num_tokens=7.0, num_seqs=3.0, norm_length=6.0)
EXAMPLES = 20


@st.composite
def batches(draw):
    """(mask, finite fields, garbage per field) for an [N, T] batch; some rows may be empty."""
    n = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, t, generator=g) < draw(st.sampled_from([0.3, 0.6, 0.9]))).float()
    fields = {
        "logprobs": -3.0 * torch.rand(n, t, generator=g),
        "old_logprobs": -3.0 * torch.rand(n, t, generator=g),
        "behaviour_logprobs": -3.0 * torch.rand(n, t, generator=g),
        "advantages": 4.0 * torch.rand(n, t, generator=g) - 2.0,
        "is_weights": 2.0 * torch.rand(n, t, generator=g),
        "entropy": 2.0 * torch.rand(n, t, generator=g),
    }
    junk = {k: torch.tensor(draw(st.lists(st.sampled_from(GARBAGE), min_size=n * t, max_size=n * t))).view(n, t)
            for k in fields}
    zeroed = {k: torch.where(mask > 0, v, 0.0) for k, v in fields.items()}
    dirty = {k: torch.where(mask > 0, v, junk[k]) for k, v in fields.items()}
    return mask, zeroed, dirty


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.isfinite(b).all(), f"{what}: non-finite {b}"
    assert torch.equal(a, b), f"{what}: {a} != {b}"


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


def _policy_loss(name: str, mask, f: dict, mode: str, with_weights: bool):
    logp = _leaf(f["logprobs"])
    inp = PolicyLossInput(logprobs=logp, old_logprobs=f["old_logprobs"], advantages=f["advantages"], mask=mask,
                          is_weights=f["is_weights"] if with_weights else None,
                          behaviour_logprobs=f["behaviour_logprobs"], entropy=f["entropy"])
    torch.manual_seed(0)  # clip_cov draws its tokens from the global RNG
    out = POLICY_LOSSES.get(name)(inp, PolicyLossConfig())
    value = aggregate(out.loss, mask, mode, **COUNTS)
    value.backward()
    return value.detach(), out, logp.grad


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
@settings(max_examples=EXAMPLES)
@given(batch=batches(), mode=st.sampled_from(AGGREGATIONS), with_weights=st.booleans())
def test_policy_losses_ignore_garbage_at_masked_positions(name, batch, mode, with_weights, examples):
    examples[f"masked garbage: policy loss {name}"] += 1
    mask, zeroed, dirty = batch
    v0, out0, g0 = _policy_loss(name, mask, zeroed, mode, with_weights)
    v1, out1, g1 = _policy_loss(name, mask, dirty, mode, with_weights)
    _same(v0, v1, f"{name} {mode} loss")
    _same(g0, g1, f"{name} {mode} gradient")
    assert torch.all(g1[mask == 0] == 0), "a gradient reached a masked position"
    _same(out0.loss, out1.loss, f"{name} per-token loss")
    assert torch.all(out1.loss[mask == 0] == 0)
    assert out0.metrics.keys() == out1.metrics.keys()
    for key in out0.metrics:
        _same(out0.metrics[key], out1.metrics[key], f"{name} metric {key}")


@settings(max_examples=EXAMPLES)
@given(batch=batches(), mode=st.sampled_from(AGGREGATIONS))
def test_aggregation_ignores_garbage_at_masked_positions(batch, mode, examples):
    examples["masked garbage: aggregate"] += 1
    mask, zeroed, dirty = batch
    results = []
    for f in (zeroed, dirty):
        x = _leaf(f["advantages"])
        value = aggregate(x, mask, mode, **COUNTS)
        value.backward()
        results.append((value.detach(), x.grad))
    _same(results[0][0], results[1][0], f"aggregate {mode}")
    _same(results[0][1], results[1][1], f"aggregate {mode} gradient")
    assert torch.all(results[1][1][mask == 0] == 0)


def test_aggregation_of_all_garbage_is_zero():
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = torch.tensor([[2.0, float("nan"), float("inf")], [float("-inf"), float("nan"), 1e30]])
    for mode in AGGREGATIONS:
        value = aggregate(loss, mask, mode, num_tokens=1.0, num_seqs=2.0, norm_length=3.0)
        assert math.isfinite(float(value)) and float(value) > 0, mode


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
@settings(max_examples=EXAMPLES)
@given(batch=batches(), mode=st.sampled_from(AGGREGATIONS))
def test_kl_estimators_ignore_garbage_at_masked_positions(kind, batch, mode, examples):
    examples[f"masked garbage: kl {kind}"] += 1
    mask, zeroed, dirty = batch
    results = []
    for f in (zeroed, dirty):
        logp = _leaf(f["logprobs"])
        kl = kl_estimate(logp, f["old_logprobs"], kind, mask=mask)
        value = aggregate(kl, mask, mode, **COUNTS)
        value.backward()
        results.append((kl.detach(), value.detach(), logp.grad))
    (k0, v0, g0), (k1, v1, g1) = results
    _same(k0, k1, f"kl {kind} per token")
    _same(v0, v1, f"kl {kind} {mode}")
    _same(g0, g1, f"kl {kind} gradient")
    assert torch.all(g1[mask == 0] == 0)
    # Without the mask (rl_update's call today) the value is still protected by aggregate().
    unmasked = aggregate(kl_estimate(dirty["logprobs"], dirty["old_logprobs"], kind), mask, mode, **COUNTS)
    _same(v0, unmasked, f"kl {kind} {mode} without mask")


@settings(max_examples=EXAMPLES)
@given(batch=batches(), mode=st.sampled_from(AGGREGATIONS), quantile=st.sampled_from([1.0, 0.5, 0.2]))
def test_entropy_terms_ignore_garbage_at_masked_positions(batch, mode, quantile, examples):
    examples["masked garbage: entropy"] += 1
    mask, zeroed, dirty = batch
    results = []
    for f in (zeroed, dirty):
        ent = _leaf(f["entropy"])
        keep = top_entropy_mask(f["entropy"], mask, quantile)
        bonus = aggregate(ent, keep, mode, **COUNTS)
        bonus.backward()
        results.append((keep, bonus.detach(), ent.grad, masked_mean(f["entropy"], mask)))
    for a, b, what in zip(results[0], results[1], ("80/20 mask", "bonus", "gradient", "mean")):
        _same(a, b, f"entropy {what}")
    assert torch.all(results[1][2][mask == 0] == 0)


@pytest.mark.parametrize("estimator", ["k1", "k3", "low_var_kl"])
@settings(max_examples=EXAMPLES)
@given(batch=batches())
def test_kl_in_reward_ignores_garbage_at_masked_positions(estimator, batch, examples):
    examples["masked garbage: kl in reward"] += 1
    mask, zeroed, dirty = batch
    r0 = kl_in_reward(None, zeroed["old_logprobs"], zeroed["behaviour_logprobs"], mask, 0.1, estimator)
    r1 = kl_in_reward(None, dirty["old_logprobs"], dirty["behaviour_logprobs"], mask, 0.1, estimator)
    _same(r0, r1, "kl in reward")
    assert torch.all(r1[mask == 0] == 0)


@pytest.mark.parametrize("name", CORRECTIONS.names())
@settings(max_examples=EXAMPLES)
@given(batch=batches(), threshold=st.sampled_from([1.2, 2.0, 5.0]), kl_threshold=st.sampled_from([0.01, 0.5]))
def test_corrections_ignore_garbage_at_masked_positions(name, batch, threshold, kl_threshold, examples):
    examples[f"masked garbage: correction {name}"] += 1
    mask, zeroed, dirty = batch
    cfg = CorrectionConfig(name=name, threshold_high=threshold, kl_threshold=kl_threshold)
    o0, o1 = (CORRECTIONS.get(name)(CorrectionInput(f["behaviour_logprobs"], f["old_logprobs"], mask), cfg)
              for f in (zeroed, dirty))
    _same(o0.weights, o1.weights, f"{name} weights")
    _same(o0.mask, o1.mask, f"{name} mask")
    assert torch.all(o1.weights[mask == 0] == 0) and torch.all(o1.mask[mask == 0] == 0)
    for key in o0.metrics:
        _same(o0.metrics[key], o1.metrics[key], f"{name} metric {key}")
    m0, m1 = (mismatch_metrics(f["behaviour_logprobs"], f["old_logprobs"], mask) for f in (zeroed, dirty))
    for key in m0:
        _same(m0[key], m1[key], f"mismatch metric {key}")


def test_a_rejected_token_holding_garbage_is_ignored_too():
    """The loss mask after a correction: a rejected (not padded) token may hold anything."""
    mask = torch.ones(1, 3)
    behaviour = torch.tensor([[-1.0, -1.0, -30.0]])  # ratio e^29 at t=2: icepop rejects it
    old = torch.tensor([[-1.0, -1.2, -1.0]])
    corr = CORRECTIONS.get("icepop")(CorrectionInput(behaviour, old, mask), CorrectionConfig(name="icepop"))
    assert corr.mask.tolist() == [[1.0, 1.0, 0.0]]
    adv = torch.tensor([[1.0, 1.0, float("nan")]])
    logp = _leaf(torch.tensor([[-1.0, -1.1, float("inf")]]))
    out = POLICY_LOSSES.get("ppo_clip")(
        PolicyLossInput(logprobs=logp, old_logprobs=old, advantages=adv, mask=corr.mask, is_weights=corr.weights),
        PolicyLossConfig())
    value = aggregate(out.loss, corr.mask, "token-mean", num_tokens=2.0, num_seqs=1.0, norm_length=3.0)
    value.backward()
    assert math.isfinite(float(value.detach())) and torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0


# ---------------------------------------------------------------- the count after a correction
def _stub_step(correction: str, mask: torch.Tensor, behaviour: torch.Tensor, old: torch.Tensor) -> float:
    """RLUpdate.prepare + update on a stub learner whose log-probs are ``old`` (advantages set to
    1 after prepare, so gpg's per-token loss is -logp); returns the logged loss/policy."""
    from posttrain.config import load_config
    from posttrain.rollout.batch import Rollouts
    from posttrain.trainers.rl_update import RLUpdate

    cfg = load_config(overrides=["model.name=tiny-random", f"algorithm.correction.name={correction}",
                                 "algorithm.aggregation=token-mean", "algorithm.policy_loss=gpg",
                                 "trainer.old_logprobs=recompute"])
    n, t = mask.shape

    class StubLearner:
        critic = None
        ref = None
        fsdp = None
        moe = None  # a dense model (the Learner's MoE routing handle, models/moe.py)
        optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}])

        def logprobs(self, batch, which="policy"):
            return old[: len(batch)].clone()

        def zero_grad(self):
            pass

        def forward_backward(self, batch, loss_fn, with_entropy=False, value_loss_fn=None):
            return float(loss_fn(batch, batch.old_logprobs.clone().requires_grad_(True), None).detach())

        def clip_grad_norm(self):
            return 0.0

        def optim_step(self, lr_factor):
            return {}

    rollouts = Rollouts(
        prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.zeros(n, t, dtype=torch.long), completion_mask=mask,
        group_ids=torch.zeros(n, dtype=torch.long), behaviour_logprobs=behaviour, entropies=torch.zeros(n, t),
        truncated=torch.zeros(n, dtype=torch.bool), texts=[""] * n, problems=[None] * n, rewards=torch.zeros(n))
    update = RLUpdate(cfg, StubLearner())
    update.entropy_ctl.value = 0.0
    update.prepare(rollouts)
    rollouts.advantages = torch.ones(n, t)
    return update.update(rollouts, [torch.arange(n)], 0)["loss/policy"]


def test_the_token_count_without_a_rejection():
    mask = torch.ones(2, 2)
    lp = torch.full((2, 2), -1.0)
    # gpg: l = -logp * A = 1 per token; token-mean over 4 tokens = 1
    assert _stub_step("tis_token", mask, lp, lp) == pytest.approx(1.0)


def test_the_token_count_is_the_kept_count_after_a_rejecting_correction():
    mask = torch.ones(2, 2)
    old = torch.full((2, 2), -1.0)
    behaviour = old.clone()
    behaviour[1] = -30.0  # row 1's ratio pi_old / mu is huge: mis_sequence rejects the whole row
    # kept: row 0's 2 tokens, each l = 1, so the token mean over the kept tokens is 1 (counting the rejected row too would give 2 / 4)
    assert _stub_step("mis_sequence", mask, behaviour, old) == pytest.approx(1.0)
