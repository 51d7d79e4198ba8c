"""verl's optimal token baseline: sum_v pi_v^2 from the fused log-prob pass, and the advantage by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput
from posttrain.config import load_config
from posttrain.models.logprobs import TokenLogProbs, completion_logprobs
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.trainers.rl_update import old_logprobs_mode

otb = ADVANTAGES.get("optimal_token_baseline")


def test_fused_sum_pi2_two_token_vocabulary_by_hand():
    # logits (0, ln 3): p = (1/4, 3/4), sum p^2 = 1/16 + 9/16 = 0.625
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [math.log(3.0)]])
    lp, ent, s2 = TokenLogProbs.apply(hidden, weight, None, torch.tensor([1]), 1.0, 4, False, True)
    assert s2.item() == pytest.approx(0.625, abs=1e-6)
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-6)
    # temperature 2: logits (0, ln 3 / 2): p = (1, sqrt 3) / (1 + sqrt 3), sum p^2 = 4 / (1 + sqrt 3)^2
    _, _, s2 = TokenLogProbs.apply(hidden, weight, None, torch.tensor([0]), 2.0, 4, True, True)
    assert s2.item() == pytest.approx(4.0 / (1.0 + math.sqrt(3.0)) ** 2, abs=1e-6)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_fused_sum_pi2_matches_full_softmax_and_leaves_logp_and_grads_unchanged(with_entropy):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 8, generator=g, dtype=torch.float64).float()
    weight = torch.randn(50, 8, generator=g)
    bias = torch.randn(50, generator=g)
    targets = torch.randint(0, 50, (37,), generator=g)
    z = (hidden @ weight.t() + bias) / 0.7
    expected = torch.exp(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))  # verl's formula

    def run(extra):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        out = TokenLogProbs.apply(h, w, b, targets, 0.7, 16, with_entropy, *extra)  # 3 chunks
        (out[0].sum() + (out[1].sum() if with_entropy else 0)).backward()
        return out, (h.grad, w.grad, b.grad)

    (lp0, ent0), grads0 = run(())
    (lp1, ent1, s2), grads1 = run((True,))
    torch.testing.assert_close(s2, expected, rtol=1e-5, atol=1e-7)
    assert not s2.requires_grad
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=0)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=0)
    for a, b in zip(grads0, grads1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_completion_logprobs_sum_pi2_equals_the_model_logits_formula():
    model, _ = tiny_model_and_tokenizer()
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    prompts = torch.randint(4, V, (3, 5), generator=g)
    prompt_mask = torch.ones(3, 5, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completions = torch.randint(4, V, (3, 4), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    with torch.no_grad():
        lp, _, s2 = completion_logprobs(model, prompts, prompt_mask, completions, completion_mask, with_sum_pi2=True)
        lp_plain, _ = completion_logprobs(model, prompts, prompt_mask, completions, completion_mask)
        for i in range(3):
            ids = torch.cat([prompts[i][prompt_mask[i] > 0], completions[i][completion_mask[i] > 0]])[None]
            logits = model(ids).logits[0].float()
            n_p, n_c = int(prompt_mask[i].sum()), int(completion_mask[i].sum())
            z = logits[n_p - 1: n_p - 1 + n_c]
            ref = torch.exp(torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1))
            torch.testing.assert_close(s2[i, :n_c], ref, rtol=1e-4, atol=1e-6)
            assert torch.all(s2[i, n_c:] == 0)
    torch.testing.assert_close(lp, lp_plain, rtol=0, atol=0)
    assert torch.all((s2 > 0) & (s2 <= 1) | (completion_mask == 0))


def _example(token_rewards=None):
    # A: reward 1, 2 tokens, pi = 0.5, sum pi^2 = 0.5 -> w = 1 - 1 + 0.5 = 0.5 per token, W = (0.5, 1.0)
    # B: reward 0, 1 token, pi = 0.25, sum pi^2 = 0.25 -> w = 1 - 0.5 + 0.25 = 0.75, W = (0.75, -)
    # C: reward 2, alone in its group: no baseline
    return AdvantageInput(
        rewards=torch.tensor([1.0, 0.0, 2.0]), group_ids=torch.tensor([0, 0, 1]),
        mask=torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
        logprobs=torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.9], [0.3, 0.3]])),
        sum_pi2=torch.tensor([[0.5, 0.5], [0.25, 0.9], [0.2, 0.2]]), token_rewards=token_rewards)


def test_otb_by_hand():
    adv = otb(_example(), AdvantageConfig())
    # t = 0: B = (1 * 0.5 + 0 * 0.75) / 1.25 = 0.4;  t = 1: only A is there: B = 1 * 1.0 / 1.0 = 1
    expected = torch.tensor([[1 - 0.4, 1 - 1.0], [0 - 0.4, 0.0], [2.0, 2.0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)


def test_otb_reward_to_go_of_token_rewards():
    # a KL penalty of 0.1 on A's first token (NaN counts as 0): G_A = (1.1, 1.0)
    tr = torch.tensor([[0.1, float("nan")], [0.0, 0.0], [0.0, 0.0]])
    adv = otb(_example(tr), AdvantageConfig())
    b0 = (1.1 * 0.5) / 1.25  # = 0.44
    expected = torch.tensor([[1.1 - b0, 0.0], [-b0, 0.0], [2.0, 2.0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)


def test_otb_weights_the_baseline_by_energy_not_uniformly():
    # equal energies would give the group mean; A's larger energy pulls B_0 toward A's return
    inp = _example()
    inp.sum_pi2 = torch.tensor([[0.9, 0.9], [0.25, 0.9], [0.2, 0.2]])  # A: w = 0.9
    adv = otb(inp, AdvantageConfig())
    b0 = 0.9 / (0.9 + 0.75)
    assert adv[0, 0].item() == pytest.approx(1 - b0, abs=1e-7)
    assert b0 > 0.5  # not the group mean


def test_otb_without_sum_pi2_names_it():
    inp = _example()
    inp.sum_pi2 = None
    with pytest.raises(ValueError, match="sum_pi2"):
        otb(inp, AdvantageConfig())


def test_otb_recomputes_old_logprobs_in_the_sum_pi2_pass():
    base = ["model.name=tiny-random", "rollout.num_completions=4"]
    cfg = load_config(None, [*base, "algorithm.advantage_estimator=optimal_token_baseline"])
    assert old_logprobs_mode(cfg) == "recompute"  # the pass runs anyway, and gives the old log-probs
    assert old_logprobs_mode(load_config(None, base)) == "current"
