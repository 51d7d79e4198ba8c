"""Aggregation by hand, and micro-batch / permutation invariance of (loss, aggregation) pairs."""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import AGGREGATIONS, POLICY_LOSSES, PolicyLossConfig, PolicyLossInput, aggregate

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 10 / 4 tokens = 2.5
        ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # (2 + 4) / 2 = 3
        ("seq-mean-token-sum", (6 + 4) / 2),  # 5
        ("seq-mean-token-sum-norm", (6 + 4) / (2 * 3)),  # 10 / 6
        ("token-sum", 10.0),
    ],
)
def test_aggregation_by_hand(mode, expected):
    got = aggregate(LOSS, MASK, mode, num_tokens=4, num_seqs=2, norm_length=3)
    assert got.item() == pytest.approx(expected)


def test_unknown_mode():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(LOSS, MASK, "mean", num_tokens=4, num_seqs=2, norm_length=3)


# Token-local losses: each token's loss depends only on its own sequence, so splitting the
# mini-batch must not change anything. KL-Cov / Clip-Cov are batch-dependent by design.
# kl_cov / clip_cov select tokens and hapo sets its clip bounds from quantiles of the tokens it is
# given: all three depend on the micro-batch by design (their docstrings say so)
BATCH_DEPENDENT_LOSSES = ("kl_cov", "clip_cov", "hapo")
INVARIANT_LOSSES = [n for n in POLICY_LOSSES.names() if n not in BATCH_DEPENDENT_LOSSES]


def _batch(seed=0, n=6, t=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])[:n]
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).double()
    logp = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 2
    old = logp + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    adv = (torch.randn(n, 1, generator=gen, dtype=torch.float64) * torch.ones(n, t, dtype=torch.float64)) * mask
    behaviour = old + 0.05 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    isw = 0.5 + torch.rand(n, t, generator=gen, dtype=torch.float64)
    return logp, old, adv, mask, behaviour, isw


def _loss_and_grad(name, mode, logp, old, adv, mask, behaviour, isw, splits, counts, entropy=None):
    """Sum over micro-batches of aggregate(loss) with global counts; returns (value, grad)."""
    leaf = logp.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    cfg = PolicyLossConfig(gspo_clip_low=0.2, gspo_clip_high=0.2)
    for idx in splits:
        x = PolicyLossInput(
            logprobs=leaf[idx], old_logprobs=old[idx], advantages=adv[idx], mask=mask[idx],
            behaviour_logprobs=behaviour[idx], is_weights=isw[idx],
            entropy=None if entropy is None else entropy[idx],
        )
        out = POLICY_LOSSES.get(name)(x, cfg)
        total = total + aggregate(out.loss, mask[idx], mode, **counts)
    total.backward()
    return total.detach(), leaf.grad.detach()


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("name", INVARIANT_LOSSES)
def test_micro_batch_and_permutation_invariance(name, mode):
    logp, old, adv, mask, behaviour, isw = _batch()
    n = logp.shape[0]
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float(n), "norm_length": float(mask.shape[1])}
    args = (logp, old, adv, mask, behaviour, isw)
    full, g_full = _loss_and_grad(name, mode, *args, [torch.arange(n)], counts)
    # uneven micro-batches, out of order
    splits = [torch.tensor([4]), torch.tensor([0, 1, 5]), torch.tensor([2, 3])]
    micro, g_micro = _loss_and_grad(name, mode, *args, splits, counts)
    assert micro.item() == pytest.approx(full.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(g_micro, g_full, atol=1e-12)
    # permuting the samples permutes the gradient and leaves the loss unchanged
    perm = torch.tensor([3, 5, 0, 2, 4, 1])
    permuted = tuple(a[perm] for a in args)
    p_loss, g_perm = _loss_and_grad(name, mode, *permuted, [torch.arange(n)], counts)
    assert p_loss.item() == pytest.approx(full.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(g_perm, g_full[perm], atol=1e-12)


def test_kl_cov_is_permutation_invariant_on_the_full_batch():
    # batch-dependent selection, but it does not depend on sample order (no ties here)
    logp, old, adv, mask, behaviour, isw = _batch()
    n = logp.shape[0]
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float(n), "norm_length": 5.0}
    adv = adv + 0.01 * torch.arange(n * 5, dtype=torch.float64).reshape(n, 5) * mask  # break ties
    args = (logp, old, adv, mask, behaviour, isw)
    full, g_full = _loss_and_grad("kl_cov", "token-mean", *args, [torch.arange(n)], counts)
    perm = torch.tensor([3, 5, 0, 2, 4, 1])
    p_loss, g_perm = _loss_and_grad("kl_cov", "token-mean", *(a[perm] for a in args), [torch.arange(n)], counts)
    assert p_loss.item() == pytest.approx(full.item())
    assert torch.allclose(g_perm, g_full[perm])


def test_hapo_is_permutation_invariant_on_the_full_batch():
    # hapo's entropy quantile is taken over the batch it is given; sample order must not matter
    logp, old, adv, mask, behaviour, isw = _batch()
    n = logp.shape[0]
    entropy = torch.rand(n, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    counts = {"num_tokens": float(mask.sum()), "num_seqs": float(n), "norm_length": 5.0}
    args = (logp, old, adv, mask, behaviour, isw)
    full, g_full = _loss_and_grad("hapo", "token-mean", *args, [torch.arange(n)], counts, entropy=entropy)
    perm = torch.tensor([3, 5, 0, 2, 4, 1])
    p_loss, g_perm = _loss_and_grad("hapo", "token-mean", *(a[perm] for a in args), [torch.arange(n)], counts,
                                    entropy=entropy[perm])
    assert p_loss.item() == pytest.approx(full.item())
    assert torch.allclose(g_perm, g_full[perm])
    assert g_full.abs().sum() > 0
